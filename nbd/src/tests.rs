//! The server over in-memory streams: every handshake variant, every command, structured and
//! simple replies, out-of-order completion and malformed input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use crate::wire::*;
use crate::*;

const SIZE: u64 = 1 << 20;
/// Reads at this offset take 200 ms (and run on their own task).
const SLOW: u64 = 8192;

struct Mem {
    data: Mutex<Vec<u8>>,
    info: ExportInfo,
    last_zero: Mutex<Option<ZeroFlags>>,
    flushes: Mutex<u32>,
    revoked: tokio::sync::Notify,
    /// READ requests the export has run.
    reads: AtomicUsize,
    /// How long a handle takes to let go (see `MemExport`'s drop).
    drop_delay: Duration,
}

#[derive(Clone)]
struct MemExport(Arc<Mem>);

impl Drop for MemExport {
    fn drop(&mut self) {
        // A handle slow to let go, as one that still has accounting to do when dropped.
        std::thread::sleep(self.0.drop_delay);
    }
}

impl Export for MemExport {
    fn info(&self) -> &ExportInfo {
        &self.0.info
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadKind, ExportError> {
        self.0.reads.fetch_add(1, Ordering::Relaxed);
        if offset == SLOW {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let d = self.0.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(if buf.iter().all(|&b| b == 0) { ReadKind::Hole } else { ReadKind::Data })
    }
    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        self.0.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), ExportError> {
        *self.0.flushes.lock().unwrap() += 1;
        Ok(())
    }
    async fn trim(&self, offset: u64, length: u64, _fua: bool) -> Result<(), ExportError> {
        self.0.data.lock().unwrap()[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        *self.0.last_zero.lock().unwrap() = Some(flags);
        if flags.fast && flags.no_hole {
            return Err(ExportError::NotFast);
        }
        self.trim(offset, length, flags.fua).await
    }
    async fn cache(&self, _offset: u64, _length: u64) -> Result<(), ExportError> {
        Ok(())
    }
    async fn block_status(&self, context: usize, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError> {
        // Context 0: 4 KiB extents alternating data/hole; context 1: one big "dirty" extent;
        // context 2: one-byte extents alternating.
        Ok(match context {
            0 => (0..4)
                .map(|i| Extent { length: 4096, flags: if (offset / 4096 + i).is_multiple_of(2) { 0 } else { 3 } })
                .collect(),
            1 => vec![Extent { length: length * 2, flags: 1 }],
            _ => (0..length).map(|i| Extent { length: 1, flags: i % 2 }).collect(),
        })
    }
    fn run_on_own_task(&self, kind: RequestKind, _length: u32) -> bool {
        kind == RequestKind::Read || kind == RequestKind::Flush
    }
    async fn revoked(&self) {
        self.0.revoked.notified().await
    }
}

struct Catalog(HashMap<String, Arc<Mem>>);

impl ExportCatalog for Catalog {
    type Export = MemExport;
    fn list(&self, _peer: &Peer) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.0.values().map(|m| (m.info.name.clone(), m.info.description.clone())).collect();
        v.sort();
        v
    }
    fn open(&self, _peer: &Peer, name: &str) -> Result<MemExport, String> {
        self.0.get(name).map(|m| MemExport(m.clone())).ok_or_else(|| format!("no export '{name}'"))
    }
}

fn catalog() -> Arc<Catalog> {
    catalog_with_drop_delay(Duration::ZERO)
}

fn catalog_with_drop_delay(drop_delay: Duration) -> Arc<Catalog> {
    let mem = |name: &str, read_only: bool| {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            info: ExportInfo {
                name: name.into(),
                description: format!("{name} export"),
                size: SIZE,
                read_only,
                min_block: 1,
                preferred_block: 4096,
                max_block: 1 << 20,
                meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:d".into(), "test:fragmented".into()],
            },
            last_zero: Mutex::new(None),
            flushes: Mutex::new(0),
            revoked: tokio::sync::Notify::new(),
            reads: AtomicUsize::new(0),
            drop_delay,
        })
    };
    Arc::new(Catalog(HashMap::from([("rw".into(), mem("rw", false)), ("ro".into(), mem("ro", true))])))
}

struct Client {
    s: DuplexStream,
    server: JoinHandle<Result<(), NbdError>>,
}

impl Client {
    /// Connects and reads the greeting; sends `client_flags`.
    async fn connect(cat: Arc<Catalog>, client_flags: u32) -> Client {
        Client::connect_with(cat, client_flags, test_config(), 4 << 20).await
    }

    /// [`Client::connect`] with a server configuration, over a pipe of `pipe` bytes each way.
    async fn connect_with(cat: Arc<Catalog>, client_flags: u32, config: ServerConfig, pipe: usize) -> Client {
        let mut c = Client::start(cat, config, pipe);
        assert_eq!(c.s.read_u64().await.unwrap(), NBDMAGIC);
        assert_eq!(c.s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(c.s.read_u16().await.unwrap(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.s.write_u32(client_flags).await.unwrap();
        c
    }

    /// Connects and reads nothing.
    fn start(cat: Arc<Catalog>, config: ServerConfig, pipe: usize) -> Client {
        let (a, b) = tokio::io::duplex(pipe);
        let server = tokio::spawn(async move { serve_connection(b, cat, &config).await });
        Client { s: a, server }
    }

    async fn option(&mut self, opt: u32, data: &[u8]) {
        self.s.write_u64(IHAVEOPT).await.unwrap();
        self.s.write_u32(opt).await.unwrap();
        self.s.write_u32(data.len() as u32).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        let opt = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let mut data = vec![0; self.s.read_u32().await.unwrap() as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (opt, kind, data)
    }

    /// Replies up to and including ACK (or the first error).
    async fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = vec![];
        loop {
            let (_, kind, data) = self.option_reply().await;
            out.push((kind, data));
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return out;
            }
        }
    }

    /// STRUCTURED_REPLY (optionally), SET_META_CONTEXT (optionally) and GO.
    async fn go(&mut self, name: &str, structured: bool, contexts: &[&str]) -> Vec<(u32, Vec<u8>)> {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.replies().await[0].0, REP_ACK);
        }
        if !contexts.is_empty() {
            self.option(OPT_SET_META_CONTEXT, &meta_request(name, contexts)).await;
            self.replies().await;
        }
        self.option(OPT_GO, &go_request(name, &[INFO_NAME, INFO_DESCRIPTION])).await;
        self.replies().await
    }

    async fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let r = Request { flags, command: wire::Command::from_wire(command), cookie, offset, length };
        self.s.write_all(&r.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
    }

    /// A simple reply: (error, cookie).
    async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        (self.s.read_u32().await.unwrap(), self.s.read_u64().await.unwrap())
    }

    /// A structured reply chunk: (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.s.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
        let flags = self.s.read_u16().await.unwrap();
        let kind = self.s.read_u16().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let mut data = vec![0; self.s.read_u32().await.unwrap() as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (flags, kind, cookie, data)
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).await.unwrap();
        b
    }

    /// True when the server closed the connection (EOF on read).
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

fn test_config() -> ServerConfig {
    ServerConfig { max_in_flight: 8, max_payload: 1 << 20, ..ServerConfig::default() }
}

fn go_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[tokio::test]
async fn export_name_sends_size_and_flags_with_and_without_zero_padding() {
    for (flags, padding) in [(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES, 0), (CLIENT_FIXED_NEWSTYLE, 124)] {
        let mut c = Client::connect(catalog(), flags).await;
        c.option(OPT_EXPORT_NAME, b"ro").await;
        assert_eq!(c.s.read_u64().await.unwrap(), SIZE);
        let tf = c.s.read_u16().await.unwrap();
        assert!(tf & TF_READ_ONLY != 0 && tf & TF_CAN_MULTI_CONN != 0 && tf & TF_SEND_FLUSH != 0);
        assert_eq!(c.bytes(padding).await, vec![0; padding]);
        c.request(CMD_READ, 0, 1, 0, 16, &[]).await;
        assert_eq!(c.simple().await, (0, 1));
    }
}

#[tokio::test]
async fn export_name_of_an_unknown_export_closes_the_connection() {
    let mut c = Client::connect(catalog(), 3).await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    assert!(c.closed().await);
    assert!(matches!(c.server.await.unwrap(), Err(NbdError::UnknownExport(_))));
}

#[tokio::test]
async fn go_and_info_report_export_name_description_and_block_sizes() {
    let mut c = Client::connect(catalog(), 3).await;
    c.option(OPT_INFO, &go_request("rw", &[INFO_NAME, INFO_DESCRIPTION])).await;
    let infos = c.replies().await;
    let by_type: HashMap<u16, Vec<u8>> = infos
        .iter()
        .filter(|(k, _)| *k == REP_INFO)
        .map(|(_, d)| (u16::from_be_bytes([d[0], d[1]]), d[2..].to_vec()))
        .collect();
    assert_eq!(u64::from_be_bytes(by_type[&INFO_EXPORT][..8].try_into().unwrap()), SIZE);
    assert_eq!(by_type[&INFO_NAME], b"rw");
    assert_eq!(by_type[&INFO_DESCRIPTION], b"rw export");
    let bs = &by_type[&INFO_BLOCK_SIZE];
    assert_eq!((be32(bs), be32(&bs[4..]), be32(&bs[8..])), (1, 4096, 1 << 20));
    assert_eq!(infos.last().unwrap().0, REP_ACK);
    // INFO leaves the session in option haggling; GO then enters transmission.
    let replies = c.go("rw", false, &[]).await;
    assert_eq!(replies.last().unwrap().0, REP_ACK);
    c.request(CMD_FLUSH, 0, 9, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 9));
}

#[tokio::test]
async fn go_to_an_unknown_export_gets_err_unknown_and_the_session_continues() {
    let mut c = Client::connect(catalog(), 3).await;
    let r = c.go("missing", false, &[]).await;
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].1).contains("missing"));
    assert_eq!(c.go("rw", false, &[]).await.last().unwrap().0, REP_ACK);
}

#[tokio::test]
async fn list_returns_every_export_and_abort_ends_the_session() {
    let mut c = Client::connect(catalog(), 3).await;
    c.option(OPT_LIST, &[]).await;
    let r = c.replies().await;
    let names: Vec<String> = r
        .iter()
        .filter(|(k, _)| *k == REP_SERVER)
        .map(|(_, d)| String::from_utf8_lossy(&d[4..4 + be32(d) as usize]).into_owned())
        .collect();
    assert_eq!(names, vec!["ro", "rw"]);
    c.option(OPT_LIST, b"junk").await;
    assert_eq!(c.replies().await[0].0, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.replies().await[0].0, REP_ACK);
    assert!(c.closed().await);
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn unknown_options_get_err_unsup_and_the_session_stays_in_sync() {
    let mut c = Client::connect(catalog(), 3).await;
    for opt in [4u32, 11, 99, 12345] {
        c.option(opt, b"some option data").await;
        let (o, kind, _) = c.option_reply().await;
        assert_eq!((o, kind), (opt, REP_ERR_UNSUP));
    }
    // Oversized option data is skipped too.
    c.option(99, &vec![0u8; 100 << 10]).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_TOO_BIG);
    assert_eq!(c.go("rw", false, &[]).await.last().unwrap().0, REP_ACK);
}

#[tokio::test]
async fn meta_contexts_are_listed_by_namespace_and_set_by_exact_name() {
    let mut c = Client::connect(catalog(), 3).await;
    c.option(OPT_SET_META_CONTEXT, &meta_request("rw", &["base:allocation"])).await;
    assert_eq!(c.replies().await[0].0, REP_ERR_INVALID, "SET needs structured replies first");
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    c.replies().await;
    let names = |r: &[(u32, Vec<u8>)]| -> Vec<String> {
        r.iter()
            .filter(|(k, _)| *k == REP_META_CONTEXT)
            .map(|(_, d)| String::from_utf8_lossy(&d[4..]).into_owned())
            .collect()
    };
    c.option(OPT_LIST_META_CONTEXT, &meta_request("rw", &[])).await;
    assert_eq!(names(&c.replies().await), vec!["base:allocation", "qemu:dirty-bitmap:d", "test:fragmented"]);
    c.option(OPT_LIST_META_CONTEXT, &meta_request("rw", &["qemu:dirty-bitmap:"])).await;
    assert_eq!(names(&c.replies().await), vec!["qemu:dirty-bitmap:d"]);
    c.option(OPT_SET_META_CONTEXT, &meta_request("rw", &["base:", "qemu:dirty-bitmap:d", "nope:x"])).await;
    assert_eq!(names(&c.replies().await), vec!["qemu:dirty-bitmap:d"]);
    c.option(OPT_LIST_META_CONTEXT, &meta_request("gone", &[])).await;
    assert_eq!(c.replies().await[0].0, REP_ERR_UNKNOWN);
}

#[tokio::test]
async fn simple_replies_cover_every_command() {
    let cat = catalog();
    let mut c = Client::connect(cat.clone(), 3).await;
    c.go("rw", false, &[]).await;
    c.request(CMD_WRITE, 0, 1, 4096, 8, b"abcdefgh").await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 100, 3, b"xyz").await;
    assert_eq!(c.simple().await, (0, 2));
    c.request(CMD_READ, 0, 3, 4096, 8, &[]).await;
    assert_eq!(c.simple().await, (0, 3));
    assert_eq!(c.bytes(8).await, b"abcdefgh");
    c.request(CMD_FLUSH, 0, 4, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
    assert_eq!(*cat.0["rw"].flushes.lock().unwrap(), 1);
    c.request(CMD_TRIM, 0, 5, 4096, 4, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 6, 100, 3, &[]).await;
    assert_eq!(c.simple().await, (0, 6));
    assert_eq!(*cat.0["rw"].last_zero.lock().unwrap(), Some(ZeroFlags { fua: false, no_hole: true, fast: false }));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 7, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (ENOTSUP, 7), "FAST_ZERO that can't be fast gets ENOTSUP");
    c.request(CMD_CACHE, 0, 8, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 8));
    c.request(CMD_READ, 0, 9, 4096, 8, &[]).await;
    assert_eq!(c.simple().await, (0, 9));
    assert_eq!(c.bytes(8).await, b"\0\0\0\0efgh");
    c.request(CMD_DISC, 0, 10, 0, 0, &[]).await;
    assert!(c.closed().await);
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn structured_reads_send_data_holes_and_error_chunks() {
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", true, &[]).await;
    c.request(CMD_WRITE, 0, 1, 0, 4, b"data").await;
    assert_eq!(c.chunk().await, (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, vec![]));
    c.request(CMD_READ, CMD_FLAG_DF, 2, 0, 4, &[]).await;
    let (flags, kind, cookie, payload) = c.chunk().await;
    assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(&payload[8..], b"data");
    c.request(CMD_READ, 0, 3, 65536, 4096, &[]).await;
    let (_, kind, _, payload) = c.chunk().await;
    assert_eq!(kind, REPLY_TYPE_OFFSET_HOLE);
    assert_eq!((u64::from_be_bytes(payload[..8].try_into().unwrap()), be32(&payload[8..])), (65536, 4096));
    c.request(CMD_READ, 0, 4, SIZE - 2, 4, &[]).await;
    let (flags, kind, cookie, payload) = c.chunk().await;
    assert_eq!((flags, kind, cookie, be32(&payload)), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 4, EINVAL));
}

#[tokio::test]
async fn reads_that_reuse_reply_buffers_send_exactly_their_own_bytes() {
    // Reply buffers are recycled without zeroing: a short read after a long one, a read after
    // a write (whose buffer held the payload) and a long one after short ones must each carry
    // their own header and data, nothing left over.
    for structured in [false, true] {
        let mut c = Client::connect(catalog(), 3).await;
        c.go("rw", structured, &[]).await;
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut cookie = 0;
        let mut read = async |c: &mut Client, offset: u64, len: usize| {
            cookie += 1;
            c.request(CMD_READ, 0, cookie, offset, len as u32, &[]).await;
            if structured {
                let (flags, kind, got, payload) = c.chunk().await;
                assert_eq!((flags, got), (REPLY_FLAG_DONE, cookie));
                if kind == REPLY_TYPE_OFFSET_HOLE {
                    return vec![0; be32(&payload[8..]) as usize];
                }
                assert_eq!(kind, REPLY_TYPE_OFFSET_DATA);
                assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), offset);
                payload[8..].to_vec()
            } else {
                assert_eq!(c.simple().await, (0, cookie));
                c.bytes(len).await
            }
        };
        c.request(CMD_WRITE, 0, 1000, 0, pattern.len() as u32, &pattern).await;
        if structured {
            assert_eq!(c.chunk().await.1, REPLY_TYPE_NONE);
        } else {
            assert_eq!(c.simple().await, (0, 1000));
        }
        assert_eq!(read(&mut c, 0, 65536).await, pattern);
        assert_eq!(read(&mut c, 100, 10).await, &pattern[100..110]);
        assert_eq!(read(&mut c, 131072, 4096).await, vec![0; 4096], "a hole after data reads as zeros");
        assert_eq!(read(&mut c, 60000, 8192).await, [&pattern[60000..], &[0; 2656][..]].concat());
        assert_eq!(read(&mut c, 1, 65535).await, &pattern[1..]);
    }
}

#[tokio::test]
async fn block_status_answers_each_selected_context_clipped_to_the_request() {
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", true, &["base:allocation", "qemu:dirty-bitmap:d"]).await;
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 10000, &[]).await;
    let (flags, kind, _, p) = c.chunk().await;
    assert_eq!((flags, kind, be32(&p)), (0, REPLY_TYPE_BLOCK_STATUS, 0));
    let ext: Vec<(u32, u32)> = p[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
    assert_eq!(ext, vec![(4096, 0), (4096, 3), (1808, 0)]);
    let (flags, _, _, p) = c.chunk().await;
    assert_eq!((flags, be32(&p), be32(&p[4..]), be32(&p[8..])), (REPLY_FLAG_DONE, 1, 10000, 1));
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 4096, 65536, &[]).await;
    let (_, _, _, p) = c.chunk().await;
    assert_eq!(p.len(), 4 + 8, "REQ_ONE returns exactly one extent");
    c.chunk().await;
    c.request(CMD_BLOCK_STATUS, 0, 3, SIZE, 1, &[]).await;
    assert_eq!(be32(&c.chunk().await.3), EINVAL);
}

#[tokio::test]
async fn a_slow_request_does_not_hold_up_later_ones_replies_come_out_of_order() {
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", false, &[]).await;
    c.request(CMD_READ, 0, 1, SLOW, 512, &[]).await;
    c.request(CMD_READ, 0, 2, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (0, 2), "the fast read is answered first");
    c.bytes(512).await;
    assert_eq!(c.simple().await, (0, 1));
    c.bytes(512).await;
}

#[tokio::test]
async fn bad_requests_get_error_codes_and_the_stream_stays_in_sync() {
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", false, &[]).await;
    c.request(CMD_WRITE, 0, 1, SIZE - 2, 4, b"abcd").await;
    assert_eq!(c.simple().await, (ENOSPC, 1), "write past the end");
    c.request(CMD_READ, 0, 2, u64::MAX - 1, 4, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 2), "offset overflow");
    c.request(CMD_WRITE, 0, 3, 0, (1 << 20) + 1, &vec![7u8; (1 << 20) + 1]).await;
    assert_eq!(c.simple().await, (EINVAL, 3), "payload over the maximum is drained and refused");
    c.request(42, 0, 4, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 4), "unknown command");
    c.request(CMD_READ, 0x100, 5, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 5), "unknown flags");
    c.request(CMD_BLOCK_STATUS, 0, 6, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 6), "block status without structured replies");
    c.request(CMD_READ, 0, 7, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (0, 7));
    assert_eq!(c.bytes(4).await, vec![0; 4], "nothing was written by the refused requests");
}

#[tokio::test]
async fn writes_to_a_read_only_export_get_eperm() {
    let mut c = Client::connect(catalog(), 3).await;
    c.go("ro", false, &[]).await;
    c.request(CMD_WRITE, 0, 1, 0, 4, b"abcd").await;
    assert_eq!(c.simple().await, (EPERM, 1));
    c.request(CMD_TRIM, 0, 2, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (EPERM, 2));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4, &[]).await;
    assert_eq!(c.simple().await, (EPERM, 3));
}

#[tokio::test]
async fn malformed_streams_close_the_connection_without_panicking() {
    // Bad request magic.
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", false, &[]).await;
    c.s.write_all(&[0xffu8; 28]).await.unwrap();
    assert!(c.closed().await);
    assert!(matches!(c.server.await.unwrap(), Err(NbdError::BadMagic(_))));
    // Truncated header, then EOF: a clean end.
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", false, &[]).await;
    c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
    c.s.shutdown().await.unwrap();
    assert!(c.server.await.unwrap().is_ok());
    // A write announcing far more than can be drained.
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", false, &[]).await;
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]).await;
    assert!(c.closed().await);
    // Unknown client flags, bad option magic.
    let c = Client::connect(catalog(), 0x80).await;
    assert!(matches!(c.server.await.unwrap(), Err(NbdError::BadClientFlags(0x80))));
    let mut c = Client::connect(catalog(), 3).await;
    c.s.write_all(&[1u8; 16]).await.unwrap();
    assert!(c.closed().await);
    // Random bytes after the greeting.
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..50 {
        let mut c = Client::connect(catalog(), 3).await;
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        c.s.write_all(&junk).await.unwrap();
        drop(c.s);
        let _ = c.server.await.expect("server task must not panic");
    }
}

#[tokio::test]
async fn revoking_the_export_closes_the_connection() {
    let cat = catalog();
    let mut c = Client::connect(cat.clone(), 3).await;
    c.go("rw", false, &[]).await;
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    cat.0["rw"].revoked.notify_one();
    assert!(c.closed().await);
    assert!(c.server.await.unwrap().is_ok());
}

/// An export whose writes fail with `Gone` (as a revoked volume handle's do).
struct GoneOnWrite(MemExport);

impl Export for GoneOnWrite {
    fn info(&self) -> &ExportInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<ReadKind, ExportError> {
        self.0.read(offset, buf).await
    }
    async fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), ExportError> {
        Err(ExportError::Gone)
    }
    async fn flush(&self) -> Result<(), ExportError> {
        self.0.flush().await
    }
    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.0.trim(offset, length, fua).await
    }
    async fn write_zeroes(&self, offset: u64, length: u64, flags: ZeroFlags) -> Result<(), ExportError> {
        self.0.write_zeroes(offset, length, flags).await
    }
    async fn cache(&self, offset: u64, length: u64) -> Result<(), ExportError> {
        self.0.cache(offset, length).await
    }
    async fn block_status(&self, context: usize, offset: u64, length: u32) -> Result<Vec<Extent>, ExportError> {
        self.0.block_status(context, offset, length).await
    }
    async fn revoked(&self) {
        std::future::pending().await
    }
}

/// A client that skipped the handshake, as the kernel NBD driver does on a socket handed to it.
fn kernel_client<E: Export>(export: E) -> Client {
    let (a, b) = tokio::io::duplex(4 << 20);
    let config = test_config();
    let server = tokio::spawn(async move { serve_transmission(b, export, &config).await });
    Client { s: a, server }
}

#[tokio::test]
async fn transmission_only_connections_get_simple_replies_to_every_command() {
    let cat = catalog();
    let mem = cat.0["rw"].clone();
    let mut c = kernel_client(MemExport(mem.clone()));
    let data = vec![0x7eu8; 8192];
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &data).await;
    assert_eq!(c.simple().await, (0, 1));
    c.request(CMD_READ, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(c.simple().await, (0, 2));
    assert_eq!(c.bytes(8192).await, data);
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 3));
    c.request(CMD_TRIM, 0, 4, 4096, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 4));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 8192, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    assert!(mem.data.lock().unwrap()[4096..12288].iter().all(|&b| b == 0));
    // Past the end: an error, and the connection stays usable.
    c.request(CMD_READ, 0, 6, SIZE, 4096, &[]).await;
    assert_eq!(c.simple().await, (EINVAL, 6));
    c.request(CMD_DISC, 0, 7, 0, 0, &[]).await;
    assert!(c.server.await.unwrap().is_ok());
}

#[tokio::test]
async fn transmission_only_connections_hold_requests_of_a_revoked_export() {
    let cat = catalog();
    let mut c = kernel_client(GoneOnWrite(MemExport(cat.0["rw"].clone())));
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[1u8; 4096]).await;
    // No error reply for the write (the kernel retries it on the next daemon's socket) ...
    c.request(CMD_READ, 0, 2, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (0, 2), "the first reply is the read's, not an error for the write");
    c.bytes(4096).await;
}

#[test]
fn kernel_flags_advertise_flush_fua_trim_zeroes_and_multi_conn_but_no_structured_replies() {
    let f = kernel_transmission_flags(false);
    for flag in [TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN] {
        assert_ne!(f & flag, 0, "flag {flag:#x}");
    }
    assert_eq!(f & (TF_READ_ONLY | TF_SEND_DF), 0);
    assert_ne!(kernel_transmission_flags(true) & TF_READ_ONLY, 0);
}

/// Sends `n` READs of `len` bytes without reading a byte of reply, over a 64 KiB pipe, and
/// returns the client and how many of them the export ran.
async fn reads_run_for_a_client_that_reads_nothing(
    cat: &Arc<Catalog>,
    config: ServerConfig,
    n: u64,
    len: u32,
) -> (Client, usize) {
    let mut c = Client::connect_with(cat.clone(), 3, config, 64 << 10).await;
    c.go("rw", false, &[]).await;
    let before = cat.0["rw"].reads.load(Ordering::Relaxed);
    for cookie in 0..n {
        c.request(CMD_READ, 0, cookie, (cookie * len as u64) % (SIZE - len as u64), len, &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    (c, cat.0["rw"].reads.load(Ordering::Relaxed) - before)
}

#[tokio::test]
async fn a_client_that_reads_no_replies_is_not_read_from_once_its_replies_fill_the_budget() {
    let cat = catalog();
    // 1 MiB of budget, 256 KiB reads: four replies may wait for the client, then the server
    // stops taking requests (the export runs no more reads) until they drain.
    let config = ServerConfig { max_buffered: 1 << 20, ..test_config() };
    let (mut c, ran) = reads_run_for_a_client_that_reads_nothing(&cat, config, 40, 256 << 10).await;
    assert!(ran <= 5, "{ran} reads of 256 KiB ran with a budget of 1 MiB and no reply read");
    assert!(ran >= 4, "only {ran} reads ran: the budget should hold four");
    // Once the client reads, every request is answered, each reply whole.
    let mut cookies = std::collections::HashSet::new();
    for _ in 0..40 {
        let (error, cookie) = c.simple().await;
        assert_eq!(error, 0);
        assert_eq!(c.bytes(256 << 10).await.len(), 256 << 10);
        cookies.insert(cookie);
    }
    assert_eq!(cookies.len(), 40);

    // The count of requests is bounded the same way: two at a time here, whatever their size.
    let config = ServerConfig { max_requests: 2, ..test_config() };
    let (mut c, ran) = reads_run_for_a_client_that_reads_nothing(&cat, config, 40, 256 << 10).await;
    assert!(ran <= 3, "{ran} reads ran with max_requests 2 and no reply read");
    for _ in 0..40 {
        assert_eq!(c.simple().await.0, 0);
        c.bytes(256 << 10).await;
    }
}

#[tokio::test]
async fn a_revoked_export_closes_the_connection_even_when_its_client_reads_no_replies() {
    let cat = catalog();
    let config = ServerConfig { max_buffered: 1 << 20, ..test_config() };
    let (c, _) = reads_run_for_a_client_that_reads_nothing(&cat, config, 40, 256 << 10).await;
    cat.0["rw"].revoked.notify_one();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), c.server)
        .await
        .expect("the connection must close although its client reads nothing");
    assert!(ended.unwrap().is_ok());
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    assert_eq!(Arc::strong_count(&cat.0["rw"]), 1, "the connection still holds the export");
    drop(c.s);
}

#[tokio::test]
async fn a_client_that_stalls_in_the_handshake_is_dropped_after_the_handshake_timeout() {
    let config = ServerConfig { handshake_timeout: Duration::from_millis(200), ..test_config() };
    // Connects and sends nothing.
    let c = Client::start(catalog(), config.clone(), 4096);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), c.server).await.expect("a silent client must be dropped");
    assert!(matches!(ended.unwrap(), Err(NbdError::HandshakeTimeout(_))));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // Stops halfway through an option.
    let mut c = Client::connect_with(catalog(), 3, config.clone(), 4096).await;
    c.s.write_u64(IHAVEOPT).await.unwrap();
    assert!(c.closed().await, "a client stalled mid-option must be dropped");
    assert!(matches!(c.server.await.unwrap(), Err(NbdError::HandshakeTimeout(_))));
    // A client that finished its handshake may then stay idle as long as it likes.
    let mut c = Client::connect_with(catalog(), 3, config, 4096).await;
    c.go("rw", false, &[]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    c.bytes(512).await;
}

#[tokio::test]
async fn block_status_describes_at_most_65536_extents_per_context_and_leaves_the_rest() {
    // Context "test:fragmented" has one-byte extents: 1 Mi of them for the whole export.
    let mut c = Client::connect(catalog(), 3).await;
    c.go("rw", true, &["test:fragmented"]).await;
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, SIZE as u32, &[]).await;
    let (flags, kind, cookie, p) = c.chunk().await;
    assert_eq!((flags, kind, cookie, be32(&p)), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1, 2));
    let extents: Vec<(u32, u32)> = p[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
    assert_eq!(extents.len(), 1 << 16);
    assert!(extents.iter().enumerate().all(|(i, &e)| e == (1, i as u32 % 2)));
}

/// A rollback right after a client disconnects counts on this: once the client sees the
/// connection close, the server holds no handle on the export, however slow it is to let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_is_dropped_before_the_client_sees_the_connection_close() {
    let cat = catalog_with_drop_delay(Duration::from_millis(300));
    let mut c = Client::connect(cat.clone(), 3).await;
    c.go("rw", false, &[]).await;
    // Still running when DISC comes: the connection ends after it.
    c.request(CMD_READ, 0, 1, SLOW, 8, &[]).await;
    c.request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    c.bytes(8).await;
    assert!(c.closed().await);
    assert_eq!(Arc::strong_count(&cat.0["rw"]), 1, "the export outlived the connection's close");
    assert!(c.server.await.unwrap().is_ok());
}

/// NBD_OPT_STARTTLS with a real rustls client (certificates made by `openssl`).
#[path = "tls_tests.rs"]
mod tls;
