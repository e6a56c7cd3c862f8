//! Unit tests of the tiny model generator: the GPT-2 alphabet, the demo merges, the random streams and the
//! configuration checks.

use super::rng::Rng;
use super::vocab::DEMO_MERGES;
use super::*;

#[test]
fn gpt2_alphabet_is_a_bijection_with_space_as_g_dot() {
    let t = gpt2_byte_chars();
    let set: std::collections::HashSet<char> = t.iter().copied().collect();
    assert_eq!(set.len(), 256);
    assert_eq!(t[b' ' as usize], 'Ġ');
    assert_eq!(t[b'\n' as usize], 'Ċ');
    assert_eq!(t[b'a' as usize], 'a');
}

#[test]
fn demo_merges_build_on_existing_tokens() {
    let v = DemoVocab::new(0);
    assert_eq!(v.tokens.len(), DemoVocab::base_len());
    for (i, merge) in DEMO_MERGES.iter().enumerate() {
        let (l, r) = merge.split_once(' ').unwrap();
        let known = |s: &str| v.tokens[..2 + 256 + i].iter().any(|t| t == s);
        assert!(known(l) && known(r), "merge {l} {r}");
    }
    let unique: std::collections::HashSet<&String> = v.tokens.iter().collect();
    assert_eq!(unique.len(), v.tokens.len());
    assert_eq!(DemoVocab::new(600).tokens.len(), 600);
}

#[test]
fn rng_is_seeded_and_sane() {
    let mut a = Rng::for_tensor(7, "x");
    let mut b = Rng::for_tensor(7, "x");
    let xs: Vec<f32> = (0..20000).map(|_| a.normal()).collect();
    assert!(xs
        .iter()
        .zip((0..20000).map(|_| b.normal()))
        .all(|(x, y)| *x == y));
    let mean = xs.iter().sum::<f32>() / xs.len() as f32;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
    assert!(
        mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
        "mean {mean} var {var}"
    );
    let ids = a.distinct(4, 16);
    let set: std::collections::HashSet<usize> = ids.iter().copied().collect();
    assert_eq!(set.len(), 4);
    assert!(ids.iter().all(|&e| e < 16));
}

#[test]
fn presets_validate_and_bad_configs_are_refused() {
    for cfg in [
        TinyConfig::small(),
        TinyConfig::alt(),
        TinyConfig::demo(),
        TinyConfig::big_experts(),
        TinyConfig::flash(1),
        TinyConfig::flash(2),
        TinyConfig::flash(43),
    ] {
        cfg.validate().unwrap();
    }
    let no_csa = TinyConfig {
        compress_ratios: vec![0, 128, 0, 128, 0, 0],
        ..TinyConfig::small()
    };
    assert!(no_csa
        .validate()
        .unwrap_err()
        .to_string()
        .contains("ratio-4"));
    let odd_groups = TinyConfig {
        o_groups: 3,
        ..TinyConfig::small()
    };
    assert!(odd_groups.validate().is_err());
    let q8_k = TinyConfig::small().with_types(WeightTypes {
        experts: GgmlType::Q8K,
        ..WeightTypes::F32
    });
    assert!(q8_k
        .validate()
        .unwrap_err()
        .to_string()
        .contains("types.experts"));
}
