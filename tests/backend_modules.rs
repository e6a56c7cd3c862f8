//! ggml backends loaded at run time (`--backend-dir`, the executable's folder, `GGML_BACKEND_PATH`), tested with
//! the one backend module this machine can build and run without a GPU: ggml's RPC client, built as
//! `libggml-rpc.so` with its own `libggml-base.so.0` by `scripts/ggml-module.sh` (ggml-base and ggml-rpc only,
//! about 15 s on 2 cores, kept under target/ggml-modules/ for the next run). Through it a `ferrite rpc-server` on
//! loopback serves its CPU as a device whose buffers, copies and graph computation all go through the module's code
//! and its copy of ggml-base, as a CUDA module's would: the model's logits on that device equal the CPU-only run
//! (1e-4 of the logit scale, F32 cache, whole prompt and token by token) and 128 greedy tokens are identical. The
//! command line's loading and its errors (a module whose libggml-base is missing, a folder without modules) are
//! checked too. What a GPU module adds (its kernels) is checked on a GPU machine by scripts/device-check.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ferrite::engine::Placement;
use ferrite::ggml::{modules, rpc};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use support::rpc::{assert_matches, command, open, RpcServer};

/// The folder with `libggml-rpc.so` and `libggml-base.so.0`, built once per test process.
fn rpc_module_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("target/ggml-modules/rpc-test");
        let status = Command::new("bash")
            .arg(root.join("scripts/ggml-module.sh"))
            .args(["-j", "2", "--build"])
            .arg(root.join("target/ggml-modules/build-rpc-test"))
            .arg("rpc")
            .arg(&out)
            .status()
            .expect("cannot run scripts/ggml-module.sh");
        assert!(status.success(), "scripts/ggml-module.sh rpc failed");
        out
    })
}

#[test]
fn a_device_of_a_loaded_module_runs_the_model_like_the_cpu() {
    let module_path = rpc_module_dir().join("libggml-rpc.so");
    let module = modules::load_file(&module_path).unwrap();
    assert_eq!(module.name, "RPC");
    assert_eq!(module.path, module_path);
    assert!(
        module.devices.is_empty(),
        "RPC has devices once a server is added"
    );
    assert!(
        !module.proc_address("ggml_backend_rpc_add_server").is_null(),
        "the module's RPC functions"
    );
    // Loading the same file again gives the same backend; the built-in RPC backend is a different registration.
    let again = modules::load_file(&module_path).unwrap();
    assert_eq!(
        again.proc_address("ggml_backend_rpc_add_server"),
        module.proc_address("ggml_backend_rpc_add_server")
    );
    assert_eq!(modules::loaded().len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_model(&path, &TinyConfig::small(), 31).unwrap();
    let server = RpcServer::start();
    let devices = rpc::add_server_with(&module, &server.endpoint).unwrap();
    assert_eq!(devices.len(), 1);
    let dev = devices[0];
    assert!(!dev.is_cpu() && dev.is_rpc());
    assert_eq!(dev.description(), server.endpoint);

    let cpu = open(&path, Placement::default(), vec![]);
    let offloaded = open(&path, Placement::all_on(dev), vec![]);
    assert_eq!(offloaded.devices(), vec![dev]);
    assert!(
        offloaded
            .device_weight_bytes()
            .iter()
            .map(|d| d.1)
            .sum::<usize>()
            > 0
    );
    assert_matches("a loaded module's device", &offloaded, &cpu, 7);
}

fn ferrite(args: &[&str], cache: &Path) -> Command {
    let mut c = command(env!("CARGO_BIN_EXE_ferrite"));
    c.args(args)
        .env("FERRITE_CACHE_DIR", cache)
        .env_remove("GGML_BACKEND_PATH");
    c
}

fn output(mut c: Command) -> (Option<i32>, String, String) {
    let out = c.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_command_line_loads_modules_and_names_what_fails() {
    let modules = rpc_module_dir();
    let dir = tempfile::tempdir().unwrap();
    let module = modules.join("libggml-rpc.so");
    let module_str = module.to_str().unwrap();

    // GGML_BACKEND_PATH names one file: loaded and reported (RPC has no device until a server is added).
    let mut with_path = ferrite(&["complete", "--list-devices"], dir.path());
    with_path.env("GGML_BACKEND_PATH", &module);
    let (code, stdout, stderr) = output(with_path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "loaded ggml backend RPC from {module_str} (0 devices)"
        )),
        "{stderr}"
    );
    assert!(stdout.contains("Available devices:"), "{stdout}");

    // In a folder, a backend ferrite has built in is not loaded again, with a note.
    let (code, _, stderr) = output(ferrite(
        &[
            "bench",
            "--list-devices",
            "--backend-dir",
            modules.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("ferrite has the RPC backend built in"),
        "{stderr}"
    );

    // A module without its libggml-base.so.0 beside it: the loader's reason, the file, a hint.
    let lonely = dir.path().join("lonely");
    std::fs::create_dir(&lonely).unwrap();
    std::fs::copy(&module, lonely.join("libggml-test.so")).unwrap();
    let (code, _, stderr) = output(ferrite(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens",
            "1,2",
            "-o",
            "/dev/null",
            "--backend-dir",
            lonely.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("libggml-test.so")
            && stderr.contains("libggml-base.so.0: cannot open shared object file")
            && stderr.contains("hint: a library it needs is missing"),
        "{stderr}"
    );

    // A folder without modules, and one that does not exist.
    let (code, _, stderr) = output(ferrite(
        &[
            "complete",
            "--list-devices",
            "--backend-dir",
            dir.path().to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no ggml backend module (libggml-NAME.so) in that folder"),
        "{stderr}"
    );
    let (code, _, stderr) = output(ferrite(
        &[
            "complete",
            "--list-devices",
            "--backend-dir",
            "/nonexistent/modules",
        ],
        dir.path(),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/modules: cannot read the folder"),
        "{stderr}"
    );

    // rpc-server takes --backend-dir too, and a module that fails is an error before it serves.
    let (code, _, stderr) = output(ferrite(
        &[
            "rpc-server",
            "--port",
            "1",
            "--backend-dir",
            lonely.to_str().unwrap(),
        ],
        dir.path(),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("libggml-test.so"), "{stderr}");
}
