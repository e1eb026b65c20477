//! File helpers shared by the layers that keep small state files.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically: written to `PATH.tmp`, then renamed over it, so a
/// reader (or a recovery) sees the old file or the new one, never a part. With `sync`, also
/// durably: the file is synced before the rename and its directory after it; without, the
/// new file survives the process but maybe not a power loss.
pub fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        sync_parent(path)?;
    }
    Ok(())
}

/// Opens `path` for appending, creating it (mode 0600) when missing.
pub fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

/// Syncs the directory holding `path`, so a file created (or renamed) there survives a power
/// loss.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}
