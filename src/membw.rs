//! Memory read bandwidth, measured: what decode speed is held against (a bandwidth-bound decode reads every weight
//! byte of a token once, so tokens/s x bytes per token cannot exceed it).
//!
//! The probe reads memory the way decode reads weights: from a buffer in transparent huge pages (where ferrite
//! copies the weights it computes from RAM), with explicit vector loads (see [`sum`]), one contiguous share per
//! thread.

use std::hint::black_box;
use std::time::Instant;

/// Bytes the measurement reads: far beyond any CPU cache.
pub const DEFAULT_BYTES: usize = 512 << 20;

/// The best of `passes` timed reads of a `bytes` buffer split over `threads` threads, in bytes per second. The
/// buffer is advised for huge pages and written first, so every page is real memory (untouched pages all map one
/// shared zero page).
pub fn read_bandwidth(threads: usize, bytes: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 64);
    let mut buf = Buffer::new(words);
    for (i, w) in buf.words_mut().iter_mut().enumerate() {
        *w = (i as u64).wrapping_mul(0x9E37_79B9);
    }
    let words = buf.words();
    // Shares on 64-byte lines, so no two threads read one line.
    let chunk = words.len().div_ceil(threads).next_multiple_of(8);
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        std::thread::scope(|s| {
            for part in words.chunks(chunk) {
                s.spawn(move || black_box(sum(part)));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words.len() * 8) as f64 / best
}

/// A buffer of words in anonymous memory advised for transparent huge pages (on Linux; a plain vector elsewhere or
/// when the mapping fails).
enum Buffer {
    Mapped(memmap2::MmapMut),
    Plain(Vec<u64>),
}

impl Buffer {
    fn new(words: usize) -> Buffer {
        match memmap2::MmapMut::map_anon(words * 8) {
            Ok(map) => {
                #[cfg(target_os = "linux")]
                let _ = map.advise(memmap2::Advice::HugePage); // a hint: without it the read is only slower
                Buffer::Mapped(map)
            }
            Err(_) => Buffer::Plain(vec![0; words]),
        }
    }

    fn words(&self) -> &[u64] {
        match self {
            // SAFETY: an anonymous mapping is page-aligned (so aligned for u64) and `len` bytes long.
            Buffer::Mapped(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr() as *const u64, m.len() / 8)
            },
            Buffer::Plain(v) => v,
        }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        match self {
            // SAFETY: as in `words`, and the mapping is writable and borrowed mutably.
            Buffer::Mapped(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut u64, m.len() / 8)
            },
            Buffer::Plain(v) => v,
        }
    }
}

/// A sum of every word, with explicit vector loads: 256-bit where the CPU has AVX2, 128-bit SSE2 or NEON (the
/// baselines of x86-64 and arm64) elsewhere. Not left to the compiler: with `target-cpu=native` on an AVX-512 host it
/// vectorized a plain loop over chunks with gathers (`vpgatherdq`, 16 words apart), which made the probe read at a
/// quarter of the memory's speed.
fn sum(words: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { simd::sum_avx2(words) };
        }
        simd::sum_sse2(words)
    }
    #[cfg(target_arch = "aarch64")]
    {
        simd::sum_neon(words)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
    }
}

/// Sums of 8 words (64 bytes, one cache line) per step into independent accumulators, then the tail.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn sum_avx2(words: &[u64]) -> u64 {
        let lines = words.len() / 8;
        let p = words.as_ptr() as *const __m256i;
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for i in 0..lines {
            // SAFETY: line i's two 32-byte loads lie inside `words` (i < len / 8).
            unsafe {
                a = _mm256_add_epi64(a, _mm256_loadu_si256(p.add(2 * i)));
                b = _mm256_add_epi64(b, _mm256_loadu_si256(p.add(2 * i + 1)));
            }
        }
        let mut out = [0u64; 4];
        // SAFETY: stores 32 bytes into a 32-byte array.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, _mm256_add_epi64(a, b)) };
        finish(&out, &words[lines * 8..])
    }

    pub fn sum_sse2(words: &[u64]) -> u64 {
        let lines = words.len() / 8;
        let p = words.as_ptr() as *const __m128i;
        // SAFETY: SSE2 is part of x86-64; each line's four 16-byte loads lie inside `words` (i < len / 8).
        let acc = unsafe {
            let mut acc = [_mm_setzero_si128(); 4];
            for i in 0..lines {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm_add_epi64(*a, _mm_loadu_si128(p.add(4 * i + k)));
                }
            }
            let sum = _mm_add_epi64(_mm_add_epi64(acc[0], acc[1]), _mm_add_epi64(acc[2], acc[3]));
            let mut out = [0u64; 2];
            _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, sum);
            out
        };
        finish(&acc, &words[lines * 8..])
    }

    fn finish(lanes: &[u64], tail: &[u64]) -> u64 {
        lanes
            .iter()
            .chain(tail)
            .fold(0u64, |a, &w| a.wrapping_add(w))
    }
}

#[cfg(target_arch = "aarch64")]
mod simd {
    use std::arch::aarch64::*;

    pub fn sum_neon(words: &[u64]) -> u64 {
        let lines = words.len() / 8;
        let p = words.as_ptr();
        // SAFETY: NEON is part of arm64; each line's four 16-byte loads lie inside `words` (i < len / 8).
        let sum = unsafe {
            let mut acc = [vdupq_n_u64(0); 4];
            for i in 0..lines {
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = vaddq_u64(*a, vld1q_u64(p.add(8 * i + 2 * k)));
                }
            }
            vaddvq_u64(vaddq_u64(
                vaddq_u64(acc[0], acc[1]),
                vaddq_u64(acc[2], acc[3]),
            ))
        };
        words[lines * 8..]
            .iter()
            .fold(sum, |a, &w| a.wrapping_add(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word_and_measures_a_positive_rate() {
        let v: Vec<u64> = (1..=41).collect();
        assert_eq!(sum(&v), 861);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(simd::sum_sse2(&v), 861);
        let bw = read_bandwidth(2, 8 << 20, 2);
        assert!(bw.is_finite() && bw > 1e8, "{bw}");
    }
}
