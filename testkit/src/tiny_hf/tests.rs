//! Unit tests of the checkpoint writer: the name mapping and the fast fill's byte kinds.

use super::fast::{fast_word, WyRand};
use super::layout::{official_specs, plan, Part};
use super::*;

#[test]
fn every_gguf_tensor_has_a_checkpoint_name() {
    for mtp in [false, true] {
        for cfg in [TinyConfig::small(), TinyConfig::alt()] {
            let p = plan(&cfg, mtp).unwrap();
            let mut names = std::collections::HashSet::new();
            for t in &p.tensors {
                assert!(names.insert(t.entry.name.clone()), "{}", t.entry.name);
                assert!(!t.entry.name.starts_with("model."), "{}", t.entry.name);
            }
            let (_, _, n_gguf) = official_specs(&cfg, mtp).unwrap();
            for (i, s) in p.specs.iter().enumerate().take(n_gguf) {
                assert!(p.tensors.iter().any(|t| t.spec == i), "{}", s.name);
            }
        }
    }
}

#[test]
fn fast_words_are_of_their_kind() {
    let mut rng = WyRand(5);
    for _ in 0..20000 {
        let r = rng.next();
        let w = fast_word(Part::Fp8Weight, r).to_le_bytes();
        assert!(w.iter().all(|b| b & 0x7f != 0x7f), "{w:x?}");
        // Only the NaN bytes change.
        for (a, b) in r.to_le_bytes().iter().zip(w) {
            assert!(*a == b || a & 0x7f == 0x7f);
        }
        let s = fast_word(Part::Fp8Scale, r).to_le_bytes();
        assert!(s.iter().all(|b| (119..=127).contains(b)), "{s:?}");
        for pair in fast_word(Part::Bf16, r).to_le_bytes().chunks(2) {
            let v = half::bf16::from_le_bytes([pair[0], pair[1]]).to_f32().abs();
            assert!((2f32.powi(-7)..2f32.powi(-3)).contains(&v), "{v}");
        }
        for quad in fast_word(Part::F32, r).to_le_bytes().chunks(4) {
            let v = f32::from_le_bytes(quad.try_into().unwrap()).abs();
            assert!((2f32.powi(-7)..2f32.powi(-3)).contains(&v), "{v}");
        }
    }
}
