//! The placement flags end to end: `--list-devices` (no model needed, exit 0), llama.cpp's spellings (`-ngl`, `-ot`,
//! `-dev`, `-cmoe`, `-ncmoe`), `-ot` syntax errors (clap, exit 2), unknown devices and buffer types (exit 1, with
//! what is there); a run whose placement is all CPU writes the same bytes whatever the placement flags; a placement
//! with a device the engine cannot compute on yet is refused at open, with the plan.

mod support;

use std::process::Output;

use ferrite::engine::{DeviceMissing, Engine, EngineOptions, PlacementOptions};
use ferrite::ggml::{devices, DeviceInfo, DeviceKind};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::plan::devices::format_device_list;
use ferrite::plan::{DeviceSelection, GpuLayers, PlacementRequest};
use support::cli::{ok, run as ferrite, text};

/// Asserts a failure with `code`, nothing on stdout and every needle on stderr.
fn fails(out: &Output, code: i32, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in stderr: {err}");
    }
}

#[test]
fn list_devices_needs_no_model_and_exits_0() {
    let cache = tempfile::tempdir().unwrap();
    let want = format_device_list(&devices());
    let cpu_only = devices().iter().all(|d| d.kind == DeviceKind::Cpu);
    if cpu_only {
        assert_eq!(want, "Available devices:\n  (none)\n");
    }
    for cmd in ["complete", "chat", "logits", "perplexity", "bench"] {
        let out = ferrite(&[cmd, "--list-devices"], cache.path(), None);
        let (stdout, _) = ok(&out);
        assert_eq!(stdout, want, "{cmd}");
    }
    // Without it, -m is required (clap's usage error).
    fails(
        &ferrite(&["complete", "-p", "x"], cache.path(), None),
        2,
        &["--model <MODEL>"],
    );
    // Commands that do not run the model have no such flag.
    fails(
        &ferrite(&["info", "--list-devices"], cache.path(), None),
        2,
        &["--list-devices"],
    );
}

#[test]
fn override_tensor_syntax_errors_are_usage_errors() {
    let cache = tempfile::tempdir().unwrap();
    let run = |ot: &str| {
        ferrite(
            &["complete", "-m", "demo", "-p", "x", "-ot", ot],
            cache.path(),
            None,
        )
    };
    fails(&run("exps"), 2, &["\"exps\" has no '='", "PATTERN=BUFFER"]);
    fails(&run("exps=CPU,"), 2, &["\"\" has no '='"]);
    fails(&run("exps="), 2, &["names no buffer type after '='"]);
    fails(
        &run(r"blk\.(1[0-9]=CPU"),
        2,
        &[r#""blk\\.(1[0-9]" is not a valid regular expression: unclosed group"#],
    );
    let ngl = ferrite(
        &["complete", "-m", "demo", "-p", "x", "-ngl", "lots"],
        cache.path(),
        None,
    );
    fails(
        &ngl,
        2,
        &["\"lots\" is not a layer count; use a number of layers, auto or all"],
    );
    let gpu_mem = ferrite(
        &["complete", "-m", "demo", "-p", "x", "--gpu-mem", "4G,x"],
        cache.path(),
        None,
    );
    fails(&gpu_mem, 2, &["--gpu-mem takes a size per device"]);
    let dev = ferrite(
        &["complete", "-m", "demo", "-p", "x", "--device", "CUDA0,"],
        cache.path(),
        None,
    );
    fails(&dev, 2, &["empty device name"]);
}

#[test]
fn unknown_devices_and_buffer_types_list_what_is_there() {
    let cache = tempfile::tempdir().unwrap();
    let names: Vec<String> = devices().iter().map(|d| d.name.clone()).collect();
    let out = ferrite(
        &["complete", "-m", "demo", "-p", "x", "--device", "Bogus0"],
        cache.path(),
        None,
    );
    let want = format!(
        "unknown device \"Bogus0\" in --device; available: {}",
        names.join(", ")
    );
    fails(&out, 1, &[&want]);
    let out = ferrite(
        &[
            "logits",
            "-m",
            "demo",
            "--tokens",
            "1,2",
            "-o",
            "/dev/null",
            "-ot",
            "exps=Bogus0",
        ],
        cache.path(),
        None,
    );
    fails(
        &out,
        1,
        &["unknown buffer type \"Bogus0\" in `-ot exps=Bogus0`; available: CPU"],
    );
}

fn complete(extra: &[&str], cache: &std::path::Path) -> (String, String) {
    let mut args = vec![
        "complete",
        "-m",
        "demo",
        "-t",
        "1",
        "-p",
        "Hello there",
        "-n",
        "16",
        "--temp",
        "0",
    ];
    args.extend_from_slice(extra);
    ok(&ferrite(&args, cache, None))
}

/// With no device in the placement, the flags change nothing: the same bytes, in both spellings.
#[test]
fn cpu_placements_compute_the_same_bytes() {
    let cache = tempfile::tempdir().unwrap();
    let (want, _) = complete(&[], cache.path());
    assert!(!want.is_empty());
    let variants: [&[&str]; 4] = [
        &[
            "--device",
            "none",
            "--n-gpu-layers",
            "99",
            "--cpu-moe",
            "--no-op-offload",
        ],
        &[
            "-dev",
            "none",
            "-ngl",
            "all",
            "-ot",
            "exps=CPU,attn=CPU",
            "-ncmoe",
            "2",
        ],
        &[
            "-ot",
            "exps=CPU",
            "-ot",
            r"blk\.(0|1)\.=CPU",
            "-cmoe",
            "--gpu-mem",
            "1G",
        ],
        &["--device", "CPU", "-ngl", "0"],
    ];
    for v in variants {
        let (got, err) = complete(v, cache.path());
        assert_eq!(got, want, "{v:?}: {err}");
        if v.contains(&"-ngl")
            && v.contains(&"all")
            && devices().iter().all(|d| d.kind == DeviceKind::Cpu)
        {
            assert!(err.contains("-ngl is ignored"), "{err}");
        }
    }
}

/// `-p -ngl` is a prompt, not a flag: llama.cpp's spellings are rewritten only where a flag can be.
#[test]
fn llama_spellings_leave_option_values_alone() {
    let cache = tempfile::tempdir().unwrap();
    let (a, _) = complete(&["--system", "-ot"], cache.path());
    let mut args = vec![
        "complete", "-m", "demo", "-t", "1", "-p", "-ngl", "-n", "16", "--temp", "0",
    ];
    let (b, _) = ok(&ferrite(&args, cache.path(), None));
    args.splice(5..7, ["--prompt=-ngl"]);
    let (c, _) = ok(&ferrite(&args, cache.path(), None));
    assert_eq!(b, c);
    assert!(!a.is_empty());
}

fn fixture_gpu() -> DeviceInfo {
    DeviceInfo {
        backend: "CUDA".into(),
        name: "Fixture0".into(),
        buffer_type: "Fixture0".into(),
        description: "a fixture GPU".into(),
        kind: DeviceKind::Gpu,
        memory_free: 8 << 30,
        memory_total: 8 << 30,
    }
}

/// A placement on a device this build's ggml does not have (a fixture GPU here) must not silently compute on the
/// CPU: `Engine::open` refuses it with the plan; with the device left out it opens.
#[test]
fn a_placement_on_a_device_this_ggml_lacks_is_refused_with_its_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.gguf");
    write_tiny_model(&path, &TinyConfig::demo(), 1).unwrap();
    let mut available = devices();
    available.push(fixture_gpu());
    let open = |request: PlacementRequest| {
        let opts = EngineOptions {
            n_threads: 1,
            placement: PlacementOptions {
                devices: available.clone(),
                request,
            },
            ..EngineOptions::default()
        };
        Engine::open(&path, opts)
    };
    let err = open(PlacementRequest::default()).err().expect("refused");
    let refused = err.downcast_ref::<DeviceMissing>().expect("DeviceMissing");
    assert_eq!(refused.device, "Fixture0");
    assert!(
        err.to_string().starts_with("the placement puts ")
            && err
                .to_string()
                .contains(" on Fixture0, which is not one of the devices of this build's ggml"),
        "{err}"
    );
    let table = refused.plan.to_string();
    assert!(
        table.contains("Fixture0") && table.contains("-ngl auto: fits"),
        "{table}"
    );
    // -ngl 0 or --device none: all on the CPU, and the engine's memory plan is the device plan's CPU share.
    for request in [
        PlacementRequest {
            gpu_layers: GpuLayers::Count(0),
            ..PlacementRequest::default()
        },
        PlacementRequest {
            devices: DeviceSelection::None,
            ..PlacementRequest::default()
        },
    ] {
        let engine = open(request).unwrap();
        assert!(engine.device_plan().is_cpu_only());
        assert_eq!(engine.memory_plan(), &engine.device_plan().cpu);
    }
}

/// `bench --json` carries the device plan: on a CPU run every part on the CPU, the experts resident, no overrides;
/// `--cpu-moe` changes the reason, not the place.
#[test]
fn bench_json_has_the_device_plan() {
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "-m",
        "demo",
        "-t",
        "1",
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
        "--no-warmup",
        "--json",
        "--device",
        "none",
        "-cmoe",
    ];
    let (stdout, _) = ok(&ferrite(&args, cache.path(), None));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let plan = &report["device_plan"];
    assert_eq!(plan["devices"][0]["name"], "CPU", "{plan}");
    assert_eq!(plan["devices"].as_array().unwrap().len(), 1, "{plan}");
    assert_eq!(
        (&plan["embedding"], &plan["output"]),
        (&"CPU".into(), &"CPU".into())
    );
    let layers = plan["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    for l in layers {
        assert_eq!(
            (&l["main"], &l["experts"]),
            (&"CPU".into(), &"cpu_resident".into()),
            "{l}"
        );
    }
    assert_eq!(plan["n_gpu_layers"], 0);
    assert!(plan["overrides"].as_array().unwrap().is_empty());
    // The CPU's share is the whole memory plan.
    let cpu = &plan["devices"][0];
    let mem = &report["memory_plan"];
    assert_eq!(cpu["cache_bytes"], mem["context_bytes"]);
    assert_eq!(cpu["compute_bytes"], mem["compute_bytes"]);
}
