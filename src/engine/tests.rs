//! Property test: the engine against a simple in-memory model. Random sequences of writes,
//! zero-writes, trims, snapshots, rollbacks, clones, deletes and restarts (clean, and
//! replay-only after a commit); after every step each volume and each snapshot is compared
//! byte for byte, and allocation and dirty bitmaps cluster by cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
struct ModelSnap {
    volume: String,
    data: Vec<u8>,
    allocated: BTreeSet<u64>,
    parent: Option<String>,
    changed: BTreeSet<u64>,
    /// The id of the group snapshot it was cut in.
    group: Option<u64>,
}

#[derive(Clone, Debug)]
struct ModelVol {
    cluster_size: u64,
    data: Vec<u8>,
    /// Clusters that map to storage (not zeros).
    allocated: BTreeSet<u64>,
    dirty: BTreeSet<u64>,
    parent: Option<String>,
    /// What a crash may bring back: the content at the last FLUSH (or FUA write, or commit
    /// of this volume's own control operation) first, then the content after every change
    /// since. After a crash each cluster must hold one of these versions.
    versions: Vec<Vec<u8>>,
    /// Snapshots of this volume taken since the first version, with the version they hold:
    /// a snapshot that survived the crash means the volume is not older than it.
    marks: Vec<(String, usize)>,
}

impl ModelVol {
    fn new(cluster_size: u64, data: Vec<u8>, allocated: BTreeSet<u64>) -> ModelVol {
        ModelVol {
            cluster_size,
            versions: vec![data.clone()],
            data,
            allocated,
            dirty: BTreeSet::new(),
            parent: None,
            marks: Vec::new(),
        }
    }

    /// The data changed (not durable yet).
    fn changed(&mut self) {
        self.versions.push(self.data.clone());
    }

    /// Everything so far is durable.
    fn durable(&mut self) {
        self.versions = vec![self.data.clone()];
        self.marks.clear();
    }
}

#[derive(Default, Debug)]
struct Model {
    vols: BTreeMap<String, ModelVol>,
    /// Key: "VOL@SNAP".
    snaps: BTreeMap<String, ModelSnap>,
    /// Snapshots whose data was released (only in the store): not read back here.
    released: BTreeSet<String>,
    next_name: u64,
}

/// The case count of a property test: `PROPTEST_CASES` when set (longer runs before a
/// change to the engine), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime")
}

/// The group snapshots the engine lists are the model's, member by member (`listed`: the
/// snapshots that exist), and each is whole: every member the model still has, or none.
fn check_groups(e: &Arc<Engine>, model: &Model, listed: &BTreeSet<String>, what: &str) {
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for g in e.group_snapshots() {
        assert_eq!(g.tag.group, "g", "{what}");
        assert_eq!(g.tag.application, g.tag.id % 2 == 0, "{what}: group snapshot {} consistency", g.tag.id);
        for (_, id) in &g.members {
            let s = e.snapshot(id).expect("member");
            assert_eq!((s.name.as_str(), s.created), (g.name.as_str(), g.created), "{what}");
            got.insert(format!("{}@{}", s.volume, s.name), g.tag.id);
        }
    }
    let want: BTreeMap<String, u64> = model
        .snaps
        .iter()
        .filter(|(k, _)| listed.contains(*k))
        .filter_map(|(k, s)| s.group.map(|g| (k.clone(), g)))
        .collect();
    assert_eq!(got, want, "{what}: group tags differ from the model");
    for id in want.values() {
        let all = model.snaps.values().filter(|s| s.group == Some(*id)).count();
        let there = want.values().filter(|g| *g == id).count();
        assert_eq!(there, all, "{what}: group snapshot {id} has {there} of its {all} members");
    }
}

fn check(engine: &Arc<Engine>, model: &Model) {
    let infos = engine.list_volumes();
    assert_eq!(
        infos.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
        model.vols.keys().cloned().collect::<Vec<_>>()
    );
    for (name, mv) in &model.vols {
        let h = engine.open_volume(name).expect("open volume");
        let mut buf = vec![0u8; mv.data.len()];
        h.read(0, &mut buf).expect("read volume");
        assert!(buf == mv.data, "volume {name} content differs from the model");
        let cs = mv.cluster_size;
        let alloc = h.allocation(0, mv.data.len() as u64).expect("allocation");
        let dirty = h.dirty(0, mv.data.len() as u64).expect("dirty");
        let expand = |ext: &[volume::Extent], flag: u32| -> BTreeSet<u64> {
            let mut out = BTreeSet::new();
            let mut off = 0;
            for e in ext {
                if e.flags & flag == flag {
                    for c in off / cs..(off + e.length).div_ceil(cs) {
                        out.insert(c);
                    }
                }
                off += e.length;
            }
            assert_eq!(off, mv.data.len() as u64);
            out
        };
        let holes = expand(&alloc, volume::STATE_HOLE | volume::STATE_ZERO);
        let clusters = (mv.data.len() as u64).div_ceil(cs);
        let allocated: BTreeSet<u64> = (0..clusters).filter(|c| !holes.contains(c)).collect();
        assert_eq!(allocated, mv.allocated, "volume {name} allocation differs");
        assert_eq!(expand(&dirty, volume::STATE_DIRTY), mv.dirty, "volume {name} dirty bitmap differs");
        let info = engine.volume(name).expect("info");
        assert_eq!(info.dirty_clusters, mv.dirty.len() as u64);
        assert_eq!(info.allocated_bytes, mv.allocated.len() as u64 * cs);
    }
    let listed = engine.list_snapshots(None).expect("list");
    assert_eq!(listed.len(), model.snaps.len());
    check_groups(engine, model, &model.snaps.keys().cloned().collect(), "live");
    for (key, ms) in &model.snaps {
        if model.released.contains(key) {
            assert!(!engine.snapshot(key).expect("snapshot info").local);
            continue;
        }
        let h = engine.open_snapshot(key, None).expect("open snapshot");
        let mut buf = vec![0u8; ms.data.len()];
        h.read(0, &mut buf).expect("read snapshot");
        assert!(buf == ms.data, "snapshot {key} content differs from the model");
        let info = engine.snapshot(key).expect("snapshot info");
        assert_eq!(info.changed_clusters, ms.changed.len() as u64, "snapshot {key} changed set");
        let parent = info.parent.map(|p| {
            let s = listed.iter().find(|s| s.id == p).expect("parent listed");
            format!("{}@{}", s.volume, s.name)
        });
        assert_eq!(parent, ms.parent, "snapshot {key} parent");
        // Every older snapshot's bitmap must flag at least the clusters whose content differs.
        let bases: Vec<String> = h.base_names().map(String::from).collect();
        for (i, base) in bases.iter().enumerate() {
            let mb = &model.snaps[&format!("{}@{base}", ms.volume)];
            let cs = engine.snapshot(key).unwrap().cluster_size as usize;
            let ext = h.changed_since(i, 0, ms.data.len() as u64).expect("changed_since");
            let mut off = 0usize;
            for e in ext {
                if e.flags == 0 {
                    for c in (off / cs)..(off + e.length as usize).div_ceil(cs) {
                        let r = c * cs..((c + 1) * cs).min(ms.data.len());
                        assert!(
                            mb.data[r.clone()] == ms.data[r],
                            "{key} vs {base}: cluster {c} differs but is not flagged"
                        );
                    }
                }
                off += e.length as usize;
            }
        }
    }
}

/// Applies one random step to both the engine and the model.
fn step(engine: &mut Arc<Engine>, dir: &Path, model: &mut Model, op: (u8, u64, u64, u64)) {
    let (kind, a, b, c) = op;
    let vol_names: Vec<String> = model.vols.keys().cloned().collect();
    let snap_keys: Vec<String> = model.snaps.keys().cloned().collect();
    let pick_vol = |i: u64| vol_names.get((i % vol_names.len().max(1) as u64) as usize).cloned();
    let pick_snap = |i: u64| snap_keys.get((i % snap_keys.len().max(1) as u64) as usize).cloned();
    match kind % 19 {
        // write (most common)
        0..=3 => {
            let Some(name) = pick_vol(a) else { return };
            let mv = model.vols.get_mut(&name).unwrap();
            let size = mv.data.len() as u64;
            let off = (b % size) & !511;
            let len = ((c % (3 * mv.cluster_size)) + 1).min(size - off);
            let data = fill(a ^ b ^ c, len as usize);
            let fua = c % 7 == 0;
            engine.open_volume(&name).unwrap().write(off, &data, fua).unwrap();
            mv.data[off as usize..(off + len) as usize].copy_from_slice(&data);
            for cl in off / mv.cluster_size..(off + len).div_ceil(mv.cluster_size) {
                mv.allocated.insert(cl);
                mv.dirty.insert(cl);
            }
            mv.changed();
            if fua {
                model.vols.values_mut().for_each(ModelVol::durable);
            }
        }
        // trim / write zeroes (unmap or allocate)
        4 | 5 => {
            let Some(name) = pick_vol(a) else { return };
            let mv = model.vols.get_mut(&name).unwrap();
            let size = mv.data.len() as u64;
            let off = (b % size) & !511;
            let len = ((c % (4 * mv.cluster_size)) + 1).min(size - off);
            let mode = if kind == 5 && c % 3 == 0 { ZeroMode::Allocate } else { ZeroMode::Unmap };
            engine.open_volume(&name).unwrap().zero(off, len, mode, false).unwrap();
            mv.data[off as usize..(off + len) as usize].fill(0);
            mv.changed();
            let cs = mv.cluster_size;
            for cl in off / cs..(off + len).div_ceil(cs) {
                let cl_len = cs.min(size - cl * cs);
                let full = off <= cl * cs && cl * cs + cl_len <= off + len;
                match mode {
                    ZeroMode::Allocate => {
                        mv.allocated.insert(cl);
                        mv.dirty.insert(cl);
                    }
                    ZeroMode::Unmap => {
                        if full {
                            mv.allocated.remove(&cl);
                        }
                        mv.dirty.insert(cl);
                    }
                }
            }
        }
        6 => {
            let Some(name) = pick_vol(a) else { return };
            model.next_name += 1;
            let snap = format!("s{}", model.next_name);
            engine.create_snapshot(&name, &snap, "prop").unwrap();
            model_snapshot(model, &name, &snap);
        }
        // a group snapshot of every volume: each as a snapshot at the same instant
        17 => {
            if vol_names.is_empty() {
                return;
            }
            model.next_name += 1;
            let snap = format!("g{}", model.next_name);
            let tag =
                GroupTag { id: model.next_name, group: "g".into(), application: model.next_name.is_multiple_of(2) };
            let infos = engine.create_group_snapshot(&vol_names, &snap, "group", &tag).unwrap();
            assert_eq!(infos.len(), vol_names.len());
            for name in &vol_names {
                model_snapshot(model, name, &snap);
                model.snaps.get_mut(&format!("{name}@{snap}")).unwrap().group = Some(tag.id);
            }
        }
        // a group rollback to the members of a group snapshot still all there and local
        18 => {
            let Some(group) = pick_snap(a).and_then(|k| k.split_once('@').map(|(_, s)| s.to_string())) else { return };
            let keys: Vec<String> = model.snaps.keys().filter(|k| k.ends_with(&format!("@{group}"))).cloned().collect();
            if !group.starts_with('g') || keys.iter().any(|k| model.released.contains(k)) {
                return;
            }
            let targets: Vec<(String, Option<String>)> = keys.iter().map(|k| (k.clone(), None)).collect();
            rt().block_on(engine.rollback_group(&targets, false)).unwrap();
            for key in keys {
                model_rollback(model, &key);
            }
        }
        7 => {
            let Some(key) = pick_snap(a) else { return };
            engine.delete_snapshot(&key, false).unwrap();
            model.released.remove(&key);
            let gone = model.snaps.remove(&key).unwrap();
            for s in model.snaps.values_mut() {
                if s.parent.as_deref() == Some(&key) {
                    s.parent = gone.parent.clone();
                    s.changed.extend(gone.changed.iter().copied());
                }
            }
            for v in model.vols.values_mut() {
                if v.parent.as_deref() == Some(&key) {
                    v.parent = gone.parent.clone();
                    v.dirty.extend(gone.changed.iter().copied());
                }
            }
        }
        8 => {
            let Some(key) = pick_snap(a).filter(|k| !model.released.contains(k)) else { return };
            rt().block_on(engine.rollback(&key, false, None)).unwrap();
            model_rollback(model, &key);
        }
        9 => {
            let Some(key) = pick_snap(a).filter(|k| !model.released.contains(k)) else { return };
            if model.vols.len() >= 6 {
                return;
            }
            model.next_name += 1;
            let name = format!("clone{}", model.next_name);
            engine.clone_snapshot(&key, &name, None).unwrap();
            let s = &model.snaps[&key];
            let cs = model.vols.get(&s.volume).map_or(0, |v| v.cluster_size);
            let cs = if cs == 0 { engine.snapshot(&key).unwrap().cluster_size as u64 } else { cs };
            model.vols.insert(name, ModelVol::new(cs, s.data.clone(), s.allocated.clone()));
        }
        10 => {
            let Some(name) = pick_vol(a) else { return };
            let has_snaps = model.snaps.values().any(|s| s.volume == name);
            let r = engine.delete_volume(&name);
            if has_snaps {
                assert_eq!(r.unwrap_err().kind(), ErrorKind::Busy);
            } else {
                r.unwrap();
                model.vols.remove(&name);
            }
        }
        12 => {
            let Some(name) = pick_vol(a) else { return };
            engine.open_volume(&name).unwrap().flush().unwrap();
            model.vols.values_mut().for_each(ModelVol::durable);
        }
        // release a snapshot's local data (as after its upload): its slots are freed
        13 => {
            let Some(key) = pick_snap(a).filter(|k| !model.released.contains(k)) else { return };
            assert!(engine.release_snapshot(&key).unwrap());
            model.released.insert(key);
        }
        // kill -9 now, and power loss now: the copies must hold what the model allows
        14 | 15 => check_crashes(engine, dir, model),
        // restart: clean (checkpoint) or after a commit with the journal replayed
        _ => {
            if b % 2 == 0 {
                engine.shutdown();
            } else {
                engine.commit().unwrap();
            }
            model.vols.values_mut().for_each(ModelVol::durable);
            engine.stop_background();
            let old = std::mem::replace(engine, Engine::open(dir).unwrap());
            drop(old);
        }
    }
}

/// The model of snapshot `snap` of volume `name` taken now.
fn model_snapshot(model: &mut Model, name: &str, snap: &str) {
    let mv = model.vols.get_mut(name).unwrap();
    let key = format!("{name}@{snap}");
    mv.marks.push((key.clone(), mv.versions.len() - 1));
    model.snaps.insert(
        key.clone(),
        ModelSnap {
            volume: name.to_string(),
            data: mv.data.clone(),
            allocated: mv.allocated.clone(),
            parent: mv.parent.replace(key),
            changed: std::mem::take(&mut mv.dirty),
            group: None,
        },
    );
}

/// The model of a rollback to snapshot `key` (durable: a rollback commits).
fn model_rollback(model: &mut Model, key: &str) {
    let s = &model.snaps[key];
    let mv = model.vols.get_mut(&s.volume).unwrap();
    mv.data = s.data.clone();
    mv.allocated = s.allocated.clone();
    mv.dirty.clear();
    mv.parent = Some(key.to_string());
    mv.durable();
}

/// Copies the daemon directory as a kill -9 (same boot) or a power loss (another boot) would
/// leave it now — for a kill also with the journal cut at records written since the last
/// synced mark (a kill just after each was written) — and checks each copy against what the
/// model allows: flushed data, snapshots exact, no object lost or revived.
fn check_crashes(engine: &Arc<Engine>, dir: &Path, model: &Model) {
    let copy = tempfile::tempdir().unwrap();
    let (durable, generation) = {
        // No commit (no punch of a slot a commit frees) while the directory is copied: the
        // copy is one instant, as the disk is at a crash.
        let _hold = engine.committer.lock();
        let durable: BTreeSet<String> =
            model.snaps.keys().filter(|k| engine.snapshot(k).unwrap().durable).cloned().collect();
        copy_dir(dir, copy.path());
        (durable, engine.tail.lock().journal.generation)
    };
    let journal_of = |d: &Path| journal::journal_path(&d.join("meta"), generation);
    let cuts = journal::cut_points(&std::fs::read(journal_of(copy.path())).unwrap());
    let all: BTreeSet<String> = model.snaps.keys().cloned().collect();
    // The last cut is the whole journal; at most a few others, spread out.
    let step = cuts.len().div_ceil(4).max(1);
    for (i, &cut) in cuts.iter().enumerate().rev().filter(|(i, _)| (cuts.len() - 1 - i).is_multiple_of(step)) {
        let whole = i == cuts.len() - 1;
        let cut_copy = tempfile::tempdir().unwrap();
        copy_dir(copy.path(), cut_copy.path());
        std::fs::OpenOptions::new().write(true).open(journal_of(cut_copy.path())).unwrap().set_len(cut).unwrap();
        let e = Engine::open_as(cut_copy.path(), journal::boot_id()).unwrap();
        let what = if whole { "kill -9".to_string() } else { format!("kill -9 with the journal cut at {cut}") };
        check_recovered(&e, model, if whole { &all } else { &durable }, &what);
    }
    let other_boot: journal::BootId = std::array::from_fn(|i| !journal::boot_id()[i]);
    let e = Engine::open_as(copy.path(), other_boot).unwrap();
    check_recovered(&e, model, &durable, "power loss");
}

/// A daemon restarted after a crash against the model: the same volumes; each cluster holds
/// a version the model allows (never older than a surviving snapshot of its volume); every
/// snapshot it has is in the model and exact, and every one in `required` is there.
fn check_recovered(e: &Arc<Engine>, model: &Model, required: &BTreeSet<String>, what: &str) {
    let names: Vec<String> = e.list_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, model.vols.keys().cloned().collect::<Vec<_>>(), "{what}: volumes differ");
    let listed: BTreeSet<String> =
        e.list_snapshots(None).unwrap().into_iter().map(|s| format!("{}@{}", s.volume, s.name)).collect();
    assert!(listed.is_subset(&model.snaps.keys().cloned().collect()), "{what}: a deleted snapshot came back");
    assert!(required.is_subset(&listed), "{what}: snapshots lost: {:?}", required.difference(&listed));
    check_groups(e, model, &listed, what);
    for (name, mv) in &model.vols {
        let data = read_all(e, name, mv.data.len());
        let from = mv.marks.iter().filter(|(k, _)| listed.contains(k)).map(|&(_, i)| i).max().unwrap_or(0);
        let cs = mv.cluster_size as usize;
        for (c, got) in data.chunks(cs).enumerate() {
            let r = c * cs..c * cs + got.len();
            assert!(
                mv.versions[from..].iter().any(|v| v[r.clone()] == *got),
                "{what}: volume {name} cluster {c} holds none of the versions since its last durable point ({} allowed)",
                mv.versions.len() - from
            );
        }
    }
    for key in &listed {
        if model.released.contains(key) {
            assert!(!e.snapshot(key).unwrap().local, "{what}: released snapshot {key} is local again");
            continue;
        }
        let ms = &model.snaps[key];
        assert!(read_all(e, key, ms.data.len()) == ms.data, "{what}: snapshot {key} changed");
    }
}

fn run_case(ops: Vec<(u8, u64, u64, u64)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::open(dir.path()).unwrap();
    let mut model = Model::default();
    for (name, size, cs) in [("a", 256u64 << 10, 4096u64), ("b", (1 << 20) + 8192, 65536)] {
        engine.create_volume(name, size, Some(cs as u32)).unwrap();
        model.vols.insert(name.into(), ModelVol::new(cs, vec![0; size as usize], BTreeSet::new()));
    }
    for op in ops {
        step(&mut engine, dir.path(), &mut model, op);
        check(&engine, &model);
    }
    check_crashes(&engine, dir.path(), &model);
    // Everything survives a replay-only restart too.
    engine.commit().unwrap();
    engine.stop_background();
    drop(std::mem::replace(&mut engine, Engine::open(dir.path()).unwrap()));
    check(&engine, &model);
    // Deleting everything leaves no data behind.
    for key in model.snaps.keys() {
        engine.delete_snapshot(key, false).unwrap();
    }
    for name in model.vols.keys() {
        engine.delete_volume(name).unwrap();
    }
    engine.shutdown();
    engine.stop_background();
    drop(std::mem::replace(&mut engine, Engine::open(dir.path()).unwrap()));
    for f in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let f = f.unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0, "{:?} still holds data", f.path());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec((any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>()), 1..60)) {
        run_case(ops);
    }
}

/// Kinds of `step` that add, share and drop maps (writes, trims, snapshots, deletes,
/// rollbacks, clones, volume deletes, releases, restarts), for `index_case`.
const STRUCTURAL: [u8; 12] = [0, 1, 4, 6, 6, 7, 7, 8, 9, 10, 13, 16];

/// Random structural sequences on two volumes of one cluster size: after every step the child
/// index equals a scan and no slot is shared across families; every dropped map's frees are
/// checked against the full walk in `release_dropped` itself.
fn index_case(ops: Vec<(u8, u64, u64, u64)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::open(dir.path()).unwrap();
    let mut model = Model::default();
    for name in ["a", "b"] {
        engine.create_volume(name, 64 << 10, Some(4096)).unwrap();
        model.vols.insert(name.into(), ModelVol::new(4096, vec![0; 64 << 10], BTreeSet::new()));
    }
    for (kind, a, b, c) in ops {
        let kind = STRUCTURAL[kind as usize % STRUCTURAL.len()];
        step(&mut engine, dir.path(), &mut model, (kind, a, b, c));
        engine.registry.read().check_indexes();
    }
    check(&engine, &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]
    #[test]
    fn slot_frees_and_reparenting_match_the_full_walks(ops in proptest::collection::vec((any::<u8>(), any::<u64>(), any::<u64>(), any::<u64>()), 1..80)) {
        index_case(ops);
    }
}

/// The case that makes lineage edges alone unsound for deciding frees: once the snapshot
/// between them is deleted, a volume and its clone share a slot their common lineage parent
/// does not hold. Deleting the clone must keep it.
#[test]
fn deleting_a_clone_keeps_the_slots_its_origin_volume_still_shares() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 64 << 10, Some(4096)).unwrap();
    engine.create_snapshot("v", "p", "").unwrap();
    let data = fill(7, 4096);
    engine.open_volume("v").unwrap().write(0, &data, false).unwrap();
    engine.create_snapshot("v", "d", "").unwrap();
    engine.clone_snapshot("v@d", "c", None).unwrap();
    engine.delete_snapshot("v@d", false).unwrap();
    engine.delete_volume("c").unwrap();
    engine.registry.read().check_indexes();
    // Slots freed by mistake would be reused by these writes.
    let h = engine.open_volume("v").unwrap();
    engine.commit().unwrap();
    for i in 1..16u64 {
        h.write(i * 4096, &fill(100 + i, 4096), false).unwrap();
    }
    engine.commit().unwrap();
    let mut buf = vec![0u8; 4096];
    h.read(0, &mut buf).unwrap();
    assert!(buf == data, "the volume's cluster 0 lost its data");
}

#[test]
fn deleting_a_snapshot_releases_the_slots_only_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(4096)).unwrap();
    let h = engine.open_volume("v").unwrap();
    h.write(0, &[1u8; 1 << 20], false).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    h.write(0, &[2u8; 1 << 19], false).unwrap(); // 128 clusters redirected
    let used = |e: &Engine| {
        let reg = e.registry.read();
        let (next, free) = reg.slot_files[&4096].stats();
        next - free
    };
    engine.commit().unwrap();
    assert_eq!(used(&engine), 256 + 128);
    engine.delete_snapshot("v@s", false).unwrap();
    engine.commit().unwrap();
    assert_eq!(used(&engine), 256);
    // The head regained exclusive ownership of the clusters it shared with the snapshot:
    // writing them again allocates nothing.
    h.write(1 << 19, &[3u8; 1 << 19], false).unwrap();
    engine.commit().unwrap();
    assert_eq!(used(&engine), 256);
}

#[test]
fn snapshot_is_exact_while_writers_run() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 4 << 20, Some(65536)).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each writer fills whole 64 KiB blocks with one byte value per write; a snapshot taken
    // mid-stream must show whole blocks only (a request is atomic w.r.t. snapshots).
    let writers: Vec<_> = (0..2u8)
        .map(|w| {
            let h = engine.open_volume("v").unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let block = (i * 7 + w as u64 * 13) % 64;
                    h.write(block * 65536, &[(i % 250) as u8 + 1; 65536], false).unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    for n in 0..20 {
        engine.create_snapshot("v", &format!("s{n}"), "").unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for n in 0..20 {
        let h = engine.open_snapshot(&format!("v@s{n}"), None).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        h.read(0, &mut buf).unwrap();
        for block in buf.chunks(65536) {
            assert!(block.iter().all(|&b| b == block[0]), "snapshot s{n} holds a torn write");
        }
    }
}

/// Writers racing snapshot creates and deletes, with I/O outside the volume lock: no
/// acknowledged write is lost (in-place writes racing redirect copies of the same cluster,
/// ownership regained when a snapshot is deleted), every snapshot holds each request whole
/// and no older than what was acknowledged before its create, and never changes afterwards.
#[test]
fn concurrent_writes_snapshots_and_deletes_lose_nothing_and_snapshots_never_change() {
    use std::sync::atomic::AtomicBool;
    const CS: u64 = 65536;
    const PAIRS: u64 = 255; // pair p = 4 KiB blocks 2p+1 and 2p+2: some cross a cluster edge
    const WRITERS: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 2 << 20, Some(CS as u32)).unwrap();
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..PAIRS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..PAIRS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let pair_data = |p: u64, seq: u64| -> Vec<u8> { ((p << 32) | seq).to_le_bytes().repeat(1024) };
    let pair_seq = |buf: &[u8], p: u64| -> u64 {
        let words: Vec<u64> = buf.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(words.iter().all(|&w| w == words[0]), "pair {p} is torn");
        assert!(words[0] == 0 || words[0] >> 32 == p, "pair {p} holds another pair's data");
        words[0] & 0xffff_ffff
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let h = engine.open_volume("v").unwrap();
            let (issued, acked, stop) = (issued.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let p = (seq * 37 + w) % PAIRS / WRITERS * WRITERS + w;
                    if p >= PAIRS {
                        continue;
                    }
                    issued[p as usize].store(seq, Ordering::SeqCst);
                    h.write((2 * p + 1) * 4096, &pair_data(p, seq), false).unwrap();
                    acked[p as usize].store(seq, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let read_all = |h: &volume::SnapshotHandle| {
        let mut buf = vec![0u8; 2 << 20];
        h.read(0, &mut buf).unwrap();
        buf
    };
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for n in 0..100 {
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let name = format!("s{n}");
        engine.create_snapshot("v", &name, "").unwrap();
        let after: Vec<u64> = issued.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let content = read_all(&engine.open_snapshot(&format!("v@{name}"), None).unwrap());
        for p in 0..PAIRS {
            let off = ((2 * p + 1) * 4096) as usize;
            let seq = pair_seq(&content[off..off + 8192], p);
            assert!(
                before[p as usize] <= seq && seq <= after[p as usize],
                "snapshot {name}, pair {p}: holds write {seq}, acknowledged before: {}, issued by the end: {}",
                before[p as usize],
                after[p as usize]
            );
        }
        kept.push((name, content));
        // Deleting the newest snapshot gives the head back the clusters it shared only with
        // it (written in place again at once); deleting older ones frees slots.
        let delete = match n % 4 {
            1 | 3 => kept.pop(),
            2 if kept.len() > 4 => Some(kept.remove(0)),
            _ => None,
        };
        if let Some((old, _)) = delete {
            engine.delete_snapshot(&format!("v@{old}"), false).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for (name, content) in &kept {
        let again = read_all(&engine.open_snapshot(&format!("v@{name}"), None).unwrap());
        assert!(again == *content, "snapshot {name} changed after it was taken");
    }
    let mut head = vec![0u8; 2 << 20];
    engine.open_volume("v").unwrap().read(0, &mut head).unwrap();
    for p in 0..PAIRS {
        let off = ((2 * p + 1) * 4096) as usize;
        let last = acked[p as usize].load(Ordering::SeqCst);
        assert_eq!(pair_seq(&head[off..off + 8192], p), last, "pair {p}: the last acknowledged write is lost");
    }
}

#[test]
fn in_place_write_after_regaining_ownership_still_marks_the_cluster_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(65536)).unwrap();
    engine.open_volume("v").unwrap().write(0, &[1u8; 65536], false).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    engine.clone_snapshot("v@s", "c", None).unwrap();
    // The origin moves away from the shared slot, so after deleting the snapshot the clone is
    // its only holder and owns it again.
    engine.open_volume("v").unwrap().write(0, &[2u8; 65536], false).unwrap();
    engine.delete_snapshot("v@s", false).unwrap();
    engine.open_volume("c").unwrap().write(4096, &[3u8; 4096], false).unwrap();
    let dirty = |e: &Arc<Engine>| e.open_volume("c").unwrap().dirty(0, 65536).unwrap();
    assert_eq!(dirty(&engine), vec![volume::Extent { length: 65536, flags: volume::STATE_DIRTY }]);
    engine.commit().unwrap();
    engine.stop_background();
    drop(std::mem::replace(&mut engine, Engine::open(dir.path()).unwrap()));
    assert_eq!(dirty(&engine), vec![volume::Extent { length: 65536, flags: volume::STATE_DIRTY }]);
    let mut buf = vec![0u8; 8192];
    engine.open_volume("c").unwrap().read(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 3));
}

// Hydration: a volume created from a snapshot in the store, against the snapshot's bytes.

/// Serves the clusters of remote snapshots from memory: the engine's whole contract with the
/// store is "the bytes of cluster C of snapshot S, or none for a hole" (the real store is
/// exercised by tests/hydrate.rs).
struct MemorySource {
    rt: tokio::runtime::Handle,
    cluster_size: u64,
    snapshots: parking_lot::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    fetches: AtomicU64,
}

impl ClusterSource for MemorySource {
    fn fetch(
        &self,
        source: &RemoteSource,
        cluster: u64,
        _priority: Priority,
    ) -> futures::future::BoxFuture<'static, Result<Option<bytes::Bytes>>> {
        use futures::FutureExt;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let snaps = self.snapshots.lock();
        let data = &snaps[&source.snapshot];
        let start = (cluster * self.cluster_size) as usize;
        let chunk = &data[start..(start + self.cluster_size as usize).min(data.len())];
        let out = (!chunk.iter().all(|&b| b == 0)).then(|| bytes::Bytes::copy_from_slice(chunk));
        futures::future::ready(Ok(out)).boxed()
    }
    fn readahead_bytes(&self) -> u64 {
        2 * self.cluster_size
    }
    fn runtime(&self) -> tokio::runtime::Handle {
        self.rt.clone()
    }
}

fn mt_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The remote snapshot's bytes: random clusters with a few holes.
fn remote_bytes(size: usize, cs: usize, seed: u64) -> Vec<u8> {
    let mut data = fill(seed, size);
    for (i, c) in data.chunks_mut(cs).enumerate() {
        if i % 5 == 3 {
            c.fill(0);
        }
    }
    data
}

fn hydrate_case(ops: Vec<(u8, u64, u64)>) {
    const SIZE: u64 = 256 << 10;
    const CS: u64 = 4096;
    let rt = mt_rt();
    let dir = tempfile::tempdir().unwrap();
    let src = Arc::new(MemorySource {
        rt: rt.handle().clone(),
        cluster_size: CS,
        snapshots: parking_lot::Mutex::new([(7, remote_bytes(SIZE as usize, CS as usize, 99))].into()),
        fetches: AtomicU64::new(0),
    });
    let open = |dir: &Path| {
        let e = Engine::open(dir).unwrap();
        e.set_cluster_source(src.clone());
        e
    };
    let source = RemoteSource { region: "mem".into(), snapshot: 7 };
    let mut engine = open(dir.path());
    engine.create_volume_from_remote("v", SIZE, CS as u32, &source).unwrap();
    let mut model = src.snapshots.lock()[&7].clone();
    // (name, content) of snapshots taken while loading.
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    // Compares without loading anything: pending clusters are compared with the source,
    // local ones read from the slots, so the pending state survives from step to step.
    let check = |engine: &Arc<Engine>, model: &[u8], snaps: &[(String, Vec<u8>)]| {
        let v = engine.registry.read().find_volume("v").unwrap().clone();
        let st = v.state.read();
        let mut buf = vec![0u8; CS as usize];
        for c in 0..SIZE / CS {
            let range = (c * CS) as usize..((c + 1) * CS) as usize;
            match &st.remote {
                Some(r) if r.is_pending(c) => {
                    let snaps = src.snapshots.lock();
                    assert!(snaps[&r.source.snapshot][range.clone()] == model[range], "pending cluster {c} differs");
                }
                _ => {
                    volume::read_map(&v.slots, &st.head, c * CS, &mut buf).unwrap();
                    assert!(buf[..] == model[range], "cluster {c} differs");
                }
            }
        }
        drop(st);
        let mut buf = vec![0u8; SIZE as usize];
        for (name, want) in snaps {
            let s = engine.open_snapshot(&format!("v@{name}"), None).unwrap();
            rt.block_on(s.read_async(0, &mut buf)).unwrap();
            assert!(&buf == want, "snapshot {name} differs");
        }
    };
    for (op, a, b) in ops {
        // Sector-aligned, up to four clusters: many requests cover whole clusters and parts.
        let off = a % (SIZE / 512) * 512;
        let len = ((b % (8 * CS / 512) + 1) * 512).min(SIZE - off);
        match op % 8 {
            // reads load what they touch; they never see zeros for data still remote
            0 => {
                let h = engine.open_volume("v").unwrap();
                let mut buf = vec![0u8; len as usize];
                rt.block_on(h.read_async(off, &mut buf)).unwrap();
                assert!(buf == model[off as usize..(off + len) as usize], "read at {off}+{len}");
            }
            1 => {
                let data = fill(b, len as usize);
                rt.block_on(engine.open_volume("v").unwrap().write_async(off, &data, false)).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            2 => {
                let mode = if op & 8 == 0 { ZeroMode::Unmap } else { ZeroMode::Allocate };
                rt.block_on(engine.open_volume("v").unwrap().zero_async(off, len, mode, false)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            3 if snaps.len() < 4 => {
                let name = format!("s{}", snaps.len());
                engine.create_snapshot("v", &name, "").unwrap();
                snaps.push((name, model.clone()));
            }
            // background loading of some pending clusters, as the store's hydrator does it
            4 => {
                let vol = parse_volume_id(&engine.volume("v").unwrap().id).unwrap();
                let Some(pending) = engine.pending_clusters(vol, &source, 0..SIZE / CS) else { continue };
                let data = src.snapshots.lock()[&7].clone();
                let items: Vec<(u64, Option<&[u8]>)> = pending
                    .into_iter()
                    .take((b % 20) as usize)
                    .map(|c| {
                        let chunk = &data[(c * CS) as usize..((c + 1) * CS) as usize];
                        (c, (!chunk.iter().all(|&x| x == 0)).then_some(chunk))
                    })
                    .collect();
                engine.install_clusters(vol, &source, &items).unwrap();
            }
            5 if !snaps.is_empty() => {
                let (name, content) = snaps[(b as usize) % snaps.len()].clone();
                rt.block_on(engine.rollback(&format!("v@{name}"), false, None)).unwrap();
                model = content;
            }
            // restart: clean, or replaying the journal after a commit
            6 | 7 => {
                if op % 2 == 0 {
                    engine.shutdown();
                } else {
                    engine.commit().unwrap();
                }
                engine.stop_background();
                drop(std::mem::replace(&mut engine, open(dir.path())));
            }
            _ => {}
        }
        check(&engine, &model, &snaps);
        engine.registry.read().check_indexes();
    }
    // Loading everything leaves a volume that no longer needs the store.
    let vol = parse_volume_id(&engine.volume("v").unwrap().id).unwrap();
    let pending_before = engine.pending_count(vol, &source).unwrap_or(0);
    let h = engine.open_volume("v").unwrap();
    rt.block_on(h.load(0, SIZE, false, Priority::ReadAhead)).unwrap();
    drop(h);
    assert!(engine.volume("v").unwrap().hydration.is_none(), "still loading after loading everything");
    check(&engine, &model, &snaps);
    let fetched = src.fetches.load(Ordering::Relaxed);
    engine.commit().unwrap();
    engine.stop_background();
    drop(std::mem::replace(&mut engine, open(dir.path())));
    check(&engine, &model, &snaps);
    assert!(engine.volume("v").unwrap().hydration.is_none());
    // Snapshots taken while loading still read their remote clusters from the store; the
    // volume itself fetched nothing more.
    let h = engine.open_volume("v").unwrap();
    let before = src.fetches.load(Ordering::Relaxed);
    let mut buf = vec![0u8; SIZE as usize];
    rt.block_on(h.read_async(0, &mut buf)).unwrap();
    assert_eq!(src.fetches.load(Ordering::Relaxed), before, "a fully loaded volume fetched again");
    // (Nothing is fetched when earlier steps loaded or overwrote every cluster.)
    assert!(fetched > 0 || pending_before == 0, "{pending_before} pending clusters loaded without a fetch");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(40), ..ProptestConfig::default() })]
    #[test]
    fn a_volume_loading_from_the_store_matches_its_model(ops in proptest::collection::vec((any::<u8>(), any::<u64>(), any::<u64>()), 1..50)) {
        hydrate_case(ops);
    }
}

#[test]
fn deleting_a_snapshot_volumes_still_load_from_is_refused() {
    let rt = mt_rt();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(65536)).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    let id = parse_snapshot_id(&engine.snapshot("v@s").unwrap().id).unwrap();
    engine.set_cluster_source(Arc::new(MemorySource {
        rt: rt.handle().clone(),
        cluster_size: 65536,
        snapshots: parking_lot::Mutex::new([(id, vec![1u8; 1 << 20])].into()),
        fetches: AtomicU64::new(0),
    }));
    engine.create_volume_from_remote("w", 1 << 20, 65536, &RemoteSource { region: "r".into(), snapshot: id }).unwrap();
    let err = engine.delete_snapshot("v@s", false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("volume w still load"), "{err}");
    // With the store copy kept (the store service defers its deletion), the snapshot goes and
    // the volume goes on loading from the store.
    // A snapshot of w taken while it loads needs the store copy too, until it is deleted.
    engine.create_snapshot("w", "t", "").unwrap();
    let both = vec!["snapshot w@t".to_string(), "volume w".to_string()];
    assert_eq!(engine.store_dependents(&snapshot_id(id)), both);
    engine.registry.read().check_indexes();
    engine.delete_snapshot("w@t", false).unwrap();
    assert_eq!(engine.store_dependents(&snapshot_id(id)), vec!["volume w".to_string()]);
    engine.registry.read().check_indexes();
    engine.delete_snapshot("v@s", true).unwrap();
    assert_eq!(engine.snapshot("v@s").unwrap_err().kind(), ErrorKind::NotFound);
    assert!(read_all(&engine, "w", 1 << 20).iter().all(|&b| b == 1));
}

#[test]
fn a_trim_of_whole_clusters_still_in_the_store_survives_a_replay() {
    // Clusters 2 and 3 trimmed (no fetch), then a replay; cluster 4 must still be pending.
    hydrate_case(vec![(2, 16, 15), (7, 0, 0), (0, 8192, 15)]);
}

/// Copies a daemon directory as it is now (what the disk would hold if the page cache were
/// written back this instant).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

fn read_all(engine: &Arc<Engine>, r: &str, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    if r.contains('@') {
        engine.open_snapshot(r, None).unwrap().read(0, &mut buf).unwrap();
    } else {
        engine.open_volume(r).unwrap().read(0, &mut buf).unwrap();
    }
    buf
}

#[test]
fn a_snapshot_survives_a_kill_at_once_and_a_power_loss_once_committed() {
    const SIZE: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", SIZE as u64, Some(65536)).unwrap();
    let h = engine.open_volume("v").unwrap();
    let flushed = fill(1, SIZE);
    h.write(0, &flushed, false).unwrap();
    h.flush().unwrap();
    let unflushed = fill(2, 3 * 65536);
    h.write(65536, &unflushed, false).unwrap();
    let mut taken = flushed.clone();
    taken[65536..4 * 65536].copy_from_slice(&unflushed);

    // No commit can run while the test holds the commit lock: the snapshot is only written.
    let hold = engine.committer.lock();
    let info = engine.create_snapshot("v", "s", "").unwrap();
    assert!(!info.durable, "the create waited for a commit it could not have made");
    assert!(read_all(&engine, "v@s", SIZE) == taken);
    let written = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), written.path());
    let lost = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), lost.path());
    drop(hold);

    // Killed (same boot): the snapshot and the writes before it are there.
    let killed = Engine::open_as(written.path(), journal::boot_id()).unwrap();
    assert!(read_all(&killed, "v@s", SIZE) == taken, "the snapshot changed across a kill");
    assert!(read_all(&killed, "v", SIZE) == taken, "writes before the snapshot were lost in a kill");
    drop(killed);
    // Power lost (another boot): the snapshot is gone; each block of the volume holds what it
    // held at the flush or what was written after it (never anything else).
    let other_boot: journal::BootId = std::array::from_fn(|i| !journal::boot_id()[i]);
    let unplugged = Engine::open_as(lost.path(), other_boot).unwrap();
    assert_eq!(unplugged.snapshot("v@s").unwrap_err().kind(), ErrorKind::NotFound);
    let after = read_all(&unplugged, "v", SIZE);
    for (i, block) in after.chunks(65536).enumerate() {
        let range = i * 65536..(i + 1) * 65536;
        assert!(
            block == &flushed[range.clone()] || block == &taken[range],
            "block {i} after the power loss is neither old nor new"
        );
    }
    drop(unplugged);

    // Once durable, a power loss keeps it.
    engine.make_durable("v@s").unwrap();
    assert!(engine.snapshot("v@s").unwrap().durable);
    let synced = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), synced.path());
    let unplugged = Engine::open_as(synced.path(), other_boot).unwrap();
    assert!(read_all(&unplugged, "v@s", SIZE) == taken, "a durable snapshot changed across a power loss");
    assert!(unplugged.snapshot("v@s").unwrap().durable);
}

#[test]
fn a_snapshot_taken_while_a_checkpoint_is_written_survives_a_kill_and_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(65536)).unwrap();
    let h = engine.open_volume("v").unwrap();
    h.write(0, &[1; 65536], false).unwrap();
    let image = engine.image_for_checkpoint().unwrap();
    // Between the image and its installation: the snapshot's record is written then.
    h.write(0, &[2; 65536], false).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    let before_install = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), before_install.path());
    engine.install_checkpoint(image).unwrap();
    drop(h);
    // Killed before the checkpoint was installed (old checkpoint + old journal) and after it
    // (new checkpoint + next journal): the snapshot and the write before it are there.
    let after_install = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), after_install.path());
    for copy in [&before_install, &after_install] {
        let e = Engine::open_as(copy.path(), journal::boot_id()).unwrap();
        assert!(read_all(&e, "v@s", 65536).iter().all(|&b| b == 2), "the snapshot is lost or changed");
        assert!(read_all(&e, "v", 65536).iter().all(|&b| b == 2));
    }
}

/// Issue 18 §1: a snapshot delete followed by another committing operation must not free a
/// slot the journal still maps the volume's head to (the head's redirect record was pending).
#[test]
fn flushed_data_survives_a_kill_after_a_snapshot_delete_and_another_commit() {
    const CS: usize = 65536;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(CS as u32)).unwrap();
    let h = engine.open_volume("v").unwrap();
    h.write(0, &[0xaa; CS], false).unwrap();
    h.flush().unwrap();
    engine.create_snapshot("v", "s1", "").unwrap();
    h.write(0, &[0xbb; 4096], false).unwrap();
    engine.delete_snapshot("v@s1", false).unwrap();
    engine.create_volume("other", 1 << 30, None).unwrap();
    let killed = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), killed.path());
    let e = Engine::open_as(killed.path(), journal::boot_id()).unwrap();
    let data = read_all(&e, "v", CS);
    assert!(data[..4096].iter().all(|&b| b == 0xaa) || data[..4096].iter().all(|&b| b == 0xbb));
    assert!(data[4096..].iter().all(|&b| b == 0xaa), "flushed data lost after the kill");
}

#[test]
fn creation_times_come_from_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = crate::clock::ManualClock::new(1_700_000_000);
    let engine = Engine::open_with_clock(dir.path(), clock.clone()).unwrap();
    assert_eq!(engine.create_volume("v", 1 << 20, None).unwrap().created, 1_700_000_000);
    clock.advance(30 * 86_400);
    assert_eq!(engine.create_snapshot("v", "s", "").unwrap().created, 1_700_000_000 + 30 * 86_400);
}

/// Issue 18 §3: a damaged checkpoint is rebuilt from the previous one and the journals (each
/// rotation keeps `checkpoint.prev` and its journal); with both damaged, a clear error naming
/// the file, never a panic.
#[test]
fn a_damaged_checkpoint_is_rebuilt_from_the_previous_one_and_the_journals() {
    const SIZE: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", SIZE as u64, Some(65536)).unwrap();
    let h = engine.open_volume("v").unwrap();
    h.write(0, &fill(1, SIZE), false).unwrap();
    engine.create_snapshot("v", "s1", "").unwrap();
    engine.checkpoint().unwrap(); // generation 1
    h.write(65536, &fill(2, 3 * 65536), false).unwrap();
    engine.create_snapshot("v", "s2", "").unwrap();
    engine.delete_snapshot("v@s1", false).unwrap();
    engine.checkpoint().unwrap(); // generation 2; checkpoint.prev is generation 1
    h.write(8192, &fill(3, 100_000), false).unwrap();
    engine.create_volume("w", SIZE as u64, None).unwrap();
    h.flush().unwrap();
    let want = read_all(&engine, "v", SIZE);
    let want_s2 = read_all(&engine, "v@s2", SIZE);
    assert!(dir.path().join("meta/checkpoint.prev").exists());

    // Killed now, with the checkpoint damaged (four zero bytes have a valid CRC of nothing).
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    std::fs::write(copy.path().join("meta/checkpoint"), [0u8; 4]).unwrap();
    let e = Engine::open_as(copy.path(), journal::boot_id()).unwrap();
    assert!(read_all(&e, "v", SIZE) == want, "the volume differs after the rebuild");
    assert!(read_all(&e, "v@s2", SIZE) == want_s2, "the snapshot differs after the rebuild");
    assert_eq!(e.snapshot("v@s1").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(e.list_volumes().len(), 2);
    drop(e);
    // And the rebuilt state is checkpointed: it opens again without the fallback.
    let e = Engine::open_as(copy.path(), journal::boot_id()).unwrap();
    assert!(read_all(&e, "v", SIZE) == want);
    drop(e);

    // Both checkpoints damaged: an error naming the file.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    std::fs::write(copy.path().join("meta/checkpoint"), [0u8; 4]).unwrap();
    std::fs::write(copy.path().join("meta/checkpoint.prev"), [1u8; 30]).unwrap();
    let Err(err) = Engine::open_as(copy.path(), journal::boot_id()) else { panic!("opened without a checkpoint") };
    assert!(err.to_string().contains("meta/checkpoint"), "{err}");
}

/// The rebuild replays the previous journal only up to where the damaged checkpoint's image
/// ended: records written while that checkpoint was being installed (in both journals) are
/// applied once.
#[test]
fn a_damaged_checkpoint_rebuild_applies_records_written_during_its_rotation_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, Some(65536)).unwrap();
    let h = engine.open_volume("v").unwrap();
    h.write(0, &[1; 65536], false).unwrap();
    engine.checkpoint().unwrap();
    let image = engine.image_for_checkpoint().unwrap();
    // Between the image and its installation (no commit can run: the image holds the
    // committer): written to both journals.
    h.write(0, &[2; 65536], false).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    engine.install_checkpoint(image).unwrap();
    h.write(65536, &[3; 65536], false).unwrap();
    h.flush().unwrap();
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    std::fs::write(copy.path().join("meta/checkpoint"), b"damaged").unwrap();
    let e = Engine::open_as(copy.path(), journal::boot_id()).unwrap();
    assert_eq!(e.list_snapshots(None).unwrap().len(), 1);
    // Applied twice, the snapshot would be its own parent with an empty changed set.
    let s = e.snapshot("v@s").unwrap();
    assert_eq!((s.parent, s.changed_clusters), (None, 1), "the snapshot's record was applied twice");
    assert!(read_all(&e, "v@s", 65536).iter().all(|&b| b == 2));
    let v = read_all(&e, "v", 2 * 65536);
    assert!(v[..65536].iter().all(|&b| b == 2) && v[65536..].iter().all(|&b| b == 3));
}

#[test]
fn a_snapshot_is_found_by_volume_at_its_id_only_on_its_own_volume() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("a", 1 << 20, None).unwrap();
    engine.create_volume("b", 1 << 20, None).unwrap();
    let s = engine.create_snapshot("a", "s1", "").unwrap();
    let a = engine.volume("a").unwrap();
    for r in [format!("a@{}", s.id), format!("{}@{}", a.id, s.id), s.id.clone(), format!("{}@s1", a.id)] {
        assert_eq!(engine.snapshot(&r).unwrap().id, s.id, "{r}");
    }
    let e = engine.snapshot(&format!("b@{}", s.id)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("volume 'b' has no snapshot with id"), "{e}");
}

#[test]
fn snapshot_names_are_found_refused_and_freed_through_the_name_index_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("a", 1 << 20, None).unwrap();
    engine.create_volume("b", 1 << 20, None).unwrap();
    let first = engine.create_snapshot("a", "s", "").unwrap();
    engine.create_snapshot("b", "s", "").unwrap();
    let e = engine.create_snapshot("a", "s", "").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let tag = GroupTag { id: 7, group: "g".into(), application: false };
    let e = engine.create_group_snapshot(&["a".into(), "b".into()], "s", "", &tag).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    // Deleted, the name is free again and names the new snapshot only.
    engine.delete_snapshot("a@s", false).unwrap();
    assert_eq!(engine.snapshot("a@s").unwrap_err().kind(), ErrorKind::NotFound);
    let second = engine.create_snapshot("a", "s", "").unwrap();
    assert_ne!(first.id, second.id);
    engine.create_group_snapshot(&["a".into(), "b".into()], "g1", "", &tag).unwrap();
    engine.shutdown();
    // Rebuilt from the journal and checkpoint the same way.
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(engine.snapshot("a@s").unwrap().id, second.id);
    assert!(engine.snapshot("a@g1").is_ok() && engine.snapshot("b@g1").is_ok());
    let e = engine.create_snapshot("b", "g1", "").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
}

#[test]
fn rollback_waits_briefly_for_a_writer_that_is_disconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.create_volume("v", 1 << 20, None).unwrap();
    engine.create_snapshot("v", "s", "").unwrap();
    // A connection closing: its handle goes a moment after the rollback is asked for.
    let closing = engine.open_volume("v").unwrap();
    let dropper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(closing);
    });
    rt().block_on(engine.rollback("v@s", false, None)).expect("rollback once the writer is gone");
    dropper.join().unwrap();
    // One that stays is refused once the grace is over.
    let _staying = engine.open_volume("v").unwrap();
    let started = std::time::Instant::now();
    let e = rt().block_on(engine.rollback("v@s", false, None)).unwrap_err();
    assert!(e.to_string().contains("has 1 writable client(s) connected"), "{e}");
    assert!(started.elapsed() >= CLOSING_GRACE && started.elapsed() < CLOSING_GRACE * 3, "{:?}", started.elapsed());
}
