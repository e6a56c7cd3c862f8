//! Memory read bandwidth, measured: what decode speed is held against (a bandwidth-bound decode reads every weight
//! byte of a token once, so tokens/s x bytes per token cannot exceed it).

use std::hint::black_box;
use std::time::Instant;

/// Bytes the measurement reads: far beyond any CPU cache.
pub const DEFAULT_BYTES: usize = 512 << 20;

/// The best of `passes` timed reads of a `bytes` buffer split over `threads` threads, in bytes per second. The
/// buffer is written first so every page is real memory (untouched pages all map one shared zero page).
pub fn read_bandwidth(threads: usize, bytes: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in buf.chunks(chunk) {
                s.spawn(move || black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best
}

/// A sum over eight lanes, which the compiler turns into wide vector loads.
fn sum(words: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut it = words.chunks_exact(8);
    for c in &mut it {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l = l.wrapping_add(w);
        }
    }
    let tail = it.remainder().iter().fold(0u64, |a, &w| a.wrapping_add(w));
    lanes.iter().fold(tail, |a, &l| a.wrapping_add(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word_and_measures_a_positive_rate() {
        let v: Vec<u64> = (1..=21).collect();
        assert_eq!(sum(&v), 231);
        let bw = read_bandwidth(2, 8 << 20, 2);
        assert!(bw.is_finite() && bw > 1e8, "{bw}");
    }
}
