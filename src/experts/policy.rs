//! The expert slot cache policy: which (layer, expert) lives in which slot of the pool, what a request must
//! load and into which slot, what it evicts, and how a needed set larger than the pool is split into waves.
//!
//! Pure bookkeeping: no I/O, no tensors, no clocks. The paged store asks [`SlotPolicy::request`] for a layer's
//! needed experts (a micro-batch's union), reads the misses into the slots it is told, computes wave by wave,
//! and calls [`SlotPolicy::begin_step`] at every new token or micro-batch.
//!
//! # Eviction: the key whose next use is expected last
//!
//! The ideal victim (Belady) is the key needed furthest in the future. The policy estimates that time, in steps,
//! for every cached key and evicts the largest:
//!
//! `next_use = sweep distance to the key's layer + (1 - p) / p`
//!
//! * `p`, the chance the key is used in a step, comes from a decayed use count (LRFU, Lee et al. 2001):
//!   `crf = Σ 2^(-(now - t_i) / H)` over the steps `t_i` of its uses, `H` the half-life
//!   ([`DEFAULT_HALF_LIFE_STEPS`]); a key used in a fraction `p` of the steps has `crf ≈ p / (1 - 2^(-1/H))`.
//!   `(1 - p) / p` is then the expected number of whole steps before it is chosen again.
//! * The sweep distance is where recency would be in LRU, and points the other way: a forward pass visits the
//!   layers in order, every step, so the layer just computed is the one needed last and the next layer's experts
//!   soonest. Plain LRU evicts exactly the keys about to be used (its known failure on loops). The distance is
//!   `(l - c) / n_layer` for a layer `l` after the current one `c` (the last request's layer), `(n_layer - c + l)
//!   / n_layer` otherwise, and `(l + 1) / n_layer` at the start of a step.
//!
//! Ties go to the least recently used key, then the lowest slot: same calls, same plans. Within a layer the
//! order of `p` does not change between uses (`log2 crf(now) = log2 crf(t) + t / H - now / H`), so each layer keeps
//! its keys in a `BTreeSet` by `log2 crf(t) + t / H` and a victim costs one look at each layer's least used key.
//! The use history is kept for keys that are not cached too (a dense table), so an expert pushed out by a long
//! prompt comes back with its popularity.
//!
//! Why frequency with a decay, with the numbers of `shared/docs/ANCHORS.md` section (c):
//! * Expert popularity is skewed, so counts pay: uniform traces cap the hit rate at the cached fraction while
//!   Zipf-skewed ones reach about 90 % hits with half the experts cached (item 7), and ds4's cache, which picks
//!   its victim by "hotness" first and `last_used` only as the tie-break, took CUDA decode from 1.03 to 2.96 tok/s
//!   at 81 % hits (item 1, ds4 #636/#639).
//! * Popularity drifts with the text, so counts must fade: KTransformers' dynamic re-placement beat a static
//!   popular set by 24 % (56.6 -> 70.2 tok/s, item 7), and moe-stream's "eviction by decayed use counts" ran
//!   4x faster than the OS page cache (6.4 vs 1.6 tok/s in 8 GB, item 1).
//! * Prefill streams every expert of a layer once; a count-based order keeps the hot set through such a scan
//!   (a key used `k` times outranks a once-used one for about `H * log2(k)` steps).
//!
//! # Waves
//!
//! When a request needs more keys than the pool can hold at once, it is split into waves that each fit: the
//! first wave takes every hit (already in a slot, no I/O: hits-first execution, ANCHORS (c) item 5) and as many
//! misses as there are slots left to take; each later wave takes misses only. Each needed key is in exactly one
//! wave, so it is read at most once per request. Later waves may evict keys of earlier waves: the caller must
//! finish computing wave `i` before it loads wave `i + 1`. A small cache is slow, never wrong.
//!
//! # Pinning, prefetch, locks
//!
//! * The keys of the wave being planned are pinned: nothing evicts them while it is planned.
//! * Keys requested in the current step are never evicted by a prefetch (but may be by a later request of the
//!   same step: its layer comes after theirs, whose experts were computed already).
//! * [`SlotPolicy::prefetch`] loads keys expected soon (hash-routed layers known from the token id, experts
//!   predicted by the next layer's router) at a lower priority: it takes free slots, or evicts a key not touched
//!   in this step whose next use is expected later than the guess's (from `weight`, the chance the guess is used
//!   in this step, and its history), and drops the guess otherwise. Requests evict unused prefetched keys of the
//!   current step last.
//! * [`SlotPolicy::lock`] keeps a slot out of every eviction (a load in flight, a slot a device still reads);
//!   when every slot is locked a request fails with [`PolicyError::NoSlotAvailable`] instead of panicking.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;

/// Index of a slot in the pool.
pub type SlotId = u32;

/// Default half-life of a use, in steps (tokens when decoding).
pub const DEFAULT_HALF_LIFE_STEPS: f64 = 64.0;

/// Most slots a pool may have.
pub const MAX_SLOTS: usize = (u32::MAX - 1) as usize;

/// Most (layer, expert) keys the history table may cover (Flash has 43 x 256 = 11,008), and most layers.
pub const MAX_KEYS: u64 = 1 << 24;
pub const MAX_LAYERS: u32 = 1 << 12;

/// Smallest use probability an estimate takes (keeps `1 / p` finite).
const MIN_P: f64 = 1e-12;

/// One routed expert of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

impl ExpertKey {
    pub const fn new(layer: u32, expert: u32) -> ExpertKey {
        ExpertKey { layer, expert }
    }
}

impl fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} expert {}", self.layer, self.expert)
    }
}

/// The shape of a pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyConfig {
    pub n_slots: usize,
    /// Keys are `layer < n_layer`, `expert < n_expert`.
    pub n_layer: u32,
    pub n_expert: u32,
    /// Steps after which a use counts half (see the module documentation).
    pub half_life_steps: f64,
}

impl PolicyConfig {
    /// A pool of `n_slots` over `n_layer` x `n_expert` keys with the default half-life.
    pub fn new(n_slots: usize, n_layer: u32, n_expert: u32) -> PolicyConfig {
        PolicyConfig {
            n_slots,
            n_layer,
            n_expert,
            half_life_steps: DEFAULT_HALF_LIFE_STEPS,
        }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("an expert cache needs at least 1 slot, got 0 (hint: the planner refuses caches smaller than the experts one token uses)")]
    NoSlots,
    #[error("an expert cache of {got} slots is more than the {max} a pool can index")]
    TooManySlots { got: usize, max: usize },
    #[error("the expert key space {n_layer} layers x {n_expert} experts is empty or larger than {max} keys")]
    BadKeySpace {
        n_layer: u32,
        n_expert: u32,
        max: u64,
    },
    #[error("the expert cache half-life must be a positive number of steps, got {0}")]
    BadHalfLife(f64),
    #[error("{key} is outside the model ({n_layer} layers of {n_expert} experts)")]
    KeyOutOfRange {
        key: ExpertKey,
        n_layer: u32,
        n_expert: u32,
    },
    #[error("slot {slot} does not exist (the pool has {n_slots} slots)")]
    SlotOutOfRange { slot: SlotId, n_slots: usize },
    #[error("a prefetch weight is the chance the guess is used, in (0, 1]; got {0}")]
    BadWeight(f64),
    #[error("no slot can take {key}: all {n_slots} slots of the expert cache are locked (hint: unlock slots whose loads finished)")]
    NoSlotAvailable { key: ExpertKey, n_slots: usize },
}

/// A needed key already in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub key: ExpertKey,
    pub slot: SlotId,
    /// The key was loaded by a prefetch and this is its first use since (a useful prefetch; its load may still
    /// be in flight).
    pub prefetched: bool,
}

/// A key to be read into `slot`; `evicted` is the key the slot held before (its load, if in flight, must finish
/// or be abandoned before the slot is overwritten).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub key: ExpertKey,
    pub slot: SlotId,
    pub evicted: Option<ExpertKey>,
}

/// Keys that are in slots together: compute them after reading `misses`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wave {
    pub hits: Vec<Hit>,
    pub misses: Vec<Load>,
}

impl Wave {
    /// The slot of `key` in this wave.
    pub fn slot_of(&self, key: ExpertKey) -> Option<SlotId> {
        let hit = self.hits.iter().find(|h| h.key == key).map(|h| h.slot);
        hit.or_else(|| self.misses.iter().find(|m| m.key == key).map(|m| m.slot))
    }

    /// Every key of the wave with its slot, hits first.
    pub fn entries(&self) -> impl Iterator<Item = (ExpertKey, SlotId)> + '_ {
        let hits = self.hits.iter().map(|h| (h.key, h.slot));
        hits.chain(self.misses.iter().map(|m| (m.key, m.slot)))
    }

    pub fn len(&self) -> usize {
        self.hits.len() + self.misses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a request needs done, wave by wave (in order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestPlan {
    pub waves: Vec<Wave>,
}

impl RequestPlan {
    pub fn n_hits(&self) -> usize {
        self.waves.iter().map(|w| w.hits.len()).sum()
    }

    pub fn n_misses(&self) -> usize {
        self.waves.iter().map(|w| w.misses.len()).sum()
    }

    /// Hits on keys a prefetch loaded.
    pub fn n_prefetch_hits(&self) -> usize {
        let hits = self.waves.iter().flat_map(|w| &w.hits);
        hits.filter(|h| h.prefetched).count()
    }

    /// Misses that pushed a key out of its slot.
    pub fn n_evictions(&self) -> usize {
        let misses = self.waves.iter().flat_map(|w| &w.misses);
        misses.filter(|m| m.evicted.is_some()).count()
    }

    /// Every key of the request with its slot, wave by wave.
    pub fn entries(&self) -> impl Iterator<Item = (ExpertKey, SlotId)> + '_ {
        self.waves.iter().flat_map(Wave::entries)
    }
}

/// What a prefetch loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefetchPlan {
    pub loads: Vec<Load>,
    /// Keys already in a slot (nothing to do).
    pub present: usize,
    /// Keys not loaded: no free slot and no key worth less than the guess.
    pub dropped: Vec<ExpertKey>,
    /// Of `present` ([`SlotPolicy::admit`]): keys placed ahead of their use ([`SlotPolicy::admit_ahead`]) and
    /// used for the first time since (the guess was right).
    pub ahead_used: usize,
}

impl PrefetchPlan {
    pub fn n_evictions(&self) -> usize {
        self.loads.iter().filter(|l| l.evicted.is_some()).count()
    }
}

/// How a slot's key stands in the current step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// Not touched in this step: evictable by requests and prefetches.
    Cold = 0,
    /// Requested in this step: evictable by later requests only.
    Used = 1,
    /// Prefetched in this step and not used yet: evicted by requests last, never by prefetches.
    Prefetched = 2,
}

/// `log2 crf(t) + t / H` (see the module documentation); always finite.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Prio(f64);

impl Eq for Prio {}

impl PartialOrd for Prio {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Prio {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Position of an evictable slot in its layer's set: least used first, then least recently touched.
type Entry = (Prio, u64, SlotId);

/// The use history of one key (kept whether or not the key is cached).
#[derive(Clone, Copy, Debug, Default)]
struct History {
    /// `crf` at step `last_step`; 0 when never used.
    crf: f64,
    last_step: u64,
}

#[derive(Clone, Debug)]
struct Slot {
    key: Option<ExpertKey>,
    class: Class,
    prio: Prio,
    /// Value of the access counter when last touched (the tie-break).
    tick: u64,
    /// Loaded by a prefetch and not requested since.
    prefetched_unused: bool,
    locked: bool,
    /// In the wave being planned.
    pinned: bool,
    /// Listed in `touched`.
    touched: bool,
}

/// A victim candidate: its expected next use (larger is evicted first), then older tick, then lower slot.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    next_use: f64,
    tick: u64,
    slot: SlotId,
}

impl Candidate {
    /// True when `self` should be evicted before `other`.
    fn before(&self, other: &Candidate) -> bool {
        match self.next_use.total_cmp(&other.next_use) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => (self.tick, self.slot) < (other.tick, other.slot),
        }
    }
}

/// The slot pool's bookkeeping. Same calls in the same order give the same plans.
#[derive(Clone, Debug)]
pub struct SlotPolicy {
    cfg: PolicyConfig,
    /// `1 / half_life`.
    lambda: f64,
    /// `1 - 2^(-1/H)`: turns a steady-state `crf` into a per-step use probability.
    p_per_crf: f64,
    slots: Vec<Slot>,
    /// Slot of each key (`layer * n_expert + expert`), `NONE` when not cached.
    slot_of: Vec<SlotId>,
    history: Vec<History>,
    /// Empty, unlocked slots.
    free: BTreeSet<SlotId>,
    /// Occupied, unlocked, unpinned slots: per layer, per class.
    evictable: Vec<[BTreeSet<Entry>; 3]>,
    /// Slots whose class is not `Cold` (reset by `begin_step`).
    touched: Vec<SlotId>,
    step: u64,
    tick: u64,
    /// The layer of the last request in this step; `None` at the start of a step.
    cursor: Option<u32>,
}

const NONE: SlotId = SlotId::MAX;

impl SlotPolicy {
    pub fn new(cfg: PolicyConfig) -> Result<SlotPolicy, PolicyError> {
        if cfg.n_slots == 0 {
            return Err(PolicyError::NoSlots);
        }
        if cfg.n_slots > MAX_SLOTS {
            return Err(PolicyError::TooManySlots {
                got: cfg.n_slots,
                max: MAX_SLOTS,
            });
        }
        let n_keys = u64::from(cfg.n_layer) * u64::from(cfg.n_expert);
        if n_keys == 0 || n_keys > MAX_KEYS || cfg.n_layer > MAX_LAYERS {
            return Err(PolicyError::BadKeySpace {
                n_layer: cfg.n_layer,
                n_expert: cfg.n_expert,
                max: MAX_KEYS,
            });
        }
        if !(cfg.half_life_steps.is_finite() && cfg.half_life_steps > 0.0) {
            return Err(PolicyError::BadHalfLife(cfg.half_life_steps));
        }
        let lambda = 1.0 / cfg.half_life_steps;
        let slot = Slot {
            key: None,
            class: Class::Cold,
            prio: Prio(0.0),
            tick: 0,
            prefetched_unused: false,
            locked: false,
            pinned: false,
            touched: false,
        };
        Ok(SlotPolicy {
            cfg,
            lambda,
            p_per_crf: 1.0 - (-lambda).exp2(),
            slots: vec![slot; cfg.n_slots],
            slot_of: vec![NONE; n_keys as usize],
            history: vec![History::default(); n_keys as usize],
            free: (0..cfg.n_slots as SlotId).collect(),
            evictable: vec![Default::default(); cfg.n_layer as usize],
            touched: Vec::new(),
            step: 0,
            tick: 0,
            cursor: None,
        })
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub fn n_slots(&self) -> usize {
        self.slots.len()
    }

    /// Slots holding a key.
    pub fn n_occupied(&self) -> usize {
        self.slots.iter().filter(|s| s.key.is_some()).count()
    }

    /// The current step (0 until the first [`Self::begin_step`]).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Starts a new step (a token or a micro-batch; its requests come layer after layer): keys requested or
    /// prefetched so far become ordinary candidates for every eviction, and uses from now on count one step later.
    pub fn begin_step(&mut self) {
        for s in std::mem::take(&mut self.touched) {
            self.slots[s as usize].touched = false;
            let slot = &self.slots[s as usize];
            if slot.class == Class::Cold {
                continue;
            }
            // A guess not used in its step keeps only its real history.
            let prio = match slot.key {
                Some(key) if slot.prefetched_unused => self.history_prio(key),
                _ => slot.prio,
            };
            self.update(s, |slot| {
                slot.class = Class::Cold;
                slot.prio = prio;
            });
        }
        self.step = self.step.saturating_add(1);
        self.cursor = None;
    }

    /// The slot holding `key`, without counting a use.
    pub fn lookup(&self, key: ExpertKey) -> Option<SlotId> {
        let i = self.key_index(key).ok()?;
        Some(self.slot_of[i]).filter(|&s| s != NONE)
    }

    /// The key held by `slot`.
    pub fn key_in(&self, slot: SlotId) -> Option<ExpertKey> {
        self.slots.get(slot as usize).and_then(|s| s.key)
    }

    pub fn is_locked(&self, slot: SlotId) -> bool {
        self.slots.get(slot as usize).is_some_and(|s| s.locked)
    }

    /// Plans `keys` (a layer's needed experts; duplicates allowed, order irrelevant): hits, and misses with the
    /// slots to read them into, in waves that fit the pool. Counts one use of every key. Fails without changing
    /// anything when a key is outside the model or every slot is locked while there is something to load.
    pub fn request(&mut self, keys: &[ExpertKey]) -> Result<RequestPlan, PolicyError> {
        let mut needed = keys.to_vec();
        for &key in &needed {
            self.key_index(key)?;
        }
        needed.sort_unstable();
        needed.dedup();
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        for &key in &needed {
            match self.lookup(key) {
                Some(slot) => hits.push((key, slot)),
                None => misses.push(key),
            }
        }
        if let Some(&first) = misses.first() {
            if self.slots.iter().all(|s| s.locked) {
                return Err(PolicyError::NoSlotAvailable {
                    key: first,
                    n_slots: self.slots.len(),
                });
            }
        }
        if let Some(last) = needed.last() {
            self.cursor = Some(last.layer);
        }

        let mut plan = RequestPlan::default();
        let mut misses = misses.into_iter().peekable();
        let mut first_wave = true;
        while first_wave || misses.peek().is_some() {
            let mut wave = Wave::default();
            if first_wave {
                for &(key, slot) in &hits {
                    let prefetched = self.slots[slot as usize].prefetched_unused;
                    self.pin(slot);
                    self.record_use(slot, key);
                    wave.hits.push(Hit {
                        key,
                        slot,
                        prefetched,
                    });
                }
            }
            while let Some(&key) = misses.peek() {
                let Some(slot) = self.demand_victim() else {
                    break;
                };
                let evicted = self.take_slot(slot);
                self.place(slot, key);
                self.pin(slot);
                self.record_use(slot, key);
                wave.misses.push(Load { key, slot, evicted });
                misses.next();
            }
            let pinned: Vec<SlotId> = wave.entries().map(|(_, s)| s).collect();
            for s in pinned {
                self.unpin(s);
            }
            if wave.is_empty() {
                // Unreachable after the check above (a wave with no pins can always take an unlocked slot);
                // kept so a broken invariant is an error, never a loop or a panic.
                if let Some(key) = misses.next() {
                    return Err(PolicyError::NoSlotAvailable {
                        key,
                        n_slots: self.slots.len(),
                    });
                }
            } else {
                plan.waves.push(wave);
            }
            first_wave = false;
        }
        Ok(plan)
    }

    /// Loads `keys` (in priority order; duplicates allowed) ahead of their use where that costs no key needed
    /// sooner: free slots first, then keys not touched in this step whose next use is expected after the guess's.
    /// `weight` is the chance the guess is used in this step: 1 for hash-routed layers (certain from the token
    /// ids), lower for the next layer's router prediction. Never evicts a key requested or prefetched in this step.
    pub fn prefetch(
        &mut self,
        keys: &[ExpertKey],
        weight: f64,
    ) -> Result<PrefetchPlan, PolicyError> {
        if !(weight > 0.0 && weight <= 1.0) {
            return Err(PolicyError::BadWeight(weight));
        }
        for &key in keys {
            self.key_index(key)?;
        }
        let mut plan = PrefetchPlan::default();
        let mut seen = BTreeSet::new();
        for &key in keys {
            if !seen.insert(key) {
                continue;
            }
            if let Some(slot) = self.lookup(key) {
                // Already in a slot: keep it there for this step (a later guess must not push it out).
                self.keep_for_step(slot);
                plan.present += 1;
                continue;
            }
            let prio = self.guess_prio(key, weight);
            match self.prefetch_victim(self.next_use(key.layer, prio)) {
                Some(slot) => plan.loads.push(self.place_ahead(slot, key, prio)),
                None => plan.dropped.push(key),
            }
        }
        Ok(plan)
    }

    /// The policy of a second tier in front of other memory (a device's cache of experts the host also holds):
    /// counts one use of every key of `keys` (a layer's needed experts; duplicates allowed), cached or not (the
    /// keys not cached were computed from the other memory), and places each key not cached where that costs no
    /// key needed sooner: a free slot, else the key not touched in this step expected last, if it is expected over
    /// [`ADMIT_MARGIN`] times later than this one (by its history, this use counted). The loads say which slot to
    /// fill with which key; keys that found no such slot are `dropped`. Never evicts a key used or placed in this
    /// step.
    pub fn admit(&mut self, keys: &[ExpertKey]) -> Result<PrefetchPlan, PolicyError> {
        let needed = self.layer_keys(keys)?;
        let mut plan = PrefetchPlan::default();
        for key in needed {
            if let Some(slot) = self.lookup(key) {
                if self.slots[slot as usize].prefetched_unused {
                    plan.ahead_used += 1;
                }
                self.record_use(slot, key);
                plan.present += 1;
                continue;
            }
            self.count_use(key);
            let prio = self.history_prio(key);
            let Some(slot) = self.admit_victim(self.next_use(key.layer, prio)) else {
                plan.dropped.push(key);
                continue;
            };
            let evicted = self.take_slot(slot);
            self.place(slot, key);
            self.record_use(slot, key);
            plan.loads.push(Load { key, slot, evicted });
        }
        Ok(plan)
    }

    /// The second tier's ahead-of-use admission (see [`Self::admit`]): places the guessed keys `keys` (a layer's
    /// experts as the next layer's router predicts them, or a hash-routed layer's from the token ids) that
    /// [`Self::admit`] would place if the guess comes true: priced with one use counted at this step, a free slot
    /// or a victim not touched in this step expected over [`ADMIT_MARGIN`] times later. Counts no use: a guess
    /// that is used is counted by the [`Self::admit`] after its layer (which finds it present); one that is not
    /// keeps only its history's priority. Placed keys are protected from the rest of this step's admissions like
    /// used ones.
    pub fn admit_ahead(&mut self, keys: &[ExpertKey]) -> Result<PrefetchPlan, PolicyError> {
        // Victims are weighed as [`Self::admit`] weighs them after the layer (the same cursor).
        let guessed = self.layer_keys(keys)?;
        let mut plan = PrefetchPlan::default();
        for key in guessed {
            if let Some(slot) = self.lookup(key) {
                self.keep_for_step(slot);
                plan.present += 1;
                continue;
            }
            match self.admit_victim(self.next_use(key.layer, self.used_prio(key))) {
                Some(slot) => {
                    let prio = self.history_prio(key);
                    plan.loads.push(self.place_ahead(slot, key, prio));
                }
                None => plan.dropped.push(key),
            }
        }
        Ok(plan)
    }

    /// A layer's `keys` checked, sorted and without repeats; the layer sweep's cursor moves to their (last) layer.
    fn layer_keys(&mut self, keys: &[ExpertKey]) -> Result<Vec<ExpertKey>, PolicyError> {
        for &key in keys {
            self.key_index(key)?;
        }
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if let Some(last) = sorted.last() {
            self.cursor = Some(last.layer);
        }
        Ok(sorted)
    }

    /// Keeps the key in `slot` out of the evictions of the rest of this step, as a guess (a cached key guessed).
    fn keep_for_step(&mut self, slot: SlotId) {
        if self.slots[slot as usize].class == Class::Cold {
            self.update(slot, |s| s.class = Class::Prefetched);
            self.mark_touched(slot);
        }
    }

    /// Puts `key` into `slot` (evicting what it holds) ahead of its use, with priority `prio`, kept for this step:
    /// the load that fills it.
    fn place_ahead(&mut self, slot: SlotId, key: ExpertKey, prio: Prio) -> Load {
        let evicted = self.take_slot(slot);
        self.place(slot, key);
        self.stamp(slot, Class::Prefetched, prio, true);
        Load { key, slot, evicted }
    }

    /// Keeps `slot` out of every eviction until [`Self::unlock`] (a load into it is in flight, or a device still
    /// reads it). A locked empty slot is not handed out either.
    pub fn lock(&mut self, slot: SlotId) -> Result<(), PolicyError> {
        self.check_slot(slot)?;
        self.update(slot, |s| s.locked = true);
        Ok(())
    }

    pub fn unlock(&mut self, slot: SlotId) -> Result<(), PolicyError> {
        self.check_slot(slot)?;
        self.update(slot, |s| s.locked = false);
        Ok(())
    }

    /// Forgets what `slot` holds (its load failed, or its bytes were overwritten): the slot becomes free and the
    /// key a miss again. Returns the key it held.
    pub fn invalidate(&mut self, slot: SlotId) -> Result<Option<ExpertKey>, PolicyError> {
        self.check_slot(slot)?;
        Ok(self.take_slot(slot))
    }

    fn check_slot(&self, slot: SlotId) -> Result<(), PolicyError> {
        if (slot as usize) < self.slots.len() {
            Ok(())
        } else {
            Err(PolicyError::SlotOutOfRange {
                slot,
                n_slots: self.slots.len(),
            })
        }
    }

    fn key_index(&self, key: ExpertKey) -> Result<usize, PolicyError> {
        if key.layer < self.cfg.n_layer && key.expert < self.cfg.n_expert {
            Ok(key.layer as usize * self.cfg.n_expert as usize + key.expert as usize)
        } else {
            Err(PolicyError::KeyOutOfRange {
                key,
                n_layer: self.cfg.n_layer,
                n_expert: self.cfg.n_expert,
            })
        }
    }

    /// The set `slot` belongs in (when evictable) and its entry there.
    fn position(&self, slot: SlotId) -> Option<(usize, usize, Entry)> {
        let s = &self.slots[slot as usize];
        let key = s.key?;
        Some((key.layer as usize, s.class as usize, (s.prio, s.tick, slot)))
    }

    /// Changes slot `slot` with `f`, keeping the free set and the eviction sets in step with it.
    fn update(&mut self, slot: SlotId, f: impl FnOnce(&mut Slot)) {
        if let Some((layer, class, entry)) = self.position(slot) {
            if let Some(set) = self.evictable.get_mut(layer) {
                set[class].remove(&entry);
            }
        }
        self.free.remove(&slot);
        f(&mut self.slots[slot as usize]);
        let s = &self.slots[slot as usize];
        if s.locked || s.pinned {
            return;
        }
        match self.position(slot) {
            Some((layer, class, entry)) => {
                if let Some(set) = self.evictable.get_mut(layer) {
                    set[class].insert(entry);
                }
            }
            None => {
                self.free.insert(slot);
            }
        }
    }

    fn pin(&mut self, slot: SlotId) {
        self.update(slot, |s| s.pinned = true);
    }

    fn unpin(&mut self, slot: SlotId) {
        self.update(slot, |s| s.pinned = false);
    }

    /// Empties `slot`, returning the key it held.
    fn take_slot(&mut self, slot: SlotId) -> Option<ExpertKey> {
        let key = self.slots[slot as usize].key;
        if let Some(k) = key {
            if let Ok(i) = self.key_index(k) {
                self.slot_of[i] = NONE;
            }
        }
        self.update(slot, |s| {
            s.key = None;
            s.class = Class::Cold;
            s.prefetched_unused = false;
        });
        key
    }

    /// Puts `key` into the empty `slot`.
    fn place(&mut self, slot: SlotId, key: ExpertKey) {
        if let Ok(i) = self.key_index(key) {
            self.slot_of[i] = slot;
        }
        self.update(slot, |s| s.key = Some(key));
    }

    /// Counts a use of `key` at the current step in its history, once per step.
    fn count_use(&mut self, key: ExpertKey) {
        if let Ok(i) = self.key_index(key) {
            self.history[i] = self.after_use(self.history[i]);
        }
    }

    /// History `h` with a use at the current step counted: once per step (a key requested again in the same step
    /// is not more popular for it).
    fn after_use(&self, h: History) -> History {
        if h.crf > 0.0 && h.last_step == self.step {
            return h;
        }
        let age = self.step.saturating_sub(h.last_step) as f64;
        History {
            crf: 1.0 + h.crf * (-age * self.lambda).exp2(),
            last_step: self.step,
        }
    }

    /// `key`'s use history (never used for a key out of range).
    fn history_of(&self, key: ExpertKey) -> History {
        self.key_index(key)
            .map(|i| self.history[i])
            .unwrap_or_default()
    }

    /// The priority a use history gives (very low for a key never used).
    fn prio_of(&self, h: History) -> Prio {
        Prio(h.crf.max(MIN_P).log2() + h.last_step as f64 * self.lambda)
    }

    /// Counts a requested use of `key` (in `slot`) at the current step, once per step.
    fn record_use(&mut self, slot: SlotId, key: ExpertKey) {
        self.count_use(key);
        let prio = self.history_prio(key);
        self.stamp(slot, Class::Used, prio, false);
    }

    /// Gives the key in `slot` its class and priority for this step, as the most recently touched.
    fn stamp(&mut self, slot: SlotId, class: Class, prio: Prio, prefetched_unused: bool) {
        self.tick += 1;
        let tick = self.tick;
        self.update(slot, |s| {
            s.class = class;
            s.prio = prio;
            s.tick = tick;
            s.prefetched_unused = prefetched_unused;
        });
        self.mark_touched(slot);
    }

    /// Lists `slot` for [`Self::begin_step`] to reset (once).
    fn mark_touched(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot as usize];
        if !s.touched {
            s.touched = true;
            self.touched.push(slot);
        }
    }

    /// The priority `key`'s uses give it (very low for a key never used).
    fn history_prio(&self, key: ExpertKey) -> Prio {
        self.prio_of(self.history_of(key))
    }

    /// The priority `key` would have with a use counted at the current step (what [`Self::count_use`] then
    /// [`Self::history_prio`] give), without counting it.
    fn used_prio(&self, key: ExpertKey) -> Prio {
        self.prio_of(self.after_use(self.history_of(key)))
    }

    /// The priority of a guess: a use in this step with probability `weight`, else its history's.
    fn guess_prio(&self, key: ExpertKey, weight: f64) -> Prio {
        let h = self.history_of(key);
        let age = self.step.saturating_sub(h.last_step) as f64;
        let p_hist = (h.crf * (-age * self.lambda).exp2() * self.p_per_crf).min(1.0);
        let p = weight + (1.0 - weight) * p_hist;
        let crf = (p / self.p_per_crf).max(MIN_P);
        Prio(crf.log2() + self.step as f64 * self.lambda)
    }

    /// Expected steps until a key of `layer` with priority `prio` is used again (see the module documentation).
    fn next_use(&self, layer: u32, prio: Prio) -> f64 {
        let n = f64::from(self.cfg.n_layer.max(1));
        let l = f64::from(layer);
        let sweep = match self.cursor {
            None => (l + 1.0) / n,
            Some(c) if layer > c => (l - f64::from(c)) / n,
            Some(c) => (n - f64::from(c) + l) / n,
        };
        let crf_now = (prio.0 - self.step as f64 * self.lambda).exp2();
        let p = (crf_now * self.p_per_crf).clamp(MIN_P, 1.0);
        sweep + (1.0 - p) / p
    }

    /// The best victim among the least used key of each layer in `classes`.
    fn best_candidate(&self, classes: &[Class]) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        for (layer, sets) in self.evictable.iter().enumerate() {
            for &class in classes {
                let Some(&(prio, tick, slot)) = sets[class as usize].first() else {
                    continue;
                };
                let c = Candidate {
                    next_use: self.next_use(layer as u32, prio),
                    tick,
                    slot,
                };
                if best.as_ref().is_none_or(|b| c.before(b)) {
                    best = Some(c);
                }
            }
        }
        best
    }

    /// The slot a demand miss takes: a free one, else the evictable key whose next use is expected last, keys
    /// prefetched in this step and not used yet only when nothing else is left.
    fn demand_victim(&self) -> Option<SlotId> {
        if let Some(&s) = self.free.first() {
            return Some(s);
        }
        self.best_candidate(&[Class::Cold, Class::Used])
            .or_else(|| self.best_candidate(&[Class::Prefetched]))
            .map(|c| c.slot)
    }

    /// The slot a prefetch whose guess is expected at `guess_next_use` takes: a free one, else a key not touched
    /// in this step expected later.
    fn prefetch_victim(&self, guess_next_use: f64) -> Option<SlotId> {
        if let Some(&s) = self.free.first() {
            return Some(s);
        }
        let c = self.best_candidate(&[Class::Cold])?;
        (c.next_use > guess_next_use).then_some(c.slot)
    }

    /// The slot a second tier's miss expected again in `next_use` steps takes: a free one, else the key not touched
    /// in this step expected last, when it is expected more than [`ADMIT_MARGIN`] times later. An upload costs
    /// more than one use computed from the other memory, so keys of about the same history do not trade places.
    fn admit_victim(&self, next_use: f64) -> Option<SlotId> {
        if let Some(&s) = self.free.first() {
            return Some(s);
        }
        let c = self.best_candidate(&[Class::Cold])?;
        (c.next_use > ADMIT_MARGIN * next_use).then_some(c.slot)
    }
}

/// How much later than an admitted key the key it evicts must be expected again ([`SlotPolicy::admit`]). An upload
/// over PCIe (about 25 GB/s, the host staging the file's pages) takes two to three times as long as the CPU
/// computing one use of the same expert from RAM, so a swap pays only for a key expected at least about twice as
/// often as the one it replaces; with keys of similar history (routing close to uniform) nothing moves.
const ADMIT_MARGIN: f64 = 2.0;

#[cfg(test)]
mod tests;
