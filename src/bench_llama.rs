//! llama.cpp, run in-process through the `llama_*` C API of the linked `llama-cpp-sys-2` crate, as the **benchmark
//! reference** of `ferrite bench --vs-llama`. Nothing else in ferrite's product code may call `llama_*` (the rule:
//! llama.cpp is the reference for tests and benchmarks only); ferrite's own engine never goes through here.
//!
//! The settings mirror `llama-bench` on the CPU with ferrite's defaults: no GPU layers, weights memory-mapped, the
//! requested thread count for prompt and generation, F16 or F32 K/V cache, flash attention off, and llama.cpp's
//! CPU weight repacking ("extra buffer types") only when asked for, so by default both engines run ggml's plain
//! CPU kernels on the same bytes.

use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{bail, ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

static INIT: Once = Once::new();
/// Whether llama.cpp's log is shown (see [`show_log`]).
static SHOW_LOG: AtomicBool = AtomicBool::new(false);

/// Shows llama.cpp's log (silenced by default) from the first model loaded on; the CLI sets it from
/// `FERRITE_LLAMA_LOG=1`.
pub fn show_log(on: bool) {
    SHOW_LOG.store(on, Ordering::Relaxed);
}

unsafe extern "C" fn quiet_log(
    _level: sys::ggml_log_level,
    _text: *const c_char,
    _user: *mut c_void,
) {
}

/// `llama_backend_init` once per process; llama.cpp's log is silenced unless [`show_log`] asked for it.
fn init() {
    INIT.call_once(|| {
        if !SHOW_LOG.load(Ordering::Relaxed) {
            // SAFETY: the callback ignores its arguments and is a plain function that lives for the whole process.
            unsafe { sys::llama_log_set(Some(quiet_log), std::ptr::null_mut()) };
        }
        // SAFETY: called once per process, before any model is loaded.
        unsafe { sys::llama_backend_init() };
    });
}

/// A model loaded by llama.cpp (CPU, memory-mapped). Not `Send`: use it on the thread that loaded it.
pub struct LlamaModel {
    model: *mut sys::llama_model,
    vocab: *const sys::llama_vocab,
}

/// Context settings for one benchmark test.
#[derive(Clone, Copy, Debug)]
pub struct LlamaContextParams {
    pub n_ctx: u32,
    /// Most tokens one decode call takes.
    pub n_batch: u32,
    /// Tokens per graph computation.
    pub n_ubatch: u32,
    pub n_threads: i32,
    /// F16 K/V cache (llama.cpp's default) instead of F32.
    pub cache_f16: bool,
}

impl LlamaModel {
    /// Loads `path` for the CPU with memory mapping; `repack` lets llama.cpp repack weights for its interleaved
    /// CPU kernels (llama-bench's default), which ferrite does not do.
    pub fn load(path: &Path, repack: bool) -> Result<LlamaModel> {
        init();
        let c_path = CString::new(
            path.to_str()
                .context("the model path is not UTF-8 (llama.cpp needs a UTF-8 path)")?,
        )?;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = 0;
        mp.load_mode = sys::LLAMA_LOAD_MODE_MMAP;
        mp.use_extra_bufts = repack;
        // SAFETY: c_path is NUL-terminated and outlives the call; mp is fully initialised.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        ensure!(
            !model.is_null(),
            "llama.cpp could not load {} (FERRITE_LLAMA_LOG=1 shows why)",
            path.display()
        );
        // SAFETY: model is valid; its vocabulary lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        Ok(LlamaModel { model, vocab })
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocabulary is valid while the model is.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) }.max(0) as usize
    }

    /// Whether llama.cpp starts a prompt with BOS for this vocabulary, and the BOS id.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: the vocabulary is valid while the model is.
        let (add, bos) = unsafe {
            (
                sys::llama_vocab_get_add_bos(self.vocab),
                sys::llama_vocab_bos(self.vocab),
            )
        };
        (add && bos >= 0).then_some(bos)
    }

    /// A context for one test.
    pub fn context(&self, p: LlamaContextParams) -> Result<LlamaContext<'_>> {
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch;
        cp.n_ubatch = p.n_ubatch;
        cp.n_seq_max = 1;
        cp.n_threads = p.n_threads;
        cp.n_threads_batch = p.n_threads;
        let ty = if p.cache_f16 {
            sys::GGML_TYPE_F16
        } else {
            sys::GGML_TYPE_F32
        };
        cp.type_k = ty;
        cp.type_v = ty;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.no_perf = true;
        // SAFETY: the model is valid; cp is fully initialised.
        let ctx = unsafe { sys::llama_init_from_model(self.model, cp) };
        if ctx.is_null() {
            bail!(
                "llama.cpp could not create a context of {} tokens (FERRITE_LLAMA_LOG=1 shows why)",
                p.n_ctx
            );
        }
        Ok(LlamaContext {
            ctx,
            n_batch: p.n_batch as usize,
            _model: PhantomData,
        })
    }
}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: created in `load`, freed once; contexts borrow the model, so none is alive here.
        unsafe { sys::llama_model_free(self.model) };
    }
}

/// One llama.cpp context (one sequence).
pub struct LlamaContext<'m> {
    ctx: *mut sys::llama_context,
    n_batch: usize,
    _model: PhantomData<&'m LlamaModel>,
}

impl LlamaContext<'_> {
    /// The context size llama.cpp allocated (it rounds the request up).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: ctx is valid.
        unsafe { sys::llama_n_ctx(self.ctx) as usize }
    }

    /// Forgets every token (the next decode starts at position 0).
    pub fn clear(&mut self) {
        // SAFETY: ctx is valid; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), false) };
    }

    /// Processes `tokens` after the ones already decoded, `n_batch` per call, computing the last position's
    /// logits of each call (as llama-bench's prompt and generation tests do), and waits for the result.
    pub fn decode(&mut self, tokens: &[i32]) -> Result<()> {
        for part in tokens.chunks(self.n_batch.max(1)) {
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
}

impl Drop for LlamaContext<'_> {
    fn drop(&mut self) {
        // SAFETY: created in `LlamaModel::context`, freed once, before its model (it borrows the model).
        unsafe { sys::llama_free(self.ctx) };
    }
}
