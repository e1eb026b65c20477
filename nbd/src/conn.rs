//! One NBD connection: the fixed-newstyle handshake, then the transmission phase.
//!
//! Shape: the connection task reads requests and runs each one inline (most complete at
//! once: a page-cache read or write), or on a task of its own when the export says it may
//! wait (FLUSH, FUA), so later requests are not held up and replies come out of order. A
//! writer task owns the socket's write half and batches replies; reply buffers flow back to
//! the reader for reuse, so a steady stream of requests allocates nothing.
//!
//! Memory is bounded per connection ([`Budget`]): the reader takes a request's bytes from the
//! connection's budget before it reads the payload or runs the request, the writer gives them
//! back once the reply is written. A client that sends requests and never reads the replies
//! stops being read (backpressure) instead of making the server hold every reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, Semaphore};

use crate::export::{Export, ExportCatalog, ExportError, ReadKind, RequestKind, ZeroFlags};
use crate::tls::{Peer, Tls, TlsAcceptor};
use crate::wire::*;

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests running on their own tasks at once, per connection.
    pub max_in_flight: usize,
    /// Largest READ/WRITE payload accepted (advertised as the maximum block size by exports).
    pub max_payload: u32,
    /// Bytes of request and reply data one connection may hold: WRITE payloads read, READ
    /// data, replies waiting for a client to read them, and reply buffers kept for reuse
    /// (as much again). Past it the connection stops reading requests until replies drain.
    pub max_buffered: usize,
    /// Requests accepted whose reply is not written yet, per connection; past it, the same
    /// backpressure.
    pub max_requests: usize,
    /// Time a client has, from connecting, to finish the handshake ([`serve_connection`]).
    pub handshake_timeout: Duration,
    /// NBD_OPT_STARTTLS: off, on at the client's choice, or required.
    pub tls: Tls,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_in_flight: 64,
            max_payload: 32 << 20,
            max_buffered: 64 << 20,
            max_requests: 256,
            handshake_timeout: Duration::from_secs(10),
            tls: Tls::Off,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent bad magic {0:#x}; closing the connection")]
    BadMagic(u64),
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client asked for unknown export '{0}' with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("client sent an oversized request ({0} bytes of payload); closing the connection")]
    Oversized(u64),
    #[error("client asked for an export with NBD_OPT_EXPORT_NAME before starting TLS, which this server requires; closing the connection")]
    TlsRequired,
    #[error("client sent data after NBD_OPT_STARTTLS before the server's reply; closing the connection")]
    DataAfterStartTls,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("client did not finish the handshake within {0:?}; closing the connection")]
    HandshakeTimeout(Duration),
}

/// Options longer than this are refused (they are names and short lists).
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Oversized WRITE payloads up to this are read and discarded (keeping the stream in sync);
/// beyond it the connection is closed.
const MAX_DRAIN: u64 = 64 << 20;
const WRITE_BUFFER: usize = 256 << 10;
/// Reply header bytes a request is not charged for (the longest: a structured OFFSET_DATA
/// chunk header and its offset), so that two maximum-size reads fit a budget of twice the
/// maximum payload.
const REPLY_HEADER: usize = STRUCTURED_REPLY_LEN + 8;
/// A recycled reply buffer up to this size is reused as it is for any request (1 MiB reads
/// mixed with 4 KiB ones reallocate nothing); a larger one is cut down to what the request
/// needs, so a small request never holds, and is never charged for, a 32 MiB buffer.
const KEEP_BUFFER: usize = (1 << 20) + 4096;
/// Most extents per meta context in one BLOCK_STATUS reply (512 KiB); the spec lets a server
/// describe less of the range than asked, and the client asks again for the rest.
const MAX_EXTENTS: usize = 1 << 16;
/// How long a connection whose export was revoked waits for its client to read the replies
/// still queued before it drops them and closes (a rollback waits 10 s for clients to go).
const REVOKED_DRAIN: Duration = Duration::from_secs(2);

/// Maps an export error to its NBD error number: the one place this happens.
pub fn errno(e: ExportError) -> u32 {
    match e {
        ExportError::Io => EIO,
        ExportError::ReadOnly => EPERM,
        ExportError::Invalid => EINVAL,
        ExportError::NoSpace => ENOSPC,
        ExportError::NotSupported | ExportError::NotFast => ENOTSUP,
        ExportError::NoMemory => ENOMEM,
        ExportError::Gone => ESHUTDOWN,
    }
}

/// The state the handshake hands to the transmission phase.
struct Session<E> {
    export: E,
    structured: bool,
    /// No reply for requests that fail because the export was revoked (see
    /// [`serve_transmission`]).
    hold_gone: bool,
    /// Selected meta contexts: indexes into `ExportInfo::meta_contexts`, in id order.
    contexts: Vec<u32>,
}

/// Serves one client connection until it disconnects, aborts, or its export is revoked.
/// With TLS configured (`config.tls`), a client's NBD_OPT_STARTTLS upgrades the connection:
/// the option haggling starts again over TLS, and the transmission phase runs over it.
pub async fn serve_connection<S, C>(stream: S, catalog: Arc<C>, config: &ServerConfig) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: ExportCatalog,
{
    // A client that connects and sends nothing (or stalls halfway, TLS handshake included)
    // must not hold a connection slot for ever: one deadline for the whole handshake.
    let deadline = tokio::time::Instant::now() + config.handshake_timeout;
    let timed_out = |_| NbdError::HandshakeTimeout(config.handshake_timeout);
    let (mut rd, mut wr) = buffered(stream);
    let plain = Peer::default();
    let first = async {
        let no_zeroes = greet(&mut rd, &mut wr).await?;
        let step = negotiate(&mut rd, &mut wr, &*catalog, config, &plain, no_zeroes).await?;
        Ok::<_, NbdError>((no_zeroes, step))
    };
    let (no_zeroes, step) = tokio::time::timeout_at(deadline, first).await.map_err(timed_out)??;
    let acceptor = match step {
        Step::Session(session) => return transmission(rd, wr, session, config).await,
        Step::Done => return Ok(()),
        Step::StartTls(acceptor) => acceptor,
    };
    // The client must wait for the ACK before it starts the TLS handshake: bytes already read
    // past the option are plaintext someone slipped in ahead of TLS.
    if !rd.buffer().is_empty() {
        return Err(NbdError::DataAfterStartTls);
    }
    let stream = rd.into_inner().unsplit(wr.into_inner());
    let upgraded = async {
        let tls = acceptor.accept(stream).await.map_err(NbdError::TlsHandshake)?;
        let der = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref());
        let peer = Peer::over_tls(der);
        tracing::debug!(client = ?peer.client_names, "NBD connection upgraded to TLS");
        let (mut rd, mut wr) = buffered(tls);
        let step = negotiate(&mut rd, &mut wr, &*catalog, config, &peer, no_zeroes).await?;
        Ok::<_, NbdError>((rd, wr, step))
    };
    let (rd, wr, step) = tokio::time::timeout_at(deadline, upgraded).await.map_err(timed_out)??;
    match step {
        Step::Session(session) => transmission(rd, wr, session, config).await,
        // (StartTls cannot come twice: `negotiate` refuses it over TLS.)
        Step::Done | Step::StartTls(_) => Ok(()),
    }
}

type Buffered<S> = (BufReader<ReadHalf<S>>, BufWriter<WriteHalf<S>>);

/// A stream split in buffered halves (the reader and the reply writer run apart).
fn buffered<S: AsyncRead + AsyncWrite>(stream: S) -> Buffered<S> {
    let (rd, wr) = tokio::io::split(stream);
    (BufReader::with_capacity(WRITE_BUFFER, rd), BufWriter::with_capacity(WRITE_BUFFER, wr))
}

/// Serves the transmission phase only, on a stream whose client skipped the handshake: a
/// socket handed to the kernel NBD driver (which never negotiates; it speaks simple replies
/// and the flags given by [`kernel_transmission_flags`]). A request that fails because the
/// export was revoked (the daemon is shutting down) gets no reply: the kernel retries it on
/// the socket a restarted daemon hands over, instead of failing it to the filesystem.
pub async fn serve_transmission<S, E>(stream: S, export: E, config: &ServerConfig) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Export,
{
    let (rd, wr) = tokio::io::split(stream);
    let rd = BufReader::with_capacity(WRITE_BUFFER, rd);
    let wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let session = Session { export, structured: false, hold_gone: true, contexts: Vec::new() };
    transmission(rd, wr, session, config).await
}

/// The transmission flags to configure the kernel NBD driver with for an export served by
/// [`serve_transmission`].
pub fn kernel_transmission_flags(read_only: bool) -> u16 {
    transmission_flags(read_only, false)
}

/// Option data shared by every option reply.
struct OptionReplies {
    out: Vec<u8>,
}

impl OptionReplies {
    fn reply(&mut self, option: u32, reply: u32, data: &[u8]) {
        option_reply(&mut self.out, option, reply, data);
    }
    fn error(&mut self, option: u32, reply: u32, message: &str) {
        self.reply(option, reply, message.as_bytes());
    }
    async fn send<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        wr.write_all(&self.out).await?;
        wr.flush().await?;
        self.out.clear();
        Ok(())
    }
}

/// How an option haggling ended.
enum Step<E> {
    /// The client chose an export: on to the transmission phase.
    Session(Session<E>),
    /// The client aborted (or the connection ends without an error).
    Done,
    /// NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next, then a new haggling.
    StartTls(TlsAcceptor),
}

/// The greeting and the client's flags; returns whether the client asked for no zeroes.
async fn greet<R, W>(rd: &mut R, wr: &mut W) -> Result<bool, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&greeting).await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::BadClientFlags(client_flags));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// The option haggling, from the first option (or the first over TLS: no state carries over
/// an upgrade, as the spec demands) to the option that ends it.
async fn negotiate<R, W, C>(
    rd: &mut R,
    wr: &mut W,
    catalog: &C,
    config: &ServerConfig,
    peer: &Peer,
    no_zeroes: bool,
) -> Result<Step<C::Export>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    C: ExportCatalog,
{
    // Before TLS in require mode, every option but STARTTLS and ABORT is refused.
    let tls_required = config.tls.required() && !peer.tls;
    let mut n = Negotiation { replies: OptionReplies { out: Vec::new() }, structured: false, selected: None, peer };
    loop {
        let magic = rd.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic(magic));
        }
        let option = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Err(NbdError::Oversized(len as u64));
            }
            tokio::io::copy(&mut (&mut *rd).take(len as u64), &mut tokio::io::sink()).await?;
            if tls_required && option != OPT_STARTTLS && option != OPT_ABORT {
                n.replies.error(option, REP_ERR_TLS_REQD, TLS_REQUIRED);
            } else {
                n.replies.error(option, REP_ERR_TOO_BIG, "option data too long");
            }
            n.replies.send(wr).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        tracing::debug!(option, len, "NBD option");
        let outcome = match option {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error: the spec says close.
            OPT_EXPORT_NAME if tls_required => return Err(NbdError::TlsRequired),
            OPT_STARTTLS => match n.start_tls(&config.tls, &data) {
                Some(acceptor) => {
                    n.replies.send(wr).await?;
                    return Ok(Step::StartTls(acceptor));
                }
                None => None,
            },
            OPT_ABORT => {
                n.replies.reply(option, REP_ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = n.replies.send(wr).await;
                return Ok(Step::Done);
            }
            _ if tls_required => {
                n.replies.error(option, REP_ERR_TLS_REQD, TLS_REQUIRED);
                None
            }
            OPT_EXPORT_NAME => {
                let (session, reply) = n.export_name(catalog, &data, no_zeroes)?;
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Ok(Step::Session(session));
            }
            OPT_INFO | OPT_GO => n.info_or_go(catalog, option, &data),
            OPT_LIST => n.list(catalog, &data),
            OPT_STRUCTURED_REPLY => n.structured_reply(&data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => n.meta_context(catalog, option, &data),
            _ => {
                n.replies.error(option, REP_ERR_UNSUP, "option not supported");
                None
            }
        };
        n.replies.send(wr).await?;
        if let Some(session) = outcome {
            return Ok(Step::Session(session));
        }
    }
}

/// The message sent with NBD_REP_ERR_TLS_REQD.
const TLS_REQUIRED: &str = "this server requires TLS: start it with NBD_OPT_STARTTLS first";

/// The handshake's state between options; one method per option, each filling `replies`
/// (sent after it) and returning the session when the option ends the handshake.
struct Negotiation<'p> {
    replies: OptionReplies,
    /// Who the client is (passed to the catalog).
    peer: &'p Peer,
    structured: bool,
    /// Meta contexts selected by SET_META_CONTEXT, and the export name they were chosen for.
    selected: Option<(String, Vec<u32>)>,
}

impl Negotiation<'_> {
    /// NBD_OPT_STARTTLS: the acceptor to upgrade with once the ACK is sent, or None (with an
    /// error reply) when TLS is off or already on.
    fn start_tls(&mut self, tls: &Tls, data: &[u8]) -> Option<TlsAcceptor> {
        if !data.is_empty() {
            self.replies.error(OPT_STARTTLS, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
            return None;
        }
        if self.peer.tls {
            self.replies.error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already on");
            return None;
        }
        let Some(acceptor) = tls.acceptor() else {
            self.replies.error(OPT_STARTTLS, REP_ERR_POLICY, "this server is not configured for TLS");
            return None;
        };
        self.replies.reply(OPT_STARTTLS, REP_ACK, &[]);
        Some(acceptor.clone())
    }

    /// NBD_OPT_EXPORT_NAME: the session and the raw reply (size, flags, zeroes). An unknown
    /// export cannot be reported with this option: the spec says close.
    fn export_name<C: ExportCatalog>(
        &self,
        catalog: &C,
        data: &[u8],
        no_zeroes: bool,
    ) -> Result<(Session<C::Export>, Vec<u8>), NbdError> {
        let name = String::from_utf8_lossy(data).into_owned();
        let export = catalog.open(self.peer, &name).map_err(|_| NbdError::UnknownExport(name.clone()))?;
        let info = export.info();
        let mut out = Vec::with_capacity(10 + 124);
        out.extend_from_slice(&info.size.to_be_bytes());
        out.extend_from_slice(&transmission_flags(info.read_only, self.structured).to_be_bytes());
        if !no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        let contexts = contexts_for(&self.selected, &name);
        Ok((Session { export, structured: self.structured, hold_gone: false, contexts }, out))
    }

    /// NBD_OPT_INFO and NBD_OPT_GO (which then ends the handshake).
    fn info_or_go<C: ExportCatalog>(&mut self, catalog: &C, option: u32, data: &[u8]) -> Option<Session<C::Export>> {
        let Ok(req) = InfoRequest::decode(data) else {
            self.replies.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
            return None;
        };
        let export = match catalog.open(self.peer, req.name) {
            Ok(e) => e,
            Err(msg) => {
                self.replies.error(option, REP_ERR_UNKNOWN, &msg);
                return None;
            }
        };
        let info = export.info();
        let mut d = Vec::new();
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&info.size.to_be_bytes());
        d.extend_from_slice(&transmission_flags(info.read_only, self.structured).to_be_bytes());
        self.replies.reply(option, REP_INFO, &d);
        if req.requests.contains(&INFO_NAME) {
            let mut d = INFO_NAME.to_be_bytes().to_vec();
            d.extend_from_slice(info.name.as_bytes());
            self.replies.reply(option, REP_INFO, &d);
        }
        if req.requests.contains(&INFO_DESCRIPTION) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(&info.description.as_bytes()[..info.description.len().min(MAX_STRING)]);
            self.replies.reply(option, REP_INFO, &d);
        }
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [info.min_block, info.preferred_block, info.max_block] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.replies.reply(option, REP_INFO, &d);
        self.replies.reply(option, REP_ACK, &[]);
        (option == OPT_GO).then(|| {
            let contexts = contexts_for(&self.selected, req.name);
            Session { export, structured: self.structured, hold_gone: false, contexts }
        })
    }

    /// NBD_OPT_LIST: every export, with its description.
    fn list<C: ExportCatalog>(&mut self, catalog: &C, data: &[u8]) -> Option<Session<C::Export>> {
        if !data.is_empty() {
            self.replies.error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            return None;
        }
        for (name, description) in catalog.list(self.peer) {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(description.as_bytes());
            self.replies.reply(OPT_LIST, REP_SERVER, &d);
        }
        self.replies.reply(OPT_LIST, REP_ACK, &[]);
        None
    }

    /// NBD_OPT_STRUCTURED_REPLY.
    fn structured_reply<E>(&mut self, data: &[u8]) -> Option<Session<E>> {
        if data.is_empty() {
            self.structured = true;
            self.replies.reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        } else {
            self.replies.error(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
        }
        None
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (which selects for one export).
    fn meta_context<C: ExportCatalog>(&mut self, catalog: &C, option: u32, data: &[u8]) -> Option<Session<C::Export>> {
        let listing = option == OPT_LIST_META_CONTEXT;
        let req = match MetaContextRequest::decode(data) {
            Err(_) => {
                self.replies.error(option, REP_ERR_INVALID, "malformed meta context request");
                return None;
            }
            Ok(_) if !self.structured => {
                self.replies.error(option, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
                return None;
            }
            Ok(req) => req,
        };
        let export = match catalog.open(self.peer, req.name) {
            Ok(e) => e,
            Err(msg) => {
                self.replies.error(option, REP_ERR_UNKNOWN, &msg);
                return None;
            }
        };
        let mut chosen = Vec::new();
        for (id, name) in export.info().meta_contexts.iter().enumerate() {
            let hit =
                (listing && req.queries.is_empty()) || req.queries.iter().any(|q| context_matches(q, name, listing));
            if hit {
                let mut d = (id as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                self.replies.reply(option, REP_META_CONTEXT, &d);
                chosen.push(id as u32);
            }
        }
        if !listing {
            self.selected = Some((req.name.to_string(), chosen));
        }
        self.replies.reply(option, REP_ACK, &[]);
        None
    }
}

/// Contexts chosen by SET_META_CONTEXT apply only to the export they were chosen for.
fn contexts_for(selected: &Option<(String, Vec<u32>)>, name: &str) -> Vec<u32> {
    match selected {
        Some((n, ids)) if n == name => ids.clone(),
        _ => Vec::new(),
    }
}

fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    // Write-side features mean nothing on a read-only export (writes get EPERM anyway).
    if read_only {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// A request ready to run: the header, and for WRITE its payload (in `buf`).
struct Job {
    req: Request,
    buf: Vec<u8>,
}

/// An encoded reply, and the bytes of the connection's budget it holds until written.
struct Reply {
    buf: Vec<u8>,
    charge: u32,
}

struct Shared<E> {
    export: E,
    structured: bool,
    hold_gone: bool,
    contexts: Vec<u32>,
}

/// A connection's memory budget: `max_buffered` bytes as semaphore permits. The reader takes a
/// request's charge before it reads the request's payload or runs it, and waits when there is
/// not enough left (backpressure: it reads no further requests meanwhile); the writer gives
/// the charge back once the reply is written (in the socket, or in the write buffer). Every
/// request costs at least `unit`, so at most `max_requests` are accepted at once. Reply
/// buffers waiting in the pool for reuse are bounded apart, by `pooled`, to as much again.
struct Budget {
    permits: Semaphore,
    total: usize,
    unit: usize,
    /// Capacity of the buffers in the pool (the writer adds, the reader subtracts).
    pooled: AtomicUsize,
}

impl Budget {
    fn new(config: &ServerConfig) -> Budget {
        // Charges are u32 (what the semaphore takes at once).
        let total = config.max_buffered.clamp(1, u32::MAX as usize);
        let unit = total.div_ceil(config.max_requests.max(1));
        Budget { permits: Semaphore::new(total), total, unit, pooled: AtomicUsize::new(0) }
    }

    /// What a request costs: the bytes its buffer holds — the payload it reads, the reply it
    /// encodes at most (`need`) or the capacity of the buffer it reuses, whichever is more —
    /// beyond a reply header; at least one unit, at most the whole budget (a request that big
    /// runs alone).
    fn charge(&self, need: usize, capacity: usize) -> u32 {
        // `total` fits in a u32 (new).
        need.max(capacity).saturating_sub(REPLY_HEADER).max(self.unit).min(self.total) as u32
    }

    /// A buffer for a request that needs `need` bytes: a recycled one when there is one.
    fn take(&self, pool: &mut mpsc::UnboundedReceiver<Vec<u8>>, need: usize) -> Vec<u8> {
        let Ok(mut buf) = pool.try_recv() else {
            return Vec::new();
        };
        self.pooled.fetch_sub(buf.capacity(), Ordering::Relaxed);
        let keep = need.max(KEEP_BUFFER);
        if buf.capacity() > keep {
            // In place (the allocator shrinks the block; nothing is copied but `keep` bytes).
            buf.truncate(keep);
            buf.shrink_to(keep);
        }
        buf
    }

    /// Puts a written reply's buffer back in the pool, unless the pool is full.
    fn recycle(&self, pool: &mpsc::UnboundedSender<Vec<u8>>, buf: Vec<u8>) {
        let capacity = buf.capacity();
        // Only the writer adds, so the check cannot be overtaken.
        if self.pooled.load(Ordering::Relaxed) + capacity <= self.total {
            self.pooled.fetch_add(capacity, Ordering::Relaxed);
            let _ = pool.send(buf);
        }
    }
}

/// The export was revoked while the reader waited: the connection closes (see
/// `transmission`, which then holds or fails what is still in flight).
fn revoked_close(was_revoked: &mut bool) -> Result<(), NbdError> {
    *was_revoked = true;
    tracing::info!("export revoked; closing the NBD connection");
    Ok(())
}

/// The most bytes a request's buffer must hold: its WRITE payload, its READ reply, its
/// BLOCK_STATUS reply at most; 0 when the reply is a header (or an error) only.
fn buffer_need(req: &Request, contexts: usize, config: &ServerConfig) -> usize {
    let len = req.length as usize;
    match req.command {
        Command::Read | Command::Write if req.length > config.max_payload => 0,
        Command::Read => REPLY_HEADER + len,
        Command::Write => len,
        Command::BlockStatus => contexts * (STRUCTURED_REPLY_LEN + 4 + 8 * len.min(MAX_EXTENTS)),
        _ => 0,
    }
}

async fn transmission<R, W, E>(mut rd: R, wr: W, session: Session<E>, config: &ServerConfig) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Export,
{
    let shared = Arc::new(Shared {
        export: session.export,
        structured: session.structured,
        hold_gone: session.hold_gone,
        contexts: session.contexts,
    });
    let budget = Arc::new(Budget::new(config));
    // Never full: every reply holds at least a unit of the budget, so there are at most
    // `max_requests` of them.
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(config.max_requests.max(1));
    let (recycle_tx, mut recycle_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut writer = tokio::spawn(write_replies(wr, reply_rx, recycle_tx, budget.clone()));
    let tasks = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let size = shared.export.info().size;
    // Boxed, not pinned on the stack: it borrows the export, which is dropped before the end.
    let mut revoked = Box::pin(shared.export.revoked());
    let mut was_revoked = false;
    let result = async {
        loop {
            let mut header = [0u8; REQUEST_LEN];
            tokio::select! {
                biased;
                _ = &mut revoked => return revoked_close(&mut was_revoked),
                r = rd.read_exact(&mut header) => match r {
                    Ok(_) => {}
                    // A client that just hangs up (without NBD_CMD_DISC) is not an error.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
            }
            let req = Request::decode(&header).map_err(|e| NbdError::BadMagic(e.0 as u64))?;
            if req.command == Command::Disc {
                return Ok(());
            }
            // A recycled buffer still holds its last reply: every use below either clears it or
            // overwrites all of it.
            let need = buffer_need(&req, shared.contexts.len(), config);
            let mut buf = budget.take(&mut recycle_rx, need);
            let charge = budget.charge(need, buf.capacity());
            // Backpressure: no payload read and nothing run until the replies of earlier
            // requests have left enough room.
            tokio::select! {
                biased;
                _ = &mut revoked => return revoked_close(&mut was_revoked),
                permits = budget.permits.acquire_many(charge) => match permits {
                    Ok(p) => p.forget(), // given back by the writer
                    Err(_) => return Ok(()), // the writer stopped: the client hung up
                },
            }
            if req.command == Command::Write {
                // The payload follows whatever we think of the request; read it first.
                let len = req.length as u64;
                if len > config.max_payload as u64 {
                    if len > MAX_DRAIN {
                        return Err(NbdError::Oversized(len));
                    }
                    tokio::io::copy(&mut (&mut rd).take(len), &mut tokio::io::sink()).await?;
                    let buf = error_reply(buf, shared.structured, req.cookie, EINVAL, "request too large");
                    reply_tx.send(Reply { buf, charge }).await.ok();
                    continue;
                }
                // Read into spare capacity: no zero-filling pass over the payload first.
                buf.clear();
                buf.reserve_exact(len as usize);
                if (&mut rd).take(len).read_to_end(&mut buf).await? != len as usize {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
            }
            if let Err((errno, message)) = validate(&req, size, shared.export.info().read_only, &shared, config) {
                let buf = error_reply(buf, shared.structured, req.cookie, errno, message);
                reply_tx.send(Reply { buf, charge }).await.ok();
                continue;
            }
            let job = Job { req, buf };
            if shared.export.run_on_own_task(kind(&req), req.length) {
                let permit = tasks.clone().acquire_owned().await.map_err(|_| std::io::Error::other("closed"))?;
                let (shared, tx) = (shared.clone(), reply_tx.clone());
                tokio::spawn(async move {
                    let buf = execute(&shared, job).await;
                    drop(shared); // the export's handle goes before the connection can end
                    let _ = tx.send(Reply { buf, charge }).await;
                    drop(permit);
                });
            } else {
                let buf = execute(&shared, job).await;
                if reply_tx.send(Reply { buf, charge }).await.is_err() {
                    return Ok(()); // writer gone: the client hung up
                }
            }
        }
    }
    .await;
    // Let requests on their own tasks finish, then let the writer drain and close. A client
    // that does not read its replies could hold that up for ever: once the export is revoked,
    // its replies are dropped after a grace period, so the export's handle goes.
    drop(reply_tx);
    let all_tasks = config.max_in_flight.max(1) as u32;
    let drained = async {
        let _ = tasks.acquire_many(all_tasks).await;
        (&mut writer).await.ok().flatten()
    };
    let give_up = async {
        if !was_revoked {
            (&mut revoked).await;
        }
        tokio::time::sleep(REVOKED_DRAIN).await;
    };
    let written = tokio::select! {
        biased;
        wr = drained => Some(wr),
        _ = give_up => None,
    };
    let wr = match written {
        Some(wr) => wr,
        None => {
            tracing::info!(
                "export revoked and the client reads no replies; dropping them and closing the NBD connection"
            );
            writer.abort();
            let _ = writer.await;
            // Their replies now go nowhere: the tasks end as soon as their requests do.
            let _ = tasks.acquire_many(all_tasks).await;
            None
        }
    };
    // The export (a volume handle counts as a writable client) goes before the client can see
    // the connection close: a rollback right after a client's disconnect finds it gone.
    drop(revoked);
    drop(shared);
    if let Some(mut wr) = wr {
        let _ = wr.shutdown().await;
    }
    result
}

fn kind(req: &Request) -> RequestKind {
    match req.command {
        Command::Read => RequestKind::Read,
        Command::Write => RequestKind::Write { fua: req.flags & CMD_FLAG_FUA != 0 },
        Command::Flush => RequestKind::Flush,
        Command::Trim => RequestKind::Trim,
        Command::WriteZeroes => RequestKind::WriteZeroes,
        Command::Cache => RequestKind::Cache,
        // (Disc and unknown commands never get this far: validated first.)
        Command::BlockStatus | Command::Disc | Command::Unknown(_) => RequestKind::BlockStatus,
    }
}

/// Checks a request before it reaches the export. Writes past the end are ENOSPC, other
/// requests past the end EINVAL (as the spec recommends).
fn validate<E: Export>(
    req: &Request,
    size: u64,
    read_only: bool,
    shared: &Shared<E>,
    config: &ServerConfig,
) -> Result<(), (u32, &'static str)> {
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
        return Err((EINVAL, "unknown command flags"));
    }
    let writes = req.command.writes();
    match req.command {
        Command::Read
        | Command::Write
        | Command::Trim
        | Command::WriteZeroes
        | Command::Cache
        | Command::BlockStatus => {}
        Command::Flush => return Ok(()),
        Command::Disc | Command::Unknown(_) => return Err((EINVAL, "unknown command")),
    }
    if writes && read_only {
        return Err((EPERM, "export is read-only"));
    }
    if req.length == 0 {
        return Err((EINVAL, "zero-length request"));
    }
    if req.command == Command::Read && req.length > config.max_payload {
        return Err((EINVAL, "request too large"));
    }
    if req.flags & CMD_FLAG_DF != 0 && !shared.structured {
        return Err((EINVAL, "DF needs structured replies"));
    }
    if req.command == Command::BlockStatus && (!shared.structured || shared.contexts.is_empty()) {
        return Err((EINVAL, "no meta context was negotiated"));
    }
    match req.offset.checked_add(req.length as u64) {
        Some(end) if end <= size => Ok(()),
        _ if writes => Err((ENOSPC, "request ends past the end of the export")),
        _ => Err((EINVAL, "request ends past the end of the export")),
    }
}

/// An error reply in `buf` (reused).
fn error_reply(mut buf: Vec<u8>, structured: bool, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    buf.clear();
    if structured {
        error_chunk(&mut buf, cookie, errno, message);
    } else {
        buf.extend_from_slice(&simple_reply(errno, cookie));
    }
    buf
}

fn done_reply(mut buf: Vec<u8>, structured: bool, cookie: u64) -> Vec<u8> {
    buf.clear();
    if structured {
        buf.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0));
    } else {
        buf.extend_from_slice(&simple_reply(0, cookie));
    }
    buf
}

/// Runs a validated request and encodes its reply into the job's buffer.
async fn execute<E: Export>(shared: &Shared<E>, job: Job) -> Vec<u8> {
    let Job { req, mut buf } = job;
    let export = &shared.export;
    let (offset, length, cookie, structured) = (req.offset, req.length as u64, req.cookie, shared.structured);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let result = match req.command {
        Command::Read => {
            // The reply header goes first, the data is read straight in after it. The recycled
            // buffer's old bytes are kept, not zeroed: the export overwrites every byte of the
            // data (holes included), and a zero-filling pass costs as much as the read's copy.
            let header = if structured { STRUCTURED_REPLY_LEN + 8 } else { SIMPLE_REPLY_LEN };
            let total = header + length as usize;
            if buf.len() < total {
                // Exactly: the budget charged this request for `total` bytes, not for a
                // doubled capacity.
                buf.reserve_exact(total - buf.len());
                buf.resize(total, 0);
            }
            buf.truncate(total);
            if structured {
                let chunk = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length as u32);
                buf[..STRUCTURED_REPLY_LEN].copy_from_slice(&chunk);
                buf[STRUCTURED_REPLY_LEN..header].copy_from_slice(&offset.to_be_bytes());
            } else {
                buf[..header].copy_from_slice(&simple_reply(0, cookie));
            }
            match export.read(offset, &mut buf[header..]).await {
                Ok(ReadKind::Hole) if structured => {
                    buf.clear();
                    buf.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
                    buf.extend_from_slice(&offset.to_be_bytes());
                    buf.extend_from_slice(&(length as u32).to_be_bytes());
                    return buf;
                }
                Ok(_) => return buf,
                Err(e) => Err(e),
            }
        }
        Command::Write => export.write(offset, &buf, fua).await,
        Command::Flush => export.flush().await,
        Command::Trim => export.trim(offset, length, fua).await,
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                fua,
                no_hole: req.flags & CMD_FLAG_NO_HOLE != 0,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            export.write_zeroes(offset, length, flags).await
        }
        Command::Cache => export.cache(offset, length).await,
        Command::BlockStatus => {
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            return block_status(shared, buf, cookie, offset, req.length, req_one).await;
        }
        Command::Disc | Command::Unknown(_) => Err(ExportError::Invalid),
    };
    match result {
        Ok(()) => done_reply(buf, structured, cookie),
        Err(ExportError::Gone) if shared.hold_gone => {
            buf.clear(); // no reply: the connection is about to close
            buf
        }
        Err(e) => error_reply(buf, structured, cookie, errno(e), &e.to_string()),
    }
}

/// One BLOCK_STATUS chunk per selected context, clipped to the request and to
/// [`MAX_EXTENTS`] extents; DONE on the last.
async fn block_status<E: Export>(
    shared: &Shared<E>,
    mut buf: Vec<u8>,
    cookie: u64,
    offset: u64,
    length: u32,
    req_one: bool,
) -> Vec<u8> {
    buf.clear();
    let n = shared.contexts.len();
    for (i, &id) in shared.contexts.iter().enumerate() {
        let extents = match shared.export.block_status(id as usize, offset, length).await {
            Ok(e) => e,
            Err(e) => return error_reply(buf, true, cookie, errno(e), &e.to_string()),
        };
        let mut clipped: Vec<(u32, u32)> = Vec::new();
        let mut left = length;
        for e in extents.into_iter().filter(|e| e.length > 0) {
            if left == 0 {
                break;
            }
            let len = e.length.min(left);
            let full = clipped.len() == MAX_EXTENTS;
            match clipped.last_mut() {
                Some(last) if last.1 == e.flags => last.0 += len,
                // The rest of the range is left for the client to ask again.
                _ if full => break,
                _ => clipped.push((len, e.flags)),
            }
            left -= len;
        }
        if req_one {
            clipped.truncate(1);
        }
        if clipped.is_empty() {
            return error_reply(buf, true, cookie, EIO, "export returned no extents");
        }
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        // Exactly what is appended: the capacity stays within what the budget charged.
        buf.reserve_exact(STRUCTURED_REPLY_LEN + 4 + 8 * clipped.len());
        buf.extend_from_slice(&chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * clipped.len() as u32));
        buf.extend_from_slice(&id.to_be_bytes());
        for (len, f) in clipped {
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(&f.to_be_bytes());
        }
    }
    buf
}

/// Writes replies as they come, flushing when no more are queued; gives each reply's charge
/// back to the budget and its buffer back to the reader. Returns the stream once every reply
/// is written, for `transmission` to close (None when writing failed).
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
    recycle: mpsc::UnboundedSender<Vec<u8>>,
    budget: Arc<Budget>,
) -> Option<W> {
    let result: std::io::Result<()> = async {
        while let Some(reply) = rx.recv().await {
            write_reply(&mut wr, reply, &recycle, &budget).await?;
            while let Ok(reply) = rx.try_recv() {
                write_reply(&mut wr, reply, &recycle, &budget).await?;
            }
            wr.flush().await?;
        }
        Ok(())
    }
    .await;
    // Nothing more will be written: a reader waiting for room must not wait for ever.
    budget.permits.close();
    match result {
        Ok(()) => Some(wr),
        Err(e) => {
            tracing::debug!(error = %e, "NBD reply writer stopped");
            None
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    reply: Reply,
    recycle: &mpsc::UnboundedSender<Vec<u8>>,
    budget: &Budget,
) -> std::io::Result<()> {
    wr.write_all(&reply.buf).await?;
    budget.permits.add_permits(reply.charge as usize);
    budget.recycle(recycle, reply.buf);
    Ok(())
}
