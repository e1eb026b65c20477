//! The in-store format, version 1 (docs/FORMAT.md, "Object store"). Pure encoding and
//! decoding; no I/O.
//!
//! - `keys/repository`: the repository master key, wrapped by the key-encryption key.
//! - `packs/<pack id>`: `MAGIC | version | pack id`, sealed blobs back to back, then a sealed
//!   index of the blobs (id, offset, length, kind) and its length. Immutable once written.
//! - A blob is one cluster's data, or one map page; a page maps up to [`PAGE_CLUSTERS`]
//!   clusters to blob references (pack, offset, length, id).
//! - `snapshots/<snapshot id>`: the sealed manifest (JSON): metadata plus the page references.
//!   Written last, after every object it references is durable.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::crypto::{hex, unhex, BlobId, RepoKeys};
use super::error::{Result, StoreError};
use crate::codec::{Put, Reader};

pub const FORMAT_VERSION: u32 = 1;
pub const PACK_MAGIC: &[u8; 8] = b"SNAPBLKP";
const PACK_TRAILER_MAGIC: &[u8; 8] = b"SNAPBLKT";
pub const MANIFEST_MAGIC: &[u8; 8] = b"SNAPBLKM";
pub const GROUP_MAGIC: &[u8; 8] = b"SNAPBLKG";
const PAGE_MAGIC: &[u8; 4] = b"SBPG";
/// Clusters per map page (256 MiB of volume at the default 64 KiB clusters).
pub const PAGE_CLUSTERS: u64 = 4096;
const PACK_TRAILER_LEN: u64 = 4 + 8;
const BLOB_REF_LEN: usize = 16 + 8 + 4 + 32;

pub type PackId = [u8; 16];

pub fn pack_key(pack: &PackId) -> String {
    format!("packs/{}", hex(pack))
}

pub fn pack_id_of_key(key: &str) -> Option<PackId> {
    unhex::<16>(key.strip_prefix("packs/")?)
}

pub fn manifest_key(snapshot_id: &str) -> String {
    format!("snapshots/{snapshot_id}")
}

pub fn group_key(group_snapshot_id: &str) -> String {
    format!("groups/{group_snapshot_id}")
}

pub const REPO_KEY_OBJECT: &str = "keys/repository";

/// Where a blob is: which pack, at which offset, how long (sealed), and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
    pub id: BlobId,
}

impl BlobRef {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pack);
        out.put_u64(self.offset);
        out.put_u32(self.len);
        out.extend_from_slice(&self.id.0);
    }

    fn get(r: &mut Reader) -> Option<BlobRef> {
        let pack = r.bytes(16).ok()?.try_into().ok()?;
        let offset = r.u64().ok()?;
        let len = r.u32().ok()?;
        let id = BlobId(r.bytes(32).ok()?.try_into().ok()?);
        Some(BlobRef { pack, offset, len, id })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum BlobKind {
    Data = 0,
    Page = 1,
}

/// A blob's entry in a pack index: id, offset, sealed length, kind.
pub type PackEntry = (BlobId, u64, u32, BlobKind);

/// One pack being assembled in memory, as a list of parts (PUT back to back): blobs sealed
/// elsewhere enter as they are, without being copied (`add_sealed_part`); small ones are
/// appended to the part being filled.
pub struct PackBuilder {
    pub id: PackId,
    parts: Vec<Bytes>,
    /// The part being filled (the header, map pages, repacked blobs, the index).
    tail: Vec<u8>,
    /// Bytes in `parts`.
    parts_len: u64,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// `capacity`: what to reserve for blobs appended with `add`/`add_sealed`.
    pub fn new(capacity: usize) -> PackBuilder {
        let id: PackId = rand::random();
        let mut tail = Vec::with_capacity(capacity);
        tail.extend_from_slice(PACK_MAGIC);
        tail.put_u32(FORMAT_VERSION);
        tail.extend_from_slice(&id);
        PackBuilder { id, parts: Vec::new(), tail, parts_len: 0, entries: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pack's size so far.
    pub fn len(&self) -> u64 {
        self.parts_len + self.tail.len() as u64
    }

    /// Seals `plain` into the pack; returns its reference.
    pub fn add(&mut self, keys: &RepoKeys, id: BlobId, plain: &[u8], kind: BlobKind) -> BlobRef {
        let offset = self.len();
        let len = keys.seal_blob(&id, plain, &mut self.tail) as u32;
        self.entries.push((id, offset, len, kind));
        BlobRef { pack: self.id, offset, len, id }
    }

    /// Copies an already sealed blob (repacking).
    pub fn add_sealed(&mut self, id: BlobId, sealed: &[u8], kind: BlobKind) -> BlobRef {
        let offset = self.len();
        self.tail.extend_from_slice(sealed);
        let len = sealed.len() as u32;
        self.entries.push((id, offset, len, kind));
        BlobRef { pack: self.id, offset, len, id }
    }

    /// Appends `part`, sealed blobs back to back, as it is; `blobs` gives each one's id and
    /// its (offset, sealed length) within `part`, in order, covering it exactly. Calls
    /// `placed` with each blob's reference.
    pub fn add_sealed_part(
        &mut self,
        part: Bytes,
        blobs: impl IntoIterator<Item = (BlobId, u32, u32)>,
        kind: BlobKind,
        mut placed: impl FnMut(BlobRef),
    ) {
        if !self.tail.is_empty() {
            let tail = std::mem::take(&mut self.tail);
            self.parts_len += tail.len() as u64;
            self.parts.push(Bytes::from(tail));
        }
        let base = self.parts_len;
        for (id, at, len) in blobs {
            debug_assert!(at as usize + len as usize <= part.len());
            let offset = base + u64::from(at);
            self.entries.push((id, offset, len, kind));
            placed(BlobRef { pack: self.id, offset, len, id });
        }
        self.parts_len += part.len() as u64;
        self.parts.push(part);
    }

    /// Appends the sealed index and the trailer; the pack is then ready to PUT, its parts
    /// back to back.
    pub fn finish(mut self, keys: &RepoKeys) -> (PackId, Vec<Bytes>, Vec<PackEntry>) {
        let mut index = Vec::with_capacity(4 + self.entries.len() * 45);
        index.put_u32(self.entries.len() as u32);
        for (id, offset, len, kind) in &self.entries {
            index.extend_from_slice(&id.0);
            index.put_u64(*offset);
            index.put_u32(*len);
            index.put_u8(*kind as u8);
        }
        let sealed = keys.seal_meta(&index_aad(&self.id), &index);
        self.tail.extend_from_slice(&sealed);
        self.tail.put_u32(sealed.len() as u32);
        self.tail.extend_from_slice(PACK_TRAILER_MAGIC);
        self.parts.push(Bytes::from(self.tail));
        (self.id, self.parts, self.entries)
    }
}

pub(crate) fn index_aad(pack: &PackId) -> Vec<u8> {
    let mut a = b"snapblk pack index ".to_vec();
    a.extend_from_slice(pack);
    a
}

/// Parses the 12-byte trailer; returns the sealed index length.
pub fn parse_pack_trailer(trailer: &[u8], key: &str) -> Result<u32> {
    let bad = || StoreError::corrupt(key, "bad pack trailer");
    if trailer.len() != PACK_TRAILER_LEN as usize || &trailer[4..] != PACK_TRAILER_MAGIC {
        return Err(bad());
    }
    Ok(u32::from_le_bytes(trailer[..4].try_into().map_err(|_| bad())?))
}

/// Opens a pack's sealed index.
pub fn open_pack_index(keys: &RepoKeys, pack: &PackId, sealed: &[u8], key: &str) -> Result<Vec<PackEntry>> {
    let plain = keys.open_meta(&index_aad(pack), sealed, key)?;
    let bad = || StoreError::corrupt(key, "bad pack index");
    let mut r = Reader::new(&plain);
    let n = r.u32().map_err(|_| bad())?;
    // No more entries than the bytes can hold (32 + 8 + 4 + 1 each), whatever the count says.
    let mut out = Vec::with_capacity((n as usize).min(r.remaining() / 45));
    for _ in 0..n {
        let id = BlobId(r.bytes(32).map_err(|_| bad())?.try_into().map_err(|_| bad())?);
        let offset = r.u64().map_err(|_| bad())?;
        let len = r.u32().map_err(|_| bad())?;
        let kind = match r.u8().map_err(|_| bad())? {
            0 => BlobKind::Data,
            1 => BlobKind::Page,
            _ => return Err(bad()),
        };
        out.push((id, offset, len, kind));
    }
    Ok(out)
}

/// One map page: `(index within the page, blob)` for every cluster holding data, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<(u32, BlobRef)>,
}

impl Page {
    pub fn encode(&self, page_index: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.entries.len() * (4 + BLOB_REF_LEN));
        out.extend_from_slice(PAGE_MAGIC);
        out.put_u32(FORMAT_VERSION);
        out.put_u64(page_index);
        out.put_u32(self.entries.len() as u32);
        for (i, r) in &self.entries {
            out.put_u32(*i);
            r.put(&mut out);
        }
        out
    }

    pub fn decode(bytes: &[u8], page_index: u64, object: &str) -> Result<Page> {
        let bad = |why: &str| StoreError::corrupt(object, format!("map page {page_index}: {why}"));
        let mut r = Reader::new(bytes);
        if r.bytes(4).ok() != Some(PAGE_MAGIC.as_slice()) || r.u32().ok() != Some(FORMAT_VERSION) {
            return Err(bad("not a version 1 page"));
        }
        if r.u64().ok() != Some(page_index) {
            return Err(bad("page index mismatch"));
        }
        let n = r.u32().map_err(|_| bad("truncated"))? as u64;
        if n > PAGE_CLUSTERS {
            return Err(bad("too many entries"));
        }
        let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / (4 + BLOB_REF_LEN)));
        for _ in 0..n {
            let i = r.u32().map_err(|_| bad("truncated"))?;
            let b = BlobRef::get(&mut r).ok_or_else(|| bad("truncated"))?;
            if u64::from(i) >= PAGE_CLUSTERS || entries.last().is_some_and(|(p, _)| *p >= i) {
                return Err(bad("entries out of order"));
            }
            entries.push((i, b));
        }
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        Ok(Page { entries })
    }
}

/// A blob reference in a manifest (hex for JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefJson {
    pub pack: String,
    pub offset: u64,
    pub len: u32,
    pub id: String,
}

impl From<&BlobRef> for RefJson {
    fn from(r: &BlobRef) -> RefJson {
        RefJson { pack: hex(&r.pack), offset: r.offset, len: r.len, id: hex(&r.id.0) }
    }
}

impl RefJson {
    pub fn to_ref(&self, object: &str) -> Result<BlobRef> {
        let bad = || StoreError::corrupt(object, "bad blob reference");
        Ok(BlobRef {
            pack: unhex::<16>(&self.pack).ok_or_else(bad)?,
            offset: self.offset,
            len: self.len,
            id: BlobId(unhex::<32>(&self.id).ok_or_else(bad)?),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRefJson {
    pub index: u64,
    #[serde(flatten)]
    pub blob: RefJson,
}

/// A snapshot as stored: everything needed to read it back, and nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub snapshot_id: String,
    pub snapshot_name: String,
    pub volume_id: String,
    pub volume_name: String,
    pub description: String,
    pub created: u64,
    pub uploaded: u64,
    pub size: u64,
    pub cluster_size: u32,
    /// The uploaded snapshot this upload was incremental to (informational: every manifest
    /// is complete on its own).
    pub base: Option<String>,
    pub allocated_clusters: u64,
    /// Bytes this snapshot's upload added to the store (new packs, sealed).
    pub added_bytes: u64,
    /// Pages holding at least one data cluster, by index.
    pub pages: Vec<PageRefJson>,
    /// A copy's origin (`snapshot copy`, `snapshot archive`): the snapshot it was copied from.
    /// Absent in uploads (and in manifests written before copies existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<CopySource>,
    /// An archived copy's minimum retention: deleting it before this time (seconds since the
    /// epoch) is refused unless forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_until: Option<u64>,
}

/// Where a copied snapshot came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySource {
    /// The source snapshot's id.
    pub id: String,
    /// Its repository (`REGION` or `ACCOUNT/REGION`) as the copying node named it.
    pub region: String,
}

pub(crate) fn manifest_aad(snapshot_id: &str) -> Vec<u8> {
    format!("snapblk manifest {snapshot_id}").into_bytes()
}

impl Manifest {
    pub fn seal(&self, keys: &RepoKeys) -> Vec<u8> {
        seal_json(keys, MANIFEST_MAGIC, &manifest_aad(&self.snapshot_id), self)
    }

    pub fn open(keys: &RepoKeys, bytes: &[u8], snapshot_id: &str) -> Result<Manifest> {
        let object = manifest_key(snapshot_id);
        let m: Manifest = open_json(keys, MANIFEST_MAGIC, &manifest_aad(snapshot_id), bytes, &object, "manifest")?;
        if m.snapshot_id != snapshot_id || m.format != FORMAT_VERSION {
            return Err(StoreError::corrupt(&object, "manifest does not describe this snapshot"));
        }
        if !m.cluster_size.is_power_of_two() || m.cluster_size < 4096 || m.size == 0 {
            return Err(StoreError::corrupt(&object, "manifest has an invalid geometry"));
        }
        Ok(m)
    }
}

/// Seals a small metadata object: `magic | version | AEAD(JSON)`, the AAD naming the object,
/// so one object's body cannot be passed off as another's.
pub fn seal_json<T: Serialize>(keys: &RepoKeys, magic: &[u8; 8], aad: &[u8], value: &T) -> Vec<u8> {
    // Serializing plain structs of strings and numbers cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    let mut out = magic.to_vec();
    out.put_u32(FORMAT_VERSION);
    out.extend_from_slice(&keys.seal_meta(aad, &json));
    out
}

/// Opens what [`seal_json`] sealed; `what` names the kind of object in errors.
pub fn open_json<T: serde::de::DeserializeOwned>(
    keys: &RepoKeys,
    magic: &[u8; 8],
    aad: &[u8],
    bytes: &[u8],
    object: &str,
    what: &str,
) -> Result<T> {
    let body = bytes
        .strip_prefix(magic.as_slice())
        .ok_or_else(|| StoreError::corrupt(object, format!("not a snapblk {what}")))?;
    let (version, sealed) = body.split_at_checked(4).ok_or_else(|| StoreError::corrupt(object, "truncated"))?;
    if version != FORMAT_VERSION.to_le_bytes() {
        return Err(StoreError::corrupt(object, format!("unsupported {what} version; upgrade snapblk")));
    }
    let json = keys.open_meta(aad, sealed, object)?;
    serde_json::from_slice(&json).map_err(|e| StoreError::corrupt(object, format!("bad {what}: {e}")))
}

/// A group snapshot in the store: which member snapshots make it. Written only after every
/// member's manifest, so a region never shows a group snapshot with a member missing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupManifest {
    pub format: u32,
    pub id: String,
    pub group: String,
    pub name: String,
    pub description: String,
    pub created: u64,
    pub consistency: String,
    pub members: Vec<GroupMemberJson>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupMemberJson {
    pub volume_id: String,
    pub volume_name: String,
    pub snapshot_id: String,
}

pub(crate) fn group_aad(id: &str) -> Vec<u8> {
    format!("snapblk group {id}").into_bytes()
}

impl GroupManifest {
    pub fn seal(&self, keys: &RepoKeys) -> Vec<u8> {
        seal_json(keys, GROUP_MAGIC, &group_aad(&self.id), self)
    }

    pub fn open(keys: &RepoKeys, bytes: &[u8], id: &str) -> Result<GroupManifest> {
        let object = group_key(id);
        let g: GroupManifest = open_json(keys, GROUP_MAGIC, &group_aad(id), bytes, &object, "group manifest")?;
        if g.id != id || g.members.is_empty() {
            return Err(StoreError::corrupt(&object, "group manifest does not describe this group snapshot"));
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RepoKeys {
        RepoKeys::new(&[9; 32], crate::store::crypto::Cipher::Aes256GcmSubkey)
    }

    #[test]
    fn pack_roundtrip_through_trailer_and_index() {
        let k = keys();
        let mut p = PackBuilder::new(1 << 20);
        let a = vec![1u8; 65536];
        let id = k.blob_id(&a);
        let r = p.add(&k, id, &a, BlobKind::Data);
        // Two blobs sealed elsewhere, entering as one part.
        let (b, c) = (vec![2u8; 4096], vec![3u8; 100]);
        let (ib, ic) = (k.blob_id(&b), k.blob_id(&c));
        let mut part = Vec::new();
        let nb = k.seal_blob(&ib, &b, &mut part) as u32;
        let nc = k.seal_blob(&ic, &c, &mut part) as u32;
        let mut placed = Vec::new();
        p.add_sealed_part(Bytes::from(part), [(ib, 0, nb), (ic, nb, nc)], BlobKind::Data, |r| placed.push(r));
        let d = vec![4u8; 5000];
        let id_d = k.blob_id(&d);
        let rd = p.add(&k, id_d, &d, BlobKind::Page);
        let (pid, parts, entries) = p.finish(&k);
        let bytes: Vec<u8> = parts.concat();
        assert_eq!(r.pack, pid);
        for (r, plain) in [(r, &a), (placed[0], &b), (placed[1], &c), (rd, &d)] {
            let blob = &bytes[r.offset as usize..r.offset as usize + r.len as usize];
            assert_eq!(&*k.open_blob(&r.id, blob, "p").unwrap(), &plain[..]);
        }
        let t = &bytes[bytes.len() - PACK_TRAILER_LEN as usize..];
        let n = parse_pack_trailer(t, "p").unwrap() as usize;
        let sealed = &bytes[bytes.len() - PACK_TRAILER_LEN as usize - n..bytes.len() - PACK_TRAILER_LEN as usize];
        assert_eq!(open_pack_index(&k, &pid, sealed, "p").unwrap(), entries);
    }

    #[test]
    fn page_roundtrip_and_rejects_garbage() {
        let r = BlobRef { pack: [3; 16], offset: 28, len: 100, id: BlobId([4; 32]) };
        let page = Page { entries: vec![(0, r), (4095, r)] };
        let bytes = page.encode(7);
        assert_eq!(Page::decode(&bytes, 7, "o").unwrap(), page);
        assert!(Page::decode(&bytes, 8, "o").is_err());
        for cut in [0, 10, bytes.len() - 1] {
            assert!(Page::decode(&bytes[..cut], 7, "o").is_err());
        }
        let unsorted = Page { entries: vec![(5, r), (5, r)] }.encode(7);
        assert!(Page::decode(&unsorted, 7, "o").is_err());
    }

    #[test]
    fn manifest_roundtrip_is_bound_to_its_snapshot() {
        let k = keys();
        let m = Manifest {
            format: FORMAT_VERSION,
            snapshot_id: "s-0000000000000001".into(),
            snapshot_name: "a".into(),
            volume_id: "v-0000000000000002".into(),
            volume_name: "vol".into(),
            description: String::new(),
            created: 1,
            uploaded: 2,
            size: 1 << 30,
            cluster_size: 65536,
            base: None,
            allocated_clusters: 0,
            added_bytes: 0,
            pages: vec![],
            source: None,
            retain_until: None,
        };
        let sealed = m.seal(&k);
        assert_eq!(Manifest::open(&k, &sealed, "s-0000000000000001").unwrap(), m);
        assert!(Manifest::open(&k, &sealed, "s-0000000000000003").is_err(), "a manifest copied to another name");
    }
}
