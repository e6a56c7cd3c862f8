//! The runs `ferrite bench` times: the random tokens both engines process, and each engine's warm-up and timed
//! repetitions of one test, one repetition at a time (so the two engines' repetitions can alternate).

use std::time::Instant;

use anyhow::Result;
use ferrite::cache::CacheType;
use ferrite::engine::{Engine, Logits, Session, SessionState};
use ferrite::experts::StatsSnapshot;
use ferrite::reference::llama::{LlamaContext, LlamaModel, LlamaParams};

use super::{BenchArgs, Kind, Test};

/// The random tokens both engines process.
pub(super) struct Tokens {
    pub(super) bos: Option<u32>,
    prompt: Vec<u32>,
    gen: Vec<u32>,
    /// The tokens before a test at depth (`-d`): the first `depth` of these.
    depth: Vec<u32>,
}

impl Tokens {
    pub(super) fn new(engine: &Engine, args: &BenchArgs) -> Tokens {
        let md = engine.model().metadata();
        let add_bos = md.bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        let n_vocab = engine.n_vocab();
        let bos = md
            .u32("tokenizer.ggml.bos_token_id")
            .ok()
            .filter(|&b| add_bos && (b as usize) < n_vocab);
        let mut state = args.seed;
        let mut random = |n: usize| -> Vec<u32> {
            let mut v: Vec<u32> = (0..n)
                .map(|_| (splitmix64(&mut state) % n_vocab as u64) as u32)
                .collect();
            if let (Some(b), Some(first)) = (bos, v.first_mut()) {
                *first = b;
            }
            v
        };
        let prompt = random(args.n_prompt);
        let gen = random(args.n_gen);
        let depth = random(args.n_depth.0.iter().copied().max().unwrap_or(0));
        Tokens {
            bos,
            prompt,
            gen,
            depth,
        }
    }

    fn of(&self, test: Test) -> &[u32] {
        match test.kind {
            Kind::Prompt => &self.prompt,
            Kind::Generation => &self.gen,
        }
    }

    fn depth_of(&self, test: Test) -> &[u32] {
        &self.depth[..test.depth]
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Each engine's state after a depth's tokens, kept across the tests of that depth (the tests of one depth have the
/// same context, see `Test::ctx`), so each depth is processed once per engine (llama-bench keeps its state too).
#[derive(Default)]
pub(super) struct DepthStates {
    /// By (depth, context).
    ferrite: Vec<((usize, usize), SessionState)>,
    llama: Vec<((usize, usize), Vec<u8>)>,
}

impl DepthStates {
    fn key(test: Test) -> (usize, usize) {
        (test.depth, test.n_ctx())
    }

    fn ferrite(&self, test: Test) -> Option<SessionState> {
        let key = Self::key(test);
        self.ferrite
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.clone())
    }

    fn llama(&self, test: Test) -> Option<Vec<u8>> {
        let key = Self::key(test);
        self.llama
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, s)| s.clone())
    }
}

/// Ferrite's runs of one test, in a session of its own.
pub(super) struct FerriteRuns<'e, 't> {
    engine: &'e Engine,
    session: Session<'e>,
    toks: &'t [u32],
    /// The tokens in the cache before each run, and the sequence's state once they were processed.
    depth: &'t [u32],
    depth_state: Option<SessionState>,
    /// The key of `depth_state` in [`DepthStates`].
    test: Test,
    kind: Kind,
    /// The expert store's counters before the first timed repetition.
    before: Option<StatsSnapshot>,
}

impl<'e, 't> FerriteRuns<'e, 't> {
    pub(super) fn new(
        engine: &'e Engine,
        test: Test,
        tokens: &'t Tokens,
        args: &BenchArgs,
        states: &DepthStates,
    ) -> Result<FerriteRuns<'e, 't>> {
        Ok(FerriteRuns {
            engine,
            session: engine.session_sized(test.n_ctx(), args.ubatch.min(test.n_ctx()))?,
            toks: tokens.of(test),
            depth: tokens.depth_of(test),
            depth_state: states.ferrite(test),
            test,
            kind: test.kind,
            before: None,
        })
    }

    /// Keeps the state after the depth's tokens for the other tests of the depth.
    pub(super) fn keep_state(&self, states: &mut DepthStates) {
        if let Some(s) = &self.depth_state {
            if states.ferrite(self.test).is_none() {
                states
                    .ferrite
                    .push((DepthStates::key(self.test), s.clone()));
            }
        }
    }

    fn run(&mut self, toks: &[u32]) -> Result<()> {
        match self.kind {
            Kind::Prompt => {
                self.session.feed(toks, Logits::Last)?;
            }
            Kind::Generation => {
                for &t in toks {
                    self.session.feed(&[t], Logits::Last)?;
                }
            }
        }
        Ok(())
    }

    /// Untimed: an empty cache, then the depth's tokens (processed the first time, restored later).
    fn prefill(&mut self) -> Result<()> {
        self.session.reset()?;
        if self.depth.is_empty() {
            return Ok(());
        }
        match &self.depth_state {
            Some(state) => self.session.set_state(state)?,
            None => {
                let start = Instant::now();
                self.session.feed(self.depth, Logits::Last)?;
                report_depth("ferrite", self.depth.len(), start);
                self.depth_state = Some(self.session.state()?);
            }
        }
        anyhow::ensure!(
            self.session.n_past() == self.depth.len(),
            "ferrite holds {} tokens after the depth's {}",
            self.session.n_past(),
            self.depth.len()
        );
        Ok(())
    }

    /// The untimed run (for generation, one token, as llama-bench does).
    pub(super) fn warm_up(&mut self) -> Result<()> {
        self.prefill()?;
        self.run(warm_part(self.kind, self.toks))
    }

    /// One timed repetition after the depth's tokens, in seconds.
    pub(super) fn timed(&mut self) -> Result<f64> {
        self.prefill()?;
        if self.before.is_none() {
            self.before = Some(self.engine.expert_stats());
        }
        let start = Instant::now();
        self.run(self.toks)?;
        let seconds = start.elapsed().as_secs_f64();
        // ggml's workers would spin a while for more work: not during the next run (llama.cpp's, interleaved).
        self.engine.pause_threads();
        Ok(seconds)
    }

    /// The expert store's counters over the timed repetitions.
    pub(super) fn expert_stats(&self) -> StatsSnapshot {
        let now = self.engine.expert_stats();
        match &self.before {
            Some(b) => now.since(b),
            None => StatsSnapshot::default(),
        }
    }
}

/// llama.cpp's runs of one test, in a context of its own with the same tokens and settings.
pub(super) struct LlamaRuns {
    ctx: LlamaContext,
    toks: Vec<i32>,
    depth: Vec<i32>,
    depth_state: DepthState,
    test: Test,
    kind: Kind,
}

/// llama.cpp's state after the depth's tokens (llama-bench's cached state).
enum DepthState {
    NotYet,
    Saved(Vec<u8>),
    /// llama.cpp could not save or restore it: each run processes the depth's tokens again.
    Unrestorable,
}

impl LlamaRuns {
    pub(super) fn new(
        model: &LlamaModel,
        threads: usize,
        test: Test,
        tokens: &Tokens,
        args: &BenchArgs,
        states: &DepthStates,
    ) -> Result<LlamaRuns> {
        // At a depth, every test's context has the same sizes (the state after the depth restores into each).
        let batch = match test.depth {
            0 => test.n,
            _ => test.n_ctx(),
        };
        let ctx = model.context(LlamaParams {
            n_ctx: test.n_ctx() as u32,
            n_batch: batch as u32,
            n_ubatch: args.ubatch.min(batch) as u32,
            n_threads: threads as i32,
            cache_f16: args.cache_type == CacheType::F16,
            cache_q8_0: args.cache_type == CacheType::Q8_0,
            cache_q4_0: args.cache_type == CacheType::Q4_0,
            ..LlamaParams::default()
        })?;
        Ok(LlamaRuns {
            ctx,
            toks: tokens.of(test).iter().map(|&t| t as i32).collect(),
            depth: tokens.depth_of(test).iter().map(|&t| t as i32).collect(),
            depth_state: match states.llama(test) {
                Some(s) => DepthState::Saved(s),
                None => DepthState::NotYet,
            },
            test,
            kind: test.kind,
        })
    }

    /// Keeps the state after the depth's tokens for the other tests of the depth.
    pub(super) fn keep_state(&self, states: &mut DepthStates) {
        if let DepthState::Saved(s) = &self.depth_state {
            if states.llama(self.test).is_none() {
                states.llama.push((DepthStates::key(self.test), s.clone()));
            }
        }
    }

    /// Untimed: an empty cache, then the depth's tokens (processed the first time, restored later).
    fn prefill(&mut self) -> Result<()> {
        self.ctx.clear();
        if self.depth.is_empty() {
            return Ok(());
        }
        if let DepthState::Saved(state) = &self.depth_state {
            if self.ctx.set_state(state).is_ok() && self.ctx.n_past() == self.depth.len() {
                return Ok(());
            }
            eprintln!(
                "ferrite: note: llama.cpp could not restore its state after the depth's {} tokens; it processes them again before each run",
                self.depth.len()
            );
            self.depth_state = DepthState::Unrestorable;
            self.ctx.clear();
        }
        let start = Instant::now();
        self.ctx.decode(&self.depth)?;
        report_depth("llama.cpp", self.depth.len(), start);
        anyhow::ensure!(
            self.ctx.n_past() == self.depth.len(),
            "llama.cpp holds {} tokens after the depth's {}",
            self.ctx.n_past(),
            self.depth.len()
        );
        if matches!(self.depth_state, DepthState::NotYet) {
            self.depth_state = match self.ctx.state() {
                Ok(state) => DepthState::Saved(state),
                Err(_) => DepthState::Unrestorable,
            };
        }
        Ok(())
    }

    fn run(ctx: &mut LlamaContext, kind: Kind, toks: &[i32]) -> Result<()> {
        match kind {
            Kind::Prompt => ctx.decode(toks),
            Kind::Generation => toks.iter().try_for_each(|&t| ctx.decode(&[t])),
        }
    }

    pub(super) fn warm_up(&mut self) -> Result<()> {
        self.prefill()?;
        Self::run(&mut self.ctx, self.kind, warm_part(self.kind, &self.toks))
    }

    pub(super) fn timed(&mut self) -> Result<f64> {
        self.prefill()?;
        let start = Instant::now();
        Self::run(&mut self.ctx, self.kind, &self.toks)?;
        Ok(start.elapsed().as_secs_f64())
    }
}

/// Prints how long processing a depth's tokens took (once per engine and depth; untimed, but it is most of a run at
/// a large depth).
fn report_depth(engine: &str, n: usize, start: Instant) {
    let s = start.elapsed().as_secs_f64();
    eprintln!(
        "{engine}: the depth's {n} tokens processed in {s:.1} s ({:.2} t/s; untimed, kept for the depth's tests)",
        n as f64 / s.max(1e-9)
    );
}

/// What a warm-up processes: the whole prompt, or generation's first token.
fn warm_part<T>(kind: Kind, toks: &[T]) -> &[T] {
    match kind {
        Kind::Prompt => toks,
        Kind::Generation => &toks[..toks.len().min(1)],
    }
}

/// Seconds of each timed repetition of `test` on ferrite (after a warm-up unless `--no-warmup`), and the expert
/// store's counters over them.
pub(super) fn measure_ferrite(
    engine: &Engine,
    test: Test,
    tokens: &Tokens,
    args: &BenchArgs,
    states: &mut DepthStates,
) -> Result<(Vec<f64>, StatsSnapshot)> {
    let mut runs = FerriteRuns::new(engine, test, tokens, args, states)?;
    if !args.no_warmup {
        runs.warm_up()?;
    }
    let seconds = (0..args.repetitions)
        .map(|_| runs.timed())
        .collect::<Result<Vec<f64>>>()?;
    runs.keep_state(states);
    Ok((seconds, runs.expert_stats()))
}

/// Seconds of each timed repetition of `test` on llama.cpp (after a warm-up unless `--no-warmup`).
pub(super) fn measure_llama(
    model: &LlamaModel,
    threads: usize,
    test: Test,
    tokens: &Tokens,
    args: &BenchArgs,
    states: &mut DepthStates,
) -> Result<Vec<f64>> {
    let mut runs = LlamaRuns::new(model, threads, test, tokens, args, states)?;
    if !args.no_warmup {
        runs.warm_up()?;
    }
    let seconds = (0..args.repetitions).map(|_| runs.timed()).collect();
    runs.keep_state(states);
    seconds
}

/// Both engines' timed repetitions of `test`, alternating (ferrite, llama.cpp, ferrite, ...) after both warm-ups,
/// so both see the same machine; and the expert store's counters over ferrite's.
pub(super) fn measure_interleaved(
    engine: &Engine,
    model: &LlamaModel,
    test: Test,
    tokens: &Tokens,
    args: &BenchArgs,
    states: &mut DepthStates,
) -> Result<(Vec<f64>, Vec<f64>, StatsSnapshot)> {
    let mut ours = FerriteRuns::new(engine, test, tokens, args, states)?;
    let threads = engine.options().n_threads;
    let mut theirs = LlamaRuns::new(model, threads, test, tokens, args, states)?;
    if !args.no_warmup {
        ours.warm_up()?;
        theirs.warm_up()?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        a.push(ours.timed()?);
        b.push(theirs.timed()?);
    }
    ours.keep_state(states);
    theirs.keep_state(states);
    Ok((a, b, ours.expert_stats()))
}
