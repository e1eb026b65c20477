//! The cluster map: cluster index → map entry, as a persistent (copy-on-write) radix tree.
//!
//! Cloning a map is O(1) (one `Arc` clone of the root): that is what makes a snapshot
//! instant. The first change to a node shared with a snapshot copies just that node and its
//! path to the root (`Arc::make_mut`), so snapshots share every unchanged page.
//!
//! Entries: `0` = the cluster reads as zeros and has no storage; otherwise `slot + 1`.

use std::collections::HashSet;
use std::sync::Arc;

use smallvec::SmallVec;

const FANOUT_BITS: u32 = 9;
const FANOUT: usize = 1 << FANOUT_BITS;
const MASK: u64 = FANOUT as u64 - 1;

/// Entry value meaning "zeros, no storage".
pub const ZERO: u64 = 0;

#[derive(Clone)]
pub(crate) enum Node {
    Leaf(Box<[u64; FANOUT]>),
    Inner(Box<[Option<Arc<Node>>; FANOUT]>),
}

impl Node {
    fn empty(level: u32) -> Node {
        if level == 1 {
            Node::Leaf(Box::new([ZERO; FANOUT]))
        } else {
            Node::Inner(Box::new(std::array::from_fn(|_| None)))
        }
    }
}

/// A cluster map of a fixed number of clusters.
#[derive(Clone)]
pub struct ClusterMap {
    root: Option<Arc<Node>>,
    /// Levels of the tree; 1 = the root is a leaf.
    height: u32,
}

/// Number of tree levels needed to index `clusters` clusters.
fn height_for(clusters: u64) -> u32 {
    let mut height = 1;
    let mut reach = FANOUT as u64;
    while reach < clusters {
        height += 1;
        reach = reach.saturating_mul(FANOUT as u64);
    }
    height
}

fn index_at(cluster: u64, level: u32) -> usize {
    ((cluster >> (FANOUT_BITS * (level - 1))) & MASK) as usize
}

impl ClusterMap {
    pub fn new(clusters: u64) -> ClusterMap {
        ClusterMap { root: None, height: height_for(clusters) }
    }

    pub fn get(&self, cluster: u64) -> u64 {
        let mut node = match &self.root {
            Some(n) => n,
            None => return ZERO,
        };
        let mut level = self.height;
        loop {
            match &**node {
                Node::Leaf(entries) => return entries[index_at(cluster, 1)],
                Node::Inner(children) => match &children[index_at(cluster, level)] {
                    Some(child) => {
                        node = child;
                        level -= 1;
                    }
                    None => return ZERO,
                },
            }
        }
    }

    /// Sets an entry, copying shared nodes on the path; returns the previous entry.
    pub fn set(&mut self, cluster: u64, entry: u64) -> u64 {
        if self.get(cluster) == entry {
            return entry; // no change: don't unshare any page
        }
        let height = self.height;
        let mut node = self.root.get_or_insert_with(|| Arc::new(Node::empty(height)));
        let mut level = height;
        loop {
            match Arc::make_mut(node) {
                Node::Leaf(entries) => {
                    return std::mem::replace(&mut entries[index_at(cluster, 1)], entry);
                }
                Node::Inner(children) => {
                    let child_level = level - 1;
                    node = children[index_at(cluster, level)].get_or_insert_with(|| Arc::new(Node::empty(child_level)));
                    level = child_level;
                }
            }
        }
    }

    /// Calls `f(cluster, entry)` for every non-zero entry, in cluster order.
    pub fn for_each_nonzero(&self, mut f: impl FnMut(u64, u64)) {
        if let Some(root) = &self.root {
            walk_nonzero(root, self.height, 0, &mut f);
        }
    }

    /// Calls `f(cluster, entry)` for every non-zero entry with `start <= cluster < end`, in
    /// order, skipping empty subtrees without visiting them.
    pub fn for_each_nonzero_in(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        fn walk(node: &Node, level: u32, base: u64, start: u64, end: u64, f: &mut dyn FnMut(u64, u64)) {
            match node {
                Node::Leaf(entries) => {
                    let lo = start.saturating_sub(base).min(FANOUT as u64) as usize;
                    let hi = end.saturating_sub(base).min(FANOUT as u64) as usize;
                    for (i, &e) in entries.iter().enumerate().take(hi).skip(lo) {
                        if e != ZERO {
                            f(base + i as u64, e);
                        }
                    }
                }
                Node::Inner(children) => {
                    let span = span(level);
                    for (i, child) in children.iter().enumerate() {
                        let child_base = base + i as u64 * span;
                        if child_base >= end {
                            break;
                        }
                        if let Some(c) = child.as_ref().filter(|_| child_base + span > start) {
                            walk(c, level - 1, child_base, start, end, f);
                        }
                    }
                }
            }
        }
        if let Some(root) = &self.root {
            walk(root, self.height, 0, start, end, &mut f);
        }
    }

    /// Calls `f(cluster)` for every cluster whose entry differs between `self` and `other`
    /// (maps of the same size). Subtrees shared by both are skipped without being read, so
    /// comparing a snapshot with its successor costs only what changed between them.
    #[cfg(test)]
    pub fn for_each_difference(&self, other: &ClusterMap, mut f: impl FnMut(u64)) {
        debug_assert_eq!(self.height, other.height);
        diff(self.root.as_ref(), other.root.as_ref(), self.height, 0, &mut f);
    }

    /// Like `for_each_nonzero`, but a node already in `seen` (shared with a map visited
    /// before) is skipped: walking many snapshots of one volume costs their distinct pages.
    pub(crate) fn for_each_distinct_leaf(&self, seen: &mut HashSet<*const Node>, mut f: impl FnMut(u64, u64)) {
        fn walk(node: &Arc<Node>, level: u32, base: u64, seen: &mut HashSet<*const Node>, f: &mut dyn FnMut(u64, u64)) {
            if !seen.insert(Arc::as_ptr(node)) {
                return;
            }
            match &**node {
                Node::Leaf(_) => walk_nonzero(node, level, base, f),
                Node::Inner(children) => {
                    for (i, child) in children.iter().enumerate() {
                        if let Some(c) = child {
                            walk(c, level - 1, base + i as u64 * span(level), seen, f);
                        }
                    }
                }
            }
        }
        if let Some(root) = &self.root {
            walk(root, self.height, 0, seen, &mut f);
        }
    }

    /// Calls `f(cluster, entry)` for every non-zero entry of `self` that none of `others`
    /// (maps of the same size) holds at that cluster. Subtrees one of them shares are skipped
    /// unread, so this costs the pages `self` does not share with them.
    pub(crate) fn for_each_unshared(&self, others: &[&ClusterMap], mut f: impl FnMut(u64, u64)) {
        fn walk(node: &Arc<Node>, others: &[Option<&Arc<Node>>], level: u32, base: u64, f: &mut dyn FnMut(u64, u64)) {
            if others.iter().flatten().any(|o| Arc::ptr_eq(o, node)) {
                return;
            }
            match &**node {
                Node::Leaf(entries) => {
                    for (i, &e) in entries.iter().enumerate() {
                        let held = |o: &Option<&Arc<Node>>| matches!(o.map(|n| &**n), Some(Node::Leaf(x)) if x[i] == e);
                        if e != ZERO && !others.iter().any(held) {
                            f(base + i as u64, e);
                        }
                    }
                }
                Node::Inner(children) => {
                    for (i, child) in children.iter().enumerate() {
                        let Some(c) = child else { continue };
                        let theirs: SmallVec<[Option<&Arc<Node>>; 4]> = others
                            .iter()
                            .map(|o| match o.map(|n| &**n) {
                                Some(Node::Inner(x)) => x[i].as_ref(),
                                _ => None,
                            })
                            .collect();
                        walk(c, &theirs, level - 1, base + i as u64 * span(level), f);
                    }
                }
            }
        }
        if let Some(root) = &self.root {
            let theirs: SmallVec<[_; 4]> =
                others.iter().filter(|o| o.height == self.height).map(|o| o.root.as_ref()).collect();
            walk(root, &theirs, self.height, 0, &mut f);
        }
    }

    /// Calls `f(i, entry)` with the entry at `clusters[i]` (sorted, distinct) when it is
    /// non-zero, reading only the pages on their paths, and none already in `seen` (a page
    /// at one position shared with a map probed before for the same clusters): probing many
    /// snapshots of one volume costs their distinct pages around `clusters`.
    pub(crate) fn probe_distinct(
        &self,
        clusters: &[u64],
        seen: &mut HashSet<(*const Node, u64)>,
        mut f: impl FnMut(usize, u64),
    ) {
        fn walk(
            node: &Arc<Node>,
            level: u32,
            base: u64,
            clusters: &[u64],
            first: usize,
            seen: &mut HashSet<(*const Node, u64)>,
            f: &mut dyn FnMut(usize, u64),
        ) {
            if !seen.insert((Arc::as_ptr(node), base)) {
                return;
            }
            match &**node {
                Node::Leaf(entries) => {
                    for (k, &c) in clusters.iter().enumerate() {
                        let e = entries[index_at(c, 1)];
                        if e != ZERO {
                            f(first + k, e);
                        }
                    }
                }
                Node::Inner(children) => {
                    let mut k = 0;
                    while k < clusters.len() {
                        let i = index_at(clusters[k], level);
                        let n = clusters[k..].iter().take_while(|&&c| index_at(c, level) == i).count();
                        if let Some(c) = &children[i] {
                            walk(c, level - 1, base + i as u64 * span(level), &clusters[k..k + n], first + k, seen, f);
                        }
                        k += n;
                    }
                }
            }
        }
        if let Some(root) = &self.root {
            walk(root, self.height, 0, clusters, 0, seen, &mut f);
        }
    }

    pub(crate) fn root(&self) -> Option<&Arc<Node>> {
        self.root.as_ref()
    }

    pub(crate) fn height(&self) -> u32 {
        self.height
    }

    /// A map of `height` levels (from a checkpoint); `None` when no volume has that many
    /// (a height of 0, or one whose spans would not fit in 64 bits, is corrupt metadata).
    pub(crate) fn from_parts(root: Option<Arc<Node>>, height: u32) -> Option<ClusterMap> {
        (1..=height_for(u64::MAX)).contains(&height).then_some(ClusterMap { root, height })
    }
}

/// Number of clusters one node at `level` covers.
fn span(level: u32) -> u64 {
    1u64 << (FANOUT_BITS * (level - 1))
}

fn walk_nonzero(node: &Node, level: u32, base: u64, f: &mut dyn FnMut(u64, u64)) {
    match node {
        Node::Leaf(entries) => {
            for (i, &e) in entries.iter().enumerate() {
                if e != ZERO {
                    f(base + i as u64, e);
                }
            }
        }
        Node::Inner(children) => {
            for (i, child) in children.iter().enumerate() {
                if let Some(c) = child {
                    walk_nonzero(c, level - 1, base + i as u64 * span(level), f);
                }
            }
        }
    }
}

#[cfg(test)]
fn diff(a: Option<&Arc<Node>>, b: Option<&Arc<Node>>, level: u32, base: u64, f: &mut dyn FnMut(u64)) {
    match (a, b) {
        (None, None) => {}
        (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {}
        (Some(x), None) | (None, Some(x)) => walk_nonzero(x, level, base, &mut |c, _| f(c)),
        (Some(x), Some(y)) => match (&**x, &**y) {
            (Node::Leaf(ex), Node::Leaf(ey)) => {
                for i in 0..FANOUT {
                    if ex[i] != ey[i] {
                        f(base + i as u64);
                    }
                }
            }
            (Node::Inner(cx), Node::Inner(cy)) => {
                for i in 0..FANOUT {
                    diff(cx[i].as_ref(), cy[i].as_ref(), level - 1, base + i as u64 * span(level), f);
                }
            }
            // Maps of one size have leaves exactly at level 1, so kinds always match.
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_entries_read_as_zero_and_set_returns_previous() {
        let mut m = ClusterMap::new(1 << 20);
        assert_eq!(m.get(12345), ZERO);
        assert_eq!(m.set(12345, 7), ZERO);
        assert_eq!(m.set(12345, 9), 7);
        assert_eq!(m.get(12345), 9);
        assert_eq!(m.get(12346), ZERO);
    }

    #[test]
    fn clone_is_isolated_from_later_writes_and_shares_unchanged_pages() {
        let mut head = ClusterMap::new(1 << 24);
        for c in (0..1 << 24).step_by(4099) {
            head.set(c, c + 1);
        }
        let snap = head.clone();
        head.set(0, 42);
        head.set(5_000_000, 43);
        assert_eq!(snap.get(0), 1);
        assert_eq!(snap.get(5_000_000), 0);
        let mut diffs = vec![];
        snap.for_each_difference(&head, |c| diffs.push(c));
        assert_eq!(diffs, vec![0, 5_000_000]);
    }

    #[test]
    fn for_each_nonzero_visits_in_order() {
        let mut m = ClusterMap::new(100_000);
        for c in [99_999u64, 3, 512, 511] {
            m.set(c, c + 10);
        }
        m.set(512, ZERO);
        let mut seen = vec![];
        m.for_each_nonzero(|c, e| seen.push((c, e)));
        assert_eq!(seen, vec![(3, 13), (511, 521), (99_999, 100_009)]);
    }

    #[test]
    fn range_walk_visits_exactly_the_nonzero_entries_in_range() {
        let mut m = ClusterMap::new(1 << 30);
        let set = [0u64, 1, 511, 512, 262_143, 262_144, 1 << 29, (1 << 30) - 1];
        for &c in &set {
            m.set(c, c + 1);
        }
        for (start, end) in
            [(0, 1 << 30), (1, 512), (511, 262_144), (262_144, 1 << 29), (5, 6), ((1 << 29) + 1, 1 << 30)]
        {
            let mut seen = vec![];
            m.for_each_nonzero_in(start, end, |c, e| seen.push((c, e)));
            let want: Vec<_> = set.iter().filter(|&&c| c >= start && c < end).map(|&c| (c, c + 1)).collect();
            assert_eq!(seen, want, "range {start}..{end}");
        }
    }

    #[test]
    fn unshared_entries_are_those_no_other_map_holds_at_that_cluster() {
        let mut a = ClusterMap::new(1 << 20);
        for c in (0..1 << 20).step_by(1021) {
            a.set(c, c + 1);
        }
        let mut b = a.clone();
        let mut c = a.clone();
        b.set(0, 500_000_000); // a's entry at 0 stays in c
        b.set(1021, 0); // a's entry at 1021 is in neither
        c.set(1021, 7);
        a.set(300_000, 9); // only in a
        let mut seen = vec![];
        a.for_each_unshared(&[&b, &c], |cl, e| seen.push((cl, e)));
        assert_eq!(seen, vec![(1021, 1022), (300_000, 9)]);
        seen.clear();
        a.for_each_unshared(&[&b, &a.clone()], |cl, e| seen.push((cl, e)));
        assert!(seen.is_empty(), "a copy holds everything");
    }

    #[test]
    fn probing_reads_the_entries_at_the_clusters_and_skips_pages_probed_before() {
        let mut a = ClusterMap::new(1 << 20);
        for c in [3u64, 600, 700_000] {
            a.set(c, c + 1);
        }
        let mut b = a.clone();
        b.set(600, 42);
        let clusters = [3u64, 4, 600, 700_000];
        let mut seen = HashSet::new();
        let mut got = vec![];
        a.probe_distinct(&clusters, &mut seen, |i, e| got.push((i, e)));
        assert_eq!(got, vec![(0, 4), (2, 601), (3, 700_001)]);
        got.clear();
        // b shares the pages of clusters 3 and 700_000 with a: only its new page is read.
        b.probe_distinct(&clusters, &mut seen, |i, e| got.push((i, e)));
        assert_eq!(got, vec![(2, 42)]);
    }

    #[test]
    fn height_covers_64_tib_of_4_kib_clusters() {
        let clusters = (64u64 << 40) / 4096;
        let mut m = ClusterMap::new(clusters);
        m.set(clusters - 1, 5);
        assert_eq!(m.get(clusters - 1), 5);
        assert_eq!(m.get(clusters - 2), 0);
    }
}
