//! The sampler (src/sampler.rs): greedy, seeded determinism, each filter of llama.cpp's chain, temperature's effect
//! on the drawn distribution, the repetition penalty, and hostile logits.

use ferrite::sampler::{Sampler, SamplerConfig};

fn cfg() -> SamplerConfig {
    SamplerConfig {
        seed: 1234,
        ..SamplerConfig::default()
    }
}

/// Logits whose softmax is `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

/// Frequencies of each id over `n` draws.
fn frequencies(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<f64> {
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[sampler.sample(logits, &[]) as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

fn assert_close(got: &[f64], want: &[f64], tolerance: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance,
            "id {i}: frequency {g:.4}, expected {w:.4} (±{tolerance}); all {got:?}"
        );
    }
}

/// A reproducible pseudo-random logit row (no PRNG crate in the tests either).
fn noisy_logits(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)).rotate_left(13);
            (x % 10_000) as f32 / 1000.0 - 5.0
        })
        .collect()
}

#[test]
fn defaults_match_the_model_card_and_llama_cpp() {
    let d = SamplerConfig::default();
    assert_eq!(
        (d.temperature, d.top_k, d.top_p, d.min_p),
        (1.0, 0, 1.0, 0.0)
    );
    assert_eq!((d.repeat_penalty, d.repeat_last_n), (1.0, 64));
}

#[test]
fn greedy_is_argmax_with_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
    for seed in 0..20 {
        let logits = noisy_logits(1000, seed);
        let argmax =
            (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
        assert_eq!(s.sample(&logits, &[]) as usize, argmax);
    }
    // Negative temperature is greedy as well.
    let mut neg = Sampler::new(SamplerConfig {
        temperature: -1.0,
        ..cfg()
    });
    assert_eq!(neg.sample(&[0.0, 5.0, 1.0], &[]), 1);
}

#[test]
fn same_seed_same_sequence_and_different_seed_differs() {
    let logits = noisy_logits(500, 7);
    let run = |seed: u64| {
        let mut s = Sampler::new(SamplerConfig { seed, ..cfg() });
        (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
    let mut s = Sampler::new(SamplerConfig { seed: 42, ..cfg() });
    s.sample(&logits, &[]);
    s.reseed(42);
    assert_eq!(
        (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>(),
        run(42)
    );
}

#[test]
fn top_k_one_equals_greedy() {
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    let mut k1 = Sampler::new(SamplerConfig {
        top_k: 1,
        temperature: 1.5,
        ..cfg()
    });
    for seed in 0..50 {
        let logits = noisy_logits(2000, seed);
        assert_eq!(k1.sample(&logits, &[]), greedy.sample(&logits, &[]));
    }
    assert_eq!(
        k1.sample(&[2.0, 5.0, 5.0], &[]),
        1,
        "ties resolve to the lowest id"
    );
}

#[test]
fn top_k_keeps_only_the_k_best() {
    let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
    let mut s = Sampler::new(SamplerConfig { top_k: 2, ..cfg() });
    let f = frequencies(&mut s, &logits, 10_000);
    // Ids 1 and 3 renormalised: 0.4/0.7 and 0.3/0.7.
    assert_close(&f, &[0.0, 4.0 / 7.0, 0.0, 3.0 / 7.0], 0.02);
}

#[test]
fn tiny_top_p_equals_greedy() {
    let mut greedy = Sampler::new(SamplerConfig::greedy());
    let mut p = Sampler::new(SamplerConfig {
        top_p: 1e-6,
        ..cfg()
    });
    for seed in 0..50 {
        let logits = noisy_logits(2000, seed);
        assert_eq!(p.sample(&logits, &[]), greedy.sample(&logits, &[]));
    }
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    // Cumulative 0.5, 0.8, 0.95, 1.0: p = 0.75 keeps the first two (the one crossing p included).
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let mut s = Sampler::new(SamplerConfig {
        top_p: 0.75,
        ..cfg()
    });
    let f = frequencies(&mut s, &logits, 10_000);
    assert_close(&f, &[0.625, 0.375, 0.0, 0.0], 0.02);
}

#[test]
fn min_p_drops_tokens_below_the_fraction_of_the_best() {
    // min_p 0.2 of 0.5 = 0.1: id 3 (0.05) goes, the rest renormalise over 0.95.
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let mut s = Sampler::new(SamplerConfig {
        min_p: 0.2,
        ..cfg()
    });
    let f = frequencies(&mut s, &logits, 10_000);
    assert_eq!(f[3], 0.0);
    assert_close(&f, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], 0.02);
    // min_p 1 keeps only the best.
    let mut only_best = Sampler::new(SamplerConfig {
        min_p: 1.0,
        ..cfg()
    });
    assert!((0..100).all(|_| only_best.sample(&logits, &[]) == 0));
}

#[test]
fn temperature_one_draws_the_softmax() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let mut s = Sampler::new(cfg());
    let f = frequencies(&mut s, &logits_of(&probs), 10_000);
    assert_close(&f, &probs, 0.02);
}

#[test]
fn temperature_flattens_and_sharpens() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let tempered = |t: f64| {
        let w: Vec<f64> = probs.iter().map(|p: &f64| p.powf(1.0 / t)).collect();
        let sum: f64 = w.iter().sum();
        w.into_iter().map(|x| x / sum).collect::<Vec<_>>()
    };
    for t in [0.5f32, 2.0] {
        let mut s = Sampler::new(SamplerConfig {
            temperature: t,
            ..cfg()
        });
        let f = frequencies(&mut s, &logits_of(&probs), 10_000);
        assert_close(&f, &tempered(f64::from(t)), 0.02);
    }
    // A very small temperature is effectively greedy, without overflow.
    let mut cold = Sampler::new(SamplerConfig {
        temperature: 1e-30,
        ..cfg()
    });
    assert!((0..200).all(|_| cold.sample(&logits_of(&probs), &[]) == 3));
}

#[test]
fn filters_run_before_temperature_as_in_llama_cpp() {
    // At temperature 1 min_p 0.5 keeps ids 0 and 1 (0.5, 0.3 >= 0.25); a high temperature must not bring id 2
    // back (it would pass min_p on the flattened distribution: 0.2^(1/4) >= 0.5 * 0.5^(1/4)).
    let logits = logits_of(&[0.5, 0.3, 0.2]);
    let mut s = Sampler::new(SamplerConfig {
        min_p: 0.5,
        temperature: 4.0,
        ..cfg()
    });
    let f = frequencies(&mut s, &logits, 5_000);
    assert_eq!(f[2], 0.0);
    assert!(f[1] > 0.3, "flattened between the two survivors: {f:?}");
}

#[test]
fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
    let greedy_with = |penalty: f32, last_n: usize| SamplerConfig {
        repeat_penalty: penalty,
        repeat_last_n: last_n,
        ..SamplerConfig::greedy()
    };
    // Positive: 2.0 / 1.5 = 1.33 < 1.5, so id 0 loses to id 1.
    let mut s = Sampler::new(greedy_with(1.5, 64));
    assert_eq!(s.sample(&[2.0, 1.5], &[]), 0);
    assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
    // Negative: -1.0 * 1.5 = -1.5 < -1.2, so id 0 loses to id 1; unpenalised it wins.
    assert_eq!(s.sample(&[-1.0, -1.2], &[]), 0);
    assert_eq!(s.sample(&[-1.0, -1.2], &[0]), 1);
    // Once per distinct token, however often it repeats: 2.0 / 1.5 = 1.33 beats 1.3 (it would not after two).
    assert_eq!(s.sample(&[2.0, 1.3], &[0, 0, 0]), 0);
    // Only the last `repeat_last_n` tokens count.
    let mut short = Sampler::new(greedy_with(1.5, 2));
    assert_eq!(short.sample(&[2.0, 1.5], &[0, 5, 6]), 0);
    assert_eq!(short.sample(&[2.0, 1.5], &[5, 0, 6]), 1);
    // 1.0 is off; ids outside the vocabulary are ignored.
    let mut off = Sampler::new(greedy_with(1.0, 64));
    assert_eq!(off.sample(&[2.0, 1.5], &[0, 0]), 0);
    assert_eq!(s.sample(&[2.0, 1.5], &[7, u32::MAX]), 0);
}

#[test]
fn repeat_penalty_lowers_a_repeated_tokens_share() {
    let logits = logits_of(&[0.5, 0.5]);
    let plain = frequencies(&mut Sampler::new(cfg()), &logits, 4000);
    let mut penalised = Sampler::new(SamplerConfig {
        repeat_penalty: 1.3,
        ..cfg()
    });
    let mut zero = 0usize;
    for _ in 0..4000 {
        zero += usize::from(penalised.sample(&logits, &[0]) == 0);
    }
    // Both logits are ln 0.5 < 0: id 0's becomes 1.3 ln 0.5, so p0 = 0.5^1.3 / (0.5^1.3 + 0.5) ≈ 0.448.
    let expected = 0.5f64.powf(1.3) / (0.5f64.powf(1.3) + 0.5);
    assert!(
        (zero as f64 / 4000.0 - expected).abs() < 0.03,
        "{zero} {expected} {plain:?}"
    );
}

#[test]
fn nan_and_infinite_logits_never_panic() {
    let configs = [
        SamplerConfig::greedy(),
        cfg(),
        SamplerConfig {
            top_k: 2,
            top_p: 0.5,
            min_p: 0.1,
            repeat_penalty: 1.2,
            ..cfg()
        },
    ];
    for c in configs {
        let mut s = Sampler::new(c);
        // NaN counts as -inf: the only finite logit wins.
        for _ in 0..50 {
            assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN], &[0, 1]), 1);
        }
        // All NaN / all -inf: the lowest id, no panic.
        assert_eq!(s.sample(&[f32::NAN; 4], &[]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3], &[]), 0);
        // +inf dominates every finite logit; several +inf share the mass.
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, f32::INFINITY, 100.0], &[]), 1);
            let id = s.sample(&[f32::INFINITY, 0.0, f32::INFINITY, f32::NAN], &[]);
            assert!(id == 0 || id == 2, "{id}");
        }
        // Empty row.
        assert_eq!(s.sample(&[], &[1, 2, 3]), 0);
        // Extreme finite logits.
        for _ in 0..50 {
            let id = s.sample(&[f32::MAX, -f32::MAX, f32::MIN_POSITIVE], &[]);
            assert_eq!(id, 0);
        }
    }
    // Nonsense settings behave as "off" rather than panicking.
    let mut odd = Sampler::new(SamplerConfig {
        temperature: f32::NAN,
        top_p: f32::NAN,
        min_p: f32::NAN,
        repeat_penalty: f32::NAN,
        top_k: usize::MAX,
        ..cfg()
    });
    assert_eq!(odd.sample(&[0.0, 1.0], &[1]), 1);
    let mut zero_penalty = Sampler::new(SamplerConfig {
        repeat_penalty: 0.0,
        ..SamplerConfig::greedy()
    });
    assert_eq!(zero_penalty.sample(&[1.0, 2.0], &[1]), 1);
}

#[test]
fn full_vocabulary_row_is_fast_enough() {
    // A DeepSeek V4 row (129280 ids) through the whole chain: well under a few ms per token in release builds.
    let logits = noisy_logits(129_280, 3);
    let history: Vec<u32> = (0..64).map(|i| i * 997).collect();
    let mut s = Sampler::new(SamplerConfig {
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        ..cfg()
    });
    let mut all = Sampler::new(SamplerConfig {
        top_p: 0.95,
        ..cfg()
    });
    let start = std::time::Instant::now();
    for _ in 0..20 {
        s.sample(&logits, &history);
        all.sample(&logits, &history);
    }
    let per_token = start.elapsed() / 40;
    assert!(
        per_token < std::time::Duration::from_millis(50),
        "{per_token:?} per token"
    );
}
