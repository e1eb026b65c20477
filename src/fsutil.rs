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
        // ("name" alone: the current directory)
        Some(dir) if dir.as_os_str().is_empty() => std::fs::File::open(".")?.sync_all(),
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// `create_dir_all`, durably: every directory it makes is synced into its parent, so a power
/// loss cannot take it away with what is later created (and synced) in it. Directories that
/// already exist cost nothing.
pub fn create_dir_all_durable(dir: &Path) -> std::io::Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    // Outermost first: each entry is durable before the one inside it.
    missing.iter().rev().try_for_each(|d| sync_parent(d))
}
