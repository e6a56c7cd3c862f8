//! A micro-batch through the paged expert store: per layer the stage graph up to its router, then the layer's
//! experts over the store's slots (hits computed while misses are read, waves when the needed set is larger than
//! the pool, the next layer's guesses prefetched), then the head. The graphs are `crate::model::paged`'s.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Context as _, Result};

use super::graphs::{kept_graph, GraphCache};
use super::{append_logits, Runner};
use crate::cache::{KvCache, UbatchPlan};
use crate::engine::Engine;
use crate::experts::device::DeviceExperts;
use crate::experts::store::PagedExperts;
use crate::experts::{ExpertKey, ExpertStats, Load, PrefetchPlan, ReadReport, SlotId, SlotPolicy};
use crate::ggml::{GraphAllocator, OwnedGraph, Scheduler};
use crate::model::config::Config;
use crate::model::forward::Uploads;
use crate::model::paged::{
    build_experts_graph, build_head_graph, build_layer_graph, Entries, ExpertsOut, StageDeps,
    StageKey, StagePaging, StageState, GUESS, SEL,
};
use crate::model::step::{batch_inputs, out_ids, GraphKey, GraphParts};

/// Experts per read batch when a layer's misses are read while the previous batch is computed: 24 slabs keep the
/// reader's 8 threads busy, and a decoded token's misses of a layer (at most 6 in Flash) stay one batch.
const READ_CHUNK: usize = 8;

/// How much a guess from the next layer's router is worth against a known need (the chance it is used).
const GUESS_WEIGHT: f64 = 0.5;

/// Stage graphs a paged session keeps per layer: the layer's graph for a few shapes and its experts' graphs for
/// the entry counts decode sees.
const PAGED_GRAPHS_PER_LAYER: usize = 12;

/// A session's parts for the paged store: the state carried between its stage graphs, and the kept stage graphs.
pub(super) struct PagedRun<'e> {
    state: Rc<StageState>,
    graphs: GraphCache<'e, StageKey>,
    /// When devices take part: the scheduler the layer and head stages run through (their graphs are built anew
    /// each time; the experts stages run on the CPU, where the slots are).
    sched: Option<Scheduler<'e>>,
}

impl<'e> PagedRun<'e> {
    pub fn new(engine: &'e Engine, n_ubatch: usize) -> Result<PagedRun<'e>> {
        let cfg = &engine.cfg;
        Ok(PagedRun {
            state: Rc::new(StageState::new(cfg, n_ubatch, &engine.backend)?),
            graphs: GraphCache::new(PAGED_GRAPHS_PER_LAYER * cfg.n_layer + 8),
            sched: None,
        })
    }
}

/// Builds a stage graph anew, allocates it through the scheduler (made or grown as needed), lets `fill` write its
/// inputs, computes it and returns what `read` takes from it. Nothing is kept: the scheduler hands its memory out
/// again for the next graph.
fn run_scheduled<'e, T>(
    engine: &'e Engine,
    sched: &mut Option<Scheduler<'e>>,
    stats: &mut super::GraphStats,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
    fill: impl FnOnce(&OwnedGraph<'e>) -> Result<()>,
    read: impl FnOnce(&OwnedGraph<'e>) -> Result<T>,
) -> Result<T> {
    let (g, sched) = prepare_scheduled(engine, sched, stats, build, fill)?;
    sched.compute(g.graph())?;
    read(&g)
}

/// Builds a stage graph anew, allocates it through the scheduler (made or grown as needed) and lets `fill` write
/// its inputs: the graph, ready to compute on the scheduler returned with it.
fn prepare_scheduled<'s, 'e>(
    engine: &'e Engine,
    sched: &'s mut Option<Scheduler<'e>>,
    stats: &mut super::GraphStats,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
    fill: impl FnOnce(&OwnedGraph<'e>) -> Result<()>,
) -> Result<(OwnedGraph<'e>, &'s mut Scheduler<'e>)> {
    stats.built += 1;
    let g = build()?;
    let size = g.graph().size();
    if !sched.as_ref().is_some_and(|s| s.fits(size)) {
        *sched = Some(engine.scheduler(size)?);
    }
    let sched = sched.as_mut().expect("made above");
    sched.alloc(g.graph())?;
    fill(&g)?;
    Ok((g, sched))
}

/// The device's half of a layer's experts, started on the scheduler and not yet waited for: its graph (whose last
/// tensor holds the outputs) and the accumulator rows they go to.
struct DeviceHalf<'e> {
    graph: OwnedGraph<'e>,
    rows: Vec<i32>,
}

/// What computing one micro-batch's stages needs: the engine, the session's cache, its paged parts, compute buffer
/// and counters, and the micro-batch's plan.
struct Stages<'r, 'e> {
    engine: &'e Engine,
    cache: &'r Rc<KvCache>,
    run: &'r mut PagedRun<'e>,
    alloc: &'r mut GraphAllocator,
    stats: &'r mut super::GraphStats,
    plan: &'r UbatchPlan,
    /// The micro-batch's shape (paged experts live in the slots, not repacked: no grouped products).
    key: GraphKey,
    parts: GraphParts<'r, 'e>,
    /// The device half of the current layer's experts while it runs (the scheduler is its until it is finished).
    device_half: Option<DeviceHalf<'e>>,
}

impl Stages<'_, '_> {
    /// Computes layer `il`'s stage graph over the batch inputs.
    fn layer(&mut self, il: usize) -> Result<()> {
        self.finish_device_experts()?;
        let engine = self.engine;
        let (plan, parts) = (self.plan, &self.parts);
        let rotation = parts.rotation;
        let deps = || StageDeps {
            cache: self.cache.clone(),
            state: self.run.state.clone(),
        };
        let paging = StagePaging {
            paged_layers: &engine.cpu_expert_layers,
        };
        let fill = |g: &OwnedGraph<'_>| -> Result<()> {
            let mut up = Uploads::kept(g.tensors());
            batch_inputs(&mut up, plan.clone(), &[], rotation)?;
            up.upload_used()?;
            Ok(())
        };
        if !engine.devices.is_empty() {
            let build = || build_layer_graph(parts, deps(), plan, il, paging);
            return run_scheduled(engine, &mut self.run.sched, self.stats, build, fill, |_| {
                Ok(())
            });
        }
        let sk = StageKey::Layer {
            key: self.key,
            layer: il,
        };
        let deps = deps();
        let build = || build_layer_graph(parts, deps, plan, il, paging);
        let (graphs, backend) = (&mut self.run.graphs, &engine.backend);
        kept_on_cpu(
            graphs,
            self.alloc,
            self.stats,
            backend,
            sk,
            build,
            fill,
            |_| Ok(()),
        )
    }

    /// Computes layer `il`'s experts for `e`'s entries on the CPU: over the expert store's slots (`e.slot` a slot),
    /// or over the layer's own expert tensors when they are resident (`e.slot` the expert).
    fn experts(&mut self, il: usize, e: &Entries) -> Result<()> {
        let engine = self.engine;
        let (cfg, fused) = (&engine.cfg, self.parts.fused);
        let sk = StageKey::Experts {
            layer: il,
            entries: e.row.len(),
        };
        let state = self.run.state.clone();
        let lw = &self.parts.weights.layers[il];
        let slots = match &engine.paged {
            Some(px) => px.slot_tensors(il),
            None => [lw.gate_exps, lw.up_exps, lw.down_exps],
        };
        let build =
            || build_experts_graph(cfg, fused, slots, state, il, e.row.len(), ExpertsOut::Acc);
        let (graphs, backend) = (&mut self.run.graphs, &engine.backend);
        kept_on_cpu(
            graphs,
            self.alloc,
            self.stats,
            backend,
            sk,
            build,
            |g| fill_entries(g, e),
            |_| Ok(()),
        )
    }

    /// Starts computing layer `il`'s experts for `e`'s entries on the device of the device expert cache, over its
    /// slots, and returns while the device works (the CPU computes the host's half meanwhile);
    /// [`Self::finish_device_experts`] waits and adds the outputs to the accumulator.
    fn start_device_experts(&mut self, il: usize, e: &Entries) -> Result<()> {
        self.finish_device_experts()?;
        let engine = self.engine;
        let (cfg, fused) = (&engine.cfg, self.parts.fused);
        let dev = engine
            .device_experts
            .as_ref()
            .ok_or_else(|| anyhow!("no device expert cache"))?;
        let slots = dev
            .slot_tensors(il)
            .ok_or_else(|| anyhow!("the device expert cache does not hold layer {il}"))?;
        // Slots still being filled are waited for before anything reads them.
        dev.wait_for_uploads(&e.slot);
        let state = self.run.state.clone();
        let n = e.row.len();
        let build = || build_experts_graph(cfg, fused, slots, state, il, n, ExpertsOut::Own);
        let (g, sched) = prepare_scheduled(engine, &mut self.run.sched, self.stats, build, |g| {
            fill_entries(g, e)
        })?;
        sched.compute_async(g.graph())?;
        self.device_half = Some(DeviceHalf {
            graph: g,
            rows: e.row.clone(),
        });
        Ok(())
    }

    /// Waits for the device half started last (if any) and writes its outputs into the accumulator's rows.
    fn finish_device_experts(&mut self) -> Result<()> {
        let Some(half) = self.device_half.take() else {
            return Ok(());
        };
        let sched = self
            .run
            .sched
            .as_mut()
            .ok_or_else(|| anyhow!("a device half without its scheduler"))?;
        sched.synchronize();
        let out = *half
            .graph
            .tensors()
            .last()
            .ok_or_else(|| anyhow!("a device half without outputs"))?;
        let values = out.get_f32()?;
        self.run.state.set_acc_rows(&half.rows, &values)
    }

    /// After a failure: waits for a device half still running (its memory is the scheduler's) and drops it.
    fn abandon_device_experts(&mut self) {
        if self.device_half.take().is_some() {
            if let Some(sched) = self.run.sched.as_mut() {
                sched.synchronize();
            }
        }
    }

    /// The first `len` values of I32 state tensor `i` (the chosen or guessed experts).
    fn read_i32(&self, i: usize, len: usize) -> Result<Vec<i32>> {
        let mut v = self.run.state.get_i32(i)?;
        v.truncate(len);
        Ok(v)
    }

    /// Computes the last layer's output and the head; appends the logits of `want` to `out`.
    fn head(&mut self, want: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.finish_device_experts()?;
        let engine = self.engine;
        let (cfg, fused) = (&engine.cfg, self.parts.fused);
        let n_tokens = self.plan.tokens.len();
        let n_out = want.len().max(1);
        let state = self.run.state.clone();
        let weights = self.parts.weights;
        let build = || build_head_graph(cfg, fused, weights, state, n_tokens, n_out);
        let fill = |g: &OwnedGraph<'_>| -> Result<()> {
            g.tensors()[1].set_i32(&out_ids(n_tokens, want))?;
            Ok(())
        };
        let read = |g: &OwnedGraph<'_>| append_logits(g.tensors()[0], want, out);
        if !engine.devices.is_empty() {
            return run_scheduled(engine, &mut self.run.sched, self.stats, build, fill, read);
        }
        let (graphs, backend) = (&mut self.run.graphs, &engine.backend);
        let sk = StageKey::Head { n_tokens, n_out };
        kept_on_cpu(
            graphs, self.alloc, self.stats, backend, sk, build, fill, read,
        )
    }
}

/// Computes a stage graph on the CPU backend: the one kept under `key` in `graphs`, or one `build` makes (and keeps,
/// allocated in `alloc`'s buffer), with inputs written by `fill`; returns what `read` takes from it.
#[allow(clippy::too_many_arguments)]
fn kept_on_cpu<'e, K: PartialEq + Copy, T>(
    graphs: &mut GraphCache<'e, K>,
    alloc: &mut GraphAllocator,
    stats: &mut super::GraphStats,
    backend: &crate::ggml::CpuBackend,
    key: K,
    build: impl FnOnce() -> crate::ggml::Result<OwnedGraph<'e>>,
    fill: impl FnOnce(&OwnedGraph<'e>) -> Result<()>,
    read: impl FnOnce(&OwnedGraph<'e>) -> Result<T>,
) -> Result<T> {
    let mut spare = None;
    let g = kept_graph(graphs, alloc, stats, key, &mut spare, build)?;
    fill(g)?;
    backend.compute(g.graph())?;
    read(g)
}

/// Splits a layer's selection `sel` (`k` experts per token) between the device cache (`device`: its experts' slots)
/// and the host: the device's entries, and the selection left to the host, with the device's rows set to -1 (no
/// expert). Every row is in exactly one of them, so every selected expert is computed once and its weighted output
/// written to its row once.
fn split_rows(sel: &[i32], k: usize, device: &BTreeMap<u32, SlotId>) -> (Entries, Vec<i32>) {
    let on_device = entries_in(sel, k, device);
    let mut rest = sel.to_vec();
    for &r in &on_device.row {
        rest[r as usize] = -1;
    }
    (on_device, rest)
}

/// Queues the uploads of the experts `plan` placed in the device cache and returns their bytes. When one fails, it
/// and the loads after it hold nothing usable: their slots are forgotten.
fn upload_placed(dev: &DeviceExperts, dp: &mut SlotPolicy, plan: &PrefetchPlan) -> Result<u64> {
    let mut bytes = 0;
    for (i, load) in plan.loads.iter().enumerate() {
        match dev.upload(load) {
            Ok(b) => bytes += b,
            Err(e) => {
                for l in &plan.loads[i..] {
                    dp.invalidate(l.slot)?;
                }
                return Err(e);
            }
        }
    }
    Ok(bytes)
}

/// Locks a slot policy (a poisoned lock still holds consistent bookkeeping: every change is made whole).
fn lock_policy(m: &Mutex<SlotPolicy>) -> std::sync::MutexGuard<'_, SlotPolicy> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes `e`'s entries into an experts graph's inputs.
fn fill_entries(g: &OwnedGraph<'_>, e: &Entries) -> Result<()> {
    let t = g.tensors();
    t[0].set_i32(&e.token)?;
    t[1].set_i32(&e.row)?;
    t[2].set_i32(&e.slot)?;
    Ok(())
}

impl Runner<'_> {
    /// Runs one micro-batch through the paged store: a graph per layer up to its router, the experts over the
    /// slots (read on demand), and the head.
    pub(super) fn run_paged(
        &mut self,
        cache: &Rc<KvCache>,
        plan: UbatchPlan,
        want: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let engine = self.engine;
        let weights = engine.weight_tensors();
        let parts = GraphParts {
            cfg: &engine.cfg,
            fused: engine.opts.fused_ops,
            grouped: None,
            weights: &weights,
            rotation: engine.rotations(),
            layer_fused: Some(self.layer_fused.clone()),
        };
        let mut stages = Stages {
            engine,
            cache,
            run: self.paged.as_mut().expect("a paged runner"),
            alloc: &mut self.alloc,
            stats: &mut self.stats,
            plan: &plan,
            key: GraphKey::of(&plan, want.len(), false),
            parts,
            device_half: None,
        };
        let host = HostStep {
            store: engine.paged.as_ref(),
            device: engine.device_experts.as_ref(),
            cpu_layers: &engine.cpu_expert_layers,
            stats: &engine.stats,
            cfg: &engine.cfg,
            tokens: &plan.tokens,
        };
        let done = host.run(&mut stages).and_then(|()| stages.head(want, out));
        if done.is_err() {
            stages.abandon_device_experts();
        }
        done
    }
}

/// The entries of `sel` (`k` per token) whose expert is in `slots`.
fn entries_in(sel: &[i32], k: usize, slots: &BTreeMap<u32, SlotId>) -> Entries {
    let mut e = Entries {
        token: Vec::new(),
        row: Vec::new(),
        slot: Vec::new(),
    };
    for (i, &x) in sel.iter().enumerate() {
        if let Some(&s) = slots.get(&(x as u32)) {
            e.token.push((i / k) as i32);
            e.row.push(i as i32);
            e.slot.push(s as i32);
        }
    }
    e
}

/// Reads loads on a background thread; `join` waits for them and records the wait.
struct Pending<'s> {
    handle: std::thread::ScopedJoinHandle<'s, Result<ReadReport, crate::experts::ExpertIoError>>,
    loads: Vec<Load>,
}

/// The host side of one micro-batch through the stages: plans every layer's experts over the device expert cache
/// and the CPU's (paged: reads misses and prefetches into slots), uploads what the device cache admits, and
/// computes the stage graphs in order.
struct HostStep<'a> {
    /// The paged store of the CPU's experts (`None`: they are resident).
    store: Option<&'a PagedExperts>,
    device: Option<&'a DeviceExperts>,
    /// Per layer: whether its experts are the CPU's (else its layer graph computes them on their device).
    cpu_layers: &'a [bool],
    stats: &'a Mutex<ExpertStats>,
    cfg: &'a Config,
    tokens: &'a [i32],
}

impl HostStep<'_> {
    /// Runs every layer's stages (not the head) through `stages`.
    fn run(&self, stages: &mut Stages<'_, '_>) -> Result<()> {
        let k = self.cfg.n_expert_used;
        let n = self.tokens.len();
        let mut policy = self.store.map(|px| lock_policy(&px.policy));
        let mut device = self.device.map(|d| (d, lock_policy(&d.policy)));
        self.stats_mut().record_step(n as u64);
        if let Some(p) = policy.as_mut() {
            p.begin_step();
        }
        if let Some((dev, dp)) = device.as_mut() {
            dp.begin_step();
            // Hash-routed layers' experts are known from the token ids: up they go before any layer runs.
            for il in (0..self.cfg.n_layer).filter(|&il| dev.hash_routed(il)) {
                let keys = dev.certain_keys(il, self.tokens, k);
                self.admit_ahead(dev, dp, &keys)?;
            }
        }
        let cpu_layer = |il: usize| self.cpu_layers.get(il).copied().unwrap_or(false);
        std::thread::scope(|scope| -> Result<()> {
            let mut pending = None;
            if let (Some(px), Some(policy)) = (self.store, policy.as_deref_mut()) {
                // Hash-routed layers: their experts are known from the token ids; read them while attention runs.
                let mut certain = Vec::new();
                for (il, table) in px.hash_experts.iter().enumerate() {
                    if let Some(table) = table {
                        for &t in self.tokens {
                            let row = &table[t as usize * k..(t as usize + 1) * k];
                            certain
                                .extend(row.iter().map(|&e| ExpertKey::new(il as u32, e as u32)));
                        }
                    }
                }
                if !certain.is_empty() {
                    let plan = policy.prefetch(&certain, 1.0)?;
                    self.stats_mut().record_prefetch(&plan);
                    pending = self.spawn(scope, plan.loads)?;
                }
            }
            for il in 0..self.cfg.n_layer {
                stages.layer(il)?;
                if let Some(policy) = policy.as_deref_mut() {
                    self.join(pending.take(), policy)?;
                }
                if !cpu_layer(il) {
                    // Computed by the layer's graph on the device that holds its experts.
                    self.stats_mut().record_resident((n * k) as u64);
                    continue;
                }
                let sel = stages.read_i32(SEL, k * n)?;
                let key = |e: i32| ExpertKey::new(il as u32, e as u32);
                // The device cache's hits are computed there; their rows leave the host's selection (-1).
                let mut host_sel = sel.clone();
                if let Some((_, dp)) = device.as_mut().filter(|(d, _)| d.caches_layer(il)) {
                    let hits: BTreeMap<u32, SlotId> = sel
                        .iter()
                        .filter_map(|&e| dp.lookup(key(e)).map(|s| (e as u32, s)))
                        .collect();
                    let (on_device, rest) = split_rows(&sel, k, &hits);
                    if !on_device.row.is_empty() {
                        stages.start_device_experts(il, &on_device)?;
                    }
                    self.stats_mut()
                        .record_device(on_device.row.len() as u64, 0, 0);
                    host_sel = rest;
                }
                let host_keys: Vec<ExpertKey> = host_sel
                    .iter()
                    .filter(|&&e| e >= 0)
                    .map(|&e| key(e))
                    .collect();
                let mut plan_waves = 1;
                match (self.store, policy.as_deref_mut()) {
                    (Some(_), Some(policy)) if !host_keys.is_empty() => {
                        let plan = policy.request(&host_keys)?;
                        self.stats_mut().record_request(&plan);
                        plan_waves = plan.waves.len();
                        for wave in &plan.waves {
                            let hits: BTreeMap<u32, SlotId> =
                                wave.hits.iter().map(|h| (h.key.expert, h.slot)).collect();
                            // Misses load in chunks, each while the one before (the hits first) is computed: a
                            // wave's slots are all different, so reading one chunk never touches what another
                            // computes.
                            let chunks: Vec<&[Load]> = wave.misses.chunks(READ_CHUNK).collect();
                            let mut reading = match chunks.first() {
                                Some(c) => self.spawn(scope, c.to_vec())?,
                                None => None,
                            };
                            if !hits.is_empty() {
                                stages.experts(il, &entries_in(&host_sel, k, &hits))?;
                            }
                            for (i, chunk) in chunks.iter().enumerate() {
                                self.join(reading.take(), policy)?;
                                if let Some(next) = chunks.get(i + 1) {
                                    reading = self.spawn(scope, next.to_vec())?;
                                }
                                let slots = chunk.iter().map(|m| (m.key.expert, m.slot)).collect();
                                stages.experts(il, &entries_in(&host_sel, k, &slots))?;
                            }
                        }
                    }
                    (Some(_), _) => {}
                    (None, _) if !host_keys.is_empty() => {
                        // Resident: every expert is its own slot.
                        let all = host_keys
                            .iter()
                            .map(|key| (key.expert, key.expert as SlotId))
                            .collect();
                        stages.experts(il, &entries_in(&host_sel, k, &all))?;
                        self.stats_mut().record_resident(host_keys.len() as u64);
                    }
                    (None, _) => {}
                }
                // Both halves are in the accumulator before the slots change.
                stages.finish_device_experts()?;
                // The device cache takes the experts this layer used that are worth a slot, from the map; the
                // copies run on the cache's own queue while the next layers compute.
                if let Some((dev, dp)) = device.as_mut().filter(|(d, _)| d.caches_layer(il)) {
                    let keys: Vec<ExpertKey> = sel.iter().map(|&e| key(e)).collect();
                    let plan = dp.admit(&keys)?;
                    let bytes = upload_placed(dev, dp, &plan)?;
                    let mut stats = self.stats_mut();
                    stats.record_device(0, plan.loads.len() as u64, bytes);
                    stats.record_device_ahead(0, plan.ahead_used as u64);
                }
                // The next layer's experts as its router guesses them from this layer's input: those the cache
                // would take after that layer go up now, while its attention runs, and that layer finds them.
                if let Some((dev, dp)) = device.as_mut() {
                    let next = il + 1;
                    if cpu_layer(next) && dev.caches_layer(next) && !dev.hash_routed(next) {
                        let guess = stages.read_i32(GUESS, k * n)?;
                        let keys: Vec<ExpertKey> = guess
                            .iter()
                            .map(|&e| ExpertKey::new(next as u32, e as u32))
                            .collect();
                        self.admit_ahead(dev, dp, &keys)?;
                    }
                }
                // Guess the next layer's experts and read them while its attention runs.
                if let (Some(px), Some(policy)) = (self.store, policy.as_deref_mut()) {
                    if plan_waves == 1 && cpu_layer(il + 1) && px.hash_experts[il + 1].is_none() {
                        let guess = stages.read_i32(GUESS, k * n)?;
                        let keys: Vec<ExpertKey> = guess
                            .iter()
                            .map(|&e| ExpertKey::new(il as u32 + 1, e as u32))
                            .collect();
                        let plan = policy.prefetch(&keys, GUESS_WEIGHT)?;
                        self.stats_mut().record_prefetch(&plan);
                        pending = self.spawn(scope, plan.loads)?;
                    }
                }
            }
            match policy.as_deref_mut() {
                Some(policy) => self.join(pending.take(), policy),
                None => Ok(()),
            }
        })
    }

    /// Places what of `keys` (experts known or guessed before their layer) the device cache takes ahead of use
    /// ([`SlotPolicy::admit_ahead`]) and queues their uploads.
    fn admit_ahead(
        &self,
        dev: &DeviceExperts,
        dp: &mut SlotPolicy,
        keys: &[ExpertKey],
    ) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let plan = dp.admit_ahead(keys)?;
        let bytes = upload_placed(dev, dp, &plan)?;
        let n = plan.loads.len() as u64;
        let mut stats = self.stats_mut();
        stats.record_device(0, n, bytes);
        stats.record_device_ahead(n, 0);
        Ok(())
    }

    fn stats_mut(&self) -> std::sync::MutexGuard<'_, ExpertStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts reading `loads` on a thread of `scope` (nothing when there are none).
    fn spawn<'s, 'env>(
        &'env self,
        scope: &'s std::thread::Scope<'s, 'env>,
        loads: Vec<Load>,
    ) -> Result<Option<Pending<'s>>> {
        if loads.is_empty() {
            return Ok(None);
        }
        let px = self
            .store
            .ok_or_else(|| anyhow!("reads without an expert store"))?;
        // SAFETY: the slots of `loads` were just handed out for loading; no graph reads them until this read is
        // joined (stages only read slots of hits and of joined loads), and no other read targets them.
        let jobs = unsafe { px.jobs(&loads)? };
        let reader = &px.reader;
        let handle = scope.spawn(move || reader.read(jobs));
        Ok(Some(Pending { handle, loads }))
    }

    /// Waits for a background read; on failure forgets what its slots were to hold.
    fn join(&self, pending: Option<Pending<'_>>, policy: &mut SlotPolicy) -> Result<()> {
        let Some(p) = pending else {
            return Ok(());
        };
        let start = Instant::now();
        let result = p.handle.join();
        let result = match result {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(_) => Err(anyhow!("a thread reading experts stopped unexpectedly")),
        };
        let mut stats = self.stats_mut();
        stats.record_io_wait(start.elapsed());
        match result {
            Ok(report) => {
                stats.record_read(&report);
                Ok(())
            }
            Err(e) => {
                for l in &p.loads {
                    policy.invalidate(l.slot)?;
                }
                Err(e).context("cannot read routed experts into the expert cache")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture routing: 3 tokens, 2 choices each, expert 5 chosen twice, expert 7 by two tokens.
    #[test]
    fn the_split_between_device_and_host_covers_every_row_once() {
        let sel = [5, 7, 2, 7, 5, 9];
        let k = 2;
        let device: BTreeMap<u32, SlotId> = [(7, 0), (9, 3)].into_iter().collect();
        let (dev, host) = split_rows(&sel, k, &device);
        assert_eq!(dev.row, vec![1, 3, 5]);
        assert_eq!(dev.token, vec![0, 1, 2]);
        assert_eq!(dev.slot, vec![0, 0, 3]);
        assert_eq!(host, vec![5, -1, 2, -1, 5, -1]);
        // The host's entries over any slots of its experts: the other rows, each once.
        let host_slots: BTreeMap<u32, SlotId> = [(5, 1), (2, 2)].into_iter().collect();
        let h = entries_in(&host, k, &host_slots);
        assert_eq!(h.row, vec![0, 2, 4]);
        assert_eq!(h.token, vec![0, 1, 2]);
        let mut rows: Vec<i32> = dev.row.iter().chain(&h.row).copied().collect();
        rows.sort_unstable();
        assert_eq!(rows, (0..sel.len() as i32).collect::<Vec<_>>());
        // A host slot map that also names a device expert never takes its rows back.
        let both: BTreeMap<u32, SlotId> = [(5, 1), (2, 2), (7, 4)].into_iter().collect();
        assert_eq!(entries_in(&host, k, &both).row, vec![0, 2, 4]);
        // Nothing on the device: the host keeps every row.
        let (none, all) = split_rows(&sel, k, &BTreeMap::new());
        assert!(none.row.is_empty());
        assert_eq!(all, sel);
    }
}
