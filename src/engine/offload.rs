//! Where each part of the model lives and runs when devices other than the CPU take part: the input the placement
//! planner fills ([`Placement`]), and the engine's side of it (weights copied into device buffers, a backend per
//! device).

use std::ops::Range;

use anyhow::{bail, Result};

use crate::ggml::Device;
use crate::model::sizes::{block_of, expert_tensor_layer};
use crate::plan::devices::{DeviceId, DevicePlan, ExpertHome, CPU};
use crate::units::format_bytes;

/// The devices of one layer. `None` is the CPU (the weights stay in the map or in RAM as without devices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerPlacement {
    /// Where the layer's non-routed weights (attention, compressor, indexer, router, shared expert, norms, hc) and
    /// its cache live, and where its graph nodes run.
    pub main: Option<Device>,
    /// Where its routed experts (`ffn_{gate,up,down}_exps`) live and are multiplied.
    pub experts: Option<Device>,
}

/// Where every part of the model lives: what the placement planner (`-ngl`, `--cpu-moe`, `-ot`, auto-fit) decides,
/// and what the engine carries out. The default is everything on the CPU (today's path, no scheduler).
///
/// A device that is the CPU counts as `None`. Layers past the end of `layers` use `rest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The token embedding (`token_embd`, read with `get_rows`).
    pub input: Option<Device>,
    /// The head: `output_norm`, the hc head and `output`.
    pub output: Option<Device>,
    /// Per layer, from layer 0.
    pub layers: Vec<LayerPlacement>,
    /// The layers past the end of `layers`.
    pub rest: LayerPlacement,
    /// Single weights placed elsewhere than their part (`-ot` rules), by tensor name.
    pub overrides: Vec<(String, Option<Device>)>,
}

/// A placement that names a device this build's ggml does not have (e.g. a planner fixture, or a device that
/// disappeared); the plan shows what would have gone where.
#[derive(Debug, thiserror::Error)]
#[error("the placement puts {} on {device}, which is not one of the devices of this build's ggml", format_bytes(*.bytes))]
pub struct DeviceMissing {
    pub device: String,
    pub bytes: u64,
    pub plan: Box<DevicePlan>,
}

impl Placement {
    /// The engine's placement of the planner's `plan`: each planned device opened by its ggml name (the CPU as
    /// `None`), the layers' parts, the routed experts on a device where the plan puts them there (on the CPU
    /// otherwise, resident or paged as the CPU's memory plan says), and `-ot`'s single tensors.
    pub fn of_plan(plan: &DevicePlan) -> Result<Placement> {
        let mut opened: Vec<Option<Device>> = Vec::with_capacity(plan.devices.len());
        for (i, d) in plan.devices.iter().enumerate() {
            if i == CPU.0 {
                opened.push(None);
                continue;
            }
            match Device::by_name(&d.name) {
                Some(dev) => opened.push(Some(dev).filter(|dev| !dev.is_cpu())),
                None if d.bytes.total() == 0 => opened.push(None),
                None => {
                    return Err(DeviceMissing {
                        device: d.name.clone(),
                        bytes: d.bytes.total(),
                        plan: Box::new(plan.clone()),
                    }
                    .into())
                }
            }
        }
        let at = |id: DeviceId| opened.get(id.0).copied().flatten();
        let layers = plan
            .layers
            .iter()
            .map(|l| LayerPlacement {
                main: at(l.main.at),
                experts: match l.experts.at {
                    ExpertHome::Device(id) => at(id),
                    ExpertHome::CpuResident | ExpertHome::CpuPaged => None,
                },
            })
            .collect();
        Ok(Placement {
            input: at(plan.embedding.at),
            output: at(plan.output.at),
            layers,
            rest: LayerPlacement::default(),
            overrides: plan
                .overrides
                .iter()
                .map(|o| (o.name.clone(), at(o.device)))
                .collect(),
        })
    }

    /// Everything on `device` (embedding, every layer with its experts and cache, the head).
    pub fn all_on(device: Device) -> Placement {
        let d = Some(device);
        Placement {
            input: d,
            output: d,
            layers: Vec::new(),
            rest: LayerPlacement {
                main: d,
                experts: d,
            },
            overrides: Vec::new(),
        }
    }

    /// Puts layers `range` (their weights, experts and cache) on `device`; the others keep their placement.
    pub fn with_layers(mut self, range: Range<usize>, device: Option<Device>) -> Placement {
        if self.layers.len() < range.end {
            let rest = self.rest;
            self.layers.resize(range.end, rest);
        }
        for l in &mut self.layers[range] {
            *l = LayerPlacement {
                main: device,
                experts: device,
            };
        }
        self
    }

    /// The placement of layer `il`.
    pub fn layer(&self, il: usize) -> LayerPlacement {
        self.layers.get(il).copied().unwrap_or(self.rest)
    }

    /// The same placement with every CPU device written as `None`.
    pub fn normalized(&self) -> Placement {
        let n = |d: Option<Device>| d.filter(|d| !d.is_cpu());
        let nl = |l: LayerPlacement| LayerPlacement {
            main: n(l.main),
            experts: n(l.experts),
        };
        Placement {
            input: n(self.input),
            output: n(self.output),
            layers: self.layers.iter().map(|&l| nl(l)).collect(),
            rest: nl(self.rest),
            overrides: self
                .overrides
                .iter()
                .map(|(name, d)| (name.clone(), n(*d)))
                .collect(),
        }
    }

    /// The devices other than the CPU that `n_layer` layers use, in order of first use (embedding, layers, head).
    pub fn devices(&self, n_layer: usize) -> Vec<Device> {
        let p = self.normalized();
        let mut out = Vec::new();
        let all = std::iter::once(p.input)
            .chain((0..n_layer).flat_map(|il| [p.layer(il).main, p.layer(il).experts]))
            .chain(std::iter::once(p.output))
            .chain(p.overrides.iter().map(|(_, d)| *d));
        for d in all.flatten() {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// True when nothing of `n_layer` layers is on a device other than the CPU.
    pub fn is_cpu_only(&self, n_layer: usize) -> bool {
        self.devices(n_layer).is_empty()
    }

    /// The device of the weight named `name` (`None`: the CPU).
    pub fn tensor_device(&self, name: &str) -> Option<Device> {
        if let Some((_, d)) = self.overrides.iter().find(|(n, _)| n == name) {
            return *d;
        }
        if let Some(il) = expert_tensor_layer(name) {
            return self.layer(il as usize).experts;
        }
        if let Some((il, _)) = block_of(name) {
            return self.layer(il as usize).main;
        }
        match name {
            "token_embd.weight" => self.input,
            _ => self.output,
        }
    }

    /// Checks the placement against a model of `n_layer` layers.
    pub fn check(&self, n_layer: usize) -> Result<()> {
        if self.layers.len() > n_layer {
            bail!(
                "the placement names {} layers, the model has {n_layer}",
                self.layers.len()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_go_where_their_part_is_placed() {
        let cpu = Device::cpu().unwrap();
        let d = Some(cpu);
        let mut p = Placement::default().with_layers(1..3, d);
        p.layers[2].experts = None;
        p.output = d;
        assert_eq!(p.layers.len(), 3);
        assert_eq!(p.tensor_device("blk.0.attn_q_a.weight"), None);
        assert_eq!(p.tensor_device("blk.1.attn_q_a.weight"), d);
        assert_eq!(p.tensor_device("blk.1.ffn_gate_exps.weight"), d);
        assert_eq!(p.tensor_device("blk.2.ffn_up_shexp.weight"), d);
        assert_eq!(p.tensor_device("blk.2.ffn_down_exps.weight"), None);
        // Past `layers`: `rest` (the CPU here).
        assert_eq!(p.tensor_device("blk.7.attn_kv.weight"), None);
        assert_eq!(p.tensor_device("token_embd.weight"), None);
        assert_eq!(p.tensor_device("output.weight"), d);
        assert_eq!(p.tensor_device("output_hc_base.weight"), d);
        // The CPU device is the CPU: nothing to schedule.
        assert!(p.devices(4).is_empty());
        assert!(p.is_cpu_only(4));
        assert_eq!(p.normalized().tensor_device("output.weight"), None);
        assert_eq!(Placement::all_on(cpu).normalized(), Placement::default());
        assert!(p.check(3).is_ok());
        assert!(p.check(2).is_err());
    }
}
