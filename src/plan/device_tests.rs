//! The device placement planner on fixture devices: the tiny configurations and the real Flash shape (43 layers,
//! Q4_K experts) from the model generator's tensor tables, no file written but the small cross-check models.

use super::budget::SystemMemory;
use super::devices::*;
use super::rules::{cpu_moe_rules, n_cpu_moe_rules, parse_override_tensor, placement_rules};
use super::*;
use crate::cache::{CacheSizes, CacheType};
use crate::ggml::{DeviceInfo, DeviceKind};
use crate::model::config::{Config, LayerKind};
use crate::model::sizes::TensorMeta;
use crate::model::tiny::{tiny_tensors, write_tiny_model, TinyConfig};
use crate::units::{GIB, MIB};

fn cpu() -> DeviceInfo {
    DeviceInfo {
        backend: "CPU".into(),
        name: "CPU".into(),
        buffer_type: "CPU".into(),
        description: "fixture CPU".into(),
        kind: DeviceKind::Cpu,
        memory_free: (100 * GIB) as usize,
        memory_total: (128 * GIB) as usize,
    }
}

fn gpu(name: &str, free: u64, total: u64) -> DeviceInfo {
    DeviceInfo {
        backend: "CUDA".into(),
        name: name.into(),
        buffer_type: name.into(),
        description: "fixture GPU".into(),
        kind: DeviceKind::Gpu,
        memory_free: free as usize,
        memory_total: total as usize,
    }
}

/// The real `Config` of a small model file, read once.
fn small_file_config() -> Config {
    use std::sync::OnceLock;
    static CFG: OnceLock<Config> = OnceLock::new();
    CFG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.gguf");
        write_tiny_model(&path, &TinyConfig::small(), 1).unwrap();
        Config::from_model(&gguf::Model::open(&path).unwrap()).unwrap()
    })
    .clone()
}

/// The `Config` a file written from `tc` reads as, in every field the placement uses (checked against real files
/// by `fixture_configs_match_files`); the others are the small model's.
fn config_of(tc: &TinyConfig) -> Config {
    let kinds = tc
        .compress_ratios
        .iter()
        .map(|r| match r {
            0 => LayerKind::Raw,
            4 => LayerKind::Csa,
            _ => LayerKind::Hca,
        })
        .collect();
    Config {
        n_layer: tc.n_layer as usize,
        n_embd: tc.n_embd as usize,
        n_vocab: tc.n_vocab as usize,
        n_head: tc.n_head as usize,
        head_dim: tc.head_dim as usize,
        window: tc.sliding_window as usize,
        kinds,
        n_expert: tc.n_expert as usize,
        n_expert_used: tc.n_expert_used as usize,
        expert_width: vec![tc.expert_ffn as usize; tc.n_layer as usize],
        indexer_dim: tc.indexer_head_dim as usize,
        ..small_file_config()
    }
}

fn model_of(tc: &TinyConfig, n_ctx: usize) -> PlacementModel {
    let cfg = config_of(tc);
    let tensors = tiny_tensors(tc);
    let bytes: Vec<u64> = tensors
        .iter()
        .map(|t| t.ty.tensor_bytes(&t.dims).unwrap())
        .collect();
    let metas = tensors.iter().zip(&bytes).map(|(t, &b)| TensorMeta {
        name: &t.name,
        dims: &t.dims,
        n_bytes: b,
    });
    let sizes = CacheSizes::new(&cfg, n_ctx, 512.min(n_ctx), CacheType::F16);
    PlacementModel::new(metas, &cfg, &sizes)
}

fn ram(bytes: u64) -> Budget {
    Budget::from_system(&SystemMemory {
        mem_available: Some(bytes),
        cgroup: None,
        physical: None,
    })
}

fn plan(
    model: &PlacementModel,
    devices: &[DeviceInfo],
    req: &PlacementRequest,
    ram_bytes: u64,
) -> Result<DevicePlan, PlacementError> {
    plan_devices(
        model,
        devices,
        req,
        &ram(ram_bytes),
        &PlanRequest::default(),
    )
}

fn auto() -> PlacementRequest {
    PlacementRequest {
        op_offload: true,
        ..PlacementRequest::default()
    }
}

fn ngl(n: GpuLayers) -> PlacementRequest {
    PlacementRequest {
        gpu_layers: n,
        ..auto()
    }
}

fn with_rules(base: PlacementRequest, rules: Vec<rules::TensorRule>) -> PlacementRequest {
    PlacementRequest { rules, ..base }
}

#[test]
fn fixture_configs_match_files() {
    for tc in [TinyConfig::alt(), TinyConfig::demo()] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_tiny_model(&path, &tc, 2).unwrap();
        let file = gguf::Model::open(&path).unwrap();
        let cfg = Config::from_model(&file).unwrap();
        let sizes = CacheSizes::new(&cfg, 1000, 64, CacheType::F16);
        let metas = file.tensors().iter().map(|t| TensorMeta {
            name: &t.info.name,
            dims: &t.info.dims,
            n_bytes: t.info.n_bytes,
        });
        let from_file = PlacementModel::new(metas, &cfg, &sizes);
        let fixture_cfg = config_of(&tc);
        let fixture_sizes = CacheSizes::new(&fixture_cfg, 1000, 64, CacheType::F16);
        let tensors = tiny_tensors(&tc);
        let bytes: Vec<u64> = tensors
            .iter()
            .map(|t| t.ty.tensor_bytes(&t.dims).unwrap())
            .collect();
        let metas = tensors.iter().zip(&bytes).map(|(t, &b)| TensorMeta {
            name: &t.name,
            dims: &t.dims,
            n_bytes: b,
        });
        assert_eq!(
            PlacementModel::new(metas, &fixture_cfg, &fixture_sizes),
            from_file
        );
    }
}

#[test]
fn roles_of_tensor_names() {
    assert_eq!(tensor_role("token_embd.weight", 43), TensorRole::Embedding);
    assert_eq!(tensor_role("output.weight", 43), TensorRole::Output);
    assert_eq!(tensor_role("output_hc_fn.weight", 43), TensorRole::Output);
    assert_eq!(
        tensor_role("blk.7.attn_q_a.weight", 43),
        TensorRole::Layer(7)
    );
    assert_eq!(
        tensor_role("blk.7.ffn_gate_shexp.weight", 43),
        TensorRole::Layer(7)
    );
    assert_eq!(
        tensor_role("blk.7.ffn_gate_inp.weight", 43),
        TensorRole::Layer(7)
    );
    assert_eq!(
        tensor_role("blk.42.ffn_down_exps.weight", 43),
        TensorRole::Routed(42)
    );
    // The MTP block (layer 43 of a 43-layer model) is not loaded.
    assert_eq!(
        tensor_role("blk.43.ffn_down_exps.weight", 43),
        TensorRole::Unused
    );
    assert_eq!(
        tensor_role("blk.43.attn_q_a.weight", 43),
        TensorRole::Unused
    );
}

/// Weights repacked into a layout larger than the file's (AMX's) count at that size where they stay on the CPU, and
/// at the file's on a device; routed experts are never given any.
#[test]
fn larger_repacked_layouts_count_on_the_cpu_only() {
    let tc = TinyConfig::small();
    let plain = model_of(&tc, 4096);
    let extra = |name: &str| match name.ends_with(".attn_q_a.weight") || name.contains("_exps") {
        true => 1000,
        false => 0,
    };
    let model = model_of(&tc, 4096).with_cpu_extra(extra);
    let n_layer = tc.n_layer as u64;
    let want = plain.cpu_only_inputs().resident_bytes + 1000 * n_layer;
    assert_eq!(model.cpu_only_inputs().resident_bytes, want);
    let p = plan(&model, &[cpu()], &auto(), GIB).unwrap();
    assert_eq!(p.cpu.inputs.resident_bytes, want);
    // The last layer (and the output head) on a GPU: its weights leave the CPU at the file's size.
    let gpu0 = gpu("CUDA0", 8 * GIB, 8 * GIB);
    let devices = [cpu(), gpu0];
    let on_gpu = plan(&model, &devices, &ngl(GpuLayers::Count(2)), GIB).unwrap();
    let plain_on_gpu = plan(&plain, &devices, &ngl(GpuLayers::Count(2)), GIB).unwrap();
    assert_eq!(
        on_gpu.cpu.inputs.resident_bytes,
        plain_on_gpu.cpu.inputs.resident_bytes + 1000 * (n_layer - 1)
    );
    assert_eq!(
        on_gpu.devices[1].bytes.weights,
        plain_on_gpu.devices[1].bytes.weights
    );
}

/// With nothing offloaded, the CPU's plan is the memory plan of the whole model, as before devices existed.
#[test]
fn cpu_only_is_the_memory_plan_of_the_whole_model() {
    let model = model_of(&TinyConfig::small(), 4096);
    let want = plan_memory(&model.cpu_only_inputs(), &ram(GIB), &PlanRequest::default()).unwrap();
    let gpu0 = gpu("CUDA0", 8 * GIB, 8 * GIB);
    let none = PlacementRequest {
        devices: DeviceSelection::None,
        ..auto()
    };
    for (devices, req) in [
        (vec![cpu()], auto()),
        (vec![], auto()),
        (vec![cpu(), gpu0.clone()], none),
        (vec![cpu(), gpu0.clone()], ngl(GpuLayers::Count(0))),
    ] {
        let p = plan(&model, &devices, &req, GIB).unwrap();
        assert!(p.is_cpu_only(), "{p}");
        assert_eq!(p.cpu, want, "{p}");
        assert_eq!(p.n_gpu_layers, 0);
        assert!(p
            .layers
            .iter()
            .all(|l| l.main.at == CPU && l.experts.at == ExpertHome::CpuResident));
        for t in &model.tensors {
            assert_eq!(p.tensor_device(&t.name), CPU, "{}", t.name);
        }
    }
    // As in llama.cpp, rules move weights, not the cache: with every weight on the CPU, the layers' caches are still
    // on the device -ngl gives them.
    let gpu0 = gpu("CUDA0", 8 * GIB, 8 * GIB);
    let p = plan(
        &model,
        &[cpu(), gpu0],
        &with_rules(auto(), parse_override_tensor("=CPU").unwrap()),
        GIB,
    )
    .unwrap();
    assert_eq!(p.devices[1].bytes.weights, 0);
    assert_eq!(p.devices[1].bytes.cache, model.context_bytes);
    assert_eq!(
        p.cpu.inputs.resident_bytes + p.cpu.inputs.routed_bytes(),
        model.tensors.iter().map(|t| t.bytes).sum::<u64>()
    );
    let table = p.to_string();
    assert!(
        table.contains("tensors") && table.contains("-ot =CPU"),
        "{table}"
    );
    // -ngl with no device to offload to is a warning, not an error (llama.cpp ignores it too).
    let p = plan(&model, &[cpu()], &ngl(GpuLayers::Count(99)), GIB).unwrap();
    assert!(
        p.warnings.iter().any(|w| w.contains("-ngl is ignored")),
        "{:?}",
        p.warnings
    );
}

/// -ngl N counts the output head as the last layer: 1 is the head only, 2 the last layer and the head.
#[test]
fn ngl_counts_layers_from_the_end_with_the_head_last() {
    let tc = TinyConfig::small();
    let model = model_of(&tc, 1024);
    let devices = [cpu(), gpu("CUDA0", 8 * GIB, 8 * GIB)];
    let gpu0 = DeviceId(1);
    let p = plan(&model, &devices, &ngl(GpuLayers::Count(1)), GIB).unwrap();
    assert_eq!(p.output.at, gpu0);
    assert!(p.layers.iter().all(|l| l.main.at == CPU));
    assert_eq!(p.embedding.at, CPU);
    let p = plan(&model, &devices, &ngl(GpuLayers::Count(3)), GIB).unwrap();
    let on: Vec<usize> = p
        .layers
        .iter()
        .filter(|l| l.main.at == gpu0)
        .map(|l| l.layer)
        .collect();
    assert_eq!(on, [4, 5]);
    // Whole layers: their experts go with them.
    assert_eq!(p.layers[5].experts.at, ExpertHome::Device(gpu0));
    assert_eq!(p.layers[3].experts.at, ExpertHome::CpuResident);
    assert_eq!(p.n_gpu_layers, 3);
    for n in [GpuLayers::All, GpuLayers::Count(7), GpuLayers::Count(99)] {
        let p = plan(&model, &devices, &ngl(n), GIB).unwrap();
        assert!(p
            .layers
            .iter()
            .all(|l| l.main.at == gpu0 && l.experts.at == ExpertHome::Device(gpu0)));
        assert_eq!(
            (p.output.at, p.embedding.at, p.n_gpu_layers),
            (gpu0, CPU, 7)
        );
        // The device holds everything but the embedding, and the cache of every layer.
        let d = &p.devices[1].bytes;
        let embd = model
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .unwrap()
            .bytes;
        let all: u64 = model.tensors.iter().map(|t| t.bytes).sum();
        assert_eq!(d.weights, all - embd);
        assert_eq!(d.cache, model.context_bytes);
        assert_eq!(d.compute, model.compute_bytes);
        assert_eq!(p.cpu.inputs.context_bytes, 0);
        assert_eq!(p.cpu.inputs.resident_bytes, embd);
        assert!(p.cpu.inputs.experts.is_empty());
    }
}

#[test]
fn cpu_moe_and_n_cpu_moe_keep_experts_on_the_cpu() {
    let model = model_of(&TinyConfig::small(), 1024);
    let devices = [cpu(), gpu("CUDA0", 8 * GIB, 8 * GIB)];
    let gpu0 = DeviceId(1);
    for base in [ngl(GpuLayers::All), auto()] {
        let p = plan(
            &model,
            &devices,
            &with_rules(base.clone(), cpu_moe_rules()),
            GIB,
        )
        .unwrap();
        assert!(p.layers.iter().all(|l| l.main.at == gpu0), "{p}");
        assert!(
            p.layers
                .iter()
                .all(|l| l.experts.at == ExpertHome::CpuResident),
            "{p}"
        );
        assert!(p
            .layers
            .iter()
            .all(|l| l.experts.why == Why::Rule("--cpu-moe".into())));
        assert!(p.overrides.is_empty(), "{:?}", p.overrides);
        assert_eq!(p.cpu.inputs.experts.len(), 6);
        assert_eq!(p.tensor_device("blk.2.ffn_up_exps.weight"), CPU);
        assert_eq!(p.tensor_device("blk.2.ffn_up_shexp.weight"), gpu0);
        let p = plan(&model, &devices, &with_rules(base, n_cpu_moe_rules(2)), GIB).unwrap();
        let homes: Vec<ExpertHome> = p.layers.iter().map(|l| l.experts.at).collect();
        let d = ExpertHome::Device(gpu0);
        let cpu = ExpertHome::CpuResident;
        assert_eq!(homes, [cpu, cpu, d, d, d, d], "{p}");
        assert_eq!(p.layers[1].experts.why, Why::Rule("--n-cpu-moe 2".into()));
    }
    // -ot is tried first: it wins over --cpu-moe.
    let ot = parse_override_tensor(r"blk\.5\.ffn_(up|down|gate)_exps=CUDA0").unwrap();
    let rules = placement_rules(&ot, None, true);
    let p = plan(
        &model,
        &devices,
        &with_rules(ngl(GpuLayers::All), rules),
        GIB,
    )
    .unwrap();
    assert_eq!(p.layers[5].experts.at, ExpertHome::Device(gpu0));
    assert_eq!(p.layers[4].experts.at, ExpertHome::CpuResident);
}

/// A rule that moves part of a layer's experts is a per-tensor override; the layer's other experts stay where the
/// layer's placement says, and the split layer is not paged.
#[test]
fn override_tensor_moves_single_tensors() {
    let model = model_of(&TinyConfig::small(), 1024);
    let devices = [cpu(), gpu("CUDA0", 8 * GIB, 8 * GIB)];
    let gpu0 = DeviceId(1);
    let ot = parse_override_tensor(r"blk\.3\.ffn_up_exps=CUDA0,attn_q_b=CPU").unwrap();
    let rules = placement_rules(&ot, None, true);
    let p = plan(&model, &devices, &with_rules(auto(), rules), GIB).unwrap();
    assert_eq!(p.tensor_device("blk.3.ffn_up_exps.weight"), gpu0);
    assert_eq!(p.tensor_device("blk.3.ffn_gate_exps.weight"), CPU);
    assert_eq!(p.tensor_device("blk.3.attn_q_b.weight"), CPU);
    assert_eq!(p.tensor_device("blk.3.attn_q_a.weight"), gpu0);
    let names: Vec<&str> = p.overrides.iter().map(|o| o.name.as_str()).collect();
    assert!(names.contains(&"blk.3.ffn_up_exps.weight"), "{names:?}");
    let q_b = model
        .tensors
        .iter()
        .filter(|t| t.name.contains("attn_q_b"))
        .count();
    assert!(q_b > 6);
    assert_eq!(names.iter().filter(|n| n.contains("attn_q_b")).count(), q_b);
    // Layer 3's gate and down experts (two thirds of its bytes) are on the CPU: the layer's experts are there.
    assert_eq!(p.layers[3].experts.at, ExpertHome::CpuResident);
    assert!(!names.contains(&"blk.3.ffn_gate_exps.weight"), "{names:?}");
    // Layer 3 is split: its CPU experts are counted resident, the other layers' are pageable.
    assert_eq!(p.cpu.inputs.experts.len(), 5);
    assert!(p.cpu.inputs.experts.iter().all(|l| l.layer != 3));
    let up = model
        .tensors
        .iter()
        .find(|t| t.name == "blk.3.ffn_up_exps.weight")
        .unwrap();
    let moved = p.overrides.iter().find(|o| o.name == up.name).unwrap();
    assert_eq!((moved.bytes, moved.device), (up.bytes, gpu0));
    let table = p.to_string();
    assert!(table.contains("blk.3.ffn_up_exps.weight"), "{table}");
    assert!(table.contains(r"-ot blk\.3\.ffn_up_exps=CUDA0"), "{table}");
}

#[test]
fn device_and_buffer_errors_name_what_is_there() {
    let model = model_of(&TinyConfig::small(), 1024);
    let devices = [
        cpu(),
        gpu("CUDA0", 8 * GIB, 8 * GIB),
        gpu("CUDA1", 8 * GIB, 8 * GIB),
    ];
    let names = |v: &[&str]| PlacementRequest {
        devices: DeviceSelection::Names(v.iter().map(|s| s.to_string()).collect()),
        ..auto()
    };
    let e = plan(&model, &devices, &names(&["Vulkan0"]), GIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown device \"Vulkan0\" in --device; available: CPU, CUDA0, CUDA1"
    );
    let e = plan(&model, &[cpu()], &names(&["CUDA0"]), GIB).unwrap_err();
    assert!(e.to_string().contains("available: CPU"), "{e}");
    let ot = with_rules(auto(), parse_override_tensor("exps=CUDA7").unwrap());
    let e = plan(&model, &devices, &ot, GIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown buffer type \"CUDA7\" in `-ot exps=CUDA7`; available: CPU, CUDA0, CUDA1"
    );
    let left_out = with_rules(
        names(&["CUDA0"]),
        parse_override_tensor("exps=CUDA1").unwrap(),
    );
    let e = plan(&model, &devices, &left_out, GIB).unwrap_err();
    assert!(
        e.to_string()
            .contains("names CUDA1, which --device leaves out"),
        "{e}"
    );
    let too_many = PlacementRequest {
        gpu_mem: vec![GIB; 3],
        ..auto()
    };
    let e = plan(&model, &devices, &too_many, GIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--gpu-mem gives 3 sizes for the devices CUDA0, CUDA1 (one size per device, in --device order)"
    );
    let p = plan(&model, &[cpu()], &too_many, GIB).unwrap();
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("--gpu-mem is ignored")),
        "{:?}",
        p.warnings
    );
    let silent = [cpu(), gpu("RPC0[x]", 0, 0)];
    let e = plan(&model, &silent, &auto(), GIB).unwrap_err();
    assert!(
        e.to_string().contains("RPC0[x] reports no memory size"),
        "{e}"
    );
    // With --gpu-mem it plans.
    let given = PlacementRequest {
        gpu_mem: vec![GIB],
        ..auto()
    };
    let p = plan(&model, &silent, &given, GIB).unwrap();
    assert_eq!(
        p.devices[1].budget.unwrap().source,
        DeviceBudgetSource::Flag
    );
    // --device CPU is the CPU only; --device names keep their order.
    let p = plan(&model, &devices, &names(&["CPU"]), GIB).unwrap();
    assert!(p.is_cpu_only());
    let p = plan(&model, &devices, &names(&["CUDA1", "CPU", "CUDA0"]), GIB).unwrap();
    let order: Vec<&str> = p.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(order, ["CPU", "CUDA1", "CUDA0"]);
}

/// Default selection: GPUs (integrated ones only without a discrete one), never the CPU or BLAS-like accelerators.
#[test]
fn default_devices_are_the_gpus() {
    let model = model_of(&TinyConfig::small(), 1024);
    let mut igpu = gpu("Vulkan1", 4 * GIB, 4 * GIB);
    igpu.kind = DeviceKind::IntegratedGpu;
    let mut blas = gpu("BLAS", 0, 0);
    blas.kind = DeviceKind::Accelerator;
    let all = [
        cpu(),
        blas.clone(),
        igpu.clone(),
        gpu("Vulkan0", 8 * GIB, 8 * GIB),
    ];
    let p = plan(&model, &all, &auto(), GIB).unwrap();
    let names: Vec<&str> = p.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["CPU", "Vulkan0"]);
    let p = plan(&model, &[cpu(), blas, igpu], &auto(), GIB).unwrap();
    let names: Vec<&str> = p.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["CPU", "Vulkan1"]);
}

/// Two devices split the offloaded layers in proportion to their budgets, contiguously, the head on the last.
#[test]
fn two_devices_split_layers_by_budget() {
    let model = model_of(&TinyConfig::alt(), 1024);
    let devices = [cpu(), gpu("CUDA0", 0, 16 * GIB), gpu("CUDA1", 0, 16 * GIB)];
    let req = PlacementRequest {
        gpu_mem: vec![GIB, 3 * GIB],
        ..ngl(GpuLayers::All)
    };
    let p = plan(&model, &devices, &req, GIB).unwrap();
    // 8 units (7 layers and the head): units 0-1 (fractions 0 and 1/8 < 1/4) on CUDA0, the rest on CUDA1.
    let mains: Vec<usize> = p.layers.iter().map(|l| l.main.at.0).collect();
    assert_eq!(mains, [1, 1, 2, 2, 2, 2, 2]);
    assert_eq!(p.output.at, DeviceId(2));
    let cache0: u64 = model.layer_cache[..2].iter().sum();
    assert_eq!(p.devices[1].bytes.cache, cache0);
    assert_eq!(p.devices[2].bytes.cache, model.context_bytes - cache0);
}

const FLASH_LAYERS: u32 = 43;

fn flash_gpu() -> DeviceInfo {
    // A 24 GiB card with the driver's 300 MiB in use.
    gpu("CUDA0", 24 * GIB - 300 * MIB, 24 * GIB)
}

/// The Flash shape on a 24 GiB GPU and 128 GiB of RAM, -ngl auto: every layer's non-routed weights, the cache and
/// the head on the GPU, then the routed experts of the last layers while they fit; the number of expert layers
/// computed here from the sizes, independently of the planner's loop.
#[test]
fn flash_auto_fit_on_24_gib() {
    let tc = TinyConfig::flash(FLASH_LAYERS);
    for n_ctx in [4096, 32768] {
        let model = model_of(&tc, n_ctx);
        let devices = [cpu(), flash_gpu()];
        let p = plan(&model, &devices, &auto(), 128 * GIB).unwrap();
        println!("Flash shape, 43 layers, Q4_K experts, -c {n_ctx}:\n{p}");
        let gpu0 = DeviceId(1);
        assert_eq!(p.n_gpu_layers, FLASH_LAYERS + 1, "{p}");
        assert!(p.layers.iter().all(|l| l.main.at == gpu0));
        assert_eq!(p.output.at, gpu0);
        assert_eq!(p.embedding.at, CPU);
        let budget = p.devices[1].budget.unwrap();
        assert_eq!(budget.bytes, 24 * GIB - 300 * MIB - GIB);
        let all: u64 = model.tensors.iter().map(|t| t.bytes).sum();
        let embd = model
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .unwrap()
            .bytes;
        let routed = model.sizes.bytes_routed;
        let per_layer = routed / FLASH_LAYERS as u64;
        let fixed = all - embd - routed + model.context_bytes + model.compute_bytes;
        let k = (budget.bytes - fixed) / per_layer;
        assert!((1..FLASH_LAYERS as u64).contains(&k), "k = {k}");
        let on_gpu: Vec<usize> = p
            .layers
            .iter()
            .filter(|l| l.experts.at == ExpertHome::Device(gpu0))
            .map(|l| l.layer)
            .collect();
        let want: Vec<usize> =
            (FLASH_LAYERS as usize - k as usize..FLASH_LAYERS as usize).collect();
        assert_eq!(on_gpu, want, "{p}");
        let used = p.devices[1].bytes.total();
        assert!(used <= budget.bytes && used + per_layer > budget.bytes);
        assert_eq!(used, fixed + k * per_layer);
        // The rest (about 130 GiB of experts) does not fit 128 GiB of RAM with its margin: paged through the
        // expert store; the CPU's plan holds exactly those layers.
        assert!(
            matches!(p.cpu.placement, ExpertPlacement::Paged { .. }),
            "{p}"
        );
        assert!(p.layers[..want[0]]
            .iter()
            .all(|l| l.experts.at == ExpertHome::CpuPaged));
        assert_eq!(
            p.cpu.inputs.experts.len(),
            FLASH_LAYERS as usize - k as usize
        );
        assert_eq!(p.cpu.inputs.resident_bytes, embd);
        assert_eq!(p.cpu.inputs.context_bytes, 0);
        match &p.layers[0].experts.why {
            Why::NoRoom {
                device,
                needed,
                left,
            } => {
                assert_eq!((*device, *needed), (gpu0, per_layer));
                assert!(*left < per_layer);
            }
            other => panic!("{other:?}"),
        }
    }
}

/// With less RAM, the experts left on the CPU are paged through the expert store, which the memory planner sizes
/// from the CPU's share only.
#[test]
fn flash_auto_fit_pages_the_cpu_share_when_ram_is_short() {
    let model = model_of(&TinyConfig::flash(FLASH_LAYERS), 4096);
    // 256 GiB: all resident.
    let p = plan(&model, &[cpu(), flash_gpu()], &auto(), 256 * GIB).unwrap();
    assert_eq!(p.cpu.placement, ExpertPlacement::Resident);
    assert!(p
        .layers
        .iter()
        .all(|l| l.experts.at != ExpertHome::CpuPaged));
    let p = plan(&model, &[cpu(), flash_gpu()], &auto(), 64 * GIB).unwrap();
    assert!(
        matches!(p.cpu.placement, ExpertPlacement::Paged { .. }),
        "{p}"
    );
    let homes: Vec<ExpertHome> = p.layers.iter().map(|l| l.experts.at).collect();
    assert!(homes.contains(&ExpertHome::CpuPaged));
    assert!(homes.contains(&ExpertHome::Device(DeviceId(1))));
    assert!(!homes.contains(&ExpertHome::CpuResident));
    assert!(p.cpu.total_bytes() <= p.cpu.budget.bytes.unwrap());
    assert!(p.to_string().contains("CPU (paged)"));
}

/// `-ngl all` (whole layers) does not fit 24 GiB: refused with the device, the numbers and flags that fit, each of
/// which really fits.
#[test]
fn flash_whole_layers_are_refused_with_numbers_and_fixes() {
    let model = model_of(&TinyConfig::flash(FLASH_LAYERS), 4096);
    let devices = [cpu(), flash_gpu()];
    let e = plan(&model, &devices, &ngl(GpuLayers::All), 128 * GIB).unwrap_err();
    let PlacementError::DoesNotFit(over) = &e else {
        panic!("{e}");
    };
    assert_eq!(over.device, "CUDA0");
    assert_eq!(over.cause, "-ngl all");
    let msg = e.to_string();
    println!("{msg}");
    for needle in [
        "CUDA0 cannot hold what -ngl all puts on it",
        "(-c 4096)",
        "22.71 GiB (23.71 GiB free minus 1.00 GiB margin)",
        "too much",
        "hint:",
    ] {
        assert!(msg.contains(needle), "{needle:?} in {msg}");
    }
    assert!(over.needed.total() > over.budget.bytes);
    assert!(!over.fixes.is_empty(), "{msg}");
    for fix in &over.fixes {
        let req = match fix.split_whitespace().collect::<Vec<_>>()[..] {
            ["-ngl", "auto"] => auto(),
            ["-ngl", n] => ngl(GpuLayers::Count(n.parse().unwrap())),
            ["--n-cpu-moe", k] => {
                with_rules(ngl(GpuLayers::All), n_cpu_moe_rules(k.parse().unwrap()))
            }
            ["--cpu-moe"] => with_rules(ngl(GpuLayers::All), cpu_moe_rules()),
            _ => panic!("{fix}"),
        };
        plan(&model, &devices, &req, 128 * GIB).unwrap_or_else(|e| panic!("{fix}: {e}"));
    }
    // The --n-cpu-moe fix is the smallest that fits: one less does not.
    let k: u32 = over
        .fixes
        .iter()
        .find_map(|f| f.strip_prefix("--n-cpu-moe ")?.parse().ok())
        .expect("an --n-cpu-moe fix");
    let less = with_rules(ngl(GpuLayers::All), n_cpu_moe_rules(k - 1));
    assert!(plan(&model, &devices, &less, 128 * GIB).is_err());
    let m: u32 = over
        .fixes
        .iter()
        .find_map(|f| f.strip_prefix("-ngl ")?.parse().ok())
        .expect("an -ngl fix");
    assert!(plan(&model, &devices, &ngl(GpuLayers::Count(m + 1)), 128 * GIB).is_err());
}

/// A rule that pins more than the device holds is refused even under -ngl auto (llama.cpp's --fit gives up
/// silently there), naming the rule.
#[test]
fn pinned_experts_over_budget_are_refused_under_auto() {
    let model = model_of(&TinyConfig::flash(FLASH_LAYERS), 4096);
    let rules = parse_override_tensor("exps=CUDA0").unwrap();
    let e = plan(
        &model,
        &[cpu(), flash_gpu()],
        &with_rules(auto(), rules),
        128 * GIB,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("CUDA0 cannot hold what -ot exps=CUDA0 puts on it"),
        "{msg}"
    );
    assert!(
        msg.contains("-ot rules that send fewer tensors to CUDA0"),
        "{msg}"
    );
    // --cpu-moe under auto does not give up: the non-routed weights still go to the device.
    let p = plan(
        &model,
        &[cpu(), flash_gpu()],
        &with_rules(auto(), cpu_moe_rules()),
        128 * GIB,
    )
    .unwrap();
    assert_eq!(p.n_gpu_layers, FLASH_LAYERS + 1);
    assert!(p
        .layers
        .iter()
        .all(|l| !matches!(l.experts.at, ExpertHome::Device(_))));
}

/// A small device under -ngl auto takes as many whole non-routed layers as fit, from the end, and says why the
/// others stayed.
#[test]
fn auto_on_a_small_device_takes_the_last_layers() {
    let model = model_of(&TinyConfig::flash(FLASH_LAYERS), 4096);
    let small = PlacementRequest {
        gpu_mem: vec![4 * GIB],
        ..auto()
    };
    let p = plan(&model, &[cpu(), flash_gpu()], &small, 128 * GIB).unwrap();
    let n = p.n_gpu_layers as usize;
    assert!(n > 1 && n < FLASH_LAYERS as usize, "{p}");
    let first_on = FLASH_LAYERS as usize + 1 - n;
    assert!(p.layers[..first_on].iter().all(|l| l.main.at == CPU));
    assert!(p.layers[first_on..]
        .iter()
        .all(|l| l.main.at == DeviceId(1)));
    assert!(matches!(p.layers[0].main.why, Why::NoRoom { .. }));
    assert!(p.devices[1].bytes.total() <= 4 * GIB);
    // One more layer would not fit.
    let one_more = PlacementRequest {
        gpu_layers: GpuLayers::Count(p.n_gpu_layers + 1),
        ..small.clone()
    };
    let with_cpu_moe = with_rules(one_more, cpu_moe_rules());
    assert!(plan(&model, &[cpu(), flash_gpu()], &with_cpu_moe, 128 * GIB).is_err());
}

#[test]
fn list_devices_like_llama_cpp() {
    assert_eq!(
        format_device_list(&[cpu()]),
        "Available devices:\n  (none)\n"
    );
    let two = format_device_list(&[cpu(), gpu("CUDA0", 20 * GIB, 24 * GIB)]);
    assert_eq!(
        two,
        "Available devices:\n  CUDA0: fixture GPU (24576 MiB, 20480 MiB free)\n"
    );
}
