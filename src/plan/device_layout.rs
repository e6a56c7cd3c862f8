//! The arithmetic behind [`super::devices`]: the bytes of each part (per layer and the output head, with what the
//! rules pin taken out), laying the parts out on devices for a given `-ngl`, what each device then holds, the CPU's
//! share for the memory planner, and the finished [`DevicePlan`].

use super::devices::{
    DeviceBudget, DeviceBytes, DeviceId, DevicePlan, ExpertHome, LayerPlacement, PlacedAt,
    PlacementModel, PlacementRequest, PlannedDevice, TensorOverride, TensorRole, Why, CPU,
};
use super::{ExpertPlacement, MemoryPlan, PlanInputs};
use crate::model::sizes::expert_tensor_layer;

use super::devices::tensor_role;

/// Where the routed experts of layers on a device go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ExpertFill {
    /// With their layer (`-ngl N`: whole layers).
    FollowLayer,
    /// On their layer's device while its budget has room, last layers first; else on the CPU (`-ngl auto`).
    Auto,
}

/// The bytes of the parts, with the tensors a rule pins taken out (they are counted on their device).
#[derive(Clone, Debug)]
pub(super) struct Parts {
    n_layer: usize,
    roles: Vec<TensorRole>,
    /// Non-routed bytes of each unit: the layers, then the output head.
    main: Vec<u64>,
    /// Routed bytes of each layer.
    experts: Vec<u64>,
    /// Cache bytes of each unit (the head has none).
    cache: Vec<u64>,
    /// Bytes the rules pin to each device.
    pinned: Vec<u64>,
    /// The token embedding and the blocks the engine does not load: on the CPU.
    cpu_fixed: u64,
    compute: u64,
}

/// The device (and reason) of each unit and of each layer's routed experts.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    unit: Vec<PlacedAt<DeviceId>>,
    experts: Vec<PlacedAt<DeviceId>>,
    n_gpu: u32,
}

/// A laid out request: the devices, their budgets, the rules' pins and the layout.
pub(super) struct Placement {
    pub devices: Vec<PlannedDevice>,
    pub budgets: Vec<Option<DeviceBudget>>,
    /// The device and rule index of each tensor a rule matches.
    pub pins: Vec<Option<(DeviceId, usize)>>,
    pub parts: Parts,
    pub layout: Layout,
}

impl Parts {
    pub fn new(
        model: &PlacementModel,
        pins: &[Option<(DeviceId, usize)>],
        n_devices: usize,
    ) -> Parts {
        let n = model.n_layer;
        let mut parts = Parts {
            n_layer: n,
            roles: Vec::with_capacity(model.tensors.len()),
            main: vec![0; n + 1],
            experts: vec![0; n],
            cache: model.layer_cache.iter().copied().chain([0]).collect(),
            pinned: vec![0; n_devices],
            cpu_fixed: 0,
            compute: model.compute_bytes,
        };
        for (t, pin) in model.tensors.iter().zip(pins) {
            let role = tensor_role(&t.name, n);
            parts.roles.push(role);
            if let Some((d, _)) = pin {
                parts.pinned[d.0] += t.bytes;
                continue;
            }
            match role {
                TensorRole::Embedding | TensorRole::Unused => parts.cpu_fixed += t.bytes,
                TensorRole::Output => parts.main[n] += t.bytes,
                TensorRole::Layer(il) => parts.main[il] += t.bytes,
                TensorRole::Routed(il) => parts.experts[il] += t.bytes,
            }
        }
        parts
    }

    fn n_units(&self) -> u32 {
        self.n_layer as u32 + 1
    }

    /// The last `n_gpu` units on the `offload` devices, split in proportion to their budgets (llama.cpp's split
    /// by free memory); the experts as `fill` says; `why` for what is on a device (`None`: it fits).
    pub fn layout(
        &self,
        offload: &[DeviceId],
        budgets: &[Option<DeviceBudget>],
        n_gpu: u32,
        fill: ExpertFill,
        why: Option<Why>,
    ) -> Layout {
        let n_gpu = if offload.is_empty() {
            0
        } else {
            n_gpu.min(self.n_units())
        };
        let start = self.n_units() - n_gpu;
        let weights: Vec<f64> = offload
            .iter()
            .map(|d| budgets[d.0].map_or(0.0, |b| b.bytes as f64))
            .collect();
        let sum: f64 = weights.iter().sum();
        let mut splits = Vec::with_capacity(weights.len());
        let mut acc = 0.0;
        for w in &weights {
            acc += if sum > 0.0 {
                w / sum
            } else {
                1.0 / weights.len() as f64
            };
            splits.push(acc);
        }
        let on_device = why.clone().unwrap_or(Why::Fits);
        let on_cpu = match (&why, offload.is_empty()) {
            (_, true) => Why::NoDevice,
            (Some(w), false) => w.clone(),
            (None, false) => Why::Fits,
        };
        let unit = (0..self.n_units())
            .map(|u| {
                if u < start {
                    return PlacedAt {
                        at: CPU,
                        why: on_cpu.clone(),
                    };
                }
                let frac = (u - start) as f64 / n_gpu as f64;
                let i = splits
                    .iter()
                    .position(|&s| s > frac)
                    .unwrap_or(splits.len() - 1);
                PlacedAt {
                    at: offload[i],
                    why: on_device.clone(),
                }
            })
            .collect::<Vec<_>>();
        let experts = (0..self.n_layer)
            .map(|il| match unit[il].at {
                CPU => PlacedAt {
                    at: CPU,
                    why: if offload.is_empty() {
                        Why::NoDevice
                    } else {
                        Why::LayerOnCpu
                    },
                },
                d => PlacedAt {
                    at: d,
                    why: on_device.clone(),
                },
            })
            .collect();
        let mut layout = Layout {
            unit,
            experts,
            n_gpu,
        };
        if fill == ExpertFill::Auto {
            self.fill_experts(&mut layout, budgets);
        }
        layout
    }

    /// Routed experts on their layer's device while it has room, last layers first; the others on the CPU.
    fn fill_experts(&self, layout: &mut Layout, budgets: &[Option<DeviceBudget>]) {
        for il in 0..self.n_layer {
            if layout.experts[il].at != CPU {
                layout.experts[il].at = CPU;
            }
        }
        let used = self.usage(layout, budgets.len());
        let mut left: Vec<u64> = budgets
            .iter()
            .zip(&used)
            .map(|(b, u)| b.map_or(0, |b| b.bytes.saturating_sub(u.total())))
            .collect();
        for il in (0..self.n_layer).rev() {
            let d = layout.unit[il].at;
            let need = self.experts[il];
            layout.experts[il] = if d == CPU {
                PlacedAt {
                    at: CPU,
                    why: Why::LayerOnCpu,
                }
            } else if need <= left[d.0] {
                left[d.0] -= need;
                PlacedAt {
                    at: d,
                    why: Why::Fits,
                }
            } else {
                PlacedAt {
                    at: CPU,
                    why: Why::NoRoom {
                        device: d,
                        needed: need,
                        left: left[d.0],
                    },
                }
            };
        }
    }

    /// `-ngl auto`: the most units whose non-routed parts, cache and compute fit (with what the rules pin), then
    /// the experts while they fit. Units left on the CPU say how much the first device lacked.
    pub fn auto_layout(&self, offload: &[DeviceId], budgets: &[Option<DeviceBudget>]) -> Layout {
        let mut chosen = None;
        for n in (0..=self.n_units()).rev() {
            let layout = self.layout(offload, budgets, n, ExpertFill::Auto, None);
            if self.overflow(&layout, budgets).is_none() {
                chosen = Some(layout);
                break;
            }
        }
        let mut layout =
            chosen.unwrap_or_else(|| self.layout(offload, budgets, 0, ExpertFill::Auto, None));
        if let Some(&first) = offload.first() {
            let used = self.usage(&layout, budgets.len());
            let left =
                budgets[first.0].map_or(0, |b| b.bytes.saturating_sub(used[first.0].total()));
            for (u, placed) in layout.unit.iter_mut().enumerate() {
                if placed.at == CPU {
                    let needed = self.main[u] + self.cache[u];
                    placed.why = Why::NoRoom {
                        device: first,
                        needed,
                        left,
                    };
                }
            }
        }
        layout
    }

    /// What each device holds under `layout`.
    pub fn usage(&self, layout: &Layout, n_devices: usize) -> Vec<DeviceBytes> {
        let mut out = vec![DeviceBytes::default(); n_devices];
        for (d, &p) in out.iter_mut().zip(&self.pinned) {
            d.weights += p;
        }
        out[0].weights += self.cpu_fixed;
        for (u, placed) in layout.unit.iter().enumerate() {
            let d = &mut out[placed.at.0];
            d.weights += self.main[u];
            d.cache += self.cache[u];
        }
        for (il, placed) in layout.experts.iter().enumerate() {
            out[placed.at.0].weights += self.experts[il];
        }
        for (i, d) in out.iter_mut().enumerate() {
            if i == 0 || d.weights + d.cache > 0 {
                d.compute = self.compute;
            }
        }
        out
    }

    /// The first device other than the CPU that `layout` overfills, what it would hold, and its budget.
    pub fn overflow(
        &self,
        layout: &Layout,
        budgets: &[Option<DeviceBudget>],
    ) -> Option<(DeviceId, DeviceBytes, DeviceBudget)> {
        let used = self.usage(layout, budgets.len());
        budgets
            .iter()
            .zip(used)
            .enumerate()
            .skip(1)
            .find_map(|(i, (b, u))| {
                b.filter(|b| u.total() > b.bytes)
                    .map(|b| (DeviceId(i), u, b))
            })
    }
}

impl Placement {
    pub fn overflow(&self) -> Option<(DeviceId, DeviceBytes, DeviceBudget)> {
        self.parts.overflow(&self.layout, &self.budgets)
    }

    pub fn usage(&self) -> Vec<DeviceBytes> {
        self.parts.usage(&self.layout, self.devices.len())
    }

    /// The device tensor `i` ends up on.
    fn device_of(&self, i: usize) -> DeviceId {
        if let Some((d, _)) = self.pins[i] {
            return d;
        }
        match self.parts.roles[i] {
            TensorRole::Embedding | TensorRole::Unused => CPU,
            TensorRole::Output => self.layout.unit[self.parts.n_layer].at,
            TensorRole::Layer(il) => self.layout.unit[il].at,
            TensorRole::Routed(il) => self.layout.experts[il].at,
        }
    }

    /// Whether every routed tensor of layer `il` is on the CPU (the memory planner may then page them).
    fn experts_on_cpu(&self, il: usize) -> bool {
        (0..self.parts.roles.len())
            .filter(|&i| self.parts.roles[i] == TensorRole::Routed(il))
            .all(|i| self.device_of(i) == CPU)
    }

    /// The memory planner's inputs for what stays on the CPU: for a plan with nothing offloaded, exactly
    /// [`PlacementModel::cpu_only_inputs`].
    pub fn cpu_inputs(&self, model: &PlacementModel) -> PlanInputs {
        let n = model.n_layer;
        let whole: Vec<bool> = (0..n).map(|il| self.experts_on_cpu(il)).collect();
        let pageable = |layer: usize| layer >= n || whole[layer];
        let mut resident = 0u64;
        for (i, t) in model.tensors.iter().enumerate() {
            if self.device_of(i) != CPU {
                continue;
            }
            match expert_tensor_layer(&t.name) {
                Some(layer) if pageable(layer as usize) => {}
                _ => resident += t.bytes + t.cpu_extra,
            }
        }
        let offloaded_cache: u64 = (0..n)
            .filter(|&il| self.layout.unit[il].at != CPU)
            .map(|il| model.layer_cache[il])
            .sum();
        PlanInputs {
            resident_bytes: resident,
            experts: model
                .sizes
                .layers
                .iter()
                .filter(|l| pageable(l.layer as usize))
                .cloned()
                .collect(),
            n_expert_used: model.n_expert_used,
            n_ctx: model.n_ctx,
            context_bytes: model.context_bytes.saturating_sub(offloaded_cache),
            // The per-token figure is the whole cache's; with layers' caches on devices it is not shown (0).
            context_per_token: match offloaded_cache {
                0 => model.context_per_token,
                _ => 0.0,
            },
            compute_bytes: model.compute_bytes,
            output_bytes: model.output_bytes,
        }
    }

    /// The plan: each part's device and reason, the tensors rules send elsewhere, the CPU's memory plan.
    pub fn finish(
        self,
        model: &PlacementModel,
        cpu: MemoryPlan,
        req: &PlacementRequest,
        warnings: Vec<String>,
    ) -> DevicePlan {
        let n = model.n_layer;
        let paged = matches!(cpu.placement, ExpertPlacement::Paged { .. });
        let rule_text = |r: usize| req.rules[r].to_string();
        let embedding = model
            .tensors
            .iter()
            .position(|t| t.name == "token_embd.weight")
            .and_then(|i| self.pins[i])
            .map_or(
                PlacedAt {
                    at: CPU,
                    why: Why::Input,
                },
                |(d, r)| PlacedAt {
                    at: d,
                    why: Why::Rule(rule_text(r)),
                },
            );
        let layers: Vec<LayerPlacement> = (0..n)
            .map(|il| {
                let routed: Vec<usize> = (0..self.parts.roles.len())
                    .filter(|&i| self.parts.roles[i] == TensorRole::Routed(il))
                    .collect();
                // All pinned: the layer's experts are where most of their bytes are; else where the layout put
                // the unpinned ones. Tensors elsewhere are overrides.
                let pinned: Vec<(usize, (DeviceId, usize))> = routed
                    .iter()
                    .filter_map(|&i| self.pins[i].map(|p| (i, p)))
                    .collect();
                let experts = if !pinned.is_empty() && pinned.len() == routed.len() {
                    let mut by_device: Vec<(DeviceId, u64, usize)> = Vec::new();
                    for &(i, (d, r)) in &pinned {
                        match by_device.iter_mut().find(|x| x.0 == d) {
                            Some(x) => x.1 += model.tensors[i].bytes,
                            None => by_device.push((d, model.tensors[i].bytes, r)),
                        }
                    }
                    let best = by_device
                        .iter()
                        .fold(by_device[0], |b, &x| if x.1 > b.1 { x } else { b });
                    PlacedAt {
                        at: best.0,
                        why: Why::Rule(rule_text(best.2)),
                    }
                } else {
                    self.layout.experts[il].clone()
                };
                let home = match experts.at {
                    CPU if paged && self.experts_on_cpu(il) => ExpertHome::CpuPaged,
                    CPU => ExpertHome::CpuResident,
                    d => ExpertHome::Device(d),
                };
                LayerPlacement {
                    layer: il,
                    main: self.layout.unit[il].clone(),
                    experts: PlacedAt {
                        at: home,
                        why: experts.why,
                    },
                }
            })
            .collect();
        let output = self.layout.unit[n].clone();
        let mut overrides = Vec::new();
        for (i, t) in model.tensors.iter().enumerate() {
            let Some((d, r)) = self.pins[i] else {
                continue;
            };
            let part = match self.parts.roles[i] {
                TensorRole::Embedding => embedding.at,
                TensorRole::Output => output.at,
                TensorRole::Layer(il) => layers[il].main.at,
                TensorRole::Routed(il) => match layers[il].experts.at {
                    ExpertHome::Device(d) => d,
                    _ => CPU,
                },
                TensorRole::Unused => CPU,
            };
            if d != part {
                overrides.push(TensorOverride {
                    name: t.name.clone(),
                    device: d,
                    bytes: t.bytes,
                    rule: rule_text(r),
                });
            }
        }
        DevicePlan {
            devices: self.devices,
            embedding,
            output,
            layers,
            overrides,
            cpu,
            request: req.gpu_layers,
            n_gpu_layers: self.layout.n_gpu,
            op_offload: req.op_offload,
            warnings,
        }
    }
}
