//! Long-running operations (verify, export, GC; later copies) run as jobs: started by the
//! operations layer, answered at once with a job id, polled by the CLI for progress. The
//! store counts a job's progress in [`Job::done`]/[`Job::total`] as it works.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::engine::ErrorKind;

/// Jobs kept for `GET /v1/jobs/ID` (the oldest go first); they are not kept over a restart.
const KEPT: usize = 100;

/// One running or finished job.
pub struct Job {
    pub id: u64,
    pub kind: String,
    pub target: String,
    /// The account of who started it: only its callers (and administrators) see it.
    pub account: String,
    /// Progress, in the job's unit (blobs verified, bytes exported).
    pub done: AtomicU64,
    pub total: AtomicU64,
    started: Instant,
    outcome: Mutex<Option<Result<serde_json::Value, (ErrorKind, String)>>>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub id: u64,
    pub kind: String,
    pub target: String,
    #[serde(default)]
    pub account: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    pub done: u64,
    pub total: u64,
    pub rate: u64,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub error_kind: Option<ErrorKind>,
}

impl Job {
    pub fn view(&self) -> JobView {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let (state, result, error, error_kind) = match &*self.outcome.lock() {
            None => ("running", None, None, None),
            Some(Ok(v)) => ("done", Some(v.clone()), None, None),
            Some(Err((k, m))) => ("failed", None, Some(m.clone()), Some(*k)),
        };
        JobView {
            id: self.id,
            kind: self.kind.clone(),
            target: self.target.clone(),
            account: self.account.clone(),
            state: state.into(),
            done,
            total: self.total.load(Ordering::Relaxed),
            rate: (done as f64 / secs) as u64,
            result,
            error,
            error_kind,
        }
    }
}

/// The daemon's jobs, run on its main runtime whichever thread started them.
pub struct Jobs {
    jobs: Mutex<HashMap<u64, Arc<Job>>>,
    next: AtomicU64,
    runtime: tokio::runtime::Handle,
}

impl Jobs {
    pub fn new(runtime: tokio::runtime::Handle) -> Jobs {
        Jobs { jobs: Mutex::new(HashMap::new()), next: AtomicU64::new(1), runtime }
    }

    pub fn get(&self, id: u64) -> Option<JobView> {
        self.jobs.lock().get(&id).map(|j| j.view())
    }

    /// Runs `work` as a job of `account` in the background; returns its first view at once.
    /// Its error is kept as its kind and sentence.
    pub fn spawn<F, Fut, T, E>(&self, kind: &str, target: &str, account: &str, work: F) -> JobView
    where
        F: FnOnce(Arc<Job>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize,
        E: std::fmt::Display + HasKind,
    {
        let job = Arc::new(Job {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            kind: kind.into(),
            target: target.into(),
            account: account.into(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            started: Instant::now(),
            outcome: Mutex::new(None),
        });
        {
            let mut jobs = self.jobs.lock();
            if jobs.len() >= KEPT {
                if let Some(oldest) = jobs.keys().min().copied() {
                    jobs.remove(&oldest);
                }
            }
            jobs.insert(job.id, job.clone());
        }
        let j = job.clone();
        self.runtime.spawn(async move {
            let outcome = work(j.clone())
                .await
                .map(|v| serde_json::to_value(v).unwrap_or_default())
                .map_err(|e| (e.kind(), e.to_string()));
            *j.outcome.lock() = Some(outcome);
        });
        job.view()
    }
}

/// An error a job can end with: it keeps the class for the API.
pub trait HasKind {
    fn kind(&self) -> ErrorKind;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Refused;
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("refused")
        }
    }
    impl HasKind for Refused {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Busy
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_job_reports_its_result_or_its_error_and_only_the_last_ones_are_kept() {
        let jobs = Jobs::new(tokio::runtime::Handle::current());
        let ok = jobs.spawn("count", "x", "default", |job| async move {
            job.total.store(2, Ordering::Relaxed);
            job.done.store(2, Ordering::Relaxed);
            Ok::<_, Refused>(7u32)
        });
        let failed = jobs.spawn("count", "y", "default", |_| async { Err::<u32, _>(Refused) });
        let ended = |id| loop {
            let v = jobs.get(id).unwrap();
            if v.state != "running" {
                return v;
            }
            std::thread::yield_now();
        };
        let (ok, failed) = (ended(ok.id), ended(failed.id));
        assert_eq!((ok.state.as_str(), ok.result, ok.done, ok.total), ("done", Some(serde_json::json!(7)), 2, 2));
        assert_eq!(failed.state, "failed");
        assert_eq!((failed.error.as_deref(), failed.error_kind), (Some("refused"), Some(ErrorKind::Busy)));
        for _ in 0..KEPT {
            jobs.spawn("noop", "z", "default", |_| async { Ok::<_, Refused>(()) });
        }
        assert!(jobs.get(ok.id).is_none(), "the oldest job made room");
    }
}
