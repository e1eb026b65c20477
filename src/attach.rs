//! Volumes attached to the kernel: `/dev/ublkbN` (ublk) and `/dev/nbdN` (the kernel NBD
//! driver, configured over netlink with sockets this daemon serves). The kernel-facing code
//! is in the `snapblk-ublk` crate; this module keeps track of attachments, opens the volume
//! handles that serve them, and persists them in `DIR/attachments.json` so a restarted daemon
//! takes its devices back:
//!
//! - ublk: user recovery (the kernel kept `/dev/ublkbN` and queued its I/O; requests the dead
//!   daemon had not completed are re-issued);
//! - NBD: NBD_CMD_RECONFIGURE with fresh sockets, within the dead-connection timeout.
//!
//! An attachment holds one volume handle per ublk queue or NBD connection, so it counts as
//! writable clients: rollback refuses while a volume is attached (unless `--force`, which
//! detaches it first) and delete refuses.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use snapblk_nbd::{kernel_transmission_flags, serve_transmission, ServerConfig};
use snapblk_ublk::nbd_kernel::{self, ConnectConfig};
use snapblk_ublk::ublk::{self, DeviceState, UblkConfig, UblkDevice};

use crate::engine::{Engine, EngineError, Result};
use crate::frontend::{widen_send_buffer, NbdExport, UblkTarget};

/// How long the kernel NBD driver waits for a restarted daemon before failing I/O.
pub const NBD_DEAD_CONN_TIMEOUT: Duration = Duration::from_secs(120);
/// A kernel NBD request not answered within this is retried (on a new socket after a restart).
pub const NBD_IO_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_DEPTH: u16 = 64;
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 4096;
const UBLK_MAX_IO_BYTES: u32 = 512 << 10;
const MAX_NBD_CONNECTIONS: u16 = 16;
const STATE_FILE: &str = "attachments.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachKind {
    Ublk,
    Nbd,
}

/// An attached volume, as the API shows it and as `DIR/attachments.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub volume: String,
    pub volume_id: String,
    pub kind: AttachKind,
    /// `/dev/ublkbN` or `/dev/nbdN`.
    pub device: PathBuf,
    /// N.
    pub index: u32,
    /// ublk hardware queues, or NBD connections.
    pub queues: u16,
    /// ublk queue depth (0 for NBD).
    pub depth: u16,
    pub logical_block_size: u32,
}

/// What `volume attach` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub kind: Option<AttachKind>,
    /// For NBD: `/dev/nbdN`, `nbdN` or `N`; for ublk: `/dev/ublkbN` or `N`. Absent: the kernel picks.
    pub device: Option<String>,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    pub logical_block_size: Option<u32>,
}

enum Running {
    Ublk(UblkDevice),
    Nbd {
        tasks: Vec<tokio::task::JoinHandle<()>>,
        /// Set before a detach: connections that end are not replaced.
        detaching: Arc<AtomicBool>,
    },
}

struct Attached {
    info: Attachment,
    running: Running,
}

pub struct Attachments {
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
    state_path: PathBuf,
    nbd_config: Arc<ServerConfig>,
    /// Serializes attach, detach and restore (which can take seconds: the kernel sets devices
    /// up) without holding `attached`, which `list` and `of_volume` read at any time.
    operations: Mutex<()>,
    /// By volume id. Held only briefly.
    attached: Mutex<BTreeMap<String, Attached>>,
}

fn invalid(msg: String) -> EngineError {
    EngineError::Invalid(msg)
}

/// A kernel-side failure, with its error kept as the source (its chain stays inspectable).
fn kernel_error(context: String, e: impl std::error::Error + Send + Sync + 'static) -> EngineError {
    EngineError::Io { context, source: std::io::Error::other(e) }
}

/// `N` from `/dev/{prefix}N`, `{prefix}N` or `N`.
pub fn parse_device(spec: &str, prefix: &str) -> Option<u32> {
    let s = spec.strip_prefix("/dev/").unwrap_or(spec);
    let s = s.strip_prefix(prefix).unwrap_or(s);
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// One queue per CPU, by default.
fn default_queues(max: u16) -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(max as usize) as u16).max(1)
}

impl Attachments {
    pub fn new(engine: Arc<Engine>, runtime: tokio::runtime::Handle, nbd_config: Arc<ServerConfig>) -> Attachments {
        let state_path = engine.dir().join(STATE_FILE);
        Attachments {
            engine,
            runtime,
            state_path,
            nbd_config,
            operations: Mutex::new(()),
            attached: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.attached.lock().values().map(|a| a.info.clone()).collect()
    }

    /// The attachment of a volume (by id, `v-…`).
    pub fn of_volume(&self, volume_id: &str) -> Option<Attachment> {
        self.attached.lock().get(volume_id).map(|a| a.info.clone())
    }

    /// Saves the attachments (called with `operations` held, so saves do not interleave).
    fn persist(&self) {
        let list = self.list();
        if let Err(e) = write_atomically(&self.state_path, &list) {
            tracing::error!(error = %e, path = %self.state_path.display(), "cannot save the attachments");
        }
    }

    /// Attaches a volume (blocking: run it off the async workers).
    pub fn attach(&self, volume: &str, req: &AttachRequest) -> Result<Attachment> {
        let kind = req.kind.ok_or_else(|| invalid("say how to attach: --ublk or --nbd".into()))?;
        let info = self.engine.volume(volume)?;
        let _op = self.operations.lock();
        if let Some(a) = self.of_volume(&info.id) {
            return Err(EngineError::Busy(format!(
                "volume '{}' is already attached to {}; detach it first (snapblk volume detach {})",
                info.name,
                a.device.display(),
                info.name
            )));
        }
        let lbs = req.logical_block_size.unwrap_or(DEFAULT_LOGICAL_BLOCK_SIZE);
        if !(512..=4096).contains(&lbs) || !lbs.is_power_of_two() {
            return Err(invalid(format!("logical block size {lbs} is not supported; use 512, 1024, 2048 or 4096")));
        }
        let a = match kind {
            AttachKind::Ublk => {
                let index = match &req.device {
                    Some(d) => Some(
                        parse_device(d, "ublkb")
                            .ok_or_else(|| invalid(format!("'{d}' is not a ublk device; give /dev/ublkbN or N")))?,
                    ),
                    None => None,
                };
                let queues = req.queues.unwrap_or_else(|| default_queues(ublk::MAX_QUEUES));
                let config = UblkConfig {
                    dev_id: index,
                    size: info.size,
                    queues,
                    depth: req.depth.unwrap_or(DEFAULT_DEPTH),
                    logical_block_size: lbs,
                    max_io_bytes: UBLK_MAX_IO_BYTES,
                    discard_granularity: info.cluster_size.max(lbs),
                };
                config.validate().map_err(|e| invalid(e.to_string()))?;
                let info = self.engine.volume(&info.id)?;
                self.start_ublk(&info.name, &info.id, &config, None)?
            }
            AttachKind::Nbd => {
                if req.depth.is_some() {
                    return Err(invalid("--depth applies to ublk only; the kernel NBD driver sets its own".into()));
                }
                let index = match &req.device {
                    Some(d) => Some(
                        parse_device(d, "nbd")
                            .ok_or_else(|| invalid(format!("'{d}' is not an NBD device; give /dev/nbdN or N")))?,
                    ),
                    None => None,
                };
                let queues = req.queues.unwrap_or_else(|| default_queues(MAX_NBD_CONNECTIONS));
                if queues == 0 || queues > MAX_NBD_CONNECTIONS {
                    return Err(invalid(format!(
                        "{queues} NBD connections is out of range; use 1 to {MAX_NBD_CONNECTIONS}"
                    )));
                }
                if let Some(i) = index {
                    if nbd_kernel::is_connected(i) {
                        return Err(EngineError::Busy(format!(
                            "/dev/nbd{i} is already connected; pick another device or disconnect it first"
                        )));
                    }
                }
                self.start_nbd(&info.name, &info.id, index, queues, lbs, false)?
            }
        };
        let shown = a.info.clone();
        self.attached.lock().insert(a.info.volume_id.clone(), a);
        self.persist();
        Ok(shown)
    }

    fn handles<T>(&self, volume_id: &str, n: u16, wrap: impl Fn(crate::engine::VolumeHandle) -> T) -> Result<Vec<T>> {
        (0..n).map(|_| self.engine.open_volume(volume_id).map(&wrap)).collect()
    }

    /// Adds (or, with `recover`, takes over) a ublk device for the volume.
    fn start_ublk(&self, name: &str, id: &str, config: &UblkConfig, recover: Option<u32>) -> Result<Attached> {
        let targets = self.handles(id, config.queues, UblkTarget::new)?;
        let device = match recover {
            Some(dev_id) => ublk::recover(dev_id, config, targets),
            None => ublk::add(config, targets),
        };
        let device = device.map_err(|e| match e {
            ublk::UblkError::NotAvailable | ublk::UblkError::Invalid(_) => invalid(e.to_string()),
            e => kernel_error(format!("cannot attach volume '{name}' with ublk"), e),
        })?;
        let info = Attachment {
            volume: name.to_string(),
            volume_id: id.to_string(),
            kind: AttachKind::Ublk,
            device: device.block_path(),
            index: device.dev_id(),
            queues: config.queues,
            depth: config.depth,
            logical_block_size: config.logical_block_size,
        };
        tracing::info!(volume = name, device = %info.device.display(), recovered = recover.is_some(), "ublk attached");
        Ok(Attached { info, running: Running::Ublk(device) })
    }

    /// Connects (or, with `reconfigure`, re-arms) a kernel NBD device with `queues` sockets
    /// served by this daemon.
    fn start_nbd(
        &self,
        name: &str,
        id: &str,
        index: Option<u32>,
        queues: u16,
        lbs: u32,
        reconfigure: bool,
    ) -> Result<Attached> {
        nbd_kernel::available().map_err(|e| match e {
            nbd_kernel::NbdKernelError::NotAvailable => invalid(e.to_string()),
            e => kernel_error("cannot reach the kernel NBD driver".into(), e),
        })?;
        let exports = self.handles(id, queues, NbdExport::for_volume)?;
        let size = self.engine.volume(id)?.size;
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..queues {
            let (a, b) = std::os::unix::net::UnixStream::pair()
                .map_err(EngineError::io("creating a socket pair for the kernel NBD driver"))?;
            a.set_nonblocking(true).map_err(EngineError::io("setting up an NBD socket"))?;
            widen_send_buffer(a.as_fd());
            ours.push(a);
            theirs.push(b);
        }
        let fds: Vec<_> = theirs.iter().map(|s| s.as_fd()).collect();
        let index = if reconfigure {
            let i = index.ok_or_else(|| invalid("reconfigure needs a device".into()))?;
            nbd_kernel::reconfigure(i, NBD_DEAD_CONN_TIMEOUT, &fds).map(|()| i)
        } else {
            let cfg = ConnectConfig {
                index,
                size,
                block_size: lbs,
                timeout: NBD_IO_TIMEOUT,
                dead_conn_timeout: NBD_DEAD_CONN_TIMEOUT,
                server_flags: kernel_transmission_flags(false),
            };
            nbd_kernel::connect(&cfg, &fds)
        }
        .map_err(|e| kernel_error(format!("cannot attach volume '{name}' to the kernel NBD driver"), e))?;
        // The kernel holds its own references to its ends now.
        drop(fds);
        drop(theirs);
        let detaching = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let _guard = self.runtime.enter();
        for (sock, export) in ours.into_iter().zip(exports) {
            let stream =
                tokio::net::UnixStream::from_std(sock).map_err(EngineError::io("registering an NBD socket"))?;
            let conn = NbdConnection {
                engine: self.engine.clone(),
                config: self.nbd_config.clone(),
                volume: name.to_string(),
                volume_id: id.to_string(),
                index,
                detaching: detaching.clone(),
            };
            tasks.push(self.runtime.spawn(conn.serve(stream, export)));
        }
        let info = Attachment {
            volume: name.to_string(),
            volume_id: id.to_string(),
            kind: AttachKind::Nbd,
            device: PathBuf::from(format!("/dev/nbd{index}")),
            index,
            queues,
            depth: 0,
            logical_block_size: lbs,
        };
        tracing::info!(volume = name, device = %info.device.display(), reconfigured = reconfigure, "kernel NBD attached");
        Ok(Attached { info, running: Running::Nbd { tasks, detaching } })
    }

    /// Detaches a volume: removes `/dev/ublkbN` or disconnects `/dev/nbdN` (blocking). I/O
    /// still in flight on the device fails; unmount first.
    pub fn detach(&self, volume: &str) -> Result<Attachment> {
        let info = self.engine.volume(volume)?;
        let _op = self.operations.lock();
        let removed = self.attached.lock().remove(&info.id);
        let Some(a) = removed else {
            return Err(EngineError::NotFound(format!("volume '{}' is not attached", info.name)));
        };
        let result = stop(a.running, &a.info);
        self.persist();
        result.map(|()| a.info)
    }

    /// Before a rollback of `volume_id`: refuses while it is attached, or with `force`
    /// detaches it (the kernel's cached pages of the old content go with the device).
    /// Returns the attachment that was removed.
    pub fn before_rollback(&self, volume_id: &str, force: bool) -> Result<Option<Attachment>> {
        let Some(a) = self.of_volume(volume_id) else {
            return Ok(None);
        };
        if !force {
            return Err(EngineError::Busy(format!(
                "volume '{}' is attached to {}; unmount it and run 'snapblk volume detach {}' first, or pass \
                 --force to detach it (its users then get I/O errors)",
                a.volume,
                a.device.display(),
                a.volume
            )));
        }
        match self.detach(volume_id) {
            Ok(a) => Ok(Some(a)),
            // detached meanwhile by someone else: nothing left to do
            Err(e) if e.kind() == crate::engine::ErrorKind::NotFound && self.of_volume(volume_id).is_none() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Refuses to delete an attached volume.
    pub fn before_delete(&self, volume_id: &str) -> Result<()> {
        match self.of_volume(volume_id) {
            Some(a) => Err(EngineError::Busy(format!(
                "volume '{}' is attached to {}; detach it first (snapblk volume detach {})",
                a.volume,
                a.device.display(),
                a.volume
            ))),
            None => Ok(()),
        }
    }

    /// At start-up: takes back the devices a previous daemon attached (blocking). Failures
    /// are logged and the attachment dropped.
    pub fn restore(&self) {
        let saved: Vec<Attachment> = match std::fs::read(&self.state_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, path = %self.state_path.display(), "unreadable attachments file; ignoring it");
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(error = %e, path = %self.state_path.display(), "cannot read the attachments file");
                return;
            }
        };
        let _op = self.operations.lock();
        for a in saved {
            match self.restore_one(&a) {
                Ok(r) => {
                    self.attached.lock().insert(r.info.volume_id.clone(), r);
                }
                Err(e) => tracing::error!(
                    volume = a.volume,
                    device = %a.device.display(),
                    error = %e,
                    "cannot take back an attached device; it is no longer attached"
                ),
            }
        }
        self.persist();
    }

    fn restore_one(&self, a: &Attachment) -> Result<Attached> {
        let info = self.engine.volume(&a.volume_id)?;
        match a.kind {
            AttachKind::Ublk => {
                let config = UblkConfig {
                    dev_id: Some(a.index),
                    size: info.size,
                    queues: a.queues,
                    depth: a.depth,
                    logical_block_size: a.logical_block_size,
                    max_io_bytes: UBLK_MAX_IO_BYTES,
                    discard_granularity: info.cluster_size.max(a.logical_block_size),
                };
                match ublk::device_state(a.index) {
                    None => self.start_ublk(&info.name, &info.id, &config, None),
                    Some(DeviceState::Dead) => {
                        ublk::delete(a.index)
                            .map_err(|e| kernel_error(format!("cannot delete {}", a.device.display()), e))?;
                        self.start_ublk(&info.name, &info.id, &config, None)
                    }
                    Some(_) => self.start_ublk(&info.name, &info.id, &config, Some(a.index)),
                }
            }
            AttachKind::Nbd => {
                let connected = nbd_kernel::is_connected(a.index);
                self.start_nbd(&info.name, &info.id, Some(a.index), a.queues, a.logical_block_size, connected)
            }
        }
    }
}

/// One kernel NBD connection of an attachment. When it ends while the volume is still
/// attached and the daemon is not stopping, the kernel dropped it (it shuts a socket down when a
/// request times out): it is replaced with a new socket (NBD_CMD_RECONFIGURE), so the device
/// does not fail once the dead-connection timeout runs out.
struct NbdConnection {
    engine: Arc<Engine>,
    config: Arc<ServerConfig>,
    volume: String,
    volume_id: String,
    index: u32,
    detaching: Arc<AtomicBool>,
}

impl NbdConnection {
    async fn serve(self, mut stream: tokio::net::UnixStream, mut export: NbdExport) {
        loop {
            match serve_transmission(stream, export, &self.config).await {
                Ok(()) => tracing::debug!(volume = self.volume, "kernel NBD connection closed"),
                Err(e) => tracing::warn!(volume = self.volume, error = %e, "kernel NBD connection ended with an error"),
            }
            if self.detaching.load(Ordering::Acquire) {
                return;
            }
            // Fails when the daemon is stopping (the engine refuses new handles).
            let Ok(handle) = self.engine.open_volume(&self.volume_id) else {
                return;
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.detaching.load(Ordering::Acquire) {
                return;
            }
            match self.reconnect().await {
                Ok(s) => {
                    tracing::warn!(
                        volume = self.volume,
                        device = self.index,
                        "the kernel dropped an NBD connection; handed it a new one"
                    );
                    stream = s;
                    export = NbdExport::for_volume(handle);
                }
                Err(e) => {
                    tracing::error!(volume = self.volume, device = self.index, error = %e, "cannot replace a dropped kernel NBD connection");
                    return;
                }
            }
        }
    }

    async fn reconnect(&self) -> Result<tokio::net::UnixStream> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(EngineError::io("creating a socket pair for the kernel NBD driver"))?;
        ours.set_nonblocking(true).map_err(EngineError::io("setting up an NBD socket"))?;
        widen_send_buffer(ours.as_fd());
        let index = self.index;
        let done = tokio::task::spawn_blocking(move || {
            nbd_kernel::reconfigure(index, NBD_DEAD_CONN_TIMEOUT, &[theirs.as_fd()])
        })
        .await
        .map_err(|e| kernel_error("reconfiguring the NBD device".into(), e))?;
        done.map_err(|e| kernel_error(format!("cannot reconfigure /dev/nbd{index}"), e))?;
        tokio::net::UnixStream::from_std(ours).map_err(EngineError::io("registering an NBD socket"))
    }
}

fn stop(running: Running, info: &Attachment) -> Result<()> {
    match running {
        Running::Ublk(device) => {
            device.remove().map_err(|e| kernel_error(format!("cannot remove {}", info.device.display()), e))
        }
        Running::Nbd { tasks, detaching } => {
            detaching.store(true, Ordering::Release);
            let result = nbd_kernel::disconnect(info.index)
                .map_err(|e| kernel_error(format!("cannot disconnect {}", info.device.display()), e));
            // The kernel sends NBD_CMD_DISC on each socket; the connections end and drop their
            // handles. Connections that do not end in time are cut.
            let deadline = Instant::now() + Duration::from_secs(10);
            while tasks.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            for t in &tasks {
                t.abort();
            }
            while tasks.iter().any(|t| !t.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            result
        }
    }
}

fn write_atomically<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    crate::fsutil::replace_file(path, &serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_parsed_in_every_accepted_form() {
        assert_eq!(parse_device("/dev/nbd3", "nbd"), Some(3));
        assert_eq!(parse_device("nbd12", "nbd"), Some(12));
        assert_eq!(parse_device("0", "nbd"), Some(0));
        assert_eq!(parse_device("/dev/ublkb1", "ublkb"), Some(1));
        assert_eq!(parse_device("/dev/sda", "nbd"), None);
        assert_eq!(parse_device("/dev/nbd", "nbd"), None);
        assert_eq!(parse_device("nbd-1", "nbd"), None);
        assert_eq!(parse_device("/dev/nbd99999999999", "nbd"), None);
    }

    #[test]
    fn attachments_round_trip_through_their_file_format() {
        let a = Attachment {
            volume: "db".into(),
            volume_id: "v-0000000000000001".into(),
            kind: AttachKind::Ublk,
            device: "/dev/ublkb0".into(),
            index: 0,
            queues: 2,
            depth: 64,
            logical_block_size: 4096,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        write_atomically(&p, &vec![a.clone()]).unwrap();
        let back: Vec<Attachment> = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, [a]);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"kind\": \"ublk\""), "{text}");
    }
}
