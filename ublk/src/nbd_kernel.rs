//! The kernel NBD driver, configured over generic netlink (family `nbd`), as `nbd-client`
//! does after its handshake. The caller serves the sockets it hands over: the kernel speaks
//! the NBD transmission phase on them directly (no handshake, simple replies).
//!
//! - [`connect`]: NBD_CMD_CONNECT with the sockets, size, block size, I/O timeout and a
//!   dead-connection timeout (how long the kernel queues I/O waiting for a new socket when
//!   the server goes away), returning the device index (`/dev/nbdN`);
//! - [`reconfigure`]: NBD_CMD_RECONFIGURE hands fresh sockets to a device whose server died
//!   (a restarted daemon), before the dead-connection timeout expires;
//! - [`disconnect`] sends NBD_CMD_DISCONNECT.
//!
//! Messages are built and parsed by pure functions (unit-tested); the socket calls are the
//! only `unsafe` code here.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `include/uapi/linux/nbd-netlink.h`.
pub mod uapi {
    pub const FAMILY: &str = "nbd";
    pub const VERSION: u8 = 1;
    pub const CMD_CONNECT: u8 = 1;
    pub const CMD_DISCONNECT: u8 = 2;
    pub const CMD_RECONFIGURE: u8 = 3;
    pub const ATTR_INDEX: u16 = 1;
    pub const ATTR_SIZE_BYTES: u16 = 2;
    pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
    pub const ATTR_TIMEOUT: u16 = 4;
    pub const ATTR_SERVER_FLAGS: u16 = 5;
    pub const ATTR_CLIENT_FLAGS: u16 = 6;
    pub const ATTR_SOCKETS: u16 = 7;
    pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
}

#[derive(Debug, thiserror::Error)]
pub enum NbdKernelError {
    #[error(
        "the kernel NBD driver is not available (no 'nbd' generic netlink family): load it with \
         'modprobe nbd' (Linux built with CONFIG_BLK_DEV_NBD)"
    )]
    NotAvailable,
    #[error("netlink {what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel refused {what}: {source}")]
    Refused {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
}

/// Attribute writer: netlink attributes, 4-byte aligned, nested ones with a patched length.
#[derive(Default)]
struct Attrs {
    buf: Vec<u8>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Attrs {
    fn put(&mut self, ty: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }
    fn u32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_ne_bytes());
    }
    fn u64(&mut self, ty: u16, v: u64) {
        self.put(ty, &v.to_ne_bytes());
    }
    fn string(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.put(ty, &data);
    }
    fn nested(&mut self, ty: u16, inner: impl FnOnce(&mut Attrs)) {
        let start = self.buf.len();
        self.put(ty, &[]);
        inner(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// A whole request: netlink header, genetlink header, attributes.
fn message(family: u16, cmd: u8, version: u8, seq: u32, attrs: &Attrs) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.buf.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.push(cmd);
    m.push(version);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&attrs.buf);
    m
}

fn getfamily_request(seq: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.string(CTRL_ATTR_FAMILY_NAME, uapi::FAMILY);
    message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq, &a)
}

/// What to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    /// `/dev/nbdN` to use; `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u32,
    /// A request not answered within this is retried on a live connection (or waits for one).
    pub timeout: Duration,
    /// How long I/O waits for a new socket after every connection died.
    pub dead_conn_timeout: Duration,
    /// The export's NBD transmission flags (NBD_FLAG_*).
    pub server_flags: u16,
}

fn connect_request(family: u16, seq: u32, cfg: &ConnectConfig, fds: &[RawFd]) -> Vec<u8> {
    let mut a = Attrs::default();
    if let Some(i) = cfg.index {
        a.u32(uapi::ATTR_INDEX, i);
    }
    a.u64(uapi::ATTR_SIZE_BYTES, cfg.size);
    a.u64(uapi::ATTR_BLOCK_SIZE_BYTES, u64::from(cfg.block_size));
    a.u64(uapi::ATTR_TIMEOUT, cfg.timeout.as_secs().max(1));
    a.u64(uapi::ATTR_DEAD_CONN_TIMEOUT, cfg.dead_conn_timeout.as_secs());
    a.u64(uapi::ATTR_SERVER_FLAGS, u64::from(cfg.server_flags));
    a.u64(uapi::ATTR_CLIENT_FLAGS, 0);
    sockets(&mut a, fds);
    message(family, uapi::CMD_CONNECT, uapi::VERSION, seq, &a)
}

fn sockets(a: &mut Attrs, fds: &[RawFd]) {
    a.nested(uapi::ATTR_SOCKETS, |a| {
        for &fd in fds {
            a.nested(uapi::SOCK_ITEM, |a| a.u32(uapi::SOCK_FD, fd as u32));
        }
    });
}

fn reconfigure_request(family: u16, seq: u32, index: u32, dead_conn_timeout: Duration, fds: &[RawFd]) -> Vec<u8> {
    let mut a = Attrs::default();
    a.u32(uapi::ATTR_INDEX, index);
    a.u64(uapi::ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout.as_secs());
    sockets(&mut a, fds);
    message(family, uapi::CMD_RECONFIGURE, uapi::VERSION, seq, &a)
}

fn disconnect_request(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.u32(uapi::ATTR_INDEX, index);
    message(family, uapi::CMD_DISCONNECT, uapi::VERSION, seq, &a)
}

/// One parsed answer.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// NLMSG_ERROR: 0 is an acknowledgement, otherwise a negative errno.
    Status {
        seq: u32,
        error: i32,
    },
    /// A genetlink message: its top-level attributes (type, payload).
    Attrs {
        seq: u32,
        attrs: Vec<(u16, Vec<u8>)>,
    },
    Done {
        seq: u32,
    },
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_attrs(mut b: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, NbdKernelError> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let len = read_u16(b, 0).ok_or(NbdKernelError::Malformed("attribute header"))? as usize;
        let ty = read_u16(b, 2).ok_or(NbdKernelError::Malformed("attribute header"))? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > b.len() {
            return Err(NbdKernelError::Malformed("attribute length"));
        }
        out.push((ty, b[NLA_HDRLEN..len].to_vec()));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// Splits a datagram into answers.
fn parse_answers(mut b: &[u8]) -> Result<Vec<Answer>, NbdKernelError> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let bad = NbdKernelError::Malformed;
        let len = read_u32(b, 0).ok_or(bad("message header"))? as usize;
        let ty = read_u16(b, 4).ok_or(bad("message header"))?;
        let seq = read_u32(b, 8).ok_or(bad("message header"))?;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(bad("message length"));
        }
        let body = &b[NLMSG_HDRLEN..len];
        out.push(match ty {
            NLMSG_ERROR => {
                let error = read_u32(body, 0).ok_or(bad("error message"))? as i32;
                Answer::Status { seq, error }
            }
            NLMSG_DONE => Answer::Done { seq },
            _ => {
                let attrs = body.get(GENL_HDRLEN..).ok_or(bad("genetlink header"))?;
                Answer::Attrs { seq, attrs: parse_attrs(attrs)? }
            }
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

fn attr_u16(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u16> {
    attrs.iter().find(|(t, _)| *t == ty).and_then(|(_, v)| read_u16(v, 0))
}

fn attr_u32(attrs: &[(u16, Vec<u8>)], ty: u16) -> Option<u32> {
    attrs.iter().find(|(t, _)| *t == ty).and_then(|(_, v)| read_u32(v, 0))
}

/// A generic netlink socket.
struct Genl {
    fd: OwnedFd,
    seq: u32,
}

fn last_os_error(what: &'static str) -> NbdKernelError {
    NbdKernelError::Io { what, source: std::io::Error::last_os_error() }
}

impl Genl {
    fn open() -> Result<Genl, NbdKernelError> {
        // SAFETY: socket(2) takes no pointers; a non-negative result is a new descriptor that
        // nothing else owns.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(last_os_error("socket"));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Never wait forever for the kernel's answer.
        let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
        // SAFETY: `tv` is a valid timeval that outlives the call, and its size is passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(last_os_error("setsockopt"));
        }
        Ok(Genl { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a request and collects answers up to its acknowledgement; a negative status
    /// becomes [`NbdKernelError::Refused`].
    fn call(&mut self, what: &'static str, req: &[u8]) -> Result<Vec<Answer>, NbdKernelError> {
        let seq = read_u32(req, 8).ok_or(NbdKernelError::Malformed("request"))?;
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0 = the kernel); it and `req` outlive
        // the call and their exact sizes are passed.
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(last_os_error("send"));
        }
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(last_os_error("receive"));
            }
            for a in parse_answers(&buf[..n as usize])? {
                match a {
                    Answer::Status { seq: s, error } if s == seq => {
                        if error < 0 {
                            return Err(NbdKernelError::Refused {
                                what,
                                source: std::io::Error::from_raw_os_error(-error),
                            });
                        }
                        return Ok(answers);
                    }
                    Answer::Attrs { seq: s, .. } if s == seq => answers.push(a),
                    _ => {} // stale answers to earlier requests
                }
            }
        }
    }

    fn nbd_family(&mut self) -> Result<u16, NbdKernelError> {
        let seq = self.next_seq();
        let answers = match self.call("looking up the nbd family", &getfamily_request(seq)) {
            Err(NbdKernelError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Err(NbdKernelError::NotAvailable)
            }
            r => r?,
        };
        answers
            .iter()
            .find_map(|a| match a {
                Answer::Attrs { attrs, .. } => attr_u16(attrs, CTRL_ATTR_FAMILY_ID),
                _ => None,
            })
            .ok_or(NbdKernelError::Malformed("no family id in the answer"))
    }
}

/// Whether the kernel NBD driver is loaded.
pub fn available() -> Result<(), NbdKernelError> {
    Genl::open()?.nbd_family().map(|_| ())
}

fn raw(fds: &[BorrowedFd<'_>]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_raw_fd()).collect()
}

/// Connects `/dev/nbdN` to `sockets` (the kernel takes its own references; the caller may
/// close its copies afterwards). Returns N.
pub fn connect(cfg: &ConnectConfig, sockets: &[BorrowedFd<'_>]) -> Result<u32, NbdKernelError> {
    let mut g = Genl::open()?;
    let family = g.nbd_family()?;
    let seq = g.next_seq();
    let answers = g.call("NBD_CMD_CONNECT", &connect_request(family, seq, cfg, &raw(sockets)))?;
    let index = answers.iter().find_map(|a| match a {
        Answer::Attrs { attrs, .. } => attr_u32(attrs, uapi::ATTR_INDEX),
        _ => None,
    });
    index.or(cfg.index).ok_or(NbdKernelError::Malformed("no device index in the answer"))
}

/// Gives `/dev/nbd{index}` new sockets in place of dead ones (after a daemon restart).
pub fn reconfigure(index: u32, dead_conn_timeout: Duration, sockets: &[BorrowedFd<'_>]) -> Result<(), NbdKernelError> {
    let mut g = Genl::open()?;
    let family = g.nbd_family()?;
    let seq = g.next_seq();
    g.call("NBD_CMD_RECONFIGURE", &reconfigure_request(family, seq, index, dead_conn_timeout, &raw(sockets)))?;
    Ok(())
}

/// Disconnects `/dev/nbd{index}` (I/O on it fails from then on; the device stays, unconfigured).
pub fn disconnect(index: u32) -> Result<(), NbdKernelError> {
    let mut g = Genl::open()?;
    let family = g.nbd_family()?;
    let seq = g.next_seq();
    g.call("NBD_CMD_DISCONNECT", &disconnect_request(family, seq, index))?;
    Ok(())
}

/// Whether `/dev/nbd{index}` is connected (from sysfs: a connected device has a `pid` file).
pub fn is_connected(index: u32) -> bool {
    std::path::Path::new(&format!("/sys/block/nbd{index}/pid")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        read_u16(b, at).unwrap()
    }

    #[test]
    fn getfamily_request_names_nbd_in_a_padded_string_attribute() {
        let m = getfamily_request(7);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(read_u32(&m, 0).unwrap() as usize, m.len());
        assert_eq!(u16_at(&m, 4), GENL_ID_CTRL);
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(read_u32(&m, 8), Some(7));
        assert_eq!(m[16], CTRL_CMD_GETFAMILY);
        // attribute: len 8 (4 + "nbd\0"), type FAMILY_NAME
        assert_eq!(u16_at(&m, 20), 8);
        assert_eq!(u16_at(&m, 22), CTRL_ATTR_FAMILY_NAME);
        assert_eq!(&m[24..28], b"nbd\0");
    }

    #[test]
    fn connect_request_carries_every_setting_and_nested_sockets() {
        let cfg = ConnectConfig {
            index: Some(3),
            size: 1 << 30,
            block_size: 4096,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            server_flags: 0x15d,
        };
        let m = connect_request(0x1a, 9, &cfg, &[5, 6]);
        assert_eq!(read_u32(&m, 0).unwrap() as usize, m.len());
        assert_eq!(u16_at(&m, 4), 0x1a);
        assert_eq!((m[16], m[17]), (uapi::CMD_CONNECT, uapi::VERSION));
        let attrs = parse_attrs(&m[20..]).unwrap();
        let get = |ty| attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(read_u32(&get(uapi::ATTR_INDEX), 0), Some(3));
        let u64_of = |v: Vec<u8>| u64::from_ne_bytes(v.try_into().unwrap());
        assert_eq!(u64_of(get(uapi::ATTR_SIZE_BYTES)), 1 << 30);
        assert_eq!(u64_of(get(uapi::ATTR_BLOCK_SIZE_BYTES)), 4096);
        assert_eq!(u64_of(get(uapi::ATTR_TIMEOUT)), 30);
        assert_eq!(u64_of(get(uapi::ATTR_DEAD_CONN_TIMEOUT)), 120);
        assert_eq!(u64_of(get(uapi::ATTR_SERVER_FLAGS)), 0x15d);
        let items = parse_attrs(&get(uapi::ATTR_SOCKETS)).unwrap();
        let fds: Vec<u32> = items
            .iter()
            .map(|(t, v)| {
                assert_eq!(*t, uapi::SOCK_ITEM);
                let inner = parse_attrs(v).unwrap();
                assert_eq!(inner[0].0, uapi::SOCK_FD);
                read_u32(&inner[0].1, 0).unwrap()
            })
            .collect();
        assert_eq!(fds, [5, 6]);
    }

    #[test]
    fn connect_without_an_index_lets_the_kernel_choose() {
        let cfg = ConnectConfig {
            index: None,
            size: 4096,
            block_size: 512,
            timeout: Duration::ZERO,
            dead_conn_timeout: Duration::ZERO,
            server_flags: 1,
        };
        let m = connect_request(0x1a, 1, &cfg, &[3]);
        let attrs = parse_attrs(&m[20..]).unwrap();
        assert!(attrs.iter().all(|(t, _)| *t != uapi::ATTR_INDEX));
        // a zero I/O timeout would mean the kernel default (30 s); at least 1 s is sent
        let t = attrs.iter().find(|(t, _)| *t == uapi::ATTR_TIMEOUT).unwrap();
        assert_eq!(u64::from_ne_bytes(t.1.clone().try_into().unwrap()), 1);
    }

    #[test]
    fn reconfigure_and_disconnect_name_the_device() {
        let m = reconfigure_request(0x1a, 2, 4, Duration::from_secs(60), &[8]);
        assert_eq!(m[16], uapi::CMD_RECONFIGURE);
        let attrs = parse_attrs(&m[20..]).unwrap();
        assert_eq!(attr_u32(&attrs, uapi::ATTR_INDEX), Some(4));
        assert!(attrs.iter().any(|(t, _)| *t == uapi::ATTR_SOCKETS));
        let m = disconnect_request(0x1a, 3, 4);
        assert_eq!(m[16], uapi::CMD_DISCONNECT);
        assert_eq!(attr_u32(&parse_attrs(&m[20..]).unwrap(), uapi::ATTR_INDEX), Some(4));
    }

    /// Builds a kernel-style answer datagram.
    fn answer(ty: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(align4(m.len()), 0);
        m
    }

    #[test]
    fn answers_are_parsed_into_attributes_and_statuses() {
        let mut a = Attrs::default();
        a.put(CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes());
        a.string(CTRL_ATTR_FAMILY_NAME, "nbd");
        let mut body = vec![1, 2, 0, 0];
        body.extend_from_slice(&a.buf);
        let mut dgram = answer(GENL_ID_CTRL, 5, &body);
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]); // the echoed request header
        dgram.extend(answer(NLMSG_ERROR, 5, &err));
        let answers = parse_answers(&dgram).unwrap();
        match &answers[0] {
            Answer::Attrs { seq: 5, attrs } => assert_eq!(attr_u16(attrs, CTRL_ATTR_FAMILY_ID), Some(0x1a)),
            other => panic!("{other:?}"),
        }
        assert_eq!(answers[1], Answer::Status { seq: 5, error: -libc::ENOENT });
    }

    #[test]
    fn truncated_or_lying_answers_are_errors_not_panics() {
        let good = answer(NLMSG_ERROR, 1, &0i32.to_ne_bytes());
        for cut in 0..good.len() {
            let _ = parse_answers(&good[..cut]);
        }
        let mut lying = good.clone();
        lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_answers(&lying).is_err());
        let mut tiny = good;
        tiny[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_answers(&tiny).is_err());
        assert!(parse_attrs(&[200, 0, 1, 0]).is_err());
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err());
        // random bytes never panic
        let mut x = 0x1234_5678u32;
        for _ in 0..2000 {
            let n = (x % 64) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let _ = parse_answers(&bytes);
        }
    }
}
