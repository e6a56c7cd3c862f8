//! The multi-device engine through ggml's RPC backend on loopback: `ferrite rpc-server` processes started by the
//! tests (127.0.0.1, a free port, killed at the end, also on panic) serve their CPU as a second ggml backend with
//! its own buffers, so weights are copied over, the cache lives there, and the scheduler splits graphs between it
//! and this process's CPU. Checked against the CPU-only run (the path without a scheduler, F32 cache): logits of a
//! whole prompt and token by token within 1e-4 of the logit scale, and 128 greedy tokens identical. Also: a device
//! without the fused DeepSeek V4 operators gets the primitive form (counted in the built graph), an unreachable
//! server and one killed mid-generation end in a clear error with exit status 1.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrite::cache::plan::{Gather, TopKReads};
use ferrite::cache::{CacheSizes, CacheType, UbatchPlan};
use ferrite::engine::{Engine, EngineOptions, Logits, PagingOptions, Placement};
use ferrite::ggml::Device;
use ferrite::model::step::GraphKey;
use ferrite::model::tiny::{write_tiny_model, TinyConfig, WeightTypes};
use gguf::GgmlType;
use support::compare::prompt;
use support::rpc::{argmax, assert_matches, command, free_port, open, RpcServer};

fn tiny(dir: &Path, cfg: &TinyConfig, seed: u64) -> std::path::PathBuf {
    let path = dir.join("m.gguf");
    write_tiny_model(&path, cfg, seed).unwrap();
    path
}

#[test]
fn every_layer_on_an_rpc_device_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), &TinyConfig::small(), 21);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let cpu = open(&path, Placement::default(), vec![]);
    assert!(cpu.devices().is_empty(), "the default is the CPU-only path");
    let offloaded = open(&path, Placement::all_on(rpc0), vec![]);
    assert_eq!(offloaded.devices(), vec![rpc0]);
    // Every weight the model computes with is on the device.
    let on_device: usize = offloaded.device_weight_bytes().iter().map(|d| d.1).sum();
    assert!(on_device > 0);
    assert!(
        offloaded.layer_fused().iter().all(|&f| f),
        "the RPC device reports the fused operators"
    );
    assert_matches("every layer on RPC", &offloaded, &cpu, 5);

    // Every node of the graph runs on the device: the cache and all weights live there.
    let mut s = offloaded.session_sized(512, 64).unwrap();
    s.feed(&prompt(20, offloaded.n_vocab(), 1), Logits::All)
        .unwrap();
    let nodes = s.scheduled_nodes().unwrap();
    let rpc_name = rpc0.name();
    let elsewhere: Vec<_> = nodes
        .iter()
        .filter(|(_, op, dev)| dev.as_deref() != Some(rpc_name.as_str()) && op != "NONE")
        .filter(|(_, op, _)| !matches!(op.as_str(), "VIEW" | "RESHAPE" | "PERMUTE" | "TRANSPOSE"))
        .collect();
    assert!(
        elsewhere.is_empty(),
        "nodes not on {rpc_name}: {elsewhere:?}"
    );
    assert_eq!(s.scheduled_splits(), Some(1));

    // Decode reuses the graphs of the shapes it cycles through (each kept with its own scheduler), and gives the
    // same logits bit for bit as building every graph anew.
    let p = prompt(20, offloaded.n_vocab(), 4);
    let mut fresh = offloaded.session_sized(512, 64).unwrap();
    fresh.set_graph_reuse(false);
    let mut kept = offloaded.session_sized(512, 64).unwrap();
    let (mut a, mut b) = (
        fresh.feed(&p, Logits::Last).unwrap(),
        kept.feed(&p, Logits::Last).unwrap(),
    );
    for _ in 0..32 {
        assert_eq!(a, b, "logits with and without graph reuse");
        let t = argmax(&a);
        a = fresh.feed(&[t], Logits::Last).unwrap();
        b = kept.feed(&[t], Logits::Last).unwrap();
    }
    let (st_fresh, st_kept) = (fresh.graph_stats(), kept.graph_stats());
    assert_eq!((st_fresh.built, st_fresh.reused), (33, 0));
    // One graph per shape the micro-batches take: the prompt's, and decode's at positions 20-51 (how many depends
    // on the ISA: gathered reads come in blocks of the SIMD lanes' rows, 32 on AVX2 and 64 on AVX-512).
    let (cfg, sizes) = (
        offloaded.config(),
        CacheSizes::new(offloaded.config(), 512, 64, CacheType::F32),
    );
    let key = |n: usize, p0: usize, n_out: usize| {
        let plan = UbatchPlan::new(
            cfg,
            &sizes,
            &vec![1; n],
            p0,
            Gather::for_this_build(),
            TopKReads::Chosen,
            ferrite::cache::INDEXER_PRODUCT_BYTES,
        );
        GraphKey::of(&plan, n_out, false)
    };
    let mut shapes = vec![key(20, 0, 1)];
    shapes.extend((20..52).map(|p| key(1, p, 1)));
    shapes.sort_by_key(|k| format!("{k:?}"));
    shapes.dedup();
    assert!(
        shapes.len() < 10,
        "decode cycles through a few shapes: {shapes:?}"
    );
    assert_eq!(
        (st_kept.built, st_kept.reused),
        (shapes.len() as u64, 33 - shapes.len() as u64),
        "a graph per shape, reused for every micro-batch of its shape: {st_kept:?}"
    );
}

#[test]
fn layers_split_over_two_rpc_servers_and_the_cpu_match_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    // Quantized experts go over the wire too.
    let cfg = TinyConfig::alt().with_types(WeightTypes {
        experts: GgmlType::Q8_0,
        ..WeightTypes::F32
    });
    let path = tiny(dir.path(), &cfg, 22);
    let (a, b) = (RpcServer::start(), RpcServer::start());
    let (rpc_a, rpc_b) = (a.device(), b.device());
    let mut placement = Placement::default()
        .with_layers(0..2, Some(rpc_a))
        .with_layers(4..7, Some(rpc_b));
    // Layer 3 computes on the CPU with its routed experts on server A; the head is on server B.
    placement.layers[3].experts = Some(rpc_a);
    placement.output = Some(rpc_b);
    let split = open(&path, placement, vec![]);
    assert_eq!(split.devices(), vec![rpc_a, rpc_b]);
    let cpu = open(&path, Placement::default(), vec![]);
    assert_matches("layers over RPC A, the CPU and RPC B", &split, &cpu, 6);

    let mut s = split.session_sized(512, 64).unwrap();
    s.feed(&prompt(20, split.n_vocab(), 2), Logits::All)
        .unwrap();
    let splits = s.scheduled_splits().unwrap();
    assert!(
        splits >= 4,
        "A, CPU, A (layer 3's experts), CPU, B at least: {splits} splits"
    );
    let nodes = s.scheduled_nodes().unwrap();
    let on = |dev: &Device| {
        nodes
            .iter()
            .filter(|n| n.2.as_deref() == Some(&dev.name()))
            .count()
    };
    let cpu_name = Device::cpu().unwrap().name();
    let on_cpu = nodes
        .iter()
        .filter(|n| n.2.as_deref() == Some(&cpu_name))
        .count();
    assert!(on(&rpc_a) > 0 && on(&rpc_b) > 0 && on_cpu > 0, "{nodes:?}");
    // Named nodes (as llama.cpp's cb() names them) run where their layer is.
    let device_of = |name: &str| nodes.iter().find(|n| n.0 == name).and_then(|n| n.2.clone());
    assert_eq!(device_of("attn_norm-0"), Some(rpc_a.name()));
    assert_eq!(device_of("attn_norm-2"), Some(cpu_name.clone()));
    assert_eq!(device_of("attn_norm-5"), Some(rpc_b.name()));
    assert_eq!(device_of("result_output"), Some(rpc_b.name()));
}

/// llama.cpp's `-ngl 99 --cpu-moe` layout: everything on the device but the routed experts, which stay on the CPU
/// (repacked for its kernels where it has them, with the grouped GEMM products for a prompt's experts: custom
/// operators only the CPU runs).
#[test]
fn routed_experts_on_the_cpu_and_the_rest_on_rpc_match_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small().with_types(WeightTypes {
        experts: GgmlType::Mxfp4,
        ..WeightTypes::F32
    });
    let path = tiny(dir.path(), &cfg, 25);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let mut cpu_moe = Placement::all_on(rpc0);
    cpu_moe.rest.experts = None;
    let offloaded = open(&path, cpu_moe, vec![]);
    let cpu = open(&path, Placement::default(), vec![]);
    assert_eq!(
        offloaded.grouped_experts().is_some(),
        cpu.grouped_experts().is_some()
    );
    assert_matches(
        "routed experts on the CPU, the rest on RPC",
        &offloaded,
        &cpu,
        9,
    );
    let mut s = offloaded.session_sized(512, 64).unwrap();
    s.feed(&prompt(64, offloaded.n_vocab(), 5), Logits::All)
        .unwrap();
    if offloaded.grouped_experts().is_some() {
        assert!(
            s.graph_stats().grouped > 0,
            "a prompt's experts use the grouped products"
        );
        let counts = s.scheduled_op_counts().unwrap();
        assert!(counts.get("CUSTOM").copied().unwrap_or(0) > 0, "{counts:?}");
    }
    // Each layer's expert products run on the CPU, the rest on the device.
    let nodes = s.scheduled_nodes().unwrap();
    let cpu_name = Device::cpu().unwrap().name();
    let expert_ops = nodes
        .iter()
        .filter(|(_, op, _)| op == "MUL_MAT_ID" || op == "CUSTOM")
        .collect::<Vec<_>>();
    assert!(!expert_ops.is_empty());
    assert!(
        expert_ops.iter().all(|n| n.2.as_deref() == Some(&cpu_name)),
        "{expert_ops:?}"
    );
    assert_eq!(
        nodes
            .iter()
            .find(|n| n.0 == "attn_norm-0")
            .and_then(|n| n.2.clone()),
        Some(rpc0.name())
    );
}

/// Nodes of the fused DeepSeek V4 hc operators in a session's last scheduled graph: their count, and each one's
/// operator and device. Ratio-4 blocks complete (the indexer runs), always as products: no graph has ggml's fused
/// lightning indexer.
fn fused_nodes(engine: &Engine) -> (usize, Vec<(String, Option<String>)>) {
    let mut s = engine.session_sized(512, 64).unwrap();
    // Long enough for ratio-4 blocks to complete (the indexer runs).
    s.feed(&prompt(40, engine.n_vocab(), 3), Logits::All)
        .unwrap();
    let hc = ["DSV4_HC_COMB", "DSV4_HC_PRE", "DSV4_HC_POST"];
    let counts = s.scheduled_op_counts().unwrap();
    let count = |op: &str| counts.get(op).copied().unwrap_or(0);
    let total_hc = hc.iter().map(|op| count(op)).sum();
    assert_eq!(count("LIGHTNING_INDEXER"), 0, "{counts:?}");
    assert!(count("TOP_K") > 0, "the indexer ran: {counts:?}");
    let nodes = s
        .scheduled_nodes()
        .unwrap()
        .into_iter()
        .filter(|(_, op, _)| hc.contains(&op.as_str()))
        .map(|(_, op, dev)| (op, dev))
        .collect();
    (total_hc, nodes)
}

#[test]
fn a_device_without_the_fused_ops_gets_the_primitive_form() {
    assert!(
        Device::cpu().unwrap().supports_dsv4_ops(),
        "the CPU has the fused operators"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small();
    let path = tiny(dir.path(), &cfg, 23);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let n_layer = cfg.n_layer as usize;
    // Every layer on the CPU, the head on the device: the scheduler runs, every layer is fused.
    let head_only = Placement {
        output: Some(rpc0),
        ..Placement::default()
    };
    let all_fused = open(&path, head_only, vec![rpc0]);
    let (hc_all, _) = fused_nodes(&all_fused);
    assert!(
        hc_all > 0 && hc_all % n_layer == 0,
        "{hc_all} fused hc nodes over {n_layer} layers"
    );
    let per_layer = hc_all / n_layer;

    // Layers 0 and 1 on a device treated as lacking them: built with primitive operators, the rest fused.
    let placement = Placement::default().with_layers(0..2, Some(rpc0));
    let mixed = open(&path, placement.clone(), vec![rpc0]);
    assert_eq!(
        mixed.layer_fused(),
        &[false, false, true, true, true, true][..n_layer]
    );
    let (hc, nodes) = fused_nodes(&mixed);
    assert_eq!(hc, per_layer * (n_layer - 2), "{nodes:?}");
    assert!(
        cfg.compress_ratios[0..2].contains(&4),
        "the test places a ratio-4 layer on the device"
    );
    let cpu_name = Device::cpu().unwrap().name();
    assert!(
        nodes
            .iter()
            .all(|(_, dev)| dev.as_deref() == Some(&cpu_name)),
        "no fused node runs on the device without them: {nodes:?}"
    );
    // The same layers on the device that has them: fused there.
    let fused_there = open(&path, placement, vec![]);
    let (hc, nodes) = fused_nodes(&fused_there);
    assert_eq!(hc, hc_all);
    assert!(nodes
        .iter()
        .any(|(_, dev)| dev.as_deref() == Some(&rpc0.name())));
    // Both forms compute the same model.
    let cpu = open(&path, Placement::default(), vec![]);
    assert_matches("primitive form on the device", &mixed, &cpu, 7);
}

/// The lightning indexer scores a micro-batch's queries in chunks when its products would be large (`indexer_bytes`,
/// 128 MiB by default: on Flash past about 2K tokens of context): forced here to one query per chunk, on the CPU-only
/// path and with every layer on RPC (where the chunks read views of the mask input, which the scheduler must place),
/// the logits equal the default unchunked CPU run's. The tiny model keeps 8 of up to 25 rows, so the scores decide.
#[test]
fn the_indexer_in_chunks_matches_on_the_cpu_and_on_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small();
    let path = tiny(dir.path(), &cfg, 24);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let chunked = |placement: Placement| {
        let mut o = options(&cfg, placement, false);
        o.session.indexer_bytes = 1;
        Engine::open(&path, o).unwrap()
    };
    let reference = open(&path, Placement::default(), vec![]);
    assert_matches(
        "indexer in chunks, CPU",
        &chunked(Placement::default()),
        &reference,
        8,
    );
    let on_rpc = chunked(Placement::all_on(rpc0));
    assert_matches("indexer in chunks, RPC", &on_rpc, &reference, 8);
    // One in-place write of each query's choice per chunk, per ratio-4 layer.
    let mut s = on_rpc.session_sized(512, 64).unwrap();
    s.feed(&prompt(40, on_rpc.n_vocab(), 3), Logits::All)
        .unwrap();
    let counts = s.scheduled_op_counts().unwrap();
    let csa = cfg.compress_ratios.iter().filter(|&&r| r == 4).count();
    assert_eq!(counts.get("SET").copied(), Some(csa * 40), "{counts:?}");
}

/// Options of the paging tests: `placement`, an F32 cache, and with `paged` an expert store of fewer slots than a
/// layer's experts (misses, evictions and waves happen).
fn options(cfg: &TinyConfig, placement: Placement, paged: bool) -> EngineOptions {
    EngineOptions {
        n_threads: 1,
        cache_type: CacheType::F32,
        paging: PagingOptions {
            ctx_size: Some(512),
            n_ubatch: Some(64),
            expert_cache: paged
                .then(|| ferrite::plan::ExpertCacheArg::Slots(u64::from(cfg.n_expert_used) + 1)),
            ..PagingOptions::default()
        },
        layout: Some(placement),
        ..EngineOptions::default()
    }
}

#[test]
fn paged_experts_with_the_rest_on_rpc_match_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small();
    let path = tiny(dir.path(), &cfg, 24);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let paged_opts = |placement: Placement| options(&cfg, placement, true);
    // Everything but the routed experts on the device; the experts paged through the slots in RAM.
    let mut rest_on_rpc = Placement::all_on(rpc0);
    rest_on_rpc.rest.experts = None;
    let paged = Engine::open(&path, paged_opts(rest_on_rpc)).unwrap();
    assert!(paged.is_paged());
    assert_eq!(paged.devices(), vec![rpc0]);
    let cpu = open(&path, Placement::default(), vec![]);
    assert!(!cpu.is_paged());
    paged.reset_expert_stats();
    assert_matches("paged experts, the rest on RPC", &paged, &cpu, 8);
    let st = paged.expert_stats();
    assert!(st.misses > 0 && st.evictions > 0, "the slots page: {st:?}");

    // Paging beside device experts: the routed experts of layers 0 (hash-routed), 3 and 5 on the device, computed
    // there by their layers' graphs; the other layers' experts paged through the slots in RAM, the rest on the device.
    let mut mixed = Placement::all_on(rpc0);
    mixed.rest.experts = None;
    let mixed = mixed.with_layers(0..1, Some(rpc0));
    let mut mixed = mixed.with_layers(3..4, Some(rpc0));
    mixed.layers.resize(cfg.n_layer as usize, mixed.rest);
    mixed.layers[5].experts = Some(rpc0);
    let both = Engine::open(&path, paged_opts(mixed.clone())).unwrap();
    assert!(both.is_paged());
    both.reset_expert_stats();
    assert_matches("paged experts beside device experts", &both, &cpu, 9);
    let st = both.expert_stats();
    assert!(st.misses > 0 && st.evictions > 0, "the slots page: {st:?}");
    // Every layer's experts on the device: nothing left to page, so no store.
    let none_paged = Engine::open(&path, paged_opts(Placement::all_on(rpc0))).unwrap();
    assert!(!none_paged.is_paged());
    assert_matches("every expert on the device", &none_paged, &cpu, 10);
}

/// The device expert cache (`--gpu-experts`) on an RPC device, with only a few slots so that device hits, host
/// computation and uploads all happen: in front of resident CPU experts, and in front of the paged store.
#[test]
fn device_expert_cache_on_rpc_matches_the_cpu() {
    use ferrite::experts::device::GpuExpertsArg;
    let dir = tempfile::tempdir().unwrap();
    let cfg = TinyConfig::small();
    let path = tiny(dir.path(), &cfg, 25);
    let server = RpcServer::start();
    let rpc0 = server.device();
    let cpu = open(&path, Placement::default(), vec![]);
    let mut experts_on_cpu = Placement::all_on(rpc0);
    experts_on_cpu.rest.experts = None;
    let opts = |paged: bool| EngineOptions {
        gpu_experts: Some(GpuExpertsArg::Slots(4)),
        ..options(&cfg, experts_on_cpu.clone(), paged)
    };
    // An expert's bytes in a slot (the RPC device has no host buffer type: no staging by default).
    let stride = {
        let e = Engine::open(&path, opts(false)).unwrap();
        let cache = e.device_experts().expect("a device cache");
        assert_eq!(cache.staging_waits(), None);
        cache.bytes() / cache.n_slots()
    };
    // The third case runs micro-batches of 16 tokens or more (the whole prompt's 64 + 36) as one graph, as a device
    // that offloads large products would, and decodes through the device cache: both paths share the cache. The
    // fourth stages uploads through host memory of two and a half experts (as on CUDA, in RAM here), so the ring
    // starts over every other upload.
    let cases = [
        (
            false,
            None,
            None,
            "device expert cache before resident CPU experts",
        ),
        (
            true,
            None,
            None,
            "device expert cache before the paged store",
        ),
        (
            false,
            Some(16),
            None,
            "device expert cache, prompts as one graph",
        ),
        (
            false,
            None,
            Some(stride * 5 / 2),
            "device expert cache, uploads staged",
        ),
    ];
    for (paged, one_graph_from, upload_staging, what) in cases {
        let engine = Engine::open(
            &path,
            EngineOptions {
                one_graph_from,
                upload_staging,
                ..opts(paged)
            },
        )
        .unwrap();
        assert_eq!(engine.is_paged(), paged);
        let cache = engine.device_experts().expect("a device cache");
        assert_eq!((cache.n_slots(), cache.device()), (4, rpc0));
        engine.reset_expert_stats();
        assert_matches(what, &engine, &cpu, 11);
        let st = engine.expert_stats();
        assert!(
            st.device_hits > 0 && st.device_loads > 4 && st.device_bytes > 0,
            "{what}: the device cache hits and refills: {st:?}"
        );
        assert!(st.hits > 0, "{what}: the host computes the rest: {st:?}");
        // Experts known or guessed before their layer go up ahead of it, and layers use some of them.
        assert!(
            st.device_ahead > 0 && st.device_ahead_used > 0 && st.device_ahead <= st.device_loads,
            "{what}: uploads ahead of the layer: {st:?}"
        );
        if paged {
            assert!(st.misses > 0, "{what}: the store pages: {st:?}");
        }
        assert!(st.to_string().contains("device cache: "), "{st}");
        if upload_staging.is_some() {
            let waits = cache.staging_waits().expect("staged");
            assert!(
                waits * 3 >= st.device_loads,
                "{what}: {waits} waits for {} uploads",
                st.device_loads
            );
        }
        if one_graph_from.is_some() {
            // A 40-token micro-batch is one graph; a decoded token is the stage chain (graphs per layer).
            let mut s = engine.session_sized(512, 64).unwrap();
            s.feed(&prompt(40, engine.n_vocab(), 4), Logits::Last)
                .unwrap();
            assert_eq!(s.graph_stats().built, 1, "{what}: the prompt is one graph");
            s.feed(&[1], Logits::Last).unwrap();
            let built = s.graph_stats().built;
            assert!(
                built > cfg.n_layer as u64,
                "{what}: {built} graphs for a token"
            );
        }
    }
    // The default on an RPC server's device is no cache: an upload there crosses the network.
    let engine = Engine::open(
        &path,
        EngineOptions {
            gpu_experts: None,
            ..opts(false)
        },
    )
    .unwrap();
    assert!(engine.device_experts().is_none());
    // Without a device to cache on, the flag is refused with a hint.
    let err = Engine::open(
        &path,
        EngineOptions {
            layout: Some(Placement::default()),
            gpu_experts: Some(GpuExpertsArg::Slots(4)),
            ..opts(false)
        },
    )
    .err()
    .expect("refused");
    assert!(
        format!("{err:#}").contains("--gpu-experts needs a device"),
        "{err:#}"
    );
}

fn ferrite(args: &[&str], cache: &Path) -> Command {
    let mut c = command(env!("CARGO_BIN_EXE_ferrite"));
    c.args(args).env("FERRITE_CACHE_DIR", cache);
    c
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("127.0.0.1:{}", free_port());
    let out = ferrite(
        &[
            "complete", "-m", "demo", "-p", "hi", "-n", "2", "--rpc", &endpoint, "--device", "RPC0",
        ],
        dir.path(),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the RPC server at {endpoint}")),
        "{stderr}"
    );
    // ggml's RPC client cannot take an IPv6 address: refused before it tries.
    let out = ferrite(
        &["complete", "-m", "demo", "-p", "hi", "--rpc", "[::1]:50052"],
        dir.path(),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not an IPv6 address"), "{stderr}");
    let out = ferrite(
        &["complete", "-m", "demo", "-p", "hi", "--device", "NOPE0"],
        dir.path(),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown device \"NOPE0\" in --device"),
        "{stderr}"
    );
}

#[test]
fn an_rpc_server_killed_mid_generation_ends_the_run_with_exit_1() {
    let (status, stderr, endpoint) = server_fails_mid_generation(false, &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the RPC server at {endpoint} closed the connection"
        )),
        "{stderr}"
    );
}

#[test]
fn an_rpc_server_stopped_mid_generation_ends_the_run_after_the_reply_timeout() {
    // SIGSTOP keeps the connection open and the kernel keeps accepting data: without a reply timeout ggml-rpc would
    // wait forever.
    let (status, stderr, endpoint) = server_fails_mid_generation(true, &["--rpc-timeout", "2"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the RPC server at {endpoint} did not answer within 2 s"
        )) && stderr.contains("--rpc-timeout"),
        "{stderr}"
    );
}

/// Runs a long generation on an RPC server's device, and once text comes out kills the server (or stops it with
/// SIGSTOP, `stop`); returns how ferrite ended (within 20 s, else the test fails: a hang), its stderr and the
/// server's endpoint.
fn server_fails_mid_generation(
    stop: bool,
    extra: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), &TinyConfig::demo(), 1);
    let mut server = RpcServer::start();
    let endpoint = server.endpoint.clone();
    let args = [
        "complete",
        "-m",
        path.to_str().unwrap(),
        "-p",
        "hello",
        "-n",
        "4000",
        "--temp",
        "0",
        "-t",
        "1",
        "--rpc",
        &endpoint,
        "--device",
        "RPC0",
    ];
    let mut child = ferrite(&[&args[..], extra].concat(), dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for generated text, then kill or stop the server.
    let mut stdout = child.stdout.take().unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 256];
    while got < 64 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the run ended before the server failed");
        got += n;
    }
    assert!(child.try_wait().unwrap().is_none(), "still generating");
    match stop {
        // SAFETY: sends a signal to the server child this test started (still alive: killed only on drop).
        true => assert_eq!(
            unsafe { libc::kill(server.child.id() as i32, libc::SIGSTOP) },
            0
        ),
        false => server.kill(),
    }
    let failed = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stdout.read_to_end(&mut rest);
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if failed.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("ferrite hangs after its RPC server failed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    reader.join().unwrap();
    (status, stderr, endpoint)
}

#[test]
fn rpc_server_warns_when_bound_beyond_loopback() {
    let port = free_port().to_string();
    let mut child = command(env!("CARGO_BIN_EXE_ferrite"))
        .args([
            "rpc-server",
            "--host",
            "0.0.0.0",
            "--port",
            &port,
            "-t",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&text).contains("authentication") {
        let n = stderr.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("no authentication"), "{text}");
}

#[test]
fn complete_on_an_rpc_device_answers_as_on_the_cpu_and_verbose_shows_the_splits() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), &TinyConfig::demo(), 1);
    let server = RpcServer::start();
    let model = path.to_str().unwrap();
    let args = [
        "complete",
        "-m",
        model,
        "-p",
        "hello",
        "-n",
        "24",
        "--temp",
        "0",
        "-t",
        "1",
        "--verbose",
    ];
    let answer = |extra: &[&str]| {
        let out = ferrite(&[&args[..], extra].concat(), dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        let ids = stderr
            .lines()
            .find(|l| l.contains("answer ids"))
            .unwrap_or_else(|| panic!("no answer ids in {stderr}"))
            .to_string();
        (ids, stderr)
    };
    let (cpu_ids, cpu_err) = answer(&[]);
    assert!(
        !cpu_err.contains("scheduler"),
        "the CPU-only path has no scheduler: {cpu_err}"
    );
    let (rpc_ids, rpc_err) = answer(&["--rpc", &server.endpoint, "--device", "RPC0"]);
    assert_eq!(rpc_ids, cpu_ids);
    assert!(rpc_err.contains("ferrite: scheduler: "), "{rpc_err}");
    assert!(rpc_err.contains(" splits"), "{rpc_err}");
    // The planner (-ngl auto) keeps the token embedding on the CPU, as llama.cpp does; layer 0 runs on RPC0.
    assert!(rpc_err.contains("embedding and layer 0: CPU "), "{rpc_err}");
    assert!(rpc_err.contains("layer 2: RPC0 "), "{rpc_err}");
    // The planner's flags, as llama.cpp users write them: every routed expert on the CPU; and -ot moving single
    // tensors (one layer's gate and up experts to the CPU, its down experts staying on RPC0).
    let rpc = ["--rpc", &server.endpoint];
    let (moe_ids, moe_err) = answer(&[&rpc[..], &["-ngl", "all", "--cpu-moe"]].concat());
    assert_eq!(moe_ids, cpu_ids);
    assert!(
        moe_err.contains("(0 with their routed experts)"),
        "{moe_err}"
    );
    let ot = r"blk\.1\.ffn_(gate|up)_exps=CPU";
    let (ot_ids, ot_err) = answer(&[&rpc[..], &["-ngl", "all", "-ot", ot]].concat());
    assert_eq!(ot_ids, cpu_ids);
    assert!(
        ot_err.contains(&format!("CPU              -ot {ot}")),
        "{ot_err}"
    );
    assert!(ot_err.contains("layer 2: CPU "), "{ot_err}");
    // Paging beside device experts: the first two layers' routed experts on the CPU, paged through 3 slots; the
    // other layers' on RPC0.
    let paged = ["-ngl", "all", "--n-cpu-moe", "2", "--expert-cache", "3"];
    let (paged_ids, paged_err) = answer(&[&rpc[..], &paged[..]].concat());
    assert_eq!(paged_ids, cpu_ids);
    assert!(
        paged_err.contains("layers 0-1: routed experts                     CPU (paged)"),
        "{paged_err}"
    );
    assert!(
        paged_err.contains("(2 with their routed experts)"),
        "{paged_err}"
    );
    assert!(paged_err.contains(" misses)"), "{paged_err}");
    // The device expert cache before the CPU's experts: 3 slots on RPC0.
    let cached = ["-ngl", "all", "--cpu-moe", "--gpu-experts", "3"];
    let (cached_ids, cached_err) = answer(&[&rpc[..], &cached[..]].concat());
    assert_eq!(cached_ids, cpu_ids);
    assert!(
        cached_err.contains("a cache of 3 routed experts of the CPU's layers"),
        "{cached_err}"
    );
    assert!(cached_err.contains("; device cache: "), "{cached_err}");
    // auto takes what the device has left (a --gpu-mem budget here); more than that is refused with the numbers;
    // 0 is no cache.
    let budget = ["-ngl", "all", "--cpu-moe", "--gpu-mem", "81M"];
    let (auto_ids, auto_err) =
        answer(&[&rpc[..], &budget[..], &["--gpu-experts", "auto"]].concat());
    assert_eq!(auto_ids, cpu_ids);
    assert!(
        auto_err.contains("a cache of 7 routed experts"),
        "{auto_err}"
    );
    let out = ferrite(
        &[&args[..], &rpc[..], &budget[..], &["--gpu-experts", "32"]].concat(),
        dir.path(),
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("32 experts take 6.00 MiB on RPC0, which has 1.36 MiB left")
            && err.contains("--gpu-experts 7 or auto"),
        "{err}"
    );
    let (none_ids, none_err) = answer(&[&rpc[..], &cached[..4], &["0"]].concat());
    assert_eq!(none_ids, cpu_ids);
    assert!(!none_err.contains("device cache"), "{none_err}");
    assert!(rpc_err.contains("head: RPC0"), "{rpc_err}");
}
