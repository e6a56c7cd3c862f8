//! llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs): the reference blocks ferrite's
//! quantize is checked against.

use std::ffi::CString;
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;

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
    super::init();
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
