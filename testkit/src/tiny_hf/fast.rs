//! [`Fill::Fast`](super::Fill::Fast): random bytes of the right kinds, streamed.

use std::io::{self, Write};

use super::layout::{HfTensor, Part};

/// [`Fill::Fast`]: random bytes of the right kind, generated and written in chunks.
///
/// [`Fill::Fast`]: super::Fill::Fast
pub(super) struct FastFill {
    seed: u64,
    n_expert: u64,
    buf: Vec<u8>,
}

/// Bytes generated per write: the writer's buffer size, so that big tensors bypass its copy.
const FAST_CHUNK: usize = 8 << 20;

/// wyrand: a fast 64-bit generator (one multiply per 8 bytes).
pub(super) struct WyRand(pub(super) u64);

impl WyRand {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }
}

impl FastFill {
    pub(super) fn new(seed: u64, n_expert: u32) -> FastFill {
        FastFill {
            seed,
            n_expert: u64::from(n_expert.max(1)),
            buf: Vec::with_capacity(FAST_CHUNK),
        }
    }

    pub(super) fn write(&mut self, t: &HfTensor, out: &mut dyn Write) -> io::Result<()> {
        let hash = t.entry.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = WyRand(self.seed ^ hash.rotate_left(29));
        let total = t.entry.byte_len().unwrap_or(0) as usize;
        if t.part == Part::I64 {
            // Rows of n_used distinct ids: consecutive experts from a random start.
            let n_used = t.entry.shape.get(1).copied().unwrap_or(1);
            let rows = t.entry.shape.first().copied().unwrap_or(0);
            self.buf.clear();
            for _ in 0..rows {
                let start = rng.next() % self.n_expert;
                for j in 0..n_used {
                    let id = (start + j) % self.n_expert;
                    self.buf.extend_from_slice(&(id as i64).to_le_bytes());
                }
                if self.buf.len() >= FAST_CHUNK {
                    out.write_all(&self.buf)?;
                    self.buf.clear();
                }
            }
            return out.write_all(&self.buf);
        }
        let mut left = total;
        while left > 0 {
            let n = left.min(FAST_CHUNK);
            self.buf.clear();
            // Whole words, then the bytes needed; every kind keeps its element boundaries (chunks are a multiple
            // of 8 bytes except the last).
            while self.buf.len() < n {
                let w = fast_word(t.part, rng.next());
                self.buf.extend_from_slice(&w.to_le_bytes());
            }
            self.buf.truncate(n);
            out.write_all(&self.buf)?;
            left -= n;
        }
        Ok(())
    }
}

/// The random word `r` made into 8 bytes of one kind.
pub(super) fn fast_word(part: Part, r: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    match part {
        // FP8: flip the lowest bit of every byte whose low 7 bits are all ones (0x7f / 0xff are NaN).
        Part::Fp8Weight => {
            let y = (r & LOW7) ^ LOW7; // zero bytes where the low 7 bits were all ones
            let nonzero = (y + LOW7) & !LOW7; // high bit set in nonzero bytes (no carries: bytes <= 0x7f)
            let zero = !nonzero & 0x8080_8080_8080_8080;
            r ^ (zero >> 7)
        }
        // Scales 2^-8..2^0: bytes 119..=127.
        Part::Fp8Scale | Part::Fp4Scale => {
            let mut w = 0u64;
            let mut x = r;
            for k in 0..8 {
                w |= (119 + (x & 0xff) % 9) << (8 * k);
                x >>= 8;
            }
            w
        }
        Part::Fp4Weight => r,
        // BF16: sign, exponent 120..=123 (2^-7..2^-4 times 1..2), any mantissa.
        Part::Bf16 => (r & 0x81ff_81ff_81ff_81ff) | 0x3c00_3c00_3c00_3c00,
        // F32: the same magnitudes.
        Part::F32 => (r & 0x81ff_ffff_81ff_ffff) | 0x3c00_0000_3c00_0000,
        // Not used: ids are written row by row.
        Part::I64 => r,
    }
}
