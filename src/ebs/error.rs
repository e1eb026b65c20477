//! The facade's one error type, and the one place it becomes an AWS error: the HTTP status of
//! the API model, the `x-amzn-ErrorType` header and a JSON body `{"Message", "Reason"}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use crate::engine::ErrorKind;
use crate::service::Error;

/// The AWS error shapes of the EBS direct API model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Validation,
    ResourceNotFound,
    AccessDenied,
    RequestThrottled,
    Conflict,
    ServiceQuotaExceeded,
    Internal,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::Validation => "ValidationException",
            Code::ResourceNotFound => "ResourceNotFoundException",
            Code::AccessDenied => "AccessDeniedException",
            Code::RequestThrottled => "RequestThrottledException",
            Code::Conflict => "ConflictException",
            Code::ServiceQuotaExceeded => "ServiceQuotaExceededException",
            Code::Internal => "InternalServerException",
        }
    }

    /// The status the API model gives each shape.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Validation | Code::RequestThrottled => StatusCode::BAD_REQUEST,
            Code::ResourceNotFound => StatusCode::NOT_FOUND,
            Code::AccessDenied => StatusCode::FORBIDDEN,
            Code::Conflict => StatusCode::CONFLICT,
            Code::ServiceQuotaExceeded => StatusCode::PAYMENT_REQUIRED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EbsError {
    pub code: Code,
    pub message: String,
    /// The shape's `Reason` member, where it has one.
    pub reason: Option<&'static str>,
}

impl EbsError {
    pub fn new(code: Code, reason: Option<&'static str>, message: impl Into<String>) -> EbsError {
        EbsError { code, message: message.into(), reason }
    }

    pub fn validation(reason: &'static str, message: impl Into<String>) -> EbsError {
        EbsError::new(Code::Validation, Some(reason), message)
    }

    pub fn denied(message: impl Into<String>) -> EbsError {
        EbsError::new(Code::AccessDenied, Some("UNAUTHORIZED_ACCOUNT"), message)
    }

    pub fn response(&self, request_id: &str) -> Response<Full<Bytes>> {
        let mut body = serde_json::json!({ "Message": self.message, "message": self.message });
        if let Some(r) = self.reason {
            body["Reason"] = r.into();
        }
        Response::builder()
            .status(self.code.status())
            .header("x-amzn-ErrorType", self.code.name())
            .header("x-amzn-RequestId", request_id)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

impl From<Error> for EbsError {
    fn from(e: Error) -> EbsError {
        let message = e.to_string();
        if let Error::Rule { reason, .. } = e {
            return EbsError::validation(reason, message);
        }
        let (code, reason) = match e.kind() {
            ErrorKind::Invalid | ErrorKind::ReadOnly => (Code::Validation, Some("INVALID_PARAMETER_VALUE")),
            ErrorKind::NotFound | ErrorKind::Gone => (Code::ResourceNotFound, Some("SNAPSHOT_NOT_FOUND")),
            ErrorKind::AlreadyExists | ErrorKind::Busy => (Code::Conflict, None),
            ErrorKind::Forbidden | ErrorKind::Unauthenticated => (Code::AccessDenied, Some("UNAUTHORIZED_ACCOUNT")),
            ErrorKind::Throttled => (Code::RequestThrottled, Some("ACCOUNT_THROTTLED")),
            ErrorKind::Quota => (Code::ServiceQuotaExceeded, None),
            ErrorKind::NoSpace | ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::Unavailable | ErrorKind::NotLocal => {
                (Code::Internal, None)
            }
        };
        EbsError::new(code, reason, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;

    #[test]
    fn service_errors_become_the_aws_shapes_with_their_status() {
        let e: EbsError = Error::Rule { reason: "INVALID_BLOCK", message: "past the end".into() }.into();
        assert_eq!((e.code, e.reason, e.code.status().as_u16()), (Code::Validation, Some("INVALID_BLOCK"), 400));
        let e: EbsError = Error::from(EngineError::NotFound("no snapshot".into())).into();
        assert_eq!((e.code.name(), e.code.status().as_u16()), ("ResourceNotFoundException", 404));
        let e: EbsError = Error::Forbidden("role reader lacks".into()).into();
        assert_eq!((e.code.name(), e.code.status().as_u16()), ("AccessDeniedException", 403));
        let e: EbsError = Error::from(EngineError::AlreadyExists("token".into())).into();
        assert_eq!((e.code.name(), e.code.status().as_u16()), ("ConflictException", 409));
        let e: EbsError = Error::Limit { message: "busy".into(), retry_after: Some(1) }.into();
        assert_eq!((e.code.name(), e.code.status().as_u16()), ("RequestThrottledException", 400));
        let r = e.response("id");
        assert_eq!(r.headers()["x-amzn-ErrorType"], "RequestThrottledException");
    }
}
