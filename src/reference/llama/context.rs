//! One llama.cpp context (one sequence) on a [`LlamaModel`]: llama-bench's decode calls, and every position's
//! logits or greedy tokens for the parity tests.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use llama_cpp_sys_2 as sys;

use super::{argmax, LlamaModel, LlamaParams};

/// A context and the model it runs (kept alive by it). Not `Send`: use it on the thread that made it.
pub struct LlamaContext {
    ctx: *mut sys::llama_context,
    model: LlamaModel,
    params: LlamaParams,
}

impl LlamaContext {
    /// Loads `path` (CPU, memory-mapped, repacking as `params.repack` says) and makes one context with `params`.
    pub fn load(path: &Path, params: LlamaParams) -> Result<LlamaContext> {
        LlamaModel::load(path, params.repack)?.context(params)
    }

    /// A context on `model` with F32 or F16 K/V cache and flash attention off, or a Q8_0 or Q4_0 cache with it on.
    pub(super) fn new(model: LlamaModel, p: LlamaParams) -> Result<LlamaContext> {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch;
        cp.n_ubatch = p.n_ubatch;
        cp.n_seq_max = 1;
        cp.n_threads = p.n_threads;
        cp.n_threads_batch = p.n_threads;
        let ty = if p.cache_q4_0 {
            sys::GGML_TYPE_Q4_0
        } else if p.cache_q8_0 {
            sys::GGML_TYPE_Q8_0
        } else if p.cache_f16 {
            sys::GGML_TYPE_F16
        } else {
            sys::GGML_TYPE_F32
        };
        cp.type_k = ty;
        cp.type_v = ty;
        cp.flash_attn_type = if p.cache_q8_0 || p.cache_q4_0 {
            sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        cp.swa_full = p.swa_full;
        cp.no_perf = true;
        // SAFETY: the model is valid (held by `model`); cp is fully initialised.
        let ctx = unsafe { sys::llama_init_from_model(model.raw.0, cp) };
        if ctx.is_null() {
            bail!(
                "llama.cpp could not create a context of {} tokens (FERRITE_LLAMA_LOG=1 shows why)",
                p.n_ctx
            );
        }
        Ok(LlamaContext {
            ctx,
            model,
            params: p,
        })
    }

    /// The model this context runs (its vocabulary).
    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab()
    }

    /// The context size llama.cpp allocated (it rounds the request up).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: ctx is valid.
        unsafe { sys::llama_n_ctx(self.ctx) as usize }
    }

    /// Forgets every token (the next decode starts at position 0).
    pub fn clear(&mut self) {
        // SAFETY: ctx is valid; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
    }

    /// Tokens in the sequence's memory (the next decode's first position).
    pub fn n_past(&self) -> usize {
        // SAFETY: ctx is valid; the memory handle belongs to it; -1 means empty.
        let max = unsafe { sys::llama_memory_seq_pos_max(sys::llama_get_memory(self.ctx), 0) };
        (max + 1).max(0) as usize
    }

    /// The sequence's state (its cache) as llama.cpp serialises it (`llama_state_seq_get_data`).
    pub fn state(&self) -> Result<Vec<u8>> {
        // SAFETY: ctx is valid; sequence 0 is the only one.
        let size = unsafe { sys::llama_state_seq_get_size(self.ctx, 0) };
        ensure!(size > 0, "llama.cpp reports an empty sequence state");
        let mut buf = vec![0u8; size];
        // SAFETY: buf has room for `size` bytes, the size llama.cpp just reported.
        let written = unsafe { sys::llama_state_seq_get_data(self.ctx, buf.as_mut_ptr(), size, 0) };
        ensure!(
            written == size,
            "llama.cpp wrote {written} bytes of sequence state, expected {size}"
        );
        Ok(buf)
    }

    /// Restores a state [`LlamaContext::state`] returned (on a context with the same parameters).
    pub fn set_state(&mut self, state: &[u8]) -> Result<()> {
        // SAFETY: ctx is valid; llama.cpp reads at most `state.len()` bytes from the slice.
        let read =
            unsafe { sys::llama_state_seq_set_data(self.ctx, state.as_ptr(), state.len(), 0) };
        ensure!(read > 0, "llama.cpp could not restore the sequence state");
        ensure!(
            self.n_past() > 0,
            "llama.cpp restored a sequence state without its tokens"
        );
        Ok(())
    }

    /// Processes `tokens` after the ones already decoded, `n_batch` per call, computing the last position's
    /// logits of each call (as llama-bench's prompt and generation tests do), and waits for the result.
    pub fn decode(&mut self, tokens: &[i32]) -> Result<()> {
        for part in tokens.chunks((self.params.n_batch as usize).max(1)) {
            let mut part = part.to_vec();
            // SAFETY: the batch points into `part`, which outlives the decode call; positions follow the memory.
            let rc = unsafe {
                let batch = sys::llama_batch_get_one(part.as_mut_ptr(), part.len() as i32);
                let rc = sys::llama_decode(self.ctx, batch);
                sys::llama_synchronize(self.ctx);
                rc
            };
            ensure!(rc == 0, "llama_decode failed with code {rc}");
        }
        Ok(())
    }

    /// Logits of every position (`tokens.len()` rows of `n_vocab`), from position 0, feeding `chunk` tokens per
    /// `llama_decode` call (1 = token by token).
    pub fn logits(&mut self, tokens: &[i32], chunk: usize) -> Result<Vec<Vec<f32>>> {
        self.clear();
        let mut rows = Vec::with_capacity(tokens.len());
        for (i, part) in tokens.chunks(chunk.max(1)).enumerate() {
            rows.extend(self.decode_at(part, (i * chunk.max(1)) as i32, true)?);
        }
        Ok(rows)
    }

    /// Logits of every position from position 0, feeding `tokens` in `llama_decode` calls of the sizes `calls` (which
    /// must add up to `tokens.len()`): the same micro-batches as an engine fed the same calls.
    pub fn logits_in_calls(&mut self, tokens: &[i32], calls: &[usize]) -> Result<Vec<Vec<f32>>> {
        ensure!(
            calls.iter().sum::<usize>() == tokens.len(),
            "calls of {calls:?} tokens do not add up to the {} tokens",
            tokens.len()
        );
        self.clear();
        let mut rows = Vec::with_capacity(tokens.len());
        let mut at = 0;
        for &n in calls {
            rows.extend(self.decode_at(&tokens[at..at + n], at as i32, true)?);
            at += n;
        }
        Ok(rows)
    }

    /// Feeds `tokens` one at a time after the `pos0` tokens already processed, asking for the last logits only
    /// (how generation runs; for speed measurements).
    pub fn decode_one_by_one(&mut self, tokens: &[i32], pos0: usize) -> Result<()> {
        for (i, &t) in tokens.iter().enumerate() {
            self.decode_at(&[t], (pos0 + i) as i32, false)?;
        }
        Ok(())
    }

    /// `n` greedily generated tokens after `prompt` (argmax, lowest id on ties).
    pub fn greedy(&mut self, prompt: &[i32], n: usize) -> Result<Vec<i32>> {
        ensure!(
            !prompt.is_empty(),
            "greedy needs a prompt of at least one token"
        );
        self.clear();
        let mut pos = 0;
        for part in prompt.chunks(self.params.n_batch as usize) {
            self.decode_at(part, pos, false)?;
            pos += part.len() as i32;
        }
        let mut last = self.logits_ith(-1)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let next = argmax(&last) as i32;
            out.push(next);
            if out.len() == n {
                break;
            }
            self.decode_at(&[next], pos, false)?;
            pos += 1;
            last = self.logits_ith(-1)?;
        }
        Ok(out)
    }

    /// Feeds `tokens` at positions `pos0..`; returns every token's logits when `all`, else requests only the last.
    fn decode_at(&mut self, tokens: &[i32], pos0: i32, all: bool) -> Result<Vec<Vec<f32>>> {
        let n = tokens.len();
        ensure!(
            n > 0 && n <= self.params.n_batch as usize,
            "decode of {n} tokens with n_batch {}",
            self.params.n_batch
        );
        // SAFETY: allocates a batch for n tokens and one sequence id each; freed below on every path.
        let batch = unsafe { sys::llama_batch_init(n as i32, 0, 1) };
        // SAFETY: the batch arrays have room for n entries (allocated above); seq_id[i] points to room for 1 id.
        unsafe {
            for (i, &t) in tokens.iter().enumerate() {
                *batch.token.add(i) = t;
                *batch.pos.add(i) = pos0 + i as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = 0;
                *batch.logits.add(i) = i8::from(all || i + 1 == n);
            }
        }
        let batch = sys::llama_batch {
            n_tokens: n as i32,
            ..batch
        };
        // SAFETY: ctx is valid and the batch is fully initialised for n_tokens entries.
        let rc = unsafe { sys::llama_decode(self.ctx, batch) };
        let mut rows = Vec::new();
        if rc == 0 && all {
            for i in 0..n {
                rows.push(self.logits_ith(i as i32)?);
            }
        }
        // SAFETY: the batch came from llama_batch_init and is freed exactly once.
        unsafe { sys::llama_batch_free(batch) };
        ensure!(
            rc == 0,
            "llama_decode failed with {rc} at positions {pos0}..{}",
            pos0 + n as i32
        );
        Ok(rows)
    }

    fn logits_ith(&self, i: i32) -> Result<Vec<f32>> {
        // SAFETY: ctx is valid; llama.cpp returns NULL for an output that was not requested.
        let p = unsafe { sys::llama_get_logits_ith(self.ctx, i) };
        ensure!(!p.is_null(), "llama.cpp has no logits for batch index {i}");
        // SAFETY: a non-null row holds n_vocab floats owned by the context, valid until the next decode.
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab()) }.to_vec())
    }
}

impl Drop for LlamaContext {
    fn drop(&mut self) {
        // SAFETY: created in `new`, freed once, before its model (whose handle is dropped after this).
        unsafe { sys::llama_free(self.ctx) };
    }
}
