//! NBD wire format: constants and pure encode/decode functions, no I/O. Numbers are from the
//! protocol specification (NetworkBlockDevice/nbd, doc/proto.md); everything is big-endian.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERROR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR | 9;

// NBD_INFO_* types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAGS_KNOWN: u16 = 0x1f;

// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Error numbers on the wire.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Strings (export names, queries) are at most this long (spec limit).
pub const MAX_STRING: usize = 4096;

/// A transmission-phase command, decoded once from its number; an unknown one keeps its
/// number (it gets EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_wire(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(v) => v,
        }
    }

    /// Whether it changes the export's content (refused on read-only exports).
    pub fn writes(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl Request {
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: Command::from_wire(u16::from_be_bytes([b[6], b[7]])),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Bounds-checked big-endian reader for option payloads.
pub struct Cursor<'a> {
    buf: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed option payload")]
pub struct Malformed;

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf }
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A `u32` length-prefixed UTF-8 string of at most `MAX_STRING` bytes.
    pub fn string(&mut self) -> Result<&'a str, Malformed> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(Malformed);
        }
        std::str::from_utf8(self.take(n)?).map_err(|_| Malformed)
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload: export name and the info types requested.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub requests: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    pub fn decode(data: &'a [u8]) -> Result<InfoRequest<'a>, Malformed> {
        let mut c = Cursor::new(data);
        let name = c.string()?;
        let n = c.u16()?;
        let requests = (0..n).map(|_| c.u16()).collect::<Result<Vec<_>, _>>()?;
        if !c.is_empty() {
            return Err(Malformed);
        }
        Ok(InfoRequest { name, requests })
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub name: &'a str,
    pub queries: Vec<&'a str>,
}

impl<'a> MetaContextRequest<'a> {
    pub fn decode(data: &'a [u8]) -> Result<MetaContextRequest<'a>, Malformed> {
        let mut c = Cursor::new(data);
        let name = c.string()?;
        let n = c.u32()?;
        // Each query takes at least 4 bytes: bound the count before allocating.
        if n as usize > data.len() / 4 {
            return Err(Malformed);
        }
        let queries = (0..n).map(|_| c.string()).collect::<Result<Vec<_>, _>>()?;
        if !c.is_empty() {
            return Err(Malformed);
        }
        Ok(MetaContextRequest { name, queries })
    }
}

/// Whether meta context `name` answers `query`. LIST accepts a bare namespace or a prefix
/// ending in ':' (e.g. `base:` or `qemu:dirty-bitmap:`) for "all contexts under it"; SET
/// selects exact names only.
pub fn context_matches(query: &str, name: &str, listing: bool) -> bool {
    query == name || (listing && query.ends_with(':') && name.starts_with(query))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_rejects_bad_magic() {
        let r = Request { flags: 1, command: Command::Write, cookie: 0xdead_beef, offset: 1 << 40, length: 4096 };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] ^= 0xff;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn option_payload_decoders_reject_malformed_input() {
        let mut go = Vec::new();
        go.extend_from_slice(&4u32.to_be_bytes());
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(InfoRequest::decode(&go), Ok(InfoRequest { name: "disk", requests: vec![1, 3] }));
        assert_eq!(InfoRequest::decode(&go[..go.len() - 1]), Err(Malformed));
        let mut long = go.clone();
        long.push(0);
        assert_eq!(InfoRequest::decode(&long), Err(Malformed));
        let huge = [0xffu8; 8];
        assert_eq!(MetaContextRequest::decode(&huge), Err(Malformed));
    }

    #[test]
    fn context_queries_match_exact_names_and_namespaces_when_listing() {
        assert!(context_matches("base:allocation", "base:allocation", false));
        assert!(context_matches("base:", "base:allocation", true));
        assert!(!context_matches("base:", "base:allocation", false));
        assert!(context_matches("qemu:dirty-bitmap:", "qemu:dirty-bitmap:s1", true));
        assert!(!context_matches("qemu:dirty-bitmap:s", "qemu:dirty-bitmap:s1", true));
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = InfoRequest::decode(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let mut req = [0u8; REQUEST_LEN];
            for b in req.iter_mut() {
                *b = next() as u8;
            }
            let _ = Request::decode(&req);
        }
    }
}
