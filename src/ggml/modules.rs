//! ggml backends loaded at run time from modules: shared libraries named `libggml-NAME.so` (or
//! `libggml-NAME-VARIANT.so`), built with ggml's `GGML_BACKEND_DL=ON` (`scripts/build-cuda.sh` builds
//! `libggml-cuda.so`). ferrite links ggml's CPU and RPC backends statically; a module adds its backend and devices to
//! the same registry, so they appear in `--list-devices` and in the placement like any other device.
//!
//! A module carries its own copy of `libggml-base.so` (ggml's tensors, graphs and buffer helpers), found beside it
//! through its run path. ggml keeps modules to that library: everything between ferrite and the module goes through
//! the backend interface's function tables and the plain `ggml_tensor` / `ggml_cgraph` structs, so the two copies
//! coexist when both are the same ggml (checked on load: version and tensor layout). A module's own log lines and
//! aborts go through its copy (to stderr), not through ferrite's handlers.
//!
//! Where modules come from, as llama.cpp's `ggml_backend_load_all` looks: the folder of the executable, and the
//! folders given with `--backend-dir`; `GGML_BACKEND_PATH` names one more module file. The current folder is not
//! searched (unlike llama.cpp): running ferrite in a downloaded folder must not run code from it.

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use super::devices::Device;
use super::error::{GgmlError, Result};
use super::types::cstr_lossy;

/// A backend loaded from a module file.
#[derive(Clone, Debug)]
pub struct LoadedBackend {
    /// The backend's registry name (`CUDA`, `Vulkan`, `RPC`, ...).
    pub name: String,
    /// The module file, as given (or found in its folder).
    pub path: PathBuf,
    /// Its devices (registered with ggml, so `Device::all` lists them).
    pub devices: Vec<Device>,
    reg: Reg,
}

impl LoadedBackend {
    /// The address of one of the backend's extra functions (`ggml_backend_reg_get_proc_address`), NULL when it has
    /// none of that name.
    pub fn proc_address(&self, name: &str) -> *mut c_void {
        let Ok(c) = CString::new(name) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a registration that lives for the whole program and a NUL-terminated name.
        unsafe { sys::ggml_backend_reg_get_proc_address(self.reg.0.as_ptr(), c.as_ptr()) }
    }

    /// The raw registration (for [`super::rpc::add_server_with`]).
    pub(super) fn reg(&self) -> sys::ggml_backend_reg_t {
        self.reg.0.as_ptr()
    }
}

/// A registration handle: ggml keeps loaded backends (and their libraries) for the whole program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reg(NonNull<sys::ggml_backend_reg>);
// SAFETY: a registration is an immutable descriptor owned by ggml's registry for the whole program.
unsafe impl Send for Reg {}
// SAFETY: as above.
unsafe impl Sync for Reg {}

/// What loading a folder did.
#[derive(Debug, Default)]
pub struct DirLoad {
    /// Modules loaded (or loaded before, from the same file).
    pub loaded: Vec<LoadedBackend>,
    /// Module files not loaded and why (a backend ferrite has built in, or one already loaded).
    pub skipped: Vec<(PathBuf, String)>,
    /// Module files that failed to load.
    pub failed: Vec<GgmlError>,
}

/// The modules loaded so far, by canonical path.
static LOADED: Mutex<BTreeMap<PathBuf, LoadedBackend>> = Mutex::new(BTreeMap::new());

fn module_error(path: &Path, detail: impl Into<String>, hint: impl Into<String>) -> GgmlError {
    GgmlError::Module {
        path: path.display().to_string(),
        detail: detail.into(),
        hint: hint.into(),
    }
}

/// The backend name a module file stands for: `libggml-cuda.so` and `libggml-cuda-sm90.so` give `cuda`. `None`
/// for anything else, ggml's own libraries (`libggml-base.so`, `libggml.so`) included.
pub fn module_name(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_prefix("libggml-")?.strip_suffix(".so")?;
    let name = stem.split('-').next().unwrap_or(stem);
    (!name.is_empty() && name != "base").then_some(name)
}

/// The folder of the running executable (where llama.cpp looks for its backend modules too).
pub fn executable_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = exe.canonicalize().unwrap_or(exe);
    exe.parent().map(Path::to_path_buf)
}

/// Loads the module `path` (explicitly asked for: every failure is an error with the reason and a hint). Loading a
/// file already loaded returns it again. The CPU backend cannot be loaded: ferrite has its own built in.
pub fn load_file(path: &Path) -> Result<LoadedBackend> {
    let meta = std::fs::metadata(path).map_err(|e| {
        module_error(
            path,
            format!("cannot read it: {e}"),
            "give the path of a ggml backend module (libggml-cuda.so, ...); scripts/build-cuda.sh builds one",
        )
    })?;
    if !meta.is_file() {
        return Err(module_error(
            path,
            "it is not a file",
            "give a module file (libggml-NAME.so); --backend-dir takes a folder of them",
        ));
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned());
    if file_name.as_deref().and_then(module_name) == Some("cpu") {
        return Err(module_error(
            path,
            "ferrite has ggml's CPU backend built in and cannot load another",
            "remove the CPU module from the folder, or build ferrite for another CPU instead",
        ));
    }
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = loaded.get(&canonical) {
        return Ok(known.clone());
    }
    // Kept open until ggml has its own handle, so the library (and the CUDA runtime it pulls in) loads once.
    let _checked = check_same_ggml(path)?;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| module_error(path, "the path contains NUL", "rename the file"))?;
    // SAFETY: a NUL-terminated path; ggml opens the library, calls its `ggml_backend_init` and registers the
    // backend and its devices, or logs why not and returns NULL.
    let (reg, log) = super::log::capture(|| unsafe { sys::ggml_backend_load(c.as_ptr()) });
    let Some(reg) = NonNull::new(reg) else {
        let why = log
            .lines()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let why = if why.is_empty() {
            "ggml gave no reason".to_string()
        } else {
            why.replace("ggml_backend_load_best: ", "")
                .replace("load_backend: ", "")
        };
        let hint = if why.contains("not supported on this system") {
            "this machine has no device for it (for CUDA: no NVIDIA driver, or no GPU it supports)"
        } else if why.contains("API version") {
            "build the module from the ggml source of the llama-cpp-sys-2 version this ferrite links (scripts/build-cuda.sh)"
        } else {
            "a missing library it needs (ldd shows which; for CUDA: libcudart, libcublas, the driver's libcuda), or not a ggml backend module"
        };
        return Err(module_error(path, why, hint));
    };
    let reg = Reg(reg);
    // SAFETY: a live registration; indices below its count give its devices.
    let n = unsafe { sys::ggml_backend_reg_dev_count(reg.0.as_ptr()) };
    let devices = (0..n)
        // SAFETY: as above; a device of a registered backend lives for the whole program.
        .filter_map(|i| unsafe {
            Device::from_raw(sys::ggml_backend_reg_dev_get(reg.0.as_ptr(), i))
        })
        .collect();
    let backend = LoadedBackend {
        // SAFETY: a registered backend with a static name.
        name: cstr_lossy(unsafe { sys::ggml_backend_reg_name(reg.0.as_ptr()) }),
        path: path.to_path_buf(),
        devices,
        reg,
    };
    loaded.insert(canonical, backend.clone());
    Ok(backend)
}

/// Loads the modules in `dir`: every `libggml-NAME[-VARIANT].so` whose backend ferrite does not have already (its
/// built-in CPU and RPC backends, or one loaded before), the variant with the best `ggml_backend_score` where a
/// backend has several (ggml's rule). A folder that cannot be read is an error; modules that fail go to
/// [`DirLoad::failed`].
pub fn load_dir(dir: &Path) -> Result<DirLoad> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        module_error(
            dir,
            format!("cannot read the folder: {e}"),
            "give a folder holding ggml backend modules (libggml-cuda.so, ...)",
        )
    })?;
    let mut by_name: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(module_name)
        else {
            continue;
        };
        if path.is_file() {
            by_name.entry(name.to_string()).or_default().push(path);
        }
    }
    let mut out = DirLoad::default();
    for (name, mut files) in by_name {
        files.sort();
        let c = CString::new(name.as_str()).expect("a file name has no NUL");
        // SAFETY: a NUL-terminated name; returns the first registered backend of that name, or NULL.
        let registered = unsafe { sys::ggml_backend_reg_by_name(c.as_ptr()) };
        let known = !registered.is_null();
        let already = {
            let loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
            files
                .iter()
                .any(|f| loaded.contains_key(&f.canonicalize().unwrap_or_else(|_| f.clone())))
        };
        if known && !already {
            let from = LOADED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .find(|b| b.reg.0.as_ptr() == registered)
                .map(|b| b.path.clone());
            let why = match from {
                Some(p) => format!(
                    "the {} backend is loaded already, from {}",
                    name.to_uppercase(),
                    p.display()
                ),
                None => format!("ferrite has the {} backend built in", name.to_uppercase()),
            };
            for f in files {
                out.skipped.push((f, why.clone()));
            }
            continue;
        }
        let best = if files.len() == 1 {
            files.remove(0)
        } else {
            match best_variant(&files) {
                Some(best) => best,
                None => {
                    out.failed.push(module_error(
                        dir,
                        format!(
                            "none of the {name} modules suits this machine ({})",
                            list(&files)
                        ),
                        "build the variant for this machine's CPU or GPU",
                    ));
                    continue;
                }
            }
        };
        for f in &files {
            if *f != best {
                out.skipped.push((
                    f.clone(),
                    format!("{} suits this machine better", best.display()),
                ));
            }
        }
        match load_file(&best) {
            Ok(b) => out.loaded.push(b),
            Err(e) => out.failed.push(e),
        }
    }
    Ok(out)
}

fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The variant with the highest non-zero `ggml_backend_score` (a module without the function scores 1).
fn best_variant(files: &[PathBuf]) -> Option<PathBuf> {
    let mut best: Option<(i32, PathBuf)> = None;
    for f in files {
        let Some(handle) = Library::open(f) else {
            continue;
        };
        let score = match handle.symbol("ggml_backend_score") {
            // SAFETY: ggml's modules export `int ggml_backend_score(void)`.
            Some(p) => unsafe { std::mem::transmute::<*mut c_void, extern "C" fn() -> i32>(p)() },
            None => 1,
        };
        if score > 0 && best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, f.clone()));
        }
    }
    best.map(|(_, f)| f)
}

/// A `dlopen` handle, closed on drop (ggml's own `dlopen` of the same file keeps the library loaded).
struct Library(NonNull<c_void>);

impl Library {
    fn open(path: &Path) -> Option<Library> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: a NUL-terminated path; RTLD_LOCAL keeps its symbols out of the global scope.
        NonNull::new(unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) })
            .map(Library)
    }

    /// `name` in the library or the libraries it depends on (`dlsym` on a handle searches both).
    fn symbol(&self, name: &str) -> Option<*mut c_void> {
        let c = CString::new(name).ok()?;
        // SAFETY: a live handle and a NUL-terminated name.
        let p = unsafe { libc::dlsym(self.0.as_ptr(), c.as_ptr()) };
        (!p.is_null()).then_some(p)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: a handle from dlopen, closed once.
        unsafe { libc::dlclose(self.0.as_ptr()) };
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message owned by libc.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown reason".into()
    } else {
        // SAFETY: non-NULL, NUL-terminated.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// Checks the module's ggml (its `libggml-base`) is the ggml ferrite was built with: the same version and the same
/// tensor layout, since tensors and graphs pass between the two copies as plain structs. Also turns a library that
/// does not load into an error with the loader's reason. Returns the open library.
fn check_same_ggml(path: &Path) -> Result<Library> {
    let Some(lib) = Library::open(path) else {
        let why = dl_error();
        let hint = if why.contains("cannot open shared object file")
            && !why.starts_with(&*path.to_string_lossy())
        {
            "a library it needs is missing: put libggml-base.so.0 beside the module (the build scripts do), and for CUDA install the NVIDIA driver; `ldd` on the module lists what is not found"
        } else {
            "is it a ggml backend module built for this machine (libggml-NAME.so from scripts/build-cuda.sh)?"
        };
        return Err(module_error(path, why, hint));
    };
    let hint = "build the module from the ggml source of the llama-cpp-sys-2 version this ferrite links (scripts/build-cuda.sh does)";
    let (Some(version), Some(overhead)) = (
        lib.symbol("ggml_version"),
        lib.symbol("ggml_tensor_overhead"),
    ) else {
        return Err(module_error(
            path,
            "it has no ggml_version or ggml_tensor_overhead: not a ggml backend module, or one without libggml-base",
            hint,
        ));
    };
    // SAFETY: ggml-base exports `const char * ggml_version(void)` and `size_t ggml_tensor_overhead(void)`.
    let (theirs, their_overhead) = unsafe {
        let v = std::mem::transmute::<*mut c_void, extern "C" fn() -> *const c_char>(version)();
        let o = std::mem::transmute::<*mut c_void, extern "C" fn() -> usize>(overhead)();
        (cstr_lossy(v), o)
    };
    // SAFETY: plain queries of the linked ggml.
    let (ours, our_overhead) =
        unsafe { (cstr_lossy(sys::ggml_version()), sys::ggml_tensor_overhead()) };
    if theirs != ours || their_overhead != our_overhead {
        return Err(module_error(
            path,
            format!(
                "it was built with ggml {theirs} (tensor header {their_overhead} bytes), ferrite with ggml {ours} ({our_overhead} bytes)"
            ),
            hint,
        ));
    }
    Ok(lib)
}

/// The modules loaded so far, in the order of their paths.
pub fn loaded() -> Vec<LoadedBackend> {
    LOADED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_follow_ggml() {
        assert_eq!(module_name("libggml-cuda.so"), Some("cuda"));
        assert_eq!(module_name("libggml-cpu-haswell.so"), Some("cpu"));
        assert_eq!(module_name("libggml-vulkan.so"), Some("vulkan"));
        assert_eq!(module_name("libggml-base.so"), None);
        assert_eq!(module_name("libggml.so"), None);
        assert_eq!(module_name("libggml-cuda.so.0"), None);
        assert_eq!(module_name("ggml-cuda.so"), None);
        assert_eq!(module_name("libggml-.so"), None);
    }

    #[test]
    fn a_file_that_is_not_a_library_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("libggml-bogus.so");
        std::fs::write(&f, b"not an ELF file").unwrap();
        let e = load_file(&f).unwrap_err().to_string();
        assert!(e.contains("libggml-bogus.so") && e.contains("hint:"), "{e}");
        let missing = load_file(&dir.path().join("libggml-none.so"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read it"), "{missing}");
        let cpu = dir.path().join("libggml-cpu.so");
        std::fs::write(&cpu, b"x").unwrap();
        let e = load_file(&cpu).unwrap_err().to_string();
        assert!(e.contains("CPU backend built in"), "{e}");
        // In a folder: the built-in CPU is skipped, the bogus module fails, nothing loads.
        let d = load_dir(dir.path()).unwrap();
        assert!(d.loaded.is_empty());
        assert_eq!(d.failed.len(), 1, "{:?}", d.failed);
        assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
        assert!(load_dir(&dir.path().join("nope")).is_err());
    }
}
