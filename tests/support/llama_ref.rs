//! llama.cpp run in-process through the `llama_*` C API: the reference every model parity test compares against.
//! CPU only, model memory-mapped, F32 K/V cache, flash attention off, logits for every token.

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::Once;

use anyhow::{bail, ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

/// Context settings of the reference.
#[derive(Clone, Copy, Debug)]
pub struct LlamaParams {
    pub n_ctx: u32,
    /// Most tokens one `llama_decode` call takes (the harness never passes more than this).
    pub n_batch: u32,
    /// Micro-batch size llama.cpp splits a decode call into.
    pub n_ubatch: u32,
    pub n_threads: i32,
    /// Keep the whole context in the raw window cache (llama.cpp's C default) instead of the window only.
    pub swa_full: bool,
    /// Let llama.cpp repack weights into its CPU "extra buffer types" (interleaved Q4_0/Q4_K/Q8_0/... kernels).
    /// Off by default: the reference then runs ggml's plain CPU kernels.
    pub repack: bool,
    /// Store the K/V cache in F16 (llama.cpp's default) instead of F32.
    pub cache_f16: bool,
}

impl Default for LlamaParams {
    fn default() -> Self {
        LlamaParams {
            n_ctx: 1024,
            n_batch: 512,
            n_ubatch: 512,
            // Tests run in parallel on a 2-core machine and ggml's threads spin while they wait: one each.
            n_threads: 1,
            swa_full: false,
            repack: false,
            cache_f16: false,
        }
    }
}

/// A loaded model and one context. Not `Send`: use it on the thread that made it.
pub struct LlamaRef {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    vocab: *const sys::llama_vocab,
    n_vocab: usize,
    params: LlamaParams,
}

static INIT: Once = Once::new();

unsafe extern "C" fn silent_log(
    _level: sys::ggml_log_level,
    _text: *const c_char,
    _user: *mut c_void,
) {
}

/// `llama_backend_init` once per process; llama.cpp's log is silenced unless FERRITE_LLAMA_LOG=1.
fn init_backend() {
    INIT.call_once(|| {
        if std::env::var("FERRITE_LLAMA_LOG").as_deref() != Ok("1") {
            // SAFETY: the callback is a plain function that ignores its arguments and lives for the whole process.
            unsafe { sys::llama_log_set(Some(silent_log), std::ptr::null_mut()) };
        }
        // SAFETY: called exactly once per process, before any model is loaded.
        unsafe { sys::llama_backend_init() };
    });
}

impl LlamaRef {
    /// Loads `path` (CPU, mmap) and creates a context with `params`, F32 K/V cache and flash attention disabled.
    pub fn load(path: &Path, params: LlamaParams) -> Result<LlamaRef> {
        init_backend();
        let c_path = CString::new(path.to_str().context("model path is not UTF-8")?)?;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = 0;
        mp.load_mode = sys::LLAMA_LOAD_MODE_MMAP;
        mp.use_extra_bufts = params.repack;
        // SAFETY: c_path is a valid NUL-terminated path that outlives the call; mp is fully initialised.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        ensure!(
            !model.is_null(),
            "llama.cpp could not load {} (FERRITE_LLAMA_LOG=1 shows why)",
            path.display()
        );

        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch;
        cp.n_seq_max = 1;
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads;
        let cache_type = if params.cache_f16 {
            sys::GGML_TYPE_F16
        } else {
            sys::GGML_TYPE_F32
        };
        cp.type_k = cache_type;
        cp.type_v = cache_type;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.swa_full = params.swa_full;
        cp.no_perf = true;
        // SAFETY: model is a valid model from llama_model_load_from_file; cp is fully initialised.
        let ctx = unsafe { sys::llama_init_from_model(model, cp) };
        if ctx.is_null() {
            // SAFETY: model is valid and owned here; nothing else refers to it.
            unsafe { sys::llama_model_free(model) };
            bail!(
                "llama.cpp could not create a context for {}",
                path.display()
            );
        }
        // SAFETY: model is valid; the vocab lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        // SAFETY: vocab is valid (see above).
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) } as usize;
        Ok(LlamaRef {
            model,
            ctx,
            vocab,
            n_vocab,
            params,
        })
    }

    /// Loads only the vocabulary of `path` (`llama_model_params.vocab_only`, as llama-tokenize does): no weights,
    /// no context. Only `n_vocab`, `tokenize`, `token_to_piece`, `detokenize` and `bos_eos` may be called on it.
    pub fn load_vocab_only(path: &Path) -> Result<LlamaRef> {
        init_backend();
        let c_path = CString::new(path.to_str().context("model path is not UTF-8")?)?;
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.vocab_only = true;
        mp.n_gpu_layers = 0;
        // SAFETY: c_path is a valid NUL-terminated path that outlives the call; mp is fully initialised.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        ensure!(
            !model.is_null(),
            "llama.cpp could not load the vocabulary of {} (FERRITE_LLAMA_LOG=1 shows why)",
            path.display()
        );
        // SAFETY: model is valid; the vocab lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        // SAFETY: vocab is valid (see above).
        let n_vocab = unsafe { sys::llama_vocab_n_tokens(vocab) } as usize;
        Ok(LlamaRef {
            model,
            ctx: std::ptr::null_mut(),
            vocab,
            n_vocab,
            params: LlamaParams::default(),
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Forgets every cached token (the next call starts at position 0).
    pub fn reset(&mut self) {
        // SAFETY: ctx is valid; the memory handle belongs to it.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
    }

    /// Logits of every position (`tokens.len()` rows of `n_vocab`), from position 0, feeding `chunk` tokens per
    /// `llama_decode` call (1 = token by token).
    pub fn logits(&mut self, tokens: &[i32], chunk: usize) -> Result<Vec<Vec<f32>>> {
        self.reset();
        let mut rows = Vec::with_capacity(tokens.len());
        for (i, part) in tokens.chunks(chunk.max(1)).enumerate() {
            rows.extend(self.decode(part, (i * chunk.max(1)) as i32, true)?);
        }
        Ok(rows)
    }

    /// Feeds `tokens` one at a time after the `pos0` tokens already processed, asking for the last logits only
    /// (how generation runs; for speed measurements).
    pub fn decode_one_by_one(&mut self, tokens: &[i32], pos0: usize) -> Result<()> {
        for (i, &t) in tokens.iter().enumerate() {
            self.decode(&[t], (pos0 + i) as i32, false)?;
        }
        Ok(())
    }

    /// `n` greedily generated tokens after `prompt` (argmax, lowest id on ties).
    pub fn greedy(&mut self, prompt: &[i32], n: usize) -> Result<Vec<i32>> {
        ensure!(
            !prompt.is_empty(),
            "greedy needs a prompt of at least one token"
        );
        self.reset();
        let mut pos = 0;
        for part in prompt.chunks(self.params.n_batch as usize) {
            self.decode(part, pos, false)?;
            pos += part.len() as i32;
        }
        let mut last = self.last_logits()?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let next = argmax(&last) as i32;
            out.push(next);
            if out.len() == n {
                break;
            }
            self.decode(&[next], pos, false)?;
            pos += 1;
            last = self.last_logits()?;
        }
        Ok(out)
    }

    /// Feeds `tokens` at positions `pos0..`; returns every token's logits when `all`, else requests only the last.
    fn decode(&mut self, tokens: &[i32], pos0: i32, all: bool) -> Result<Vec<Vec<f32>>> {
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

    fn last_logits(&self) -> Result<Vec<f32>> {
        self.logits_ith(-1)
    }

    fn logits_ith(&self, i: i32) -> Result<Vec<f32>> {
        // SAFETY: ctx is valid; llama.cpp returns NULL for an output that was not requested.
        let p = unsafe { sys::llama_get_logits_ith(self.ctx, i) };
        ensure!(!p.is_null(), "llama.cpp has no logits for batch index {i}");
        // SAFETY: a non-null row holds n_vocab floats owned by the context, valid until the next decode.
        Ok(unsafe { std::slice::from_raw_parts(p, self.n_vocab) }.to_vec())
    }

    /// `llama_tokenize` without adding BOS; `parse_special` lets control tokens be matched in the text.
    pub fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<i32>> {
        let mut buf = vec![0i32; text.len() + 8];
        // SAFETY: text points to text.len() bytes; buf has room for buf.len() tokens.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab,
                text.as_ptr().cast(),
                text.len() as i32,
                buf.as_mut_ptr(),
                buf.len() as i32,
                false,
                parse_special,
            )
        };
        ensure!(n >= 0, "llama_tokenize needs {} token slots", -n);
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// The bytes of one token (`special`: render control tokens too).
    pub fn token_to_piece(&self, token: i32, special: bool) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf has room for buf.len() bytes; the vocab is valid.
        let n = unsafe {
            sys::llama_token_to_piece(
                self.vocab,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                special,
            )
        };
        ensure!(n >= 0, "token {token} needs a piece buffer of {} bytes", -n);
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// The concatenated pieces of `tokens`.
    pub fn detokenize(&self, tokens: &[i32], special: bool) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &t in tokens {
            out.extend(self.token_to_piece(t, special)?);
        }
        Ok(out)
    }

    /// BOS and EOS ids of the vocabulary (-1 when absent).
    pub fn bos_eos(&self) -> (i32, i32) {
        // SAFETY: the vocab is valid.
        unsafe {
            (
                sys::llama_vocab_bos(self.vocab),
                sys::llama_vocab_eos(self.vocab),
            )
        }
    }
}

impl Drop for LlamaRef {
    fn drop(&mut self) {
        // SAFETY: ctx (null for a vocabulary-only load) and model were created in `load` or `load_vocab_only`, are
        // freed once, context before model.
        unsafe {
            if !self.ctx.is_null() {
                sys::llama_free(self.ctx);
            }
            sys::llama_model_free(self.model);
        }
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs) from `input` to `output` as `ftype`
/// (a `llama_ftype` value). `pure`: every quantizable tensor gets the ftype's base type (no mixtures). `imatrix`:
/// per-tensor importance weights (n_per_row x n_mat values each), as llama-quantize passes them.
pub fn llama_quantize(
    input: &Path,
    output: &Path,
    ftype: u32,
    n_threads: i32,
    pure: bool,
    imatrix: &[(String, Vec<f32>)],
) -> Result<()> {
    init_backend();
    let c_in = CString::new(input.to_str().context("path is not UTF-8")?)?;
    let c_out = CString::new(output.to_str().context("path is not UTF-8")?)?;
    let names: Vec<CString> = imatrix
        .iter()
        .map(|(n, _)| CString::new(n.as_str()))
        .collect::<Result<_, _>>()?;
    let mut entries: Vec<sys::llama_model_imatrix_data> = names
        .iter()
        .zip(imatrix)
        .map(|(n, (_, v))| sys::llama_model_imatrix_data {
            name: n.as_ptr(),
            data: v.as_ptr(),
            size: v.len(),
        })
        .collect();
    // The list ends at an entry without a name.
    entries.push(sys::llama_model_imatrix_data {
        name: std::ptr::null(),
        data: std::ptr::null(),
        size: 0,
    });
    // SAFETY: returns a plain struct of defaults.
    let mut p = unsafe { sys::llama_model_quantize_default_params() };
    p.nthread = n_threads;
    p.ftype = ftype as _;
    p.pure_ = pure;
    if !imatrix.is_empty() {
        p.imatrix = entries.as_ptr();
    }
    // SAFETY: both paths are valid NUL-terminated strings and the imatrix entries (names and data) outlive the call;
    // the list is terminated by a null name; p is fully initialised.
    let rc = unsafe { sys::llama_model_quantize(c_in.as_ptr(), c_out.as_ptr(), &p) };
    ensure!(
        rc == 0,
        "llama_model_quantize failed with {rc} (FERRITE_LLAMA_LOG=1 shows why)"
    );
    Ok(())
}
