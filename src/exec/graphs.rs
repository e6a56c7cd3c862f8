//! Kept graphs: the cache of recent micro-batch graphs (with, under the scheduler, the scheduler that allocated
//! each), building and allocating a graph when none is kept, and what `--verbose` prints about a schedule.

use anyhow::{anyhow, Result};

use crate::ggml::{GraphAllocator, OwnedGraph, Scheduler};
use crate::model::step::GraphKey;

/// How a session's micro-batches got their graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs built (and allocated).
    pub built: u64,
    /// Micro-batches that reused a kept graph.
    pub reused: u64,
    /// Micro-batches whose attention gathered the key rows it reads, whole or in chunks of queries.
    pub gathered: u64,
    pub chunked: u64,
    /// Gathered micro-batches whose ratio-4 layers read only the rows the indexer chose for each query (see
    /// [`crate::cache::CompPlan::top_k`]).
    pub chosen: u64,
    /// Micro-batches whose repacked experts multiplied with the grouped GEMM products.
    pub grouped: u64,
}

/// Graphs kept for reuse, each under its key (a [`GraphKey`], or a stage of the paged store) with what it needs
/// beside it (`X`: under the scheduler, the scheduler whose buffers the graph was allocated in); the least recently
/// used goes when a new one needs room.
pub struct GraphCache<'e, K = GraphKey, X = ()> {
    entries: Vec<Entry<'e, K, X>>,
    capacity: usize,
    clock: u64,
}

/// A kept graph. Fields drop in order: the graph before what it points into.
struct Entry<'e, K, X> {
    key: K,
    graph: OwnedGraph<'e>,
    extra: X,
    last_use: u64,
}

impl<'e, K: PartialEq + Copy, X> GraphCache<'e, K, X> {
    /// Keeps up to `capacity` graphs (0: none, every micro-batch builds its own).
    pub fn new(capacity: usize) -> GraphCache<'e, K, X> {
        GraphCache {
            entries: Vec::new(),
            capacity,
            clock: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes how many graphs are kept (dropping the least recently used ones beyond it).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        while self.entries.len() > capacity {
            self.pop_lru();
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The graph kept under `key`, marked as just used.
    pub fn get(&mut self, key: &K) -> Option<&OwnedGraph<'e>> {
        self.get_with(key).map(|(g, _)| g)
    }

    /// The graph kept under `key` and what is kept beside it, marked as just used.
    pub fn get_with(&mut self, key: &K) -> Option<(&OwnedGraph<'e>, &mut X)> {
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.iter_mut().find(|e| e.key == *key)?;
        e.last_use = clock;
        Some((&e.graph, &mut e.extra))
    }

    /// The most recently used graph and what is kept beside it.
    pub fn last_used(&self) -> Option<(&OwnedGraph<'e>, &X)> {
        let e = self.entries.iter().max_by_key(|e| e.last_use)?;
        Some((&e.graph, &e.extra))
    }

    /// Drops the least recently used graph and returns what was kept beside it.
    pub fn pop_lru(&mut self) -> Option<X> {
        let i = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_use)?;
        let Entry { graph, extra, .. } = self.entries.swap_remove(i);
        drop(graph);
        Some(extra)
    }

    /// Keeps `graph` and `extra` under `key` even beyond the capacity (the caller made room: a graph must outlive
    /// its computation even with reuse off); the next insertion or [`GraphCache::set_capacity`] trims.
    pub fn insert_with(&mut self, key: K, graph: OwnedGraph<'e>, extra: X) {
        self.entries.retain(|e| e.key != key);
        self.clock += 1;
        self.entries.push(Entry {
            key,
            graph,
            extra,
            last_use: self.clock,
        });
    }

    /// Drops every kept graph.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

impl<'e, K: PartialEq + Copy> GraphCache<'e, K> {
    /// Keeps `graph` under `key` (when the capacity allows), making room by dropping the least recently used.
    pub fn insert(&mut self, key: K, graph: OwnedGraph<'e>) {
        if self.capacity == 0 {
            return;
        }
        self.entries.retain(|e| e.key != key);
        while self.entries.len() >= self.capacity {
            self.pop_lru();
        }
        self.insert_with(key, graph, ());
    }
}

/// The graph kept under `key`, built by `build` and allocated when there is none (kept graphs are dropped when the
/// compute buffer grows, as they point into the old one). With nothing kept (capacity 0) the graph lives in `spare`.
pub(crate) fn kept_graph<'g, 'e, K: PartialEq + Copy>(
    graphs: &'g mut GraphCache<'e, K>,
    alloc: &mut GraphAllocator,
    stats: &mut GraphStats,
    key: K,
    spare: &'g mut Option<OwnedGraph<'e>>,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
) -> Result<&'g OwnedGraph<'e>> {
    if graphs.get(&key).is_some() {
        stats.reused += 1;
    } else {
        stats.built += 1;
        let g = build()?;
        let before = alloc.buffer_size();
        alloc.alloc(g.graph())?;
        if alloc.buffer_size() != before {
            // A bigger compute buffer: kept graphs still point into the old one; let them go.
            graphs.clear();
        }
        if graphs.capacity() == 0 {
            return Ok(spare.insert(g));
        }
        graphs.insert(key, g);
    }
    graphs
        .get(&key)
        .ok_or_else(|| anyhow!("a graph was neither kept nor built"))
}

/// Graphs kept under the scheduler: each with the scheduler that allocated it (a scheduler hands its compute
/// buffers out again for each graph it allocates, so each kept graph has its own).
pub(crate) type SchedGraphs<'e, K> = GraphCache<'e, K, Scheduler<'e>>;

/// The graph kept under `key` in `graphs` with its scheduler, or one `build` makes, allocated through the least
/// recently used graph's scheduler when as many graphs as kept are there (else a new one from `new_sched`, which
/// must hold graphs of the given size). `fresh` is called with a newly allocated graph (e.g. to print its schedule).
pub(crate) fn kept_scheduled<'g, 'e, K: PartialEq + Copy>(
    graphs: &'g mut SchedGraphs<'e, K>,
    stats: &mut GraphStats,
    key: K,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
    new_sched: impl FnOnce(usize) -> Result<Scheduler<'e>>,
    fresh: impl FnOnce(&Scheduler<'e>, &OwnedGraph<'e>),
) -> Result<(&'g OwnedGraph<'e>, &'g mut Scheduler<'e>)> {
    let reuse = graphs.capacity() > 0;
    if reuse && graphs.get_with(&key).is_some() {
        stats.reused += 1;
    } else {
        stats.built += 1;
        let g = build()?;
        let size = g.graph().size();
        let old = match graphs.len() >= graphs.capacity().max(1) {
            true => graphs.pop_lru(),
            false => None,
        };
        let mut sched = match old {
            Some(s) if s.fits(size) => s,
            _ => new_sched(size)?,
        };
        sched.alloc(g.graph())?;
        fresh(&sched, &g);
        graphs.insert_with(key, g, sched);
    }
    graphs
        .get_with(&key)
        .ok_or_else(|| anyhow!("a scheduled graph was neither kept nor built"))
}

/// What `--verbose` prints about a scheduled graph: its splits, which device runs the nodes of each layer (runs of
/// layers on one device joined), and the compute buffers.
pub(crate) fn schedule_report(sched: &Scheduler<'_>, g: &OwnedGraph<'_>) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let nodes = sched.assignments(g.graph());
    // Nodes per device between layer outputs (named `l_out-N`, as llama.cpp's cb() names them): group k holds layer
    // k's nodes (the embedding's with layer 0), the group after the last layer the head's.
    let mut per_layer: BTreeMap<usize, BTreeMap<String, usize>> = BTreeMap::new();
    let mut current = 0usize;
    for (name, _, dev) in &nodes {
        let dev = dev.map_or_else(|| "?".to_string(), |d| d.name());
        *per_layer
            .entry(current)
            .or_default()
            .entry(dev)
            .or_insert(0) += 1;
        if name.starts_with("l_out-") {
            current += 1;
        }
    }
    let n_layers = current;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ferrite: scheduler: {} nodes in {} splits",
        nodes.len(),
        sched.n_splits()
    );
    for (layer, devs) in &per_layer {
        let what = match *layer {
            0 => "embedding and layer 0".to_string(),
            il if il == n_layers => "head".to_string(),
            il => format!("layer {il}"),
        };
        let devs: Vec<String> = devs.iter().map(|(d, n)| format!("{d} {n}")).collect();
        let _ = writeln!(s, "ferrite: scheduler:   {what}: {}", devs.join(", "));
    }
    for (backend, bytes) in sched.buffer_sizes() {
        let _ = writeln!(
            s,
            "ferrite: scheduler: compute buffer on {backend}: {}",
            crate::units::format_bytes(bytes as u64)
        );
    }
    s
}
