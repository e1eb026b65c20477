//! ublk devices (`/dev/ublkbN`) served by per-queue threads.
//!
//! [`add`] creates a device and [`recover`] takes over one whose server died (ublk user
//! recovery: the kernel keeps `/dev/ublkbN` and queues its I/O until a new server attaches).
//! Both run `libublk`'s control loop on a thread of their own; each hardware queue gets a
//! thread that owns its [`BlockTarget`] and per-tag I/O buffers, and serves requests one
//! by one: decode the descriptor, call the target, commit the result and fetch the next
//! request in one `io_uring` submission. Nothing is allocated per request.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! server process exits (crash, `kill -9`, or a restart), requests it had not completed are
//! re-issued to the next server instead of failing, so a mounted filesystem sees a pause, not
//! an error.

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, BufDescList, UblkFlags, UblkIORes};

use crate::target::{execute, BlockTarget};

/// The ublk control device; it exists when the `ublk_drv` module is loaded.
pub const CONTROL: &str = "/dev/ublk-control";
/// How long [`add`] and [`recover`] wait for the device to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Limits checked before asking the kernel (its own: UBLK_MAX_NR_QUEUES, UBLK_MAX_QUEUE_DEPTH).
pub const MAX_QUEUES: u16 = 64;
pub const MAX_DEPTH: u16 = 4096;
/// Largest discard / write-zeroes request the kernel may send (it splits bigger ones).
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error(
        "ublk is not available on this machine: {CONTROL} does not exist (load the kernel module with \
         'modprobe ublk_drv'; it needs Linux 6.0 or later built with CONFIG_BLK_DEV_UBLK)"
    )]
    NotAvailable,
    #[error("{0}")]
    Invalid(String),
    #[error("ublk {what} failed: {detail}")]
    Kernel { what: String, detail: String },
    #[error("ublk device did not come up within {}s", .0.as_secs())]
    Timeout(Duration),
}

fn kernel(what: impl Into<String>) -> impl FnOnce(libublk::UblkError) -> UblkError {
    let what = what.into();
    move |e| {
        let detail = match e {
            libublk::UblkError::OtherError(n) | libublk::UblkError::UringIOError(n) if n < 0 => {
                std::io::Error::from_raw_os_error(-n).to_string()
            }
            libublk::UblkError::IOError(io) => io.to_string(),
            other => other.to_string(),
        };
        UblkError::Kernel { what, detail }
    }
}

/// Whether the ublk driver is loaded.
pub fn available() -> Result<(), UblkError> {
    if std::path::Path::new(CONTROL).exists() {
        Ok(())
    } else {
        Err(UblkError::NotAvailable)
    }
}

/// The shape of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkConfig {
    /// Device number to ask for (`/dev/ublkbN`); `None` lets the kernel choose.
    pub dev_id: Option<u32>,
    /// Size in bytes, a multiple of `logical_block_size`.
    pub size: u64,
    pub queues: u16,
    pub depth: u16,
    /// 512, 1024, 2048 or 4096.
    pub logical_block_size: u32,
    /// Largest request (and per-tag buffer) in bytes.
    pub max_io_bytes: u32,
    /// Discards smaller than this (or unaligned to it) free nothing: the storage's allocation unit.
    pub discard_granularity: u32,
}

impl UblkConfig {
    pub fn validate(&self) -> Result<(), UblkError> {
        let invalid = |m: String| Err(UblkError::Invalid(m));
        let lbs = self.logical_block_size;
        if !(512..=4096).contains(&lbs) || !lbs.is_power_of_two() {
            return invalid(format!("logical block size {lbs} is not supported; use 512, 1024, 2048 or 4096"));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(lbs)) {
            return invalid(format!("device size {} is not a non-zero multiple of the block size {lbs}", self.size));
        }
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return invalid(format!("{} queues is out of range; use 1 to {MAX_QUEUES}", self.queues));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return invalid(format!("queue depth {} is out of range; use 1 to {MAX_DEPTH}", self.depth));
        }
        if self.max_io_bytes < 4096 || self.max_io_bytes > (1 << 20) || !self.max_io_bytes.is_multiple_of(4096) {
            return invalid(format!("maximum I/O size {} must be a multiple of 4 KiB up to 1 MiB", self.max_io_bytes));
        }
        if !self.discard_granularity.is_power_of_two() || self.discard_granularity < lbs {
            return invalid(format!(
                "discard granularity {} must be a power of two no smaller than the block size",
                self.discard_granularity
            ));
        }
        Ok(())
    }

    /// The parameters sent with SET_PARAMS: a volatile write cache with FUA (so the kernel
    /// sends FLUSH and FUA), the block sizes, discard and write-zeroes limits.
    pub fn params(&self) -> sys::ublk_params {
        let lbs_shift = self.logical_block_size.trailing_zeros() as u8;
        sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
                logical_bs_shift: lbs_shift,
                physical_bs_shift: lbs_shift.max(12),
                io_opt_shift: lbs_shift.max(12),
                io_min_shift: lbs_shift,
                max_sectors: self.max_io_bytes >> 9,
                dev_sectors: self.size >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: self.discard_granularity,
                max_discard_sectors: MAX_DISCARD_SECTORS,
                max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Device flags: user recovery, with requests in flight at a crash re-issued.
fn ctrl_flags() -> u64 {
    u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE)
}

/// A running device. Dropping it leaves the device running (the process is exiting, and a
/// later server recovers it); [`UblkDevice::remove`] stops and deletes it.
pub struct UblkDevice {
    dev_id: u32,
    runner: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice").field("dev_id", &self.dev_id).finish()
    }
}

/// `/dev/ublkbN` for a device number.
pub fn block_path(dev_id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{dev_id}"))
}

impl UblkDevice {
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    pub fn block_path(&self) -> PathBuf {
        block_path(self.dev_id)
    }

    /// Stops the device (in-flight and later I/O fails, `/dev/ublkbN` goes away), waits for
    /// its queue threads and deletes it.
    pub fn remove(mut self) -> Result<(), UblkError> {
        let stopped = UblkCtrl::new_simple(self.dev_id as i32)
            .map_err(kernel(format!("opening device {}", self.dev_id)))
            .and_then(|c| c.kill_dev().map_err(kernel(format!("stopping device {}", self.dev_id))));
        if let Some(runner) = self.runner.take() {
            if stopped.is_ok() {
                let _ = runner.join();
            }
        }
        stopped?;
        delete(self.dev_id)
    }
}

/// Deletes a device that no server runs (e.g. one left by an earlier server that is not
/// recovered). A missing device is not an error.
pub fn delete(dev_id: u32) -> Result<(), UblkError> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return Ok(());
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32).map_err(kernel(format!("opening device {dev_id}")))?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev().map_err(kernel(format!("deleting device {dev_id}")))?;
    Ok(())
}

/// The kernel's view of an existing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Dead,
    Live,
    /// Its server died; I/O waits for a new one ([`recover`]).
    Quiesced,
    FailIo,
    Unknown(u16),
}

/// The state of device `dev_id`, or `None` when it does not exist.
pub fn device_state(dev_id: u32) -> Option<DeviceState> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{dev_id}")).exists() {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32).ok()?;
    Some(match u32::from(ctrl.dev_info().state) {
        sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
        sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
        s => DeviceState::Unknown(s as u16),
    })
}

/// Creates a device served by `targets` (one per queue) and waits until `/dev/ublkbN` is live.
pub fn add<T: BlockTarget>(config: &UblkConfig, targets: Vec<T>) -> Result<UblkDevice, UblkError> {
    available()?;
    config.validate()?;
    run(config.clone(), targets, false)
}

/// Takes over device `dev_id` after its server died: START_USER_RECOVERY (waiting until the
/// kernel has quiesced it), new queue threads, END_USER_RECOVERY. Queued and re-issued
/// requests then reach `targets`.
pub fn recover<T: BlockTarget>(dev_id: u32, config: &UblkConfig, targets: Vec<T>) -> Result<UblkDevice, UblkError> {
    available()?;
    config.validate()?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32).map_err(kernel(format!("opening device {dev_id}")))?;
    let info = ctrl.dev_info();
    if info.nr_hw_queues as usize != targets.len() {
        return Err(UblkError::Invalid(format!(
            "device {dev_id} has {} queues but {} targets were given",
            info.nr_hw_queues,
            targets.len()
        )));
    }
    match ctrl.start_user_recover() {
        Ok(r) if r >= 0 => {}
        Ok(r) => {
            return Err(kernel(format!("START_USER_RECOVERY on device {dev_id}"))(libublk::UblkError::OtherError(r)))
        }
        Err(e) => return Err(kernel(format!("START_USER_RECOVERY on device {dev_id}"))(e)),
    }
    let config =
        UblkConfig { dev_id: Some(dev_id), queues: info.nr_hw_queues, depth: info.queue_depth, ..config.clone() };
    run(config, targets, true)
}

type Started = Result<u32, UblkError>;

/// Runs the control loop on its own thread; returns once the device is live (or failed).
fn run<T: BlockTarget>(config: UblkConfig, targets: Vec<T>, recovering: bool) -> Result<UblkDevice, UblkError> {
    let (tx, rx) = mpsc::channel::<Started>();
    let name = match config.dev_id {
        Some(id) => format!("ublk-ctl-{id}"),
        None => "ublk-ctl".to_string(),
    };
    let runner = std::thread::Builder::new()
        .name(name)
        .spawn(move || control_loop(config, targets, recovering, tx))
        .map_err(|e| UblkError::Kernel { what: "starting the control thread".into(), detail: e.to_string() })?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(dev_id)) => Ok(UblkDevice { dev_id, runner: Some(runner) }),
        Ok(Err(e)) => {
            let _ = runner.join();
            Err(e)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(UblkError::Timeout(START_TIMEOUT)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = runner.join();
            Err(UblkError::Kernel { what: "starting the device".into(), detail: "the control thread ended".into() })
        }
    }
}

fn control_loop<T: BlockTarget>(config: UblkConfig, targets: Vec<T>, recovering: bool, tx: mpsc::Sender<Started>) {
    let dev_flags = if recovering { UblkFlags::UBLK_DEV_F_RECOVER_DEV } else { UblkFlags::UBLK_DEV_F_ADD_DEV };
    let id = config.dev_id.map_or(-1, |i| i as i32);
    let ctrl = UblkCtrlBuilder::default()
        .name("snapblk")
        .id(id)
        .nr_queues(config.queues)
        .depth(config.depth)
        .io_buf_bytes(config.max_io_bytes)
        .ctrl_flags(ctrl_flags())
        .dev_flags(dev_flags)
        .build();
    let ctrl = match ctrl {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(kernel("adding the device")(e)));
            return;
        }
    };
    // Each queue thread takes its own target out of this list (once, at start).
    let slots: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new(targets.into_iter().map(Some).collect()));
    let params = config.params();
    let size = config.size;
    let started = tx.clone();
    let result = ctrl.run_target(
        move |dev: &mut UblkDev| {
            dev.tgt.dev_size = size;
            dev.tgt.params = params;
            Ok(())
        },
        move |qid: u16, dev: &UblkDev| {
            let target = slots.lock().ok().and_then(|mut s| s.get_mut(qid as usize).and_then(Option::take));
            match target {
                Some(t) => serve_queue(qid, dev, t),
                None => tracing::error!(qid, "no target for ublk queue"),
            }
        },
        move |ctrl: &UblkCtrl| {
            let _ = started.send(Ok(ctrl.dev_info().dev_id));
        },
    );
    if let Err(e) = result {
        // Before the device started, the receiver is waiting for this; afterwards it is gone.
        let _ = tx.send(Err(kernel("starting the device")(e)));
    }
    // A recovered device is not deleted by dropping its control (only an added one is):
    // `UblkDevice::remove` deletes it explicitly either way.
}

/// One queue thread: fetch, serve, commit until the device stops.
fn serve_queue<T: BlockTarget>(qid: u16, dev: &UblkDev, target: T) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot set up ublk queue");
            return;
        }
    };
    let queue = match queue.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot fetch ublk requests");
            return;
        }
    };
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _ctx: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let (op_flags, start, sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
        let Some(buf) = bufs.get_mut(tag as usize) else {
            return;
        };
        let buf = buf.as_mut_slice();
        let result = execute(&target, op_flags, start, sectors, buf);
        tracing::trace!(qid, tag, op_flags, start, sectors, ?result, "ublk request");
        if let Some(res) = result {
            if let Err(e) = q.complete_io_cmd_unified(tag, BufDesc::Slice(buf), Ok(UblkIORes::Result(res))) {
                tracing::warn!(qid, tag, error = %e, "cannot complete ublk request");
            }
        }
        // `None`: the target is gone (daemon shutting down). The request stays with this
        // process; when it exits the kernel re-issues it to the next server.
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> UblkConfig {
        UblkConfig {
            dev_id: None,
            size: 1 << 30,
            queues: 2,
            depth: 64,
            logical_block_size: 4096,
            max_io_bytes: 512 << 10,
            discard_granularity: 64 << 10,
        }
    }

    #[test]
    fn params_advertise_cache_fua_block_sizes_and_discard() {
        let p = config().params();
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, (512 << 10) >> 9);
        assert_eq!(p.discard.discard_granularity, 64 << 10);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert!(p.discard.max_discard_sectors > 0 && p.discard.max_write_zeroes_sectors > 0);
        let small = UblkConfig { logical_block_size: 512, ..config() }.params();
        assert_eq!((small.basic.logical_bs_shift, small.basic.physical_bs_shift), (9, 12));
    }

    #[test]
    fn bad_configurations_are_refused_with_a_reason() {
        assert!(config().validate().is_ok());
        let bad = [
            UblkConfig { logical_block_size: 8192, ..config() },
            UblkConfig { logical_block_size: 1000, ..config() },
            UblkConfig { size: 4096 + 512, ..config() },
            UblkConfig { size: 0, ..config() },
            UblkConfig { queues: 0, ..config() },
            UblkConfig { queues: MAX_QUEUES + 1, ..config() },
            UblkConfig { depth: 0, ..config() },
            UblkConfig { max_io_bytes: 1000, ..config() },
            UblkConfig { discard_granularity: 512, ..config() },
        ];
        for c in bad {
            let e = c.validate().expect_err("refused");
            assert!(matches!(e, UblkError::Invalid(_)), "{c:?}: {e}");
        }
    }

    #[test]
    fn without_the_driver_adding_a_device_names_the_missing_module() {
        if available().is_ok() {
            return; // a machine with ublk: nothing to check here
        }
        struct Never;
        impl BlockTarget for Never {
            fn read(&self, _: u64, _: &mut [u8]) -> Result<(), crate::TargetError> {
                unreachable!()
            }
            fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), crate::TargetError> {
                unreachable!()
            }
            fn flush(&self) -> Result<(), crate::TargetError> {
                unreachable!()
            }
            fn discard(&self, _: u64, _: u64) -> Result<(), crate::TargetError> {
                unreachable!()
            }
            fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), crate::TargetError> {
                unreachable!()
            }
        }
        let e = add(&config(), vec![Never, Never]).expect_err("no driver");
        assert!(e.to_string().contains("ublk_drv"), "{e}");
    }
}
