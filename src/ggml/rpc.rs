//! ggml's RPC backend: devices of other machines (or other processes) reached over TCP, and the server that offers
//! a device of this machine. Its functions are reached through the "RPC" registry entry's proc addresses
//! (`ggml_backend_rpc_add_server`, `ggml_backend_rpc_start_server`), as llama.cpp does.
//!
//! ggml-rpc aborts the process (`GGML_ABORT`) when a server cannot be reached or closes the connection mid-run;
//! [`install_abort_handler`] turns that into a message naming the server and exit status 1, and [`add_server`]
//! checks the server answers before ggml tries. ggml-rpc waits for replies without a limit, so a server that stops
//! answering (stopped, hung, its machine gone without closing the connection) would hang the run:
//! [`limit_replies`] gives the connections to the added servers a reply timeout, after which ggml-rpc's read fails
//! and the run ends the same way.

use std::ffi::{c_char, c_void, CString};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use llama_cpp_sys_2 as sys;

use super::devices::Device;
use super::error::{GgmlError, Result};
use super::modules::LoadedBackend;
use super::types::cstr_lossy;

/// How long connecting to a server may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The endpoints added so far (for the abort message).
static ENDPOINTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The reply timeout [`limit_replies`] gave the connections (for the abort message); `None`: none given.
static REPLY_TIMEOUT: Mutex<Option<Duration>> = Mutex::new(None);

/// How long a reply from an RPC server may take by default (`--rpc-timeout`): far beyond one micro-batch of any
/// layer on a slow machine, short enough that a stopped server ends the run.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Gives every open connection of this process to an added RPC server a reply (and send) timeout of `timeout`:
/// ggml-rpc's blocking reads then fail after that long without data, and the run ends with exit status 1 and the
/// server named instead of hanging. ggml-rpc opens its connections lazily and keeps one per server while anything
/// uses it; call this after the weights are on the devices (and again whenever new connections may exist). Returns
/// how many connections were limited. Linux only (the connections are found in /proc/self/fd); elsewhere 0.
pub fn limit_replies(timeout: Duration) -> usize {
    let endpoints = ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if endpoints.is_empty() || timeout.is_zero() {
        return 0;
    }
    let peers: Vec<std::net::SocketAddr> = endpoints
        .iter()
        .filter_map(|e| e.to_socket_addrs().ok())
        .flatten()
        .collect();
    *REPLY_TIMEOUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(timeout);
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    let mut limited = 0;
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(peer) = peer_of(fd) else { continue };
        if !peers.contains(&peer) {
            continue;
        }
        let mut ok = true;
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: `fd` is a socket of this process (getpeername succeeded); the option value is a timeval of the
            // size given.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            ok &= r == 0;
        }
        limited += usize::from(ok);
    }
    limited
}

/// The address of the TCP peer of socket `fd` (`None` for anything else).
fn peer_of(fd: i32) -> Option<std::net::SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid; getpeername writes at most `len` bytes into it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: a pointer to the storage and its length; a descriptor that is not a connected socket gives an error.
    let r = unsafe {
        libc::getpeername(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in =
                unsafe { &*(&storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some((ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 =
                unsafe { &*(&storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some((ip, u16::from_be(a.sin6_port)).into())
        }
        _ => None,
    }
}

type AddServerFn = unsafe extern "C" fn(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
type StartServerFn = unsafe extern "C" fn(
    endpoint: *const c_char,
    cache_dir: *const c_char,
    n_threads: usize,
    n_devices: usize,
    devices: *mut sys::ggml_backend_dev_t,
);

fn rpc_error(detail: String) -> GgmlError {
    GgmlError::Op { op: "rpc", detail }
}

/// The RPC backend's registration (the built-in one: the first registered).
fn rpc_reg() -> Result<sys::ggml_backend_reg_t> {
    let reg_name = CString::new("RPC").expect("no NUL");
    // SAFETY: a NUL-terminated name; returns the registered backend or NULL.
    let reg = unsafe { sys::ggml_backend_reg_by_name(reg_name.as_ptr()) };
    if reg.is_null() {
        return Err(rpc_error(
            "this build of ggml has no RPC backend (build with GGML_RPC=ON)".into(),
        ));
    }
    Ok(reg)
}

/// The address of one of the functions of the RPC registration `reg`.
fn proc_address(reg: sys::ggml_backend_reg_t, name: &str) -> Result<*mut c_void> {
    let c = CString::new(name).expect("no NUL");
    // SAFETY: a registered backend and a NUL-terminated name; returns the function or NULL.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(reg, c.as_ptr()) };
    if f.is_null() {
        return Err(rpc_error(format!("ggml's RPC backend has no {name}")));
    }
    Ok(f)
}

/// Checks `endpoint` (`HOST:PORT`) is well formed and a server accepts connections there.
pub fn check_reachable(endpoint: &str) -> Result<()> {
    let hint = "start it on that machine with `ferrite rpc-server --host ADDRESS --port PORT`";
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(|| {
        rpc_error(format!(
            "RPC server '{endpoint}' is not HOST:PORT (e.g. 127.0.0.1:50052)"
        ))
    })?;
    if host.contains(':') {
        return Err(rpc_error(format!(
            "RPC server '{endpoint}': ggml's RPC client takes HOST:PORT with an IPv4 address or a host name, not an IPv6 address (hint: use the server's IPv4 address, or a host name that resolves to it)"
        )));
    }
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(rpc_error(format!(
            "RPC server '{endpoint}' is not HOST:PORT with a port from 1 to 65535"
        )));
    }
    let addrs: Vec<_> = endpoint
        .to_socket_addrs()
        .map_err(|e| rpc_error(format!("cannot resolve the RPC server '{endpoint}': {e}")))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
    Err(rpc_error(format!(
        "cannot reach the RPC server at {endpoint}: {why} (hint: {hint})"
    )))
}

/// Connects to the RPC server at `endpoint` (`HOST:PORT`) and registers its devices with ggml (named `RPC0`,
/// `RPC1`, ... in the order servers are added; their description is the endpoint). Returns them. Adding the same
/// endpoint again returns its devices.
pub fn add_server(endpoint: &str) -> Result<Vec<Device>> {
    add_server_on(rpc_reg()?, endpoint)
}

/// [`add_server`] through an RPC backend loaded as a module (`libggml-rpc.so`, with its own copy of ggml-base)
/// instead of the built-in one: the tests' stand-in for a GPU module.
pub fn add_server_with(module: &LoadedBackend, endpoint: &str) -> Result<Vec<Device>> {
    if !module.name.eq_ignore_ascii_case("RPC") {
        return Err(rpc_error(format!(
            "{} is the {} backend, not RPC",
            module.path.display(),
            module.name
        )));
    }
    add_server_on(module.reg(), endpoint)
}

fn add_server_on(rpc: sys::ggml_backend_reg_t, endpoint: &str) -> Result<Vec<Device>> {
    install_abort_handler();
    check_reachable(endpoint)?;
    let f = proc_address(rpc, "ggml_backend_rpc_add_server")?;
    // SAFETY: the registry documents this symbol as `ggml_backend_reg_t (*)(const char *)`.
    let add: AddServerFn = unsafe { std::mem::transmute::<*mut c_void, AddServerFn>(f) };
    let c = CString::new(endpoint)
        .map_err(|_| rpc_error(format!("RPC server '{endpoint}' contains NUL")))?;
    {
        let mut list = ENDPOINTS.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|e| e == endpoint) {
            list.push(endpoint.to_string());
        }
    }
    // SAFETY: a NUL-terminated endpoint; ggml connects (aborting through our handler on failure) and returns the
    // server's registration, NULL when it offers no device.
    let reg = unsafe { add(c.as_ptr()) };
    if reg.is_null() {
        return Err(rpc_error(format!(
            "the RPC server at {endpoint} offers no device"
        )));
    }
    // SAFETY: a live registration; registering twice is harmless for ggml but would list its devices twice, so
    // only new ones are registered.
    let n = unsafe { sys::ggml_backend_reg_dev_count(reg) };
    // SAFETY: indices below the count.
    let first = unsafe { sys::ggml_backend_reg_dev_get(reg, 0) };
    // SAFETY: `first` is NULL or a device of the registration.
    let known = unsafe { Device::from_raw(first) }.is_some_and(|d| Device::all().contains(&d));
    if !known {
        // SAFETY: a registration that stays alive for the whole program (ggml keeps it in a static map).
        unsafe { sys::ggml_backend_register(reg) };
    }
    Ok((0..n)
        // SAFETY: indices below the count give the registration's devices.
        .filter_map(|i| unsafe { Device::from_raw(sys::ggml_backend_reg_dev_get(reg, i)) })
        .collect())
}

/// Serves `device` on `endpoint` (`HOST:PORT`) with `n_threads` compute threads, one client at a time; returns
/// only when the server cannot start or stops. ggml prints the server's banner on stdout.
pub fn start_server(endpoint: &str, device: Device, n_threads: usize) -> Result<()> {
    install_abort_handler();
    let f = proc_address(rpc_reg()?, "ggml_backend_rpc_start_server")?;
    // SAFETY: the registry documents this symbol with this signature (ggml-rpc.h).
    let start: StartServerFn = unsafe { std::mem::transmute::<*mut c_void, StartServerFn>(f) };
    let c = CString::new(endpoint)
        .map_err(|_| rpc_error(format!("endpoint '{endpoint}' contains NUL")))?;
    let mut devices = [device.as_ptr()];
    let _ = std::io::stdout().flush();
    // SAFETY: a NUL-terminated endpoint, no cache folder, one registered device; blocks while serving.
    unsafe {
        start(
            c.as_ptr(),
            std::ptr::null(),
            n_threads.max(1),
            1,
            devices.as_mut_ptr(),
        )
    };
    Err(rpc_error(format!(
        "the RPC server on {endpoint} stopped (is the port already in use, or the address not this machine's?)"
    )))
}

/// Makes a ggml abort print one clear line on stderr and exit with status 1 instead of `abort()` (status 134 and a
/// backtrace). For ggml-rpc's aborts on a broken connection, the message names the servers that no longer accept
/// connections. Installed once; idempotent.
pub fn install_abort_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets a global function pointer; the callback is a plain extern "C" fn that never returns.
        unsafe {
            sys::ggml_set_abort_callback(Some(on_abort as unsafe extern "C" fn(*const c_char)))
        };
    });
}

extern "C" fn on_abort(message: *const c_char) {
    // First, before anything else can change it: a read that timed out leaves EAGAIN.
    let timed_out = matches!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT)
    );
    let message = cstr_lossy(message);
    let message = message.trim();
    let endpoints = match ENDPOINTS.try_lock() {
        Ok(list) => list.clone(),
        Err(_) => Vec::new(),
    };
    let rpc_related = message.contains("RPC") || message.contains("rpc");
    let line = if rpc_related && !endpoints.is_empty() {
        let dead = || -> Vec<&String> {
            endpoints
                .iter()
                .filter(|e| check_reachable(e).is_err())
                .collect()
        };
        let mut down = dead();
        if down.is_empty() {
            // A server being killed may close our connection a moment before its listening socket.
            std::thread::sleep(Duration::from_millis(300));
            down = dead();
        }
        if down.is_empty() && endpoints.len() == 1 {
            down = endpoints.iter().collect();
        }
        let which = match down.as_slice() {
            [] => format!("one of the RPC servers ({})", endpoints.join(", ")),
            [one] => format!("the RPC server at {one}"),
            many => format!(
                "the RPC servers at {}",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let timeout = REPLY_TIMEOUT.try_lock().ok().and_then(|t| *t);
        match timeout.filter(|_| timed_out) {
            Some(t) => format!(
                "ferrite: error: {which} did not answer within {} s (ggml: {message})\nhint: is the server stopped or overloaded? restart it, or wait longer with --rpc-timeout SECS (0: no limit)",
                t.as_secs()
            ),
            None => format!(
                "ferrite: error: {which} closed the connection (ggml: {message})\nhint: restart the server and run again"
            ),
        }
    } else {
        format!("ferrite: error: ggml aborted: {message}")
    };
    let _ = writeln!(std::io::stderr(), "{line}");
    // SAFETY: ends the process at once without unwinding into C or running destructors (other threads may be
    // inside ggml); stderr is unbuffered.
    unsafe { libc::_exit(1) }
}
