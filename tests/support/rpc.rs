//! An RPC device on loopback for the multi-device tests: `ferrite rpc-server` children and the checks that compare
//! an engine on devices with the CPU-only run (logits within [`TOLERANCE`] of the logit scale, whole prompt and
//! token by token, and [`N_GEN`] greedy tokens identical).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrite::cache::CacheType;
use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions, Placement};
use ferrite::ggml::{rpc, Device};

use super::compare::{prompt, relative_errors};

/// Greedy tokens generated after each prompt.
pub const N_GEN: usize = 128;
/// The largest relative logit error allowed against the CPU-only run.
pub const TOLERANCE: f32 = 1e-4;

/// A command whose child inherits no file descriptor but stdin, stdout and stderr. ggml-rpc's client sockets are
/// not close-on-exec: a child spawned while another test's connection is open would keep that connection alive
/// after the test closes it, and the server (one client at a time) would never serve the next one.
pub fn command(program: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(program);
    // SAFETY: runs in the child between fork and exec, calling only close(2), which is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            for fd in 3..1024 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    c
}

/// A `ferrite rpc-server` child process on 127.0.0.1, killed when dropped.
pub struct RpcServer {
    pub child: Child,
    pub endpoint: String,
}

impl RpcServer {
    pub fn start() -> RpcServer {
        let port = free_port();
        let child = command(env!("CARGO_BIN_EXE_ferrite"))
            .args(["rpc-server", "--port", &port.to_string(), "-t", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start ferrite rpc-server");
        let server = RpcServer {
            child,
            endpoint: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&server.endpoint).is_err() {
            assert!(
                Instant::now() < deadline,
                "rpc-server on {} did not start listening",
                server.endpoint
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// The server's device, registered with ggml in this process.
    pub fn device(&self) -> Device {
        let devices = rpc::add_server(&self.endpoint).unwrap();
        assert_eq!(devices.len(), 1, "one device per server");
        assert_eq!(devices[0].description(), self.endpoint);
        assert!(devices[0].is_rpc() && !devices[0].is_cpu());
        devices[0]
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `path` opened with `placement` (F32 cache, -c 512, micro-batches of 64, one thread); devices in `no_fused_on`
/// get the primitive-op form.
pub fn open(path: &Path, placement: Placement, no_fused_on: Vec<Device>) -> Engine {
    Engine::open(
        path,
        EngineOptions {
            n_threads: 1,
            cache_type: CacheType::F32,
            paging: PagingOptions {
                ctx_size: Some(512),
                n_ubatch: Some(64),
                ..PagingOptions::default()
            },
            layout: Some(placement),
            no_fused_on,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Logit rows (one per position) of `prompt`, whole (`ubatch` 64) or token by token, and of `N_GEN` greedy tokens
/// after it, and those tokens.
pub fn run(engine: &Engine, prompt: &[u32], whole: bool) -> (Vec<Vec<f32>>, Vec<u32>) {
    let n_vocab = engine.n_vocab();
    let mut s = engine
        .session_sized(512, if whole { 64 } else { 1 })
        .unwrap();
    let mut rows: Vec<Vec<f32>> = Vec::new();
    if whole {
        let all = s.feed(prompt, Logits::All).unwrap();
        rows.extend(all.chunks(n_vocab).map(<[f32]>::to_vec));
    } else {
        for &t in prompt {
            rows.push(s.feed(&[t], Logits::Last).unwrap());
        }
    }
    let mut out = Vec::new();
    let mut next = argmax(rows.last().unwrap());
    for _ in 0..N_GEN {
        out.push(next);
        let row = s.feed(&[next], Logits::Last).unwrap();
        next = argmax(&row);
        rows.push(row);
    }
    (rows, out)
}

/// `engine` against `reference` (the CPU-only run) on one prompt, whole and token by token.
pub fn assert_matches(what: &str, engine: &Engine, reference: &Engine, seed: u64) {
    let p = prompt(100, reference.n_vocab(), seed);
    for whole in [true, false] {
        let what = format!(
            "{what}, prompt {}",
            if whole { "whole" } else { "token by token" }
        );
        let (rows, toks) = run(engine, &p, whole);
        let (ref_rows, ref_toks) = run(reference, &p, whole);
        let errs = relative_errors(&rows, &ref_rows);
        let (worst, at) =
            errs.iter().enumerate().fold(
                (0f32, 0),
                |(m, a), (i, &e)| if e > m { (e, i) } else { (m, a) },
            );
        assert!(
            worst <= TOLERANCE,
            "{what}: position {at} is {worst:e} of the logit scale away from the CPU-only run (at most {TOLERANCE:e})"
        );
        assert_eq!(toks, ref_toks, "{what}: greedy tokens");
    }
}
