//! Random numbers: splitmix64 with Box-Muller normals. Small, seeded, identical on every platform.

pub(super) struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    /// A stream for one tensor: the seed mixed with the FNV-1a hash of its name.
    pub(super) fn for_tensor(seed: u64, name: &str) -> Rng {
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = Rng {
            state: seed ^ hash.rotate_left(17),
            spare: None,
        };
        rng.next_u64();
        rng
    }

    /// The stream of block `block` of a block-stream tensor ([`Streams`]): the tensor's stream state mixed with a
    /// splitmix64 hash of the block index, so blocks start at unrelated points of the sequence.
    ///
    /// [`Streams`]: super::Streams
    pub(super) fn for_block(seed: u64, name: &str, block: u64) -> Rng {
        let tensor = Rng::for_tensor(seed, name);
        let mut key = Rng {
            state: block,
            spare: None,
        };
        let mut rng = Rng {
            state: tensor.state ^ key.next_u64(),
            spare: None,
        };
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub(super) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller; the second value of each pair is kept for the next call).
    pub(super) fn normal(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n
    }

    /// `k` distinct values of 0..n in random order (partial Fisher-Yates).
    pub(super) fn distinct(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut pool: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }
}
