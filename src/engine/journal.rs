//! Crash-safe metadata: a checkpoint of the whole engine state plus a journal of the changes
//! made since, both documented in docs/FORMAT.md.
//!
//! Each change to metadata (a map entry, a snapshot, a rollback, ...) is a [`Record`]. Records
//! are buffered and appended to `meta/journal-<gen>` at commit (FLUSH, FUA, control
//! operations), after the slot files were synced, so a committed record never points at data
//! that is not durable. Recovery loads `meta/checkpoint` and replays the journal of the same
//! generation, stopping at the first torn or corrupt frame (the uncommitted tail). When the
//! journal grows large, a new checkpoint is written beside it and atomically renamed into place,
//! then a fresh journal of the next generation starts.
//!
//! Records may also be written *before* their slot data is synced (a snapshot create writes
//! its record at once and leaves the sync to a commit started in the background). Such a tail
//! survives a killed process (the page cache keeps both the records and the data they point
//! at) but not a power loss. So each process marks its frames with the kernel's boot id, and
//! each commit, after syncing the slot files, writes a `synced through` mark: at recovery,
//! records past the last mark are kept only if the boot id is the current one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{EngineError, Result};
use super::types::GroupTag;
use crate::codec::{Put, Reader, Short};

pub const JOURNAL_MAGIC: &[u8; 8] = b"SNAPBLKJ";
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"SNAPBLKC";
/// Version 2 added `SnapshotRelease` records and the snapshot flags byte in checkpoints;
/// version 3 added hydration (`RemoteHead`, `Hydrate`, `LoadedRange` records and each map's
/// remote part in checkpoints). Older files are still read.
/// Version 4 added the journal's `Boot` and `Synced` frames (checkpoints are unchanged);
/// version 5 the `Base` frame and the previous checkpoint kept beside the current one;
/// version 6 the `GroupSnapshot` and `Batch` records; version 7 the group snapshot's tag
/// (id, group, consistency) in the `GroupSnapshot` record (a new record type; the untagged one
/// is still read) and with each member snapshot in checkpoints; version 8 run containers in
/// checkpoint bitmaps (a range of clusters costs bytes per run, not per 65,536 clusters).
pub const FORMAT_VERSION: u32 = 8;
pub(crate) const JOURNAL_HEADER_LEN: u64 = 8 + 4 + 8;
/// A frame larger than this is corrupt (no record is anywhere near it).
const MAX_FRAME: u32 = 1 << 20;

/// One metadata change. Replaying records in order on top of a checkpoint rebuilds the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Cluster `cluster` of volume `volume` now has map entry `entry`; the cluster is dirty.
    MapSet {
        volume: u64,
        cluster: u64,
        entry: u64,
    },
    VolumeCreate {
        volume: u64,
        name: String,
        size: u64,
        cluster_size: u32,
        created: u64,
        origin: Option<u64>,
    },
    VolumeDelete {
        volume: u64,
    },
    SnapshotCreate {
        volume: u64,
        snapshot: u64,
        seq: u64,
        name: String,
        description: String,
        created: u64,
    },
    SnapshotDelete {
        snapshot: u64,
    },
    Rollback {
        volume: u64,
        snapshot: u64,
    },
    /// Clusters `start..end` of the volume are dirty (trimmed or zeroed, mapped or not).
    DirtyRange {
        volume: u64,
        start: u64,
        end: u64,
    },
    /// The snapshot's data now lives only in the object store: its local map is dropped.
    SnapshotRelease {
        snapshot: u64,
    },
    /// The volume's head becomes a view of a snapshot in the object store: no local data, every
    /// cluster pending. `parent` is the local (released) snapshot it rolls back to, if any.
    RemoteHead {
        volume: u64,
        parent: Option<u64>,
        region: String,
        snapshot: u64,
    },
    /// A pending cluster was loaded from the store into a slot (`entry`); not a change, so the
    /// cluster does not become dirty.
    Hydrate {
        volume: u64,
        cluster: u64,
        entry: u64,
    },
    /// Pending clusters `start..end` are loaded without data: holes in the source, or trimmed.
    LoadedRange {
        volume: u64,
        start: u64,
        end: u64,
    },
    /// One snapshot of each member volume, taken at one instant (a consistency group's cut):
    /// `(volume, snapshot)` pairs, the snapshots numbered `seq`, `seq + 1`, ... in this order.
    /// One frame, so recovery sees every member's snapshot or none. Each member carries
    /// `group` (none only in records of version 6).
    GroupSnapshot {
        members: Vec<(u64, u64)>,
        seq: u64,
        name: String,
        description: String,
        created: u64,
        group: Option<GroupTag>,
    },
    /// Records applied together or not at all (one frame): a group rollback's `Rollback` and
    /// `RemoteHead` records. Only those two kinds nest.
    Batch(Vec<Record>),
}

const T_MAP_SET: u8 = 1;
const T_VOLUME_CREATE: u8 = 2;
const T_VOLUME_DELETE: u8 = 3;
const T_SNAPSHOT_CREATE: u8 = 4;
const T_SNAPSHOT_DELETE: u8 = 5;
const T_ROLLBACK: u8 = 6;
const T_DIRTY_RANGE: u8 = 7;
const T_SNAPSHOT_RELEASE: u8 = 8;
const T_REMOTE_HEAD: u8 = 9;
const T_HYDRATE: u8 = 10;
const T_LOADED_RANGE: u8 = 11;
const T_GROUP_SNAPSHOT: u8 = 15;
const T_BATCH: u8 = 16;
/// `GroupSnapshot` with its group tag (version 7).
const T_GROUP_SNAPSHOT_TAGGED: u8 = 17;
/// Most volumes in one group snapshot (`GroupSnapshot`).
pub const MAX_GROUP_MEMBERS: usize = 64;
/// Journal frames about the journal itself (not records): the writer's boot id, and the
/// offset up to which every record's slot data was synced.
const T_BOOT: u8 = 12;
const T_SYNCED: u8 = 13;
/// The first frame of a journal made by a checkpoint: the offset in the previous
/// generation's journal its image ends at (see `Engine::open` on a damaged checkpoint).
const T_BASE: u8 = 14;

/// A boot id: 16 bytes that differ after every reboot of the machine.
pub type BootId = [u8; 16];

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`). Without one, a random id: then
/// nothing written without a sync is trusted after any restart, which is safe, only stricter.
pub fn boot_id() -> BootId {
    static ID: std::sync::OnceLock<BootId> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let parsed = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().and_then(|text| {
            let hex: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
            let mut id = [0u8; 16];
            for (i, pair) in hex.chunks(2).enumerate() {
                *id.get_mut(i)? = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
            }
            (hex.len() == 32).then_some(id)
        });
        parsed.unwrap_or_else(|| {
            tracing::warn!("cannot read the kernel boot id; snapshots become crash-safe only once committed");
            rand::random()
        })
    })
}

/// What a scan of the journal's frames found.
pub(crate) struct Scan {
    /// Records, each with the file offset where its frame ends.
    pub(crate) records: Vec<(Record, u64)>,
    /// The boot id of the last process that wrote frames.
    boot: Option<BootId>,
    /// The highest `Synced` mark.
    synced_through: u64,
    /// The `Base` frame's offset, if any.
    base: Option<u64>,
    /// The end of the last valid frame (where the next write goes).
    pub(crate) valid: u64,
}

fn frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    payload(out);
    let payload_len = (out.len() - start - 8) as u32;
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

impl Record {
    /// Appends the framed record: `len u32 | crc32c(payload) u32 | payload`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(out, |out| self.encode_payload(out));
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Record::MapSet { volume, cluster, entry } => {
                out.put_u8(T_MAP_SET);
                out.put_u64(*volume);
                out.put_u64(*cluster);
                out.put_u64(*entry);
            }
            Record::VolumeCreate { volume, name, size, cluster_size, created, origin } => {
                out.put_u8(T_VOLUME_CREATE);
                out.put_u64(*volume);
                out.put_str(name);
                out.put_u64(*size);
                out.put_u32(*cluster_size);
                out.put_u64(*created);
                out.put_opt(*origin);
            }
            Record::VolumeDelete { volume } => {
                out.put_u8(T_VOLUME_DELETE);
                out.put_u64(*volume);
            }
            Record::SnapshotCreate { volume, snapshot, seq, name, description, created } => {
                out.put_u8(T_SNAPSHOT_CREATE);
                out.put_u64(*volume);
                out.put_u64(*snapshot);
                out.put_u64(*seq);
                out.put_str(name);
                out.put_str(description);
                out.put_u64(*created);
            }
            Record::GroupSnapshot { members, seq, name, description, created, group } => {
                out.put_u8(if group.is_some() { T_GROUP_SNAPSHOT_TAGGED } else { T_GROUP_SNAPSHOT });
                out.put_u32(members.len() as u32);
                for (volume, snapshot) in members {
                    out.put_u64(*volume);
                    out.put_u64(*snapshot);
                }
                out.put_u64(*seq);
                out.put_str(name);
                out.put_str(description);
                out.put_u64(*created);
                if let Some(tag) = group {
                    put_group_tag(out, tag);
                }
            }
            Record::Batch(records) => {
                out.put_u8(T_BATCH);
                out.put_u32(records.len() as u32);
                for r in records {
                    let mut inner = Vec::new();
                    r.encode_payload(&mut inner);
                    out.put_u32(inner.len() as u32);
                    out.extend_from_slice(&inner);
                }
            }
            Record::SnapshotDelete { snapshot } => {
                out.put_u8(T_SNAPSHOT_DELETE);
                out.put_u64(*snapshot);
            }
            Record::Rollback { volume, snapshot } => {
                out.put_u8(T_ROLLBACK);
                out.put_u64(*volume);
                out.put_u64(*snapshot);
            }
            Record::DirtyRange { volume, start, end } => {
                out.put_u8(T_DIRTY_RANGE);
                out.put_u64(*volume);
                out.put_u64(*start);
                out.put_u64(*end);
            }
            Record::SnapshotRelease { snapshot } => {
                out.put_u8(T_SNAPSHOT_RELEASE);
                out.put_u64(*snapshot);
            }
            Record::RemoteHead { volume, parent, region, snapshot } => {
                out.put_u8(T_REMOTE_HEAD);
                out.put_u64(*volume);
                out.put_opt(*parent);
                out.put_str(region);
                out.put_u64(*snapshot);
            }
            Record::Hydrate { volume, cluster, entry } => {
                out.put_u8(T_HYDRATE);
                out.put_u64(*volume);
                out.put_u64(*cluster);
                out.put_u64(*entry);
            }
            Record::LoadedRange { volume, start, end } => {
                out.put_u8(T_LOADED_RANGE);
                out.put_u64(*volume);
                out.put_u64(*start);
                out.put_u64(*end);
            }
        }
    }

    fn decode(payload: &[u8]) -> Result<Record, Short> {
        let mut r = Reader::new(payload);
        let rec = match r.u8()? {
            T_MAP_SET => Record::MapSet { volume: r.u64()?, cluster: r.u64()?, entry: r.u64()? },
            T_VOLUME_CREATE => Record::VolumeCreate {
                volume: r.u64()?,
                name: r.str()?,
                size: r.u64()?,
                cluster_size: r.u32()?,
                created: r.u64()?,
                origin: r.opt()?,
            },
            T_VOLUME_DELETE => Record::VolumeDelete { volume: r.u64()? },
            T_SNAPSHOT_CREATE => Record::SnapshotCreate {
                volume: r.u64()?,
                snapshot: r.u64()?,
                seq: r.u64()?,
                name: r.str()?,
                description: r.str()?,
                created: r.u64()?,
            },
            kind @ (T_GROUP_SNAPSHOT | T_GROUP_SNAPSHOT_TAGGED) => {
                let n = group_size(&mut r)?;
                let members = (0..n).map(|_| Ok((r.u64()?, r.u64()?))).collect::<Result<Vec<_>, Short>>()?;
                Record::GroupSnapshot {
                    members,
                    seq: r.u64()?,
                    name: r.str()?,
                    description: r.str()?,
                    created: r.u64()?,
                    group: if kind == T_GROUP_SNAPSHOT_TAGGED { Some(group_tag(&mut r)?) } else { None },
                }
            }
            T_BATCH => {
                let n = group_size(&mut r)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u32()? as usize;
                    let inner = Record::decode(r.bytes(len)?)?;
                    if !matches!(inner, Record::Rollback { .. } | Record::RemoteHead { .. }) {
                        return Err(Short);
                    }
                    records.push(inner);
                }
                Record::Batch(records)
            }
            T_SNAPSHOT_DELETE => Record::SnapshotDelete { snapshot: r.u64()? },
            T_ROLLBACK => Record::Rollback { volume: r.u64()?, snapshot: r.u64()? },
            T_DIRTY_RANGE => Record::DirtyRange { volume: r.u64()?, start: r.u64()?, end: r.u64()? },
            T_SNAPSHOT_RELEASE => Record::SnapshotRelease { snapshot: r.u64()? },
            T_REMOTE_HEAD => {
                Record::RemoteHead { volume: r.u64()?, parent: r.opt()?, region: r.str()?, snapshot: r.u64()? }
            }
            T_HYDRATE => Record::Hydrate { volume: r.u64()?, cluster: r.u64()?, entry: r.u64()? },
            T_LOADED_RANGE => Record::LoadedRange { volume: r.u64()?, start: r.u64()?, end: r.u64()? },
            _ => return Err(Short),
        };
        if r.remaining() != 0 {
            return Err(Short);
        }
        Ok(rec)
    }
}

/// A group tag: `id u64 | group str | consistency u8` (0 = crash, 1 = application). The
/// checkpoint writes it the same way.
pub(super) fn put_group_tag(out: &mut Vec<u8>, tag: &GroupTag) {
    out.put_u64(tag.id);
    out.put_str(&tag.group);
    out.put_u8(u8::from(tag.application));
}

pub(super) fn group_tag(r: &mut Reader<'_>) -> Result<GroupTag, Short> {
    let (id, group) = (r.u64()?, r.str()?);
    let application = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(Short),
    };
    Ok(GroupTag { id, group, application })
}

/// The member count of a group record: 1 to [`MAX_GROUP_MEMBERS`].
fn group_size(r: &mut Reader<'_>) -> Result<usize, Short> {
    let n = r.u32()? as usize;
    if n == 0 || n > MAX_GROUP_MEMBERS {
        return Err(Short);
    }
    Ok(n)
}

/// Decodes frames from `buf` until the first torn or corrupt one (records, `Boot` and
/// `Synced` frames); `base` is the file offset of `buf`.
pub(crate) fn scan_frames(buf: &[u8], base: u64) -> Scan {
    let mut scan = Scan { records: Vec::new(), boot: None, synced_through: base, base: None, valid: base };
    let mut pos = 0;
    while let Some(header) = buf.get(pos..pos + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME {
            break;
        }
        let Some(payload) = buf.get(pos + 8..pos + 8 + len as usize) else { break };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        let end = base + (pos + 8 + len as usize) as u64;
        let mut r = Reader::new(payload);
        match r.u8() {
            Ok(T_BOOT) => match r.array::<16>() {
                Ok(id) if r.remaining() == 0 => scan.boot = Some(id),
                _ => break,
            },
            Ok(T_SYNCED) => match r.u64() {
                Ok(through) if r.remaining() == 0 => scan.synced_through = scan.synced_through.max(through),
                _ => break,
            },
            Ok(T_BASE) => match r.u64() {
                Ok(offset) if r.remaining() == 0 => {
                    scan.base = Some(offset);
                    // Written first, by a rotation, and naming no slot data: nothing it relies
                    // on can be lost with a page cache, so it is trusted as if synced (else a
                    // journal holding only it would look cut by a restart of the machine).
                    if scan.synced_through == scan.valid {
                        scan.synced_through = end;
                    }
                }
                _ => break,
            },
            _ => match Record::decode(payload) {
                Ok(rec) => scan.records.push((rec, end)),
                Err(Short) => break,
            },
        }
        pos += 8 + len as usize;
        scan.valid = end;
    }
    scan
}

/// Test support: the offsets a crash could have cut the journal file `bytes` at without
/// losing a synced record — the end of every frame from the last `Synced` mark on.
#[cfg(test)]
pub(crate) fn cut_points(bytes: &[u8]) -> Vec<u64> {
    let Some(frames) = bytes.get(JOURNAL_HEADER_LEN as usize..) else { return Vec::new() };
    let scan = scan_frames(frames, JOURNAL_HEADER_LEN);
    let mut cuts: Vec<u64> = scan.records.iter().map(|(_, end)| *end).filter(|&e| e > scan.synced_through).collect();
    cuts.push(scan.valid);
    cuts
}

/// What `Journal::read_trusted` found.
pub struct Trusted {
    pub records: Vec<(Record, u64)>,
    pub len: u64,
    pub base: Option<u64>,
}

/// The open journal file of the current generation.
pub struct Journal {
    dir: PathBuf,
    file: Arc<File>,
    pub generation: u64,
    /// Bytes in the file (header included).
    pub len: u64,
    boot: BootId,
    /// Whether this process has written its `Boot` frame to this file yet.
    boot_written: bool,
    /// The last `Synced` mark written (or the end of what recovery kept).
    synced_through: u64,
    /// The next generation's journal while a checkpoint is being installed: frames written
    /// meanwhile go to both, so they survive whichever of the two recovery ends up using.
    next: Option<Box<Journal>>,
}

pub fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation:016x}"))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(EngineError::io(format!("syncing directory {}", dir.display())))
}

impl Journal {
    /// Opens (or creates) the journal of `generation` and returns its valid records. A torn
    /// tail is cut off so new frames follow valid ones; so is a tail written without a sync
    /// by another boot than `boot` (a power loss may have kept records but lost their data).
    pub fn open(dir: &Path, generation: u64, boot: BootId) -> Result<(Journal, Vec<Record>)> {
        let path = journal_path(dir, generation);
        let ctx = || format!("opening journal {}", path.display());
        let (records, len) = match Journal::read_trusted(dir, generation, boot)? {
            Some(Trusted { records, len, .. }) => (records.into_iter().map(|(r, _)| r).collect(), len),
            // Missing or shorter than its header (crash while creating it): start it anew.
            _ => {
                let mut header = Vec::new();
                header.extend_from_slice(JOURNAL_MAGIC);
                header.put_u32(FORMAT_VERSION);
                header.put_u64(generation);
                let mut f = File::create(&path).map_err(EngineError::io(ctx()))?;
                f.write_all(&header).and_then(|_| f.sync_all()).map_err(EngineError::io(ctx()))?;
                sync_dir(dir)?;
                (Vec::new(), JOURNAL_HEADER_LEN)
            }
        };
        let file = OpenOptions::new().write(true).open(&path).map_err(EngineError::io(ctx()))?;
        file.set_len(len).map_err(EngineError::io(ctx()))?;
        let journal = Journal {
            dir: dir.to_path_buf(),
            file: Arc::new(file),
            generation,
            len,
            boot,
            boot_written: false,
            synced_through: len,
            next: None,
        };
        Ok((journal, records))
    }

    /// The records of journal `generation` that can be trusted (each with the offset its
    /// frame ends at), the length they end at and its `Base` offset; `None` when the file is
    /// missing or shorter than its header. Reads only.
    pub fn read_trusted(dir: &Path, generation: u64, boot: BootId) -> Result<Option<Trusted>> {
        let path = journal_path(dir, generation);
        let bytes = match fs::read(&path) {
            Ok(bytes) if bytes.len() as u64 >= JOURNAL_HEADER_LEN => bytes,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EngineError::io(format!("opening journal {}", path.display()))(e)),
        };
        let version = check_header(&bytes, JOURNAL_MAGIC, generation, &path)?;
        let scan = scan_frames(&bytes[JOURNAL_HEADER_LEN as usize..], JOURNAL_HEADER_LEN);
        // Before version 4 every record was written after its data was synced.
        let trusted = if version < 4 || scan.boot == Some(boot) { scan.valid } else { scan.synced_through };
        let records: Vec<(Record, u64)> = scan.records.into_iter().take_while(|(_, end)| *end <= trusted).collect();
        if trusted < scan.valid {
            tracing::warn!(
                journal = %path.display(),
                dropped_bytes = scan.valid - trusted,
                "the machine restarted since the journal's last records were written, before they were synced: they are dropped (snapshots taken just before a power loss)"
            );
        }
        Ok(Some(Trusted { records, len: trusted, base: scan.base }))
    }

    fn write_at_end(&mut self, frames: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(frames, self.len).map_err(EngineError::io("writing to the journal"))?;
        self.len += frames.len() as u64;
        Ok(())
    }

    /// Writes encoded frames without syncing anything: they survive the process, not a power
    /// loss, until a `mark_synced` past them is synced. Returns the end offset.
    pub fn write(&mut self, frames: &[u8]) -> Result<u64> {
        if !frames.is_empty() {
            if !self.boot_written {
                let mut boot = Vec::with_capacity(32);
                frame(&mut boot, |out| {
                    out.put_u8(T_BOOT);
                    out.extend_from_slice(&self.boot);
                });
                self.write_at_end(&boot)?;
                self.boot_written = true;
            }
            self.write_at_end(frames)?;
            if let Some(next) = &mut self.next {
                next.write(frames)?;
            }
        }
        Ok(self.len)
    }

    /// Records that the slot data of every record ending at or before `through` is synced.
    /// Durable with the next `sync`.
    pub fn mark_synced(&mut self, through: u64) -> Result<()> {
        if through <= self.synced_through {
            return Ok(());
        }
        let mut mark = Vec::with_capacity(24);
        frame(&mut mark, |out| {
            out.put_u8(T_SYNCED);
            out.put_u64(through);
        });
        self.write_at_end(&mark)?;
        self.synced_through = through;
        Ok(())
    }

    /// The file, to sync without holding the journal's lock.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Rotation, step 1 (no lock needed): a fresh, empty journal for the generation after
    /// `generation`.
    pub fn create_next(dir: &Path, generation: u64, boot: BootId) -> Result<Journal> {
        let path = journal_path(dir, generation + 1);
        // A leftover of a rotation that failed earlier must not lend its records.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(EngineError::io(format!("removing {}", path.display()))(e))
            }
            _ => {}
        }
        Ok(Journal::open(dir, generation + 1, boot)?.0)
    }

    /// Step 2, with the state imaged: from now on frames go to `next` too. Its first frame
    /// says where in this journal the image ends (recovery from the previous checkpoint, should
    /// the new one be damaged, replays this journal that far and then the next).
    pub fn attach_next(&mut self, mut next: Journal) -> Result<()> {
        let mut base = Vec::with_capacity(24);
        frame(&mut base, |out| {
            out.put_u8(T_BASE);
            out.put_u64(self.len);
        });
        next.write_at_end(&base)?;
        self.next = Some(Box::new(next));
        Ok(())
    }

    /// Step 3 (no lock needed): installs `checkpoint`, the image of the state after every
    /// record of generation `generation`, as the checkpoint of `generation + 1`. Crash-safe at
    /// every step: until the rename, recovery uses the old checkpoint and the old journal
    /// (which has everything); after it, the new checkpoint and the next journal (which has
    /// everything written since the image).
    pub fn install_checkpoint(dir: &Path, checkpoint: &[u8]) -> Result<()> {
        let path = dir.join("checkpoint");
        // The checkpoint being replaced stays as `checkpoint.prev` (with this journal): the way
        // back should the new one ever be unreadable. Linked, then renamed, so `checkpoint`
        // exists at every instant.
        if path.exists() {
            let (tmp, prev) = (dir.join("checkpoint.prev.tmp"), dir.join("checkpoint.prev"));
            let _ = fs::remove_file(&tmp);
            fs::hard_link(&path, &tmp)
                .and_then(|()| fs::rename(&tmp, &prev))
                .map_err(EngineError::io(format!("keeping {}", prev.display())))?;
        }
        crate::fsutil::replace_file(&path, checkpoint, true)
            .map_err(EngineError::io(format!("writing checkpoint {}", path.display())))
    }

    /// Step 4: switches to the next journal, keeping this one (it goes with
    /// `checkpoint.prev`) and removing the one before it.
    pub fn switch_to_next(&mut self) {
        let Some(next) = self.next.take() else { return };
        let older = self.generation.checked_sub(1).map(|g| journal_path(&self.dir, g));
        *self = *next;
        // Best effort: a leftover journal is ignored and removed at the next start.
        if let Some(older) = older {
            let _ = fs::remove_file(older);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn boot(&self) -> BootId {
        self.boot
    }
}

/// Checks `MAGIC | version u32 | generation u64` at the start of a metadata file; returns the
/// version (1..=FORMAT_VERSION).
pub fn check_header(bytes: &[u8], magic: &[u8; 8], generation: u64, path: &Path) -> Result<u32> {
    let mut r = Reader::new(bytes);
    let bad = || {
        EngineError::Corrupt(format!(
            "{} is not a snapblk metadata file of this format; restore the daemon directory from a backup",
            path.display()
        ))
    };
    if r.bytes(8).map_err(|_| bad())? != magic {
        return Err(bad());
    }
    let version = r.u32().map_err(|_| bad())?;
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(EngineError::Corrupt(format!(
            "{} has format version {version}, this snapblk reads versions 1 to {FORMAT_VERSION}; use a matching snapblk release",
            path.display()
        )));
    }
    if r.u64().map_err(|_| bad())? != generation {
        return Err(bad());
    }
    Ok(version)
}

/// Removes journals of generations other than `keep` and the one before it (left behind by a
/// crash during rotate).
pub fn remove_stale_journals(dir: &Path, keep: u64) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(hex) = name.to_str().and_then(|n| n.strip_prefix("journal-")) else { continue };
        if u64::from_str_radix(hex, 16).is_ok_and(|g| g != keep && g.checked_add(1) != Some(keep)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records of `buf` and the length of its valid prefix.
    fn decode_frames(buf: &[u8]) -> (Vec<Record>, usize) {
        let scan = scan_frames(buf, 0);
        (scan.records.into_iter().map(|(r, _)| r).collect(), scan.valid as usize)
    }

    fn sample() -> Vec<Record> {
        vec![
            Record::Batch(vec![
                Record::Rollback { volume: 1, snapshot: 10 },
                Record::RemoteHead { volume: 2, parent: Some(11), region: "r".into(), snapshot: 11 },
            ]),
            Record::GroupSnapshot {
                members: vec![(1, 10), (2, 11)],
                seq: 7,
                name: "cut".into(),
                description: "db and log".into(),
                created: 9,
                group: Some(GroupTag { id: 0x77, group: "db".into(), application: true }),
            },
            // As version 6 wrote it: no tag.
            Record::GroupSnapshot {
                members: vec![(3, 12)],
                seq: 9,
                name: "old".into(),
                description: String::new(),
                created: 10,
                group: None,
            },
            Record::VolumeCreate {
                volume: 1,
                name: "disk0".into(),
                size: 1 << 30,
                cluster_size: 65536,
                created: 5,
                origin: None,
            },
            Record::MapSet { volume: 1, cluster: 3, entry: 9 },
            Record::SnapshotCreate {
                volume: 1,
                snapshot: 2,
                seq: 1,
                name: "s1".into(),
                description: "d".into(),
                created: 6,
            },
            Record::Rollback { volume: 1, snapshot: 2 },
            Record::DirtyRange { volume: 1, start: 7, end: 9 },
            Record::SnapshotRelease { snapshot: 2 },
            Record::RemoteHead { volume: 1, parent: Some(2), region: "garage".into(), snapshot: 2 },
            Record::RemoteHead { volume: 1, parent: None, region: "local".into(), snapshot: 5 },
            Record::Hydrate { volume: 1, cluster: 4, entry: 11 },
            Record::LoadedRange { volume: 1, start: 0, end: 1 << 40 },
            Record::SnapshotDelete { snapshot: 2 },
            Record::VolumeDelete { volume: 1 },
        ]
    }

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        for r in sample() {
            r.encode(&mut buf);
        }
        let (decoded, valid) = decode_frames(&buf);
        assert_eq!(decoded, sample());
        assert_eq!(valid, buf.len());
    }

    #[test]
    fn torn_or_corrupt_tail_is_cut_at_the_last_good_frame() {
        let mut buf = Vec::new();
        for r in sample() {
            r.encode(&mut buf);
        }
        let mut first = Vec::new();
        sample()[0].encode(&mut first);
        for cut in first.len()..buf.len() {
            let (decoded, valid) = decode_frames(&buf[..cut]);
            assert!(valid <= cut && !decoded.is_empty());
            assert_eq!(decoded[..], sample()[..decoded.len()]);
        }
        let mut flipped = buf.clone();
        flipped[first.len() + 10] ^= 1;
        assert_eq!(decode_frames(&flipped).0, sample()[..1]);
    }

    #[test]
    fn records_written_after_the_last_synced_mark_are_kept_only_in_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let recs = sample();
        let (mut j, _) = Journal::open(dir.path(), 7, a).unwrap();
        let mut first = Vec::new();
        recs[..3].iter().for_each(|r| r.encode(&mut first));
        let through = j.write(&first).unwrap();
        j.mark_synced(through).unwrap();
        let mut rest = Vec::new();
        recs[3..].iter().for_each(|r| r.encode(&mut rest));
        j.write(&rest).unwrap();
        drop(j);
        let copy = |to: &Path| {
            std::fs::copy(journal_path(dir.path(), 7), journal_path(to, 7)).unwrap();
        };
        // Same boot (the process was killed): everything.
        let same = tempfile::tempdir().unwrap();
        copy(same.path());
        assert_eq!(Journal::open(same.path(), 7, a).unwrap().1, recs);
        // Another boot (power loss): up to the mark, and the file is cut there.
        let other = tempfile::tempdir().unwrap();
        copy(other.path());
        let (j, kept) = Journal::open(other.path(), 7, b).unwrap();
        assert_eq!(kept, recs[..3]);
        assert_eq!(j.len, through);
        drop(j);
        assert_eq!(Journal::open(other.path(), 7, a).unwrap().1, recs[..3], "the cut tail came back");
        // A version 3 journal has no marks: every record was synced before it was written.
        let v3 = tempfile::tempdir().unwrap();
        let mut bytes = JOURNAL_MAGIC.to_vec();
        bytes.put_u32(3);
        bytes.put_u64(7);
        bytes.extend_from_slice(&first);
        bytes.extend_from_slice(&rest);
        std::fs::write(journal_path(v3.path(), 7), &bytes).unwrap();
        assert_eq!(Journal::open(v3.path(), 7, b).unwrap().1, recs);
    }

    #[test]
    fn a_journal_holding_only_its_base_frame_is_kept_whole_in_another_boot() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let (mut older, _) = Journal::open(dir.path(), 3, a).unwrap();
        let through = older.write(&{
            let mut buf = Vec::new();
            sample()[0].encode(&mut buf);
            buf
        });
        let through = through.unwrap();
        let next = Journal::create_next(dir.path(), 3, a).unwrap();
        older.attach_next(next).unwrap();
        older.switch_to_next();
        let len = older.len;
        drop(older);
        // A clean stop ends with a rotation; the next start (a later boot, or the same one:
        // the Base frame carries no boot id) keeps the Base frame and says nothing dropped.
        let t = Journal::read_trusted(dir.path(), 4, b).unwrap().unwrap();
        assert_eq!((t.len, t.base, t.records.len()), (len, Some(through), 0));
        assert!(len > JOURNAL_HEADER_LEN);
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let len = (x % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_frames(&bytes);
            let _ = Record::decode(&bytes);
        }
    }
}
