//! The checkpoint: the engine's whole metadata state in one file (`meta/checkpoint`), written
//! at journal rotation. Map nodes shared between a volume and its snapshots are written once
//! and shared again on load, so snapshots cost no more memory after a restart than before.
//! Layout in docs/FORMAT.md.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use roaring::RoaringTreemap;

use super::error::{EngineError, Result};
use super::ids::check_geometry;
use super::journal::{check_header, group_tag, put_group_tag, CHECKPOINT_MAGIC, FORMAT_VERSION};
use super::map::{ClusterMap, Node};
use super::remote::{Remote, RemoteSource};
use super::types::GroupTag;
use crate::codec::{Put, Reader, Short};

pub struct VolumeImage {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub cluster_size: u32,
    pub created: u64,
    pub origin: Option<u64>,
    pub head: ClusterMap,
    pub dirty: RoaringTreemap,
    pub parent: Option<u64>,
    pub allocated: u64,
    pub remote: Option<Remote>,
    pub anchor: Option<RemoteSource>,
}

pub struct SnapshotImage {
    pub id: u64,
    pub volume: u64,
    pub seq: u64,
    pub name: String,
    pub description: String,
    pub created: u64,
    pub allocated: u64,
    pub map: ClusterMap,
    pub parent: Option<u64>,
    pub changed: RoaringTreemap,
    /// The data lives only in the object store (the map is empty).
    pub released: bool,
    pub remote: Option<Remote>,
    pub anchor: Option<RemoteSource>,
    /// The group snapshot it is a member of (version 7).
    pub group: Option<GroupTag>,
}

pub struct State {
    pub generation: u64,
    pub next_seq: u64,
    pub volumes: Vec<VolumeImage>,
    pub snapshots: Vec<SnapshotImage>,
}

const NO_NODE: u64 = u64::MAX;
const LEAF: u8 = 0;
const INNER: u8 = 1;

/// Assigns ids to distinct nodes in post-order and encodes each once.
struct NodeWriter {
    ids: HashMap<*const Node, u64>,
    /// The one node written for every leaf with no entry (decode shares one such leaf, so
    /// writing each separately would make the encoding depend on how often it went through
    /// a checkpoint).
    empty_leaf: Option<u64>,
    out: Vec<u8>,
    count: u64,
}

impl NodeWriter {
    fn write(&mut self, node: &Arc<Node>) -> u64 {
        if let Some(&id) = self.ids.get(&Arc::as_ptr(node)) {
            return id;
        }
        let empty = matches!(&**node, Node::Leaf(entries) if entries.iter().all(|&e| e == 0));
        if let (true, Some(id)) = (empty, self.empty_leaf) {
            self.ids.insert(Arc::as_ptr(node), id);
            return id;
        }
        let mut body = Vec::new();
        match &**node {
            Node::Leaf(entries) => {
                body.put_u8(LEAF);
                let n = entries.iter().filter(|&&e| e != 0).count();
                body.put_u16(n as u16);
                for (i, &e) in entries.iter().enumerate().filter(|(_, &e)| e != 0) {
                    body.put_u16(i as u16);
                    body.put_u64(e);
                }
            }
            Node::Inner(children) => {
                let kids: Vec<(usize, u64)> =
                    children.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, self.write(c)))).collect();
                body.put_u8(INNER);
                body.put_u16(kids.len() as u16);
                for (i, id) in kids {
                    body.put_u16(i as u16);
                    body.put_u64(id);
                }
            }
        }
        self.out.extend_from_slice(&body);
        let id = self.count;
        self.count += 1;
        self.ids.insert(Arc::as_ptr(node), id);
        if empty {
            self.empty_leaf = Some(id);
        }
        id
    }

    fn map(&mut self, map: &ClusterMap) -> (u64, u32) {
        (map.root().map_or(NO_NODE, |r| self.write(r)), map.height())
    }
}

fn put_source(out: &mut Vec<u8>, s: Option<&RemoteSource>) {
    match s {
        Some(s) => {
            out.put_u8(1);
            out.put_str(&s.region);
            out.put_u64(s.snapshot);
        }
        None => out.put_u8(0),
    }
}

/// A map's remote part (version 3): its source, then the loaded set.
fn put_remote(out: &mut Vec<u8>, r: &Option<Remote>) {
    put_source(out, r.as_ref().map(|r| &r.source));
    if let Some(r) = r {
        put_bitmap(out, &r.loaded);
    }
}

fn put_bitmap(out: &mut Vec<u8>, b: &RoaringTreemap) {
    let mut bytes = Vec::with_capacity(b.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = b.serialize_into(&mut bytes);
    out.put_u64(bytes.len() as u64);
    out.extend_from_slice(&bytes);
}

/// Checks the layout of a serialized bitmap in time proportional to its bytes (not to the
/// values they hold): keys in increasing order at both levels, every container's bytes
/// present, nothing left over. Inner bitmaps come in roaring's two layouts: without run
/// containers (cookie 12346, count, descriptions, offsets, containers) and with them (format
/// version 8: cookie 12347 with the count in its high half, a bit per container marking runs,
/// descriptions, offsets from 4 containers on, containers). The containers' contents (arrays
/// sorted, bitmap cardinalities, runs non-empty, ordered and apart) are checked by roaring's
/// `deserialize_from` itself.
fn check_bitmap_layout(bytes: &[u8]) -> Result<(), &'static str> {
    const NO_RUN_CONTAINERS: u32 = 12346;
    const RUN_CONTAINERS: u16 = 12347;
    let short = |_: Short| "bitmap truncated";
    let mut r = Reader::new(bytes);
    let le32 = |r: &mut Reader| r.array().map(u32::from_le_bytes).map_err(short);
    let le16 = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    let inner = u64::from_le_bytes(r.array().map_err(short)?);
    let mut last_high = None;
    for _ in 0..inner {
        let high = le32(&mut r)?;
        if last_high.is_some_and(|last| high <= last) {
            return Err("bitmap keys out of order");
        }
        last_high = Some(high);
        let cookie = le32(&mut r)?;
        let (containers, runs) = if cookie == NO_RUN_CONTAINERS {
            let containers = le32(&mut r)? as usize;
            if containers > 1 << 16 {
                return Err("bitmap with too many containers");
            }
            (containers, None)
        } else if cookie as u16 == RUN_CONTAINERS {
            let containers = (cookie >> 16) as usize + 1;
            (containers, Some(r.bytes(containers.div_ceil(8)).map_err(short)?))
        } else {
            return Err("bitmap with an unknown cookie");
        };
        let descriptions = r.bytes(containers * 4).map_err(short)?;
        if runs.is_none() || containers >= 4 {
            r.bytes(containers * 4).map_err(short)?; // offsets: not needed to decode
        }
        let mut last_key = None;
        for (i, d) in descriptions.chunks_exact(4).enumerate() {
            let key = le16(d);
            if last_key.is_some_and(|last| key <= last) {
                return Err("bitmap containers out of order");
            }
            last_key = Some(key);
            let len = if runs.is_some_and(|runs| runs[i / 8] & (1 << (i % 8)) != 0) {
                // A run container: its run count, then (start, length - 1) per run.
                usize::from(le16(r.bytes(2).map_err(short)?)) * 4
            } else {
                // An array container below 4,097 values, a 1024-word bitmap above.
                let cardinality = usize::from(le16(&d[2..])) + 1;
                if cardinality <= 4096 {
                    cardinality * 2
                } else {
                    8192
                }
            };
            r.bytes(len).map_err(short)?;
        }
    }
    if r.remaining() != 0 {
        return Err("bytes after the bitmap");
    }
    Ok(())
}

pub fn encode(state: &State) -> Vec<u8> {
    let mut nodes = NodeWriter { ids: HashMap::new(), empty_leaf: None, out: Vec::new(), count: 0 };
    let vol_roots: Vec<_> = state.volumes.iter().map(|v| nodes.map(&v.head)).collect();
    let snap_roots: Vec<_> = state.snapshots.iter().map(|s| nodes.map(&s.map)).collect();

    let mut out = Vec::with_capacity(nodes.out.len() + 4096);
    out.extend_from_slice(CHECKPOINT_MAGIC);
    out.put_u32(FORMAT_VERSION);
    out.put_u64(state.generation);
    out.put_u64(state.next_seq);
    out.put_u64(nodes.count);
    out.extend_from_slice(&nodes.out);
    out.put_u32(state.volumes.len() as u32);
    for (v, (root, height)) in state.volumes.iter().zip(vol_roots) {
        out.put_u64(v.id);
        out.put_str(&v.name);
        out.put_u64(v.size);
        out.put_u32(v.cluster_size);
        out.put_u64(v.created);
        out.put_opt(v.origin);
        out.put_u64(root);
        out.put_u32(height);
        put_bitmap(&mut out, &v.dirty);
        out.put_opt(v.parent);
        out.put_u64(v.allocated);
        put_remote(&mut out, &v.remote);
        put_source(&mut out, v.anchor.as_ref());
    }
    out.put_u32(state.snapshots.len() as u32);
    for (s, (root, height)) in state.snapshots.iter().zip(snap_roots) {
        out.put_u64(s.id);
        out.put_u64(s.volume);
        out.put_u64(s.seq);
        out.put_str(&s.name);
        out.put_str(&s.description);
        out.put_u64(s.created);
        out.put_u64(s.allocated);
        out.put_u64(root);
        out.put_u32(height);
        out.put_opt(s.parent);
        put_bitmap(&mut out, &s.changed);
        out.put_u8(u8::from(s.released)); // flags (version 2)
        put_remote(&mut out, &s.remote);
        put_source(&mut out, s.anchor.as_ref());
        match &s.group {
            Some(tag) => {
                out.put_u8(1);
                put_group_tag(&mut out, tag);
            }
            None => out.put_u8(0),
        }
    }
    let crc = crc32c::crc32c(&out);
    out.put_u32(crc);
    out
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<State> {
    let corrupt = |what: &str| {
        EngineError::Corrupt(format!(
            "checkpoint {} is corrupt ({what}); restore the daemon directory from a backup",
            path.display()
        ))
    };
    // Magic, version, generation, then the body and a CRC: anything shorter is damaged (a
    // file of four zero bytes has a valid CRC of nothing).
    const HEADER: usize = 8 + 4 + 8;
    if bytes.len() < HEADER + 4 {
        return Err(corrupt(&format!("truncated: {} bytes", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let generation = Reader::new(&body[12..HEADER]).u64().map_err(|_| corrupt("truncated header"))?;
    let version = check_header(body, CHECKPOINT_MAGIC, generation, path)?;
    let mut r = Reader::new(&body[HEADER..]);
    decode_body(&mut r, generation, version).map_err(corrupt)
}

fn decode_body(r: &mut Reader, generation: u64, version: u32) -> Result<State, &'static str> {
    let short = |_: Short| "truncated";
    let next_seq = r.u64().map_err(short)?;
    let count = r.u64().map_err(short)?;
    // (node, level) by id; children always precede parents.
    let mut nodes: Vec<(Arc<Node>, u32)> = Vec::new();
    // Leaves with no entry share one node: each takes 3 bytes of the file and would
    // otherwise take 4 KiB of memory (maps copy a shared node before changing it).
    let empty_leaf = Arc::new(Node::Leaf(Box::new([0u64; 512])));
    for _ in 0..count {
        let kind = r.u8().map_err(short)?;
        let n = r.u16().map_err(short)? as usize;
        let node = match kind {
            LEAF if n == 0 => (empty_leaf.clone(), 1),
            LEAF => {
                let mut entries = Box::new([0u64; 512]);
                for _ in 0..n {
                    let i = r.u16().map_err(short)? as usize;
                    *entries.get_mut(i).ok_or("leaf index out of range")? = r.u64().map_err(short)?;
                }
                (Arc::new(Node::Leaf(entries)), 1)
            }
            INNER => {
                let mut children: Box<[Option<Arc<Node>>; 512]> = Box::new(std::array::from_fn(|_| None));
                let mut level = None;
                for _ in 0..n {
                    let i = r.u16().map_err(short)? as usize;
                    let id = r.u64().map_err(short)?;
                    let (child, child_level) = nodes.get(id as usize).ok_or("node reference out of range")?;
                    if *level.get_or_insert(child_level + 1) != child_level + 1 {
                        return Err("inconsistent tree levels");
                    }
                    *children.get_mut(i).ok_or("child index out of range")? = Some(child.clone());
                }
                (Arc::new(Node::Inner(children)), level.ok_or("empty inner node")?)
            }
            _ => return Err("unknown node kind"),
        };
        nodes.push(node);
    }
    let map = |r: &mut Reader| -> Result<ClusterMap, &'static str> {
        let root = r.u64().map_err(short)?;
        let height = r.u32().map_err(short)?;
        let root = match root {
            NO_NODE => None,
            root => {
                let (node, level) = nodes.get(root as usize).ok_or("root out of range")?;
                if *level != height {
                    return Err("map height mismatch");
                }
                Some(node.clone())
            }
        };
        ClusterMap::from_parts(root, height).ok_or("bad map height")
    };
    let bitmap = |r: &mut Reader| -> Result<RoaringTreemap, &'static str> {
        let n = r.u64().map_err(short)?;
        let bytes = r.bytes(usize::try_from(n).map_err(|_| "bitmap too large")?).map_err(short)?;
        check_bitmap_layout(bytes)?;
        RoaringTreemap::deserialize_from(bytes).map_err(|_| "bad bitmap")
    };
    let source = |r: &mut Reader| -> Result<Option<RemoteSource>, &'static str> {
        if version < 3 {
            return Ok(None);
        }
        Ok(match r.u8().map_err(short)? {
            0 => None,
            1 => Some(RemoteSource { region: r.str().map_err(short)?, snapshot: r.u64().map_err(short)? }),
            _ => return Err("bad remote source"),
        })
    };
    let remote = |r: &mut Reader| -> Result<Option<Remote>, &'static str> {
        Ok(match source(r)? {
            Some(source) => Some(Remote { source, loaded: Arc::new(bitmap(r)?) }),
            None => None,
        })
    };
    let mut volumes = Vec::new();
    for _ in 0..r.u32().map_err(short)? {
        let volume = VolumeImage {
            id: r.u64().map_err(short)?,
            name: r.str().map_err(short)?,
            size: r.u64().map_err(short)?,
            cluster_size: r.u32().map_err(short)?,
            created: r.u64().map_err(short)?,
            origin: r.opt().map_err(short)?,
            head: map(r)?,
            dirty: bitmap(r)?,
            parent: r.opt().map_err(short)?,
            allocated: r.u64().map_err(short)?,
            remote: remote(r)?,
            anchor: source(r)?,
        };
        check_geometry(volume.size, volume.cluster_size).map_err(|_| "bad volume geometry")?;
        volumes.push(volume);
    }
    let mut snapshots = Vec::new();
    for _ in 0..r.u32().map_err(short)? {
        snapshots.push(SnapshotImage {
            id: r.u64().map_err(short)?,
            volume: r.u64().map_err(short)?,
            seq: r.u64().map_err(short)?,
            name: r.str().map_err(short)?,
            description: r.str().map_err(short)?,
            created: r.u64().map_err(short)?,
            allocated: r.u64().map_err(short)?,
            map: map(r)?,
            parent: r.opt().map_err(short)?,
            changed: bitmap(r)?,
            released: version >= 2 && r.u8().map_err(short)? & 1 != 0,
            remote: remote(r)?,
            anchor: source(r)?,
            group: if version < 7 {
                None
            } else {
                match r.u8().map_err(short)? {
                    0 => None,
                    1 => Some(group_tag(r).map_err(short)?),
                    _ => return Err("bad group tag"),
                }
            },
        });
    }
    if r.remaining() != 0 {
        return Err("trailing bytes");
    }
    Ok(State { generation, next_seq, volumes, snapshots })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: u64, group: Option<GroupTag>) -> SnapshotImage {
        SnapshotImage {
            id,
            volume: 1,
            seq: id,
            name: format!("s{id}"),
            description: String::new(),
            created: 5,
            allocated: 0,
            map: ClusterMap::new(16),
            parent: None,
            changed: RoaringTreemap::new(),
            released: false,
            remote: None,
            anchor: None,
            group,
        }
    }

    fn volume() -> VolumeImage {
        VolumeImage {
            id: 1,
            name: "a".into(),
            size: 1 << 20,
            cluster_size: 65536,
            created: 1,
            origin: None,
            head: ClusterMap::new(16),
            dirty: RoaringTreemap::new(),
            parent: None,
            allocated: 0,
            remote: None,
            anchor: None,
        }
    }

    #[test]
    fn group_tags_round_trip_and_a_version_6_checkpoint_reads_without_them() {
        let path = Path::new("/d/meta/checkpoint");
        let tag = GroupTag { id: 0xabc, group: "db".into(), application: true };
        let state = State {
            generation: 2,
            next_seq: 9,
            volumes: vec![volume()],
            snapshots: vec![snapshot(7, Some(tag.clone()))],
        };
        let read = decode(&encode(&state), path).unwrap();
        assert_eq!(read.snapshots[0].group, Some(tag));
        // Version 6 had no tag byte: the same image without it (the snapshot's last byte).
        let state = State { snapshots: vec![snapshot(8, None)], ..state };
        let v7 = encode(&state);
        let mut v6 = v7[..v7.len() - 5].to_vec();
        v6[8..12].copy_from_slice(&6u32.to_le_bytes());
        let crc = crc32c::crc32c(&v6);
        v6.put_u32(crc);
        let read = decode(&v6, path).unwrap();
        assert_eq!((read.snapshots[0].id, read.snapshots[0].group.clone()), (8, None));
        assert!(decode(&v7[..v7.len() - 5], path).is_err(), "a checkpoint cut before its CRC decoded");
    }

    #[test]
    fn a_short_or_damaged_checkpoint_is_an_error_naming_the_file_never_a_panic() {
        let path = Path::new("/d/meta/checkpoint");
        let state = State { generation: 3, next_seq: 7, volumes: vec![], snapshots: vec![] };
        let good = encode(&state);
        assert_eq!(decode(&good, path).unwrap().next_seq, 7);
        // Every truncation, four zero bytes (a valid CRC of nothing), and a flipped byte.
        let mut damaged: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        damaged.push(vec![0; 4]);
        damaged.push(vec![0; 24]);
        let mut flipped = good.clone();
        flipped[10] ^= 1;
        damaged.push(flipped);
        for bytes in damaged {
            let Err(err) = decode(&bytes, path) else { panic!("{} damaged bytes decoded", bytes.len()) };
            assert!(err.to_string().contains("/d/meta/checkpoint"), "{err}");
        }
    }

    #[test]
    fn bitmaps_decode_by_their_layout_and_refuse_what_roaring_would_choke_on() {
        let serialize = |b: &RoaringTreemap| {
            let mut bytes = Vec::new();
            b.serialize_into(&mut bytes).unwrap();
            bytes
        };
        // Dense and sparse values across two high keys: accepted, equal after decode.
        let mut good: RoaringTreemap = (0..100_000u64).collect();
        good.insert(7 << 32);
        good.insert((7 << 32) + 70_000);
        let bytes = serialize(&good);
        check_bitmap_layout(&bytes).unwrap();
        assert_eq!(RoaringTreemap::deserialize_from(&bytes[..]).unwrap(), good);
        // A trailing byte, a truncation, and an unknown cookie are refused.
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(check_bitmap_layout(&trailing).is_err());
        assert!(check_bitmap_layout(&bytes[..bytes.len() - 1]).is_err());
        let mut cookie = serialize(&RoaringTreemap::from_iter([1u64]));
        cookie[12..16].copy_from_slice(&12345u32.to_le_bytes());
        assert_eq!(check_bitmap_layout(&cookie), Err("bitmap with an unknown cookie"));
        // Run containers (a range, as a discard of a whole volume leaves), with fewer and more
        // than 4 containers per inner bitmap (offsets present from 4 on), mixed with arrays and
        // bitmaps: accepted, equal after decode, a few bytes per 65,536 values.
        for containers in [2u64, 3, 4, 9, 70_000] {
            let mut ranges = RoaringTreemap::new();
            ranges.insert_range(1..containers << 16);
            ranges.insert(5 << 32);
            ranges.insert_range((6 << 32) + 3..(6 << 32) + 90_000);
            let bytes = serialize(&ranges);
            assert!(bytes.len() < 64 + containers as usize * 16, "{} bytes", bytes.len());
            check_bitmap_layout(&bytes).unwrap();
            assert_eq!(RoaringTreemap::deserialize_from(&bytes[..]).unwrap(), ranges);
            assert!(check_bitmap_layout(&bytes[..bytes.len() - 1]).is_err());
        }
        // Two containers of one inner bitmap, swapped in the descriptions: out of order.
        let two = serialize(&RoaringTreemap::from_iter([1u64, 1 << 16]));
        let mut swapped = two.clone();
        swapped[20..22].copy_from_slice(&1u16.to_le_bytes());
        swapped[24..26].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(check_bitmap_layout(&swapped), Err("bitmap containers out of order"));
        // The same high key twice.
        let one = serialize(&RoaringTreemap::from_iter([5u64]));
        let mut twice = 2u64.to_le_bytes().to_vec();
        twice.extend_from_slice(&one[8..]);
        twice.extend_from_slice(&one[8..]);
        assert_eq!(check_bitmap_layout(&twice), Err("bitmap keys out of order"));
    }
}
