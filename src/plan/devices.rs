//! The device placement planner: which device holds the token embedding, the output head, each layer's non-routed
//! weights and cache, and each layer's routed experts (a device, or the CPU: resident, or paged through the expert
//! store as [`plan_memory`] decides for the CPU's share); what the rules of `-ot`, `--cpu-moe` and `--n-cpu-moe`
//! move; the bytes each device gets (weights, cache, compute) and why. Pure arithmetic over the model's tensor
//! sizes and a list of devices with their free memory ([`DeviceInfo`]: ggml's, or fixtures in tests).
//!
//! The automatic placement (`-ngl auto`, the default) follows DESIGN.md 4 "Offload": first the non-routed weights,
//! the cache and the compute buffers of as many layers as fit (the last layers, the output head counted as the last,
//! as llama.cpp's `-ngl` counts them), then whole layers' routed experts, last layers first, while they fit; the rest
//! stay on the CPU. `-ngl N|all` places the last N layers whole (experts too, unless a rule keeps them on the CPU)
//! and refuses, with the numbers, what does not fit. Several devices split the offloaded layers in proportion to
//! their budgets, as llama.cpp splits them by free memory. The token embedding stays on the CPU (llama.cpp: "very
//! little benefit to offloading the input layer").

use crate::cache::{
    cache_bytes, indexer_step, layer_cache_bytes, CacheSizes, INDEXER_PRODUCT_BYTES,
    MAX_CHUNK_QUERIES,
};
use crate::ggml::{DeviceInfo, DeviceKind};
use crate::model::config::{Config, LayerKind};
use crate::model::sizes::{
    block_of, expert_tensor_layer, weight_sizes_of, TensorMeta, WeightSizes,
};
use crate::units::GIB;

use super::device_layout::{ExpertFill, Parts, Placement};
use super::rules::{n_cpu_moe_rules, TensorRule, CPU_BUFFER};
use super::{plan_memory, Budget, MemoryPlan, PlanError, PlanInputs, PlanRequest};

pub use super::device_table::format_device_list;

/// A device of a [`DevicePlan`]: an index into [`DevicePlan::devices`]; [`CPU`] is always the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub usize);

/// The CPU: what no other device holds.
pub const CPU: DeviceId = DeviceId(0);

/// What a tensor is to the placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// `token_embd.weight`: the input layer.
    Embedding,
    /// `output.weight`, `output_norm.weight`, `output_hc_*`: the output head.
    Output,
    /// A non-routed tensor of layer L (attention, compressor, indexer, router, shared expert, norms).
    Layer(usize),
    /// A routed-expert tensor of layer L (`blk.L.ffn_{gate,up,down}_exps.weight`).
    Routed(usize),
    /// A block the engine does not load (the MTP block): it stays in the file.
    Unused,
}

/// The role of tensor `name` in a model of `n_layer` main layers.
pub fn tensor_role(name: &str, n_layer: usize) -> TensorRole {
    match block_of(name) {
        Some((il, _)) if il >= n_layer as u64 => TensorRole::Unused,
        Some((il, _)) if expert_tensor_layer(name).is_some() => TensorRole::Routed(il as usize),
        Some((il, _)) => TensorRole::Layer(il as usize),
        None if name == "token_embd.weight" => TensorRole::Embedding,
        None => TensorRole::Output,
    }
}

/// One tensor's name and bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorBytes {
    pub name: String,
    pub bytes: u64,
    /// Bytes more than `bytes` it takes in RAM on the CPU: a repacked layout larger than the file's (see
    /// [`PlacementModel::with_cpu_extra`]).
    pub cpu_extra: u64,
}

/// The model as the placement sees it: every tensor of the file, the cache of each layer for the context, and the
/// compute buffers a device needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacementModel {
    /// Main layers (without the MTP block).
    pub n_layer: usize,
    pub tensors: Vec<TensorBytes>,
    /// The memory planner's sizes of the same tensors.
    pub sizes: WeightSizes,
    pub n_expert_used: u64,
    pub n_ctx: u64,
    /// Cache bytes of each layer for `n_ctx` tokens.
    pub layer_cache: Vec<u64>,
    /// The whole cache as the memory planner counts it.
    pub context_bytes: u64,
    /// How the cache grows per token of context.
    pub context_per_token: f64,
    /// Compute buffers of one device (activations of a micro-batch, the logits): an estimate.
    pub compute_bytes: u64,
    /// Output the run keeps in RAM beyond the compute buffers (`ferrite logits`: every position's logits).
    pub output_bytes: u64,
}

impl PlacementModel {
    /// The placement model of `tensors` (a file's tensor table, or a generator's) for `cfg` and the cache `sizes`.
    pub fn new<'a>(
        tensors: impl IntoIterator<Item = TensorMeta<'a>> + Clone,
        cfg: &Config,
        sizes: &CacheSizes,
    ) -> PlacementModel {
        let layer_cache = cfg
            .kinds
            .iter()
            .map(|&kind| layer_cache_bytes(cfg, kind, sizes).total)
            .collect();
        let cache = cache_bytes(cfg, sizes);
        PlacementModel {
            n_layer: cfg.n_layer,
            tensors: tensors
                .clone()
                .into_iter()
                .map(|t| TensorBytes {
                    name: t.name.to_string(),
                    bytes: t.n_bytes,
                    cpu_extra: 0,
                })
                .collect(),
            sizes: weight_sizes_of(tensors),
            n_expert_used: cfg.n_expert_used as u64,
            n_ctx: sizes.n_ctx as u64,
            layer_cache,
            context_bytes: cache.total,
            context_per_token: cache.per_token,
            compute_bytes: compute_bytes(cfg, sizes),
            output_bytes: 0,
        }
    }

    /// Counts `extra(name)` bytes more in RAM for each non-routed tensor that stays on the CPU: ferrite repacks
    /// those into layouts of ggml's CPU extra buffer types, which can be larger than the file's (AMX's Q8_0: +12 %).
    /// Routed experts are not given any (their repacked layouts are the plain size, and paged ones are not
    /// repacked).
    pub fn with_cpu_extra(mut self, extra: impl Fn(&str) -> u64) -> PlacementModel {
        for t in &mut self.tensors {
            if expert_tensor_layer(&t.name).is_none() {
                t.cpu_extra = extra(&t.name);
            }
        }
        self
    }

    /// The memory planner's inputs when everything is on the CPU: the plan ferrite made before devices existed.
    pub fn cpu_only_inputs(&self) -> PlanInputs {
        let mut inputs = PlanInputs::from_sizes(
            &self.sizes,
            self.n_expert_used,
            self.n_ctx,
            self.context_bytes,
            self.compute_bytes,
        );
        let extra: u64 = self.tensors.iter().map(|t| t.cpu_extra).sum();
        inputs.resident_bytes = inputs.resident_bytes.saturating_add(extra);
        inputs.context_per_token = self.context_per_token;
        inputs.output_bytes = self.output_bytes;
        inputs
    }
}

/// Bytes of compute buffers the plan reserves: activations of a micro-batch (streams, attention, the experts'
/// intermediates, scores over the window, the compressor's values and scores on their way through the pooling) and
/// the logits of every row (perplexity asks for them all), and what grows with the context (see [`depth_bytes`]). An
/// estimate.
pub fn compute_bytes(cfg: &Config, sizes: &CacheSizes) -> u64 {
    let width = cfg.expert_width.iter().copied().max().unwrap_or(0) as u64;
    let n_ubatch = sizes.n_ubatch as u64;
    // Features per token of the widest compressor: ratio 4 pools overlapping blocks from two sets of head_dim.
    let coff = if cfg.kinds.contains(&LayerKind::Csa) {
        2
    } else if cfg.kinds.contains(&LayerKind::Hca) {
        1
    } else {
        0
    };
    let per_token = [
        8 * (cfg.hc * cfg.n_embd) as u64,
        4 * (cfg.n_head * cfg.head_dim) as u64,
        3 * cfg.n_expert_used as u64 * width,
        (cfg.n_head as u64).saturating_mul((cfg.window as u64).saturating_add(n_ubatch)),
        // Values and scores, their sources with the ring, the rows the blocks pool, their transposes and weights.
        8 * coff * cfg.head_dim as u64,
        cfg.n_vocab as u64,
    ]
    .into_iter()
    .fold(0u64, u64::saturating_add);
    n_ubatch
        .saturating_mul(per_token)
        .saturating_mul(4)
        .saturating_add(depth_bytes(cfg, sizes))
}

/// Compute buffers that grow with the context, at its end: each query's masks over every compressed row (F32); the
/// indexer's keys converted to F32 and one product of its head scores with the chunk's scores
/// ([`crate::cache::indexer_step`]); and a query chunk's attention over every ratio-128 row (gathered keys and values,
/// scores and their softmax). At 1M tokens on Flash with 512-token micro-batches about 1 GiB.
pub fn depth_bytes(cfg: &Config, sizes: &CacheSizes) -> u64 {
    let n = sizes.n_ubatch as u64;
    let rows = |kind: LayerKind| match cfg.kinds.contains(&kind) {
        true => sizes.comp_rows(kind.ratio()) as u64,
        false => 0,
    };
    let (csa, hca) = (rows(LayerKind::Csa), rows(LayerKind::Hca));
    let masks = n.saturating_mul(csa.saturating_add(hca));
    let heads = cfg.indexer_heads as u64;
    let indexer = match csa > 0 && heads > 0 {
        true => {
            let step = indexer_step(
                sizes.n_ubatch,
                csa as usize,
                cfg.indexer_heads,
                INDEXER_PRODUCT_BYTES,
            ) as u64;
            let per_row = (cfg.indexer_dim as u64)
                .saturating_add(heads.saturating_add(2).saturating_mul(step));
            csa.saturating_mul(per_row)
        }
        false => 0,
    };
    let chunk = n.min(MAX_CHUNK_QUERIES as u64);
    let per_row = 2 * cfg.head_dim as u64 + 2 * chunk * cfg.n_head as u64;
    let hca_attention = hca.saturating_mul(per_row);
    [masks, indexer, hca_attention]
        .into_iter()
        .fold(0u64, u64::saturating_add)
        .saturating_mul(4)
}

/// `--device`: which devices the placement may use besides the CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceSelection {
    /// Every GPU and RPC device ggml has (integrated GPUs only when there is no other GPU), as llama.cpp.
    #[default]
    Default,
    /// `--device none`: the CPU only.
    None,
    /// `--device A,B`: these, in this order (`CPU` may be named: it always holds what the others do not).
    Names(Vec<String>),
}

/// `-ngl, --n-gpu-layers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuLayers {
    /// Fit to the devices' budgets (DESIGN.md 4).
    #[default]
    Auto,
    /// Every layer and the output head.
    All,
    /// The last N of the layers and the output head (counted as the last), as llama.cpp counts them.
    Count(u32),
}

/// How the user asked for the model to be placed. The default is llama.cpp's: every device, `-ngl auto`, no
/// rules, each device's reported free memory, op offload on.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacementRequest {
    pub devices: DeviceSelection,
    pub gpu_layers: GpuLayers,
    /// `-ot`, `--n-cpu-moe`, `--cpu-moe`, in the order they are tried (see [`super::rules::placement_rules`]).
    pub rules: Vec<TensorRule>,
    /// `--gpu-mem SIZE,...`: the budget of each selected device, in order; the others use what they report free.
    pub gpu_mem: Vec<u64>,
    /// `--no-op-offload` turns this off: ggml may upload CPU-resident weights for a prompt's large products.
    pub op_offload: bool,
}

impl Default for PlacementRequest {
    fn default() -> Self {
        PlacementRequest {
            devices: DeviceSelection::default(),
            gpu_layers: GpuLayers::default(),
            rules: Vec::new(),
            gpu_mem: Vec::new(),
            op_offload: true,
        }
    }
}

/// Where a device's budget came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceBudgetSource {
    /// What the device reports free, less a margin.
    Reported,
    /// `--gpu-mem`.
    Flag,
}

/// What the placement may put on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceBudget {
    pub bytes: u64,
    pub free: u64,
    pub total: u64,
    pub margin: u64,
    pub source: DeviceBudgetSource,
}

/// Bytes kept free on a device that reports its free memory: 1 GiB (llama.cpp's `--fit-target` default), at most
/// a tenth of what is free.
pub fn device_margin(free: u64) -> u64 {
    GIB.min(free / 10)
}

/// Bytes a device gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceBytes {
    pub weights: u64,
    pub cache: u64,
    pub compute: u64,
}

impl DeviceBytes {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.cache)
            .saturating_add(self.compute)
    }
}

/// One device of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedDevice {
    /// ggml's device name ("CPU", "CUDA0", "RPC0[127.0.0.1:50052]"): what the engine opens.
    pub name: String,
    pub backend: String,
    pub buffer_type: String,
    pub description: String,
    /// `None` for the CPU: its budget is the memory plan's ([`DevicePlan::cpu`]).
    pub budget: Option<DeviceBudget>,
    /// What is placed on it (for the CPU: see [`DevicePlan::cpu`], which pages what does not fit).
    pub bytes: DeviceBytes,
}

/// Why a part went where it did.
#[derive(Clone, Debug, PartialEq)]
pub enum Why {
    /// `-ngl auto`: it fits the device's budget.
    Fits,
    /// `-ngl auto`: no room left: `needed` bytes, `left` on the device that would have taken it.
    NoRoom {
        device: DeviceId,
        needed: u64,
        left: u64,
    },
    /// `-ngl N` (`None`: all).
    GpuLayers(Option<u32>),
    /// A rule (`-ot`, `--cpu-moe`, `--n-cpu-moe`) as the user wrote it.
    Rule(String),
    /// The input layer stays on the CPU.
    Input,
    /// No device to offload to.
    NoDevice,
    /// The layer's non-routed weights are on the CPU: its experts stay with them.
    LayerOnCpu,
}

/// Where a layer's routed experts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertHome {
    Device(DeviceId),
    /// On the CPU, computed from RAM (or the map).
    CpuResident,
    /// On the CPU, paged through the expert store's slots.
    CpuPaged,
}

/// Where a part is and why.
#[derive(Clone, Debug, PartialEq)]
pub struct PlacedAt<T> {
    pub at: T,
    pub why: Why,
}

/// One layer: its non-routed weights and cache, and its routed experts.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlacement {
    pub layer: usize,
    /// The device of the non-routed weights and the cache.
    pub main: PlacedAt<DeviceId>,
    pub experts: PlacedAt<ExpertHome>,
}

/// A tensor a rule sends somewhere else than its layer's placement says.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorOverride {
    pub name: String,
    pub device: DeviceId,
    pub bytes: u64,
    /// The rule, as the user wrote it.
    pub rule: String,
}

/// The placement: what goes where and why, printed as one table at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    /// The CPU first, then the devices used or selected, in order.
    pub devices: Vec<PlannedDevice>,
    pub embedding: PlacedAt<DeviceId>,
    pub output: PlacedAt<DeviceId>,
    pub layers: Vec<LayerPlacement>,
    /// Tensors placed by a rule away from their layer's (or head's) device.
    pub overrides: Vec<TensorOverride>,
    /// The CPU's share, planned by the memory planner (resident or paged experts, the RAM budget).
    pub cpu: MemoryPlan,
    pub request: GpuLayers,
    /// Layers and head placed on devices (the output head counts as one, as in llama.cpp's `-ngl`).
    pub n_gpu_layers: u32,
    pub op_offload: bool,
    pub warnings: Vec<String>,
}

impl DevicePlan {
    /// True when nothing is placed on a device other than the CPU.
    pub fn is_cpu_only(&self) -> bool {
        self.offload_devices().next().is_none()
    }

    /// The devices other than the CPU that hold something.
    pub fn offload_devices(&self) -> impl Iterator<Item = &PlannedDevice> {
        self.devices.iter().skip(1).filter(|d| d.bytes.total() > 0)
    }

    pub fn device(&self, id: DeviceId) -> &PlannedDevice {
        &self.devices[id.0]
    }

    /// The device of tensor `name`: a rule's, else its part's (routed experts on the CPU, resident or paged, are
    /// [`CPU`]).
    pub fn tensor_device(&self, name: &str) -> DeviceId {
        if let Some(o) = self.overrides.iter().find(|o| o.name == name) {
            return o.device;
        }
        match tensor_role(name, self.layers.len()) {
            TensorRole::Embedding => self.embedding.at,
            TensorRole::Output => self.output.at,
            TensorRole::Layer(il) => self.layers[il].main.at,
            TensorRole::Routed(il) => match self.layers[il].experts.at {
                ExpertHome::Device(d) => d,
                ExpertHome::CpuResident | ExpertHome::CpuPaged => CPU,
            },
            TensorRole::Unused => CPU,
        }
    }
}

/// Why a placement was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlacementError {
    #[error("unknown device {name:?} in --device; available: {}", list_or_none(.available))]
    UnknownDevice {
        name: String,
        available: Vec<String>,
    },
    #[error("unknown buffer type {buffer:?} in `{rule}`; available: {}", list_or_none(.available))]
    UnknownBuffer {
        buffer: String,
        rule: String,
        available: Vec<String>,
    },
    #[error("`{rule}` names {device}, which --device leaves out (add it to --device, or change the rule)")]
    DeviceLeftOut { rule: String, device: String },
    #[error("--gpu-mem gives {given} sizes for the devices {} (one size per device, in --device order)", .names.join(", "))]
    TooManyGpuMem {
        given: usize,
        devices: usize,
        names: Vec<String>,
    },
    #[error("device {device} reports no memory size: give its budget with --gpu-mem SIZE")]
    UnknownMemory { device: String },
    #[error("{0}")]
    DoesNotFit(Box<Overflow>),
    /// The CPU's share does not fit RAM (the memory planner's refusal).
    #[error("{0}")]
    Cpu(PlanError),
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none (`--list-devices` shows what ggml has)".into()
    } else {
        v.join(", ")
    }
}

/// The numbers of a device that cannot hold what the flags put on it, and what would fit.
#[derive(Clone, Debug, PartialEq)]
pub struct Overflow {
    pub device: String,
    pub needed: DeviceBytes,
    pub budget: DeviceBudget,
    /// The context the cache is sized for (`-c`).
    pub n_ctx: u64,
    /// The flags that put it there (`-ngl 44`, `-ot ...`).
    pub cause: String,
    /// The changes that would fit, as flags (`-ngl 12`, `--n-cpu-moe 30`, `--cpu-moe`).
    pub fixes: Vec<String>,
}

/// Plans where every part of `model` goes over the `available` devices (the CPU among them or not: it is always
/// used) as `req` asks; plans the CPU's share with the memory planner under `cpu_budget` and `cpu_req`. Refuses
/// with the numbers what cannot fit.
pub fn plan_devices(
    model: &PlacementModel,
    available: &[DeviceInfo],
    req: &PlacementRequest,
    cpu_budget: &Budget,
    cpu_req: &PlanRequest,
) -> Result<DevicePlan, PlacementError> {
    let mut placed = place(model, available, req)?;
    if let Some((d, needed, budget)) = placed.overflow() {
        return Err(PlacementError::DoesNotFit(Box::new(Overflow {
            device: placed.devices[d.0].name.clone(),
            needed,
            budget,
            n_ctx: model.n_ctx,
            cause: cause_of(req, &placed, d),
            fixes: fixes(model, available, req),
        })));
    }
    let cpu_inputs = placed.cpu_inputs(model);
    let cpu = plan_memory(&cpu_inputs, cpu_budget, cpu_req).map_err(PlacementError::Cpu)?;
    let mut warnings = Vec::new();
    let no_device = placed.devices.len() == 1;
    if no_device && matches!(req.gpu_layers, GpuLayers::All | GpuLayers::Count(1..)) {
        warnings.push(
            "-ngl is ignored: there is no device to offload to (`--list-devices` shows what ggml has)"
                .into(),
        );
    }
    if no_device && !req.gpu_mem.is_empty() {
        warnings.push("--gpu-mem is ignored: there is no device to offload to".into());
    }
    let usage = placed.usage();
    for ((d, bytes), budget) in placed.devices.iter_mut().zip(usage).zip(&placed.budgets) {
        d.bytes = bytes;
        d.budget = *budget;
    }
    placed.devices[0].bytes = DeviceBytes {
        weights: cpu.inputs.resident_bytes + cpu.expert_bytes(),
        cache: cpu.inputs.context_bytes,
        compute: cpu.inputs.compute_bytes,
    };
    Ok(placed.finish(model, cpu, req, warnings))
}

/// Selects the devices, resolves the rules and budgets, and lays the parts out as `req` asks.
fn place(
    model: &PlacementModel,
    available: &[DeviceInfo],
    req: &PlacementRequest,
) -> Result<Placement, PlacementError> {
    let mut devices = vec![cpu_device(available)];
    let mut reported = vec![(0, 0)];
    for d in select_devices(available, &req.devices)? {
        devices.push(planned(d));
        reported.push((d.memory_free as u64, d.memory_total as u64));
    }
    let pins = resolve_rules(model, available, req, &mut devices, &mut reported)?;
    let budgets = budgets(&devices, &reported, &req.gpu_mem)?;
    let parts = Parts::new(model, &pins, devices.len());
    let offload: Vec<DeviceId> = (1..devices.len()).map(DeviceId).collect();
    let n_units = model.n_layer as u32 + 1;
    let layout = match req.gpu_layers {
        _ if offload.is_empty() => {
            parts.layout(&offload, &budgets, 0, ExpertFill::FollowLayer, None)
        }
        GpuLayers::Auto => parts.auto_layout(&offload, &budgets),
        GpuLayers::All => parts.layout(
            &offload,
            &budgets,
            n_units,
            ExpertFill::FollowLayer,
            Some(Why::GpuLayers(None)),
        ),
        GpuLayers::Count(n) => parts.layout(
            &offload,
            &budgets,
            n.min(n_units),
            ExpertFill::FollowLayer,
            Some(Why::GpuLayers(Some(n))),
        ),
    };
    Ok(Placement {
        devices,
        budgets,
        pins,
        parts,
        layout,
    })
}

/// Whether `req` fits (for the fixes a refusal suggests).
fn fits(model: &PlacementModel, available: &[DeviceInfo], req: &PlacementRequest) -> bool {
    place(model, available, req).is_ok_and(|p| p.overflow().is_none())
}

/// Flag changes that make a refused request fit: a lower `-ngl`, `--n-cpu-moe K` or `--cpu-moe`, `-ngl auto`.
fn fixes(model: &PlacementModel, available: &[DeviceInfo], req: &PlacementRequest) -> Vec<String> {
    let mut out = Vec::new();
    let n_units = model.n_layer as u32 + 1;
    let with_ngl = |n: u32| PlacementRequest {
        gpu_layers: GpuLayers::Count(n),
        ..req.clone()
    };
    let asked = match req.gpu_layers {
        GpuLayers::Auto => None,
        GpuLayers::All => Some(n_units),
        GpuLayers::Count(n) => Some(n.min(n_units)),
    };
    if let Some(n) = asked {
        // Fewer layers never need more memory: the largest count that fits, by bisection.
        if let Some(best) = last_true(0, n, |k| fits(model, available, &with_ngl(k))) {
            if best > 0 {
                out.push(format!("-ngl {best}"));
            }
        }
        let with_moe = |k: u32| PlacementRequest {
            rules: [req.rules.clone(), n_cpu_moe_rules(k)].concat(),
            ..req.clone()
        };
        let n_layer = model.n_layer as u32;
        if let Some(k) = first_true(1, n_layer, |k| fits(model, available, &with_moe(k))) {
            out.push(if k == n_layer {
                "--cpu-moe".into()
            } else {
                format!("--n-cpu-moe {k}")
            });
        }
        let auto = PlacementRequest {
            gpu_layers: GpuLayers::Auto,
            ..req.clone()
        };
        if fits(model, available, &auto) {
            out.push("-ngl auto".into());
        }
    }
    out
}

/// The largest `k` in `lo..=hi` with `ok(k)`, for `ok` true up to some point and false after.
fn last_true(lo: u32, hi: u32, ok: impl Fn(u32) -> bool) -> Option<u32> {
    if !ok(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

/// The smallest `k` in `lo..=hi` with `ok(k)`, for `ok` false up to some point and true after.
fn first_true(lo: u32, hi: u32, ok: impl Fn(u32) -> bool) -> Option<u32> {
    if lo > hi || !ok(hi) {
        return None;
    }
    let (mut bad, mut good) = (lo.checked_sub(1), hi);
    loop {
        let from = bad.map_or(lo, |b| b + 1);
        if from >= good {
            return Some(good);
        }
        let mid = from + (good - from) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = Some(mid);
        }
    }
}

fn cpu_device(available: &[DeviceInfo]) -> PlannedDevice {
    match available.iter().find(|d| d.kind == DeviceKind::Cpu) {
        Some(d) => planned(d),
        None => PlannedDevice {
            name: CPU_BUFFER.into(),
            backend: CPU_BUFFER.into(),
            buffer_type: CPU_BUFFER.into(),
            description: String::new(),
            budget: None,
            bytes: DeviceBytes::default(),
        },
    }
}

fn planned(d: &DeviceInfo) -> PlannedDevice {
    PlannedDevice {
        name: d.name.clone(),
        backend: d.backend.clone(),
        buffer_type: d.buffer_type.clone(),
        description: d.description.clone(),
        budget: None,
        bytes: DeviceBytes::default(),
    }
}

/// Devices that can take offloaded weights: not the CPU, not an accelerator that computes on host memory (BLAS).
fn is_offload(d: &DeviceInfo) -> bool {
    !matches!(d.kind, DeviceKind::Cpu | DeviceKind::Accelerator)
}

fn select_devices<'a>(
    available: &'a [DeviceInfo],
    sel: &DeviceSelection,
) -> Result<Vec<&'a DeviceInfo>, PlacementError> {
    match sel {
        DeviceSelection::None => Ok(Vec::new()),
        DeviceSelection::Default => {
            let has_gpu = available.iter().any(|d| d.kind == DeviceKind::Gpu);
            Ok(available
                .iter()
                .filter(|d| is_offload(d) && !(has_gpu && d.kind == DeviceKind::IntegratedGpu))
                .collect())
        }
        DeviceSelection::Names(names) => {
            let mut out: Vec<&DeviceInfo> = Vec::new();
            for name in names {
                let Some(d) = available.iter().find(|d| &d.name == name) else {
                    return Err(PlacementError::UnknownDevice {
                        name: name.clone(),
                        available: available.iter().map(|d| d.name.clone()).collect(),
                    });
                };
                if d.kind != DeviceKind::Cpu && !out.iter().any(|o| o.name == d.name) {
                    out.push(d);
                }
            }
            Ok(out)
        }
    }
}

/// The device and rule of each tensor's first matching rule (`None`: no rule matches, or the engine does not load
/// it). A device a rule names that the default selection left out (an accelerator) is added; one that an explicit
/// `--device` list leaves out is refused.
fn resolve_rules(
    model: &PlacementModel,
    available: &[DeviceInfo],
    req: &PlacementRequest,
    devices: &mut Vec<PlannedDevice>,
    reported: &mut Vec<(u64, u64)>,
) -> Result<Vec<Option<(DeviceId, usize)>>, PlacementError> {
    let mut rule_device = Vec::with_capacity(req.rules.len());
    for rule in &req.rules {
        let buffer = rule.buffer.as_str();
        let named = |d: &PlannedDevice| d.buffer_type == buffer || d.name == buffer;
        let id = if buffer == CPU_BUFFER {
            CPU
        } else if let Some(i) = devices.iter().skip(1).position(named) {
            DeviceId(i + 1)
        } else {
            let found = available.iter().find(|d| {
                d.kind != DeviceKind::Cpu && (d.buffer_type == buffer || d.name == buffer)
            });
            let Some(d) = found else {
                let mut names: Vec<String> = vec![CPU_BUFFER.into()];
                names.extend(
                    available
                        .iter()
                        .filter(|d| d.kind != DeviceKind::Cpu)
                        .map(|d| d.buffer_type.clone()),
                );
                return Err(PlacementError::UnknownBuffer {
                    buffer: buffer.into(),
                    rule: rule.to_string(),
                    available: names,
                });
            };
            if req.devices != DeviceSelection::Default {
                return Err(PlacementError::DeviceLeftOut {
                    rule: rule.to_string(),
                    device: d.name.clone(),
                });
            }
            devices.push(planned(d));
            reported.push((d.memory_free as u64, d.memory_total as u64));
            DeviceId(devices.len() - 1)
        };
        rule_device.push(id);
    }
    Ok(model
        .tensors
        .iter()
        .map(|t| match tensor_role(&t.name, model.n_layer) {
            TensorRole::Unused => None,
            _ => req
                .rules
                .iter()
                .position(|r| r.matches(&t.name))
                .map(|i| (rule_device[i], i)),
        })
        .collect())
}

/// Each device's budget (`None` for the CPU): `--gpu-mem` in order, else what it reports free less
/// [`device_margin`].
fn budgets(
    devices: &[PlannedDevice],
    reported: &[(u64, u64)],
    gpu_mem: &[u64],
) -> Result<Vec<Option<DeviceBudget>>, PlacementError> {
    let offload = &devices[1..];
    if gpu_mem.len() > offload.len() && !offload.is_empty() {
        return Err(PlacementError::TooManyGpuMem {
            given: gpu_mem.len(),
            devices: offload.len(),
            names: offload.iter().map(|d| d.name.clone()).collect(),
        });
    }
    let mut out = vec![None];
    for (i, d) in offload.iter().enumerate() {
        let (free, total) = reported[i + 1];
        out.push(Some(match gpu_mem.get(i) {
            Some(&bytes) => DeviceBudget {
                bytes,
                free,
                total,
                margin: 0,
                source: DeviceBudgetSource::Flag,
            },
            None if free == 0 && total == 0 => {
                return Err(PlacementError::UnknownMemory {
                    device: d.name.clone(),
                })
            }
            None => {
                let margin = device_margin(free);
                DeviceBudget {
                    bytes: free - margin,
                    free,
                    total,
                    margin,
                    source: DeviceBudgetSource::Reported,
                }
            }
        }));
    }
    Ok(out)
}

fn cause_of(req: &PlacementRequest, placed: &Placement, d: DeviceId) -> String {
    let mut causes = Vec::new();
    match req.gpu_layers {
        GpuLayers::Auto => {}
        GpuLayers::All => causes.push("-ngl all".to_string()),
        GpuLayers::Count(n) => causes.push(format!("-ngl {n}")),
    }
    let mut rules: Vec<usize> = placed
        .pins
        .iter()
        .flatten()
        .filter(|(dev, _)| *dev == d)
        .map(|&(_, r)| r)
        .collect();
    rules.sort_unstable();
    rules.dedup();
    causes.extend(rules.into_iter().map(|r| req.rules[r].to_string()));
    if causes.is_empty() {
        causes.push("-ngl auto".into());
    }
    causes.join(", ")
}
