//! llama.cpp, run in-process through the `llama_*` C API of the linked `llama-cpp-sys-2` crate: the **reference**
//! of `ferrite bench --vs-llama` and of the parity tests (logits, greedy tokens, tokenizer, quantizer). Nothing else
//! in ferrite may call `llama_*` (the rule: llama.cpp is the reference for tests and benchmarks only); ferrite's own
//! engine never goes through here.
//!
//! The settings mirror `llama-bench` on the CPU: no GPU layers (and no device at all, so no op offload either),
//! weights memory-mapped, the requested thread count for prompt and generation, F16 or F32 K/V cache, flash
//! attention off, and llama.cpp's CPU weight repacking ("extra buffer types") only when asked for, so by default
//! both engines run ggml's plain CPU kernels on the same bytes. [`LlamaModel::load_placed`] gives llama.cpp devices,
//! `-ngl` and `-ot` rules instead (`bench --vs-llama` passes ferrite's placement).

use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

mod context;
mod quantize;

pub use context::LlamaContext;
pub use quantize::llama_quantize;

static INIT: Once = Once::new();
/// Whether llama.cpp's log is shown (see [`show_log`]).
static SHOW_LOG: AtomicBool = AtomicBool::new(false);

/// Shows llama.cpp's log (silenced by default) from the first model loaded on; `ferrite bench` sets it from
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

/// Context settings.
#[derive(Clone, Copy, Debug)]
pub struct LlamaParams {
    pub n_ctx: u32,
    /// Most tokens one `llama_decode` call takes.
    pub n_batch: u32,
    /// Micro-batch size llama.cpp splits a decode call into.
    pub n_ubatch: u32,
    /// Threads for prompt and generation.
    pub n_threads: i32,
    /// Keep the whole context in the raw window cache (llama.cpp's C default) instead of the window only.
    pub swa_full: bool,
    /// Let llama.cpp repack weights into its CPU "extra buffer types" (interleaved Q4_0/Q4_K/Q8_0/... kernels): a
    /// setting of the model, read by [`LlamaContext::load`] ([`LlamaModel::context`] keeps the model's).
    pub repack: bool,
    /// Store the K/V cache in F16 (llama.cpp's default) instead of F32.
    pub cache_f16: bool,
    /// Store the K/V cache in Q8_0 (overrides `cache_f16`) with flash attention on, which llama.cpp requires for
    /// a quantized cache.
    pub cache_q8_0: bool,
    /// Store the K/V cache in Q4_0 (overrides the others), with flash attention on.
    pub cache_q4_0: bool,
}

impl Default for LlamaParams {
    /// The parity tests' settings: 1024 tokens, one thread (tests run in parallel and ggml's threads spin while they
    /// wait), no repacking, F32 cache.
    fn default() -> Self {
        LlamaParams {
            n_ctx: 1024,
            n_batch: 512,
            n_ubatch: 512,
            n_threads: 1,
            swa_full: false,
            repack: false,
            cache_f16: false,
            cache_q8_0: false,
            cache_q4_0: false,
        }
    }
}

/// Where llama.cpp puts the weights: its model parameters `devices`, `n_gpu_layers` and `tensor_buft_overrides`
/// (llama.cpp's `--device`, `-ngl`, `-ot`). The default: the CPU only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LlamaPlacement {
    /// Devices to offload to, by ggml name (`CUDA0`, `RPC0`); none: no device at all.
    pub devices: Vec<String>,
    /// Layers on the devices, the output head counting as the last one (llama.cpp's `-ngl`).
    pub n_gpu_layers: i32,
    /// `-ot` rules, first match wins: a regular expression on tensor names and the device (or `CPU`) it sends
    /// them to.
    pub overrides: Vec<(String, String)>,
}

impl std::fmt::Display for LlamaPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.devices.is_empty() {
            return write!(f, "--device none -ngl 0");
        }
        write!(
            f,
            "--device {} -ngl {}",
            self.devices.join(","),
            self.n_gpu_layers
        )?;
        for (pattern, to) in &self.overrides {
            write!(f, " -ot {pattern}={to}")?;
        }
        Ok(())
    }
}

/// The `-ot`-style rule that keeps the CPU layers' `attn_output_a` out of ggml's AMX buffers when llama.cpp repacks
/// on a CPU that has them (None elsewhere: the rule is not needed).
///
/// llama.cpp (the pinned version) creates `attn_output_a` 3-D, `{H·Dh/G, o_lora, G}`, and its loader gives it to
/// AMX whenever `o_lora` is a multiple of 32 (Flash's 1024). The product that reads it has a permuted activation,
/// which AMX's kernels refuse, and no other backend may compute from an AMX buffer: llama.cpp then aborts building
/// its first graph (`GGML_ASSERT(*cur_backend_id != -1)` in ggml-backend.cpp), taking the process with it. A rule
/// to `CPU` (llama.cpp's `-ot attn_output_a=CPU`) does not help: llama.cpp chooses among the extra types again for
/// it. So the reference keeps these weights in a plain host buffer ([`plain_host_buffer_type`]), which is what
/// ferrite does with them: it never repacks `attn_output_a`. Every other weight is placed as llama.cpp places it.
fn amx_output_a_rule(path: &Path, placement: &LlamaPlacement) -> Result<Option<String>> {
    if crate::ggml::RepackType::amx().is_none() {
        return Ok(None);
    }
    if placement.devices.is_empty() || placement.n_gpu_layers <= 0 {
        return Ok(Some(output_a_pattern(None)));
    }
    let file = gguf::GgufFile::open(path)?;
    let meta = file.metadata();
    let arch = meta.str("general.architecture")?;
    let n_layer = meta.u32(&format!("{arch}.block_count"))? as i32;
    Ok(cpu_layers(n_layer, placement.n_gpu_layers).map(|n| output_a_pattern(Some(n))))
}

/// How many of the first layers llama.cpp leaves on the CPU with `-ngl n_gpu_layers` and devices
/// (`llama_model::load_tensors`: the last `-ngl` of the layers and the output head go to the devices); None: none.
fn cpu_layers(n_layer: i32, n_gpu_layers: i32) -> Option<i32> {
    let n = (n_layer + 1 - n_gpu_layers).clamp(0, n_layer);
    (n > 0).then_some(n)
}

/// The rule's pattern: `attn_output_a` of every layer, or of the first `n`.
fn output_a_pattern(first: Option<i32>) -> String {
    match first {
        None => r"^blk\.\d+\.attn_output_a\.".into(),
        Some(n) => {
            let layers: Vec<String> = (0..n).map(|l| l.to_string()).collect();
            format!(r"^blk\.({})\.attn_output_a\.", layers.join("|"))
        }
    }
}

/// ggml's buffer type for plain host memory that is not the CPU device's own (`CPU_Mapped`, the type of
/// `ggml_backend_cpu_buffer_from_ptr` buffers): llama.cpp's loader uses a rule's buffer type as it is unless it is
/// the CPU's, and the CPU backend computes from any host buffer with its plain kernels.
fn plain_host_buffer_type() -> sys::ggml_backend_buffer_type_t {
    #[repr(align(64))]
    struct Area([u8; 64]);
    let mut area = Box::new(Area([0; 64]));
    // SAFETY: an aligned area of 64 bytes that outlives the buffer, which is freed at once; the buffer type is a
    // static object of ggml's, valid for the life of the process.
    unsafe {
        let buf = sys::ggml_backend_cpu_buffer_from_ptr(area.0.as_mut_ptr().cast(), area.0.len());
        let buft = sys::ggml_backend_buffer_get_type(buf);
        sys::ggml_backend_buffer_free(buf);
        buft
    }
}

/// A `llama_model` freed on drop, shared by the model handle and its contexts.
struct RawModel(*mut sys::llama_model);

impl Drop for RawModel {
    fn drop(&mut self) {
        // SAFETY: created by llama_model_load_from_file and freed once, after every context (each holds a reference).
        unsafe { sys::llama_model_free(self.0) };
    }
}

/// A model loaded by llama.cpp (CPU, memory-mapped), or only its vocabulary. Not `Send`: use it on the thread that
/// loaded it.
pub struct LlamaModel {
    raw: Rc<RawModel>,
    vocab: *const sys::llama_vocab,
    /// The CPU layers' `attn_output_a` are kept out of AMX (see [`amx_output_a_rule`]).
    output_a_plain: bool,
}

impl LlamaModel {
    /// Loads `path` for the CPU with memory mapping; `repack` lets llama.cpp repack weights for its interleaved
    /// CPU kernels (llama-bench's default; ferrite's too).
    pub fn load(path: &Path, repack: bool) -> Result<LlamaModel> {
        LlamaModel::load_placed(path, repack, &LlamaPlacement::default())
    }

    /// [`LlamaModel::load`] with the weights placed on devices as `placement` says (device names as ggml's
    /// registry has them, e.g. after ferrite loaded a backend module or added RPC servers).
    pub fn load_placed(
        path: &Path,
        repack: bool,
        placement: &LlamaPlacement,
    ) -> Result<LlamaModel> {
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.load_mode = sys::LLAMA_LOAD_MODE_MMAP;
        mp.use_extra_bufts = repack;
        // The device list (NULL-terminated; an empty one means no device, where NULL would mean every GPU).
        let mut devices: Vec<sys::ggml_backend_dev_t> = Vec::new();
        for name in &placement.devices {
            let c = std::ffi::CString::new(name.as_str())?;
            // SAFETY: a NUL-terminated name; returns a registered device or NULL.
            let dev = unsafe { sys::ggml_backend_dev_by_name(c.as_ptr()) };
            ensure!(!dev.is_null(), "llama.cpp: no device named {name}");
            devices.push(dev);
        }
        devices.push(std::ptr::null_mut());
        mp.devices = devices.as_mut_ptr();
        mp.n_gpu_layers = if placement.devices.is_empty() {
            0
        } else {
            placement.n_gpu_layers
        };
        // The placement's rules, then (where they apply) the AMX rule: first match wins.
        let mut rules: Vec<(String, sys::ggml_backend_buffer_type_t)> = Vec::new();
        for (pattern, to) in &placement.overrides {
            let c = std::ffi::CString::new(to.as_str())?;
            // SAFETY: a NUL-terminated name; returns a registered device or NULL.
            let dev = unsafe { sys::ggml_backend_dev_by_name(c.as_ptr()) };
            ensure!(!dev.is_null(), "llama.cpp: -ot names no device {to}");
            // SAFETY: a registered device; its buffer type lives as long as the device.
            rules.push((pattern.clone(), unsafe {
                sys::ggml_backend_dev_buffer_type(dev)
            }));
        }
        let amx_rule = match repack {
            true => amx_output_a_rule(path, placement)?,
            false => None,
        };
        let output_a_plain = amx_rule.is_some();
        if let Some(pattern) = amx_rule {
            rules.push((pattern, plain_host_buffer_type()));
        }
        let patterns: Vec<std::ffi::CString> = rules
            .iter()
            .map(|(p, _)| std::ffi::CString::new(p.as_str()))
            .collect::<Result<_, _>>()?;
        let mut overrides: Vec<sys::llama_model_tensor_buft_override> = rules
            .iter()
            .zip(&patterns)
            .map(
                |(&(_, buft), pattern)| sys::llama_model_tensor_buft_override {
                    pattern: pattern.as_ptr(),
                    buft,
                },
            )
            .collect();
        overrides.push(sys::llama_model_tensor_buft_override {
            pattern: std::ptr::null(),
            buft: std::ptr::null_mut(),
        });
        if rules.is_empty() {
            mp.tensor_buft_overrides = std::ptr::null();
        } else {
            mp.tensor_buft_overrides = overrides.as_ptr();
        }
        // `devices`, `patterns` and `overrides` outlive the load, which is all that reads them.
        let mut model = LlamaModel::load_with(path, mp, "")?;
        model.output_a_plain = output_a_plain;
        Ok(model)
    }

    /// Whether llama.cpp keeps the CPU layers' `attn_output_a` in a plain buffer where it would have put them in
    /// AMX and aborted (repacking on a CPU with AMX; see [`amx_output_a_rule`]).
    pub fn keeps_output_a_plain(&self) -> bool {
        self.output_a_plain
    }

    /// Loads only the vocabulary of `path` (`llama_model_params.vocab_only`, as llama-tokenize does): no weights,
    /// so no context; the vocabulary calls work.
    pub fn load_vocab_only(path: &Path) -> Result<LlamaModel> {
        // SAFETY: returns a plain struct of defaults.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.vocab_only = true;
        mp.n_gpu_layers = 0;
        LlamaModel::load_with(path, mp, "the vocabulary of ")
    }

    fn load_with(path: &Path, mp: sys::llama_model_params, what: &str) -> Result<LlamaModel> {
        init();
        let c_path = CString::new(
            path.to_str()
                .context("the model path is not UTF-8 (llama.cpp needs a UTF-8 path)")?,
        )?;
        // SAFETY: c_path is NUL-terminated and outlives the call; mp is fully initialised.
        let model = unsafe { sys::llama_model_load_from_file(c_path.as_ptr(), mp) };
        ensure!(
            !model.is_null(),
            "llama.cpp could not load {what}{} (FERRITE_LLAMA_LOG=1 shows why)",
            path.display()
        );
        // SAFETY: model is valid; its vocabulary lives as long as the model.
        let vocab = unsafe { sys::llama_model_get_vocab(model) };
        Ok(LlamaModel {
            raw: Rc::new(RawModel(model)),
            vocab,
            output_a_plain: false,
        })
    }

    /// Another handle on the same model (for a context, which keeps the model alive).
    fn share(&self) -> LlamaModel {
        LlamaModel {
            raw: Rc::clone(&self.raw),
            vocab: self.vocab,
            output_a_plain: self.output_a_plain,
        }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: the vocabulary is valid while the model is.
        unsafe { sys::llama_vocab_n_tokens(self.vocab) }.max(0) as usize
    }

    /// Whether llama.cpp starts a prompt with BOS for this vocabulary, and the BOS id.
    pub fn bos(&self) -> Option<i32> {
        // SAFETY: the vocabulary is valid while the model is.
        let add = unsafe { sys::llama_vocab_get_add_bos(self.vocab) };
        let (bos, _) = self.bos_eos();
        (add && bos >= 0).then_some(bos)
    }

    /// BOS and EOS ids of the vocabulary (-1 when absent).
    pub fn bos_eos(&self) -> (i32, i32) {
        // SAFETY: the vocabulary is valid while the model is.
        unsafe {
            (
                sys::llama_vocab_bos(self.vocab),
                sys::llama_vocab_eos(self.vocab),
            )
        }
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
        // SAFETY: buf has room for buf.len() bytes; the vocabulary is valid.
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

    /// A context (one sequence) on this model; `p.repack` is ignored (the model's setting stays).
    pub fn context(&self, p: LlamaParams) -> Result<LlamaContext> {
        LlamaContext::new(self.share(), p)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amx_rule_covers_the_layers_llama_cpp_keeps_on_the_cpu() {
        // 4 layers: -ngl 2 offloads layer 3 and the output head, -ngl 5 or more everything.
        assert_eq!(cpu_layers(4, 2), Some(3));
        assert_eq!(cpu_layers(4, 1), Some(4));
        assert_eq!(cpu_layers(4, 5), None);
        assert_eq!(cpu_layers(4, 99), None);
        assert_eq!(cpu_layers(4, 0), Some(4));
        let all = output_a_pattern(None);
        let first = output_a_pattern(Some(3));
        assert_eq!(first, r"^blk\.(0|1|2)\.attn_output_a\.");
        let re = |p: &str| regex::Regex::new(p).unwrap();
        for (name, in_all, in_first) in [
            ("blk.0.attn_output_a.weight", true, true),
            ("blk.2.attn_output_a.weight", true, true),
            ("blk.3.attn_output_a.weight", true, false),
            ("blk.12.attn_output_a.weight", true, false),
            ("blk.1.attn_output_b.weight", false, false),
        ] {
            assert_eq!(re(&all).is_match(name), in_all, "{name}");
            assert_eq!(re(&first).is_match(name), in_first, "{name}");
        }
    }
}
