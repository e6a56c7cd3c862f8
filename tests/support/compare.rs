//! Inputs and comparisons the model tests share: seeded prompts and per-position errors relative to the logit scale.

/// Deterministic token ids in `0..n_vocab` (splitmix64 of `seed`).
pub fn prompt(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n_vocab as u64) as u32
        })
        .collect()
}

/// max |ours - reference| over one position's logits, divided by the reference's largest |logit| (the scale).
pub fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// [`relative_error`] of every row.
pub fn relative_errors<A: AsRef<[f32]>, B: AsRef<[f32]>>(ours: &[A], reference: &[B]) -> Vec<f32> {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| relative_error(a.as_ref(), b.as_ref()))
        .collect()
}
