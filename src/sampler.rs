//! Picks the next token from a row of logits: llama.cpp's default chain (repetition penalty, top-k, top-p, min-p,
//! temperature, then a seeded draw), or greedy at temperature 0. Seeded by a small PRNG of its own, so the same seed
//! and inputs give the same tokens on every machine.

/// The seed a default configuration draws with (llama.cpp picks a random one; callers that want that pass one).
pub const DEFAULT_SEED: u64 = 0x5EED_F00D;

/// Sampling settings, with llama.cpp's meanings and flags (`--temp`, `--top-k`, `--top-p`, `--min-p`,
/// `--repeat-penalty`, `--repeat-last-n`, `--seed`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Divides the logits before the draw; `<= 0` (or NaN) is greedy. Default 1.0, DeepSeek's recommendation.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; `>= 1` (or NaN) keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `<= 0` (or NaN) keeps all.
    pub min_p: f32,
    /// Penalises tokens seen in the last `repeat_last_n` of the history: positive logits are divided by it,
    /// negative ones multiplied. 1.0 (or any value that is not finite and positive) is off.
    pub repeat_penalty: f32,
    /// How much of the history the repetition penalty looks at; 0 is off.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: DEFAULT_SEED,
        }
    }
}

impl SamplerConfig {
    /// Argmax every time (temperature 0).
    pub fn greedy() -> SamplerConfig {
        SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0
    }
}

/// A token still in the running, with its (possibly penalised or scaled) logit. Never NaN.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits by lowest id, so every step is deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Draws tokens with one configuration and one random stream.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Xoshiro256,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        Sampler {
            cfg,
            rng: Xoshiro256::seeded(cfg.seed),
            candidates: Vec::new(),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Restarts the random stream as a new sampler with `seed` would have it.
    pub fn reseed(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Xoshiro256::seeded(seed);
    }

    /// The next token for `logits` (one per vocabulary id), given the tokens so far (`history`, prompt included if
    /// the caller wants the penalty to see it). NaN logits count as -inf. Never panics: an empty row gives 0, a row
    /// with no finite maximum gives the lowest id among the best.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.load(logits);
        self.apply_repeat_penalty(history);
        if self.cfg.is_greedy() {
            return greedy(&self.candidates);
        }
        self.apply_top_k();
        self.apply_top_p();
        self.apply_min_p();
        let u = self.rng.next_f64();
        draw(&self.candidates, self.cfg.temperature, u)
    }

    fn load(&mut self, logits: &[f32]) {
        self.candidates.clear();
        self.candidates
            .extend(logits.iter().enumerate().map(|(id, &l)| Candidate {
                id: id as u32,
                logit: if l.is_nan() { f32::NEG_INFINITY } else { l },
            }));
    }

    /// llama.cpp's `penalty_repeat`: once per distinct token of the last `repeat_last_n`. Runs while the candidates
    /// are still in id order, so the id is the index.
    fn apply_repeat_penalty(&mut self, history: &[u32]) {
        let penalty = self.cfg.repeat_penalty;
        if !(penalty.is_finite() && penalty > 0.0) || penalty == 1.0 || self.cfg.repeat_last_n == 0
        {
            return;
        }
        let mut recent = history[history.len().saturating_sub(self.cfg.repeat_last_n)..].to_vec();
        recent.sort_unstable();
        recent.dedup();
        for id in recent {
            if let Some(c) = self.candidates.get_mut(id as usize) {
                c.logit = if c.logit <= 0.0 {
                    c.logit * penalty
                } else {
                    c.logit / penalty
                };
            }
        }
    }

    fn apply_top_k(&mut self) {
        let k = self.cfg.top_k;
        if k == 0 || k >= self.candidates.len() {
            return;
        }
        self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
        self.candidates.truncate(k);
    }

    /// Keeps the most likely tokens up to and including the one where the cumulative probability reaches `top_p`
    /// (probabilities from the logits as they are here, before temperature, as in llama.cpp's chain).
    fn apply_top_p(&mut self) {
        let p = self.cfg.top_p;
        if p.is_nan() || p >= 1.0 || self.candidates.len() <= 1 {
            return;
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        let weights = softmax_weights(&self.candidates, 1.0);
        let total: f64 = weights.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            self.candidates.truncate(1);
            return;
        }
        let target = f64::from(p) * total;
        let mut cumulative = 0.0;
        let mut keep = self.candidates.len();
        for (i, w) in weights.iter().enumerate() {
            cumulative += w;
            if cumulative >= target {
                keep = i + 1;
                break;
            }
        }
        self.candidates.truncate(keep.max(1));
    }

    /// Keeps tokens whose probability is at least `min_p` times the largest: `logit >= max + ln(min_p)`.
    fn apply_min_p(&mut self) {
        let p = self.cfg.min_p;
        if p.is_nan() || p <= 0.0 || self.candidates.is_empty() {
            return;
        }
        let max = self
            .candidates
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        let threshold = max + p.ln();
        // The maximum always passes (ln(p) <= 0 for p <= 1; for p > 1 only the maximum's equals survive).
        self.candidates
            .retain(|c| c.logit >= threshold || c.logit == max);
    }
}

/// The highest logit, lowest id on ties; all -inf gives the lowest id.
fn greedy(candidates: &[Candidate]) -> u32 {
    let mut best = candidates[0];
    for &c in &candidates[1..] {
        if by_logit_desc(&c, &best).is_lt() {
            best = c;
        }
    }
    best.id
}

/// Unnormalised probabilities `exp((logit - max) / temperature)`, in f64 so a small temperature cannot overflow.
/// A +inf maximum gives weight 1 to every +inf logit and 0 elsewhere; an all -inf set gives all zeros.
fn softmax_weights(candidates: &[Candidate], temperature: f32) -> Vec<f64> {
    let inv_t = 1.0 / f64::from(temperature);
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    candidates
        .iter()
        .map(|c| {
            if max == f32::INFINITY {
                f64::from(u8::from(c.logit == f32::INFINITY))
            } else if max == f32::NEG_INFINITY {
                0.0
            } else {
                ((f64::from(c.logit) - f64::from(max)) * inv_t).exp()
            }
        })
        .collect()
}

/// Picks a candidate with probability `softmax(logit / temperature)`; `u` is uniform in [0, 1).
fn draw(candidates: &[Candidate], temperature: f32, u: f64) -> u32 {
    let weights = softmax_weights(candidates, temperature);
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return greedy(candidates);
    }
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for (c, w) in candidates.iter().zip(&weights) {
        if *w > 0.0 {
            cumulative += w;
            last_positive = Some(c.id);
            if target < cumulative {
                return c.id;
            }
        }
    }
    // Rounding can leave `target` a hair above the final sum.
    last_positive.unwrap_or_else(|| greedy(candidates))
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn seeded(seed: u64) -> Xoshiro256 {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [splitmix(), splitmix(), splitmix(), splitmix()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
