//! Capturing what ggml logs while one call runs on this thread, so its reasons end up in our error messages;
//! everything else still goes to the logger that was installed before.

use std::cell::RefCell;
use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use super::types::cstr_lossy;

thread_local! {
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The logger that was installed when the capture began (function address and user data).
static PREV_CALLBACK: AtomicUsize = AtomicUsize::new(0);
static PREV_USER_DATA: AtomicUsize = AtomicUsize::new(0);
/// One capture at a time installs and restores the logger.
static INSTALL: Mutex<()> = Mutex::new(());

unsafe extern "C" fn capture_callback(
    level: sys::ggml_log_level,
    text: *const c_char,
    _user: *mut c_void,
) {
    let captured = CAPTURED
        .try_with(|c| match c.borrow_mut().as_mut() {
            Some(buf) => {
                buf.push_str(&cstr_lossy(text));
                true
            }
            None => false,
        })
        .unwrap_or(false);
    if captured {
        return;
    }
    let prev = PREV_CALLBACK.load(Ordering::Acquire);
    if prev != 0 {
        // SAFETY: `prev` is the non-null callback ggml_log_get returned (stored as an address), called with the
        // user data that went with it.
        let f: unsafe extern "C" fn(sys::ggml_log_level, *const c_char, *mut c_void) =
            unsafe { std::mem::transmute::<usize, _>(prev) };
        let user = PREV_USER_DATA.load(Ordering::Acquire) as *mut c_void;
        // SAFETY: forwarding ggml's own arguments to the logger it had before.
        unsafe { f(level, text, user) };
    }
}

/// Runs `f` with ggml's log output on this thread captured; returns `f`'s result and the captured text (trimmed).
/// Other threads' messages go to the previous logger meanwhile.
pub fn capture<T>(f: impl FnOnce() -> T) -> (T, String) {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let mut prev_cb: sys::ggml_log_callback = None;
    let mut prev_ud: *mut c_void = std::ptr::null_mut();
    // SAFETY: ggml_log_get writes the current callback and user data into the two out-pointers.
    unsafe { sys::ggml_log_get(&mut prev_cb, &mut prev_ud) };
    PREV_CALLBACK.store(prev_cb.map_or(0, |cb| cb as usize), Ordering::Release);
    PREV_USER_DATA.store(prev_ud as usize, Ordering::Release);
    CAPTURED.with(|c| *c.borrow_mut() = Some(String::new()));
    // SAFETY: installs a callback that never unwinds and only reads its text argument.
    unsafe { sys::ggml_log_set(Some(capture_callback), std::ptr::null_mut()) };
    let out = f();
    // SAFETY: restores exactly what was installed before.
    unsafe { sys::ggml_log_set(prev_cb, prev_ud) };
    let text = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (out, text.trim().to_string())
}
