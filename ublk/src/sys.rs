//! The two system calls snapblk makes that neither `std`, `nix` nor `socket2` wraps. They
//! live here, in the one crate allowed `unsafe` code, so the rest of the project has none.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Starts write-back of every dirty page of `file` (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`) without waiting for it and without making anything durable: a
/// later `fdatasync` then finds less to write.
pub fn start_writeback(file: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: sync_file_range takes a descriptor, which `file` keeps open for the call, and
    // plain integers; no memory is passed.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the nice value of the calling thread alone (Linux applies `setpriority` to one
/// thread when given its id). Lowering it needs root or CAP_SYS_NICE.
pub fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid takes nothing; setpriority takes plain integers (this thread's own id).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
