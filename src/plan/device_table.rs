//! The placement as people read it: the start-up table of a [`DevicePlan`] (each device's bytes and budget, then
//! each part's device and why, then the CPU's memory plan), the refusal of an [`Overflow`], and `--list-devices`.

use std::fmt;

use super::devices::{
    DeviceBudget, DeviceBudgetSource, DeviceId, DevicePlan, ExpertHome, GpuLayers, Overflow, Why,
    CPU,
};
use crate::ggml::{DeviceInfo, DeviceKind};
use crate::units::{format_bytes, MIB};

/// `--list-devices`, as llama.cpp prints it: every device but the CPU, with its memory in MiB.
pub fn format_device_list(devices: &[DeviceInfo]) -> String {
    let mut out = String::from("Available devices:\n");
    let offload: Vec<&DeviceInfo> = devices
        .iter()
        .filter(|d| d.kind != DeviceKind::Cpu)
        .collect();
    if offload.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in offload {
        out.push_str(&format!(
            "  {}: {} ({} MiB, {} MiB free)\n",
            d.name,
            d.description,
            d.memory_total as u64 / MIB,
            d.memory_free as u64 / MIB
        ));
    }
    out
}

fn budget_text(b: &DeviceBudget) -> String {
    match b.source {
        DeviceBudgetSource::Flag => format!("{} (--gpu-mem)", format_bytes(b.bytes)),
        DeviceBudgetSource::Reported => format!(
            "{} ({} free minus {} margin)",
            format_bytes(b.bytes),
            format_bytes(b.free),
            format_bytes(b.margin)
        ),
    }
}

impl DevicePlan {
    fn name(&self, d: DeviceId) -> &str {
        &self.devices[d.0].name
    }

    fn why_text(&self, why: &Why, at_cpu: bool) -> String {
        match why {
            Why::Fits => "-ngl auto: fits".into(),
            Why::NoRoom {
                device,
                needed,
                left,
            } => format!(
                "-ngl auto: {} has {} left, this needs {}",
                self.name(*device),
                format_bytes(*left),
                format_bytes(*needed)
            ),
            Why::GpuLayers(None) => "-ngl all".into(),
            Why::GpuLayers(Some(n)) if at_cpu => format!("-ngl {n}: not among the last {n}"),
            Why::GpuLayers(Some(n)) => format!("-ngl {n}"),
            Why::Rule(r) => r.clone(),
            Why::Input => "the input layer stays on the CPU (as in llama.cpp)".into(),
            Why::NoDevice => "no device to offload to".into(),
            Why::LayerOnCpu => "with its layer".into(),
        }
    }

    fn home_text(&self, h: ExpertHome) -> String {
        match h {
            ExpertHome::Device(d) => self.name(d).to_string(),
            ExpertHome::CpuResident => "CPU (resident)".into(),
            ExpertHome::CpuPaged => "CPU (paged)".into(),
        }
    }

    /// Rows of consecutive layers that share a device and a reason: (first, last, where, why).
    fn layer_rows(&self, experts: bool) -> Vec<(usize, usize, String, String)> {
        let mut rows: Vec<(usize, usize, String, String)> = Vec::new();
        for l in &self.layers {
            let (at, why) = if experts {
                let cpu = !matches!(l.experts.at, ExpertHome::Device(_));
                (
                    self.home_text(l.experts.at),
                    self.why_text(&l.experts.why, cpu),
                )
            } else {
                (
                    self.name(l.main.at).to_string(),
                    self.why_text(&l.main.why, l.main.at == CPU),
                )
            };
            match rows.last_mut() {
                Some(r) if r.2 == at && r.3 == why => r.1 = l.layer,
                _ => rows.push((l.layer, l.layer, at, why)),
            }
        }
        rows
    }

    /// The overrides grouped by rule and device: (rule, device, tensor names, bytes).
    fn override_groups(&self) -> Vec<(String, DeviceId, Vec<&str>, u64)> {
        let mut groups: Vec<(String, DeviceId, Vec<&str>, u64)> = Vec::new();
        for o in &self.overrides {
            match groups.iter_mut().find(|g| g.0 == o.rule && g.1 == o.device) {
                Some(g) => {
                    g.2.push(&o.name);
                    g.3 += o.bytes;
                }
                None => groups.push((o.rule.clone(), o.device, vec![&o.name], o.bytes)),
            }
        }
        groups
    }

    fn headline(&self) -> String {
        let n_units = self.layers.len() + 1;
        let ngl = match self.request {
            GpuLayers::Auto => "auto".to_string(),
            GpuLayers::All => "all".to_string(),
            GpuLayers::Count(n) => n.to_string(),
        };
        let on_device = self
            .layers
            .iter()
            .filter(|l| matches!(l.experts.at, ExpertHome::Device(_)))
            .count();
        let devices: Vec<&str> = self.offload_devices().map(|d| d.name.as_str()).collect();
        let devices = if devices.is_empty() {
            "no device".to_string()
        } else {
            devices.join(" + ")
        };
        format!(
            "device plan: {devices} + CPU, -ngl {ngl}: {}/{n_units} layers on devices (the output head counts as one), routed experts of {on_device}/{} layers on devices",
            self.n_gpu_layers,
            self.layers.len()
        )
    }
}

/// One table: the devices and what each holds, the parts and where each went and why, the CPU's memory plan.
impl fmt::Display for DevicePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.headline())?;
        let head = format!(
            "  {:<24} {:>11} {:>11} {:>11} {:>11}  {}",
            "device", "weights", "cache", "compute", "total", "budget"
        );
        writeln!(f, "{head}")?;
        for (i, d) in self.devices.iter().enumerate() {
            let budget = match (&d.budget, i) {
                (Some(b), _) => budget_text(b),
                (None, _) => match self.cpu.budget.bytes {
                    Some(b) => format!("{} (RAM: the memory plan below)", format_bytes(b)),
                    None => "RAM not limited (the memory plan below)".into(),
                },
            };
            let b = &d.bytes;
            let line = format!(
                "  {:<24} {:>11} {:>11} {:>11} {:>11}  {budget}",
                d.name,
                format_bytes(b.weights),
                format_bytes(b.cache),
                format_bytes(b.compute),
                format_bytes(b.total())
            );
            writeln!(f, "{}", line.trim_end())?;
        }
        let mut parts = vec![
            (
                "token embedding".to_string(),
                self.name(self.embedding.at).to_string(),
                self.why_text(&self.embedding.why, self.embedding.at == CPU),
            ),
            (
                "output head".to_string(),
                self.name(self.output.at).to_string(),
                self.why_text(&self.output.why, self.output.at == CPU),
            ),
        ];
        let range = |a: usize, b: usize| {
            if a == b {
                format!("layer {a}")
            } else {
                format!("layers {a}-{b}")
            }
        };
        for (a, b, at, why) in self.layer_rows(false) {
            parts.push((
                format!("{}: attention, shared expert, cache", range(a, b)),
                at,
                why,
            ));
        }
        for (a, b, at, why) in self.layer_rows(true) {
            parts.push((format!("{}: routed experts", range(a, b)), at, why));
        }
        for (rule, device, names, bytes) in self.override_groups() {
            let what = match &names[..] {
                [one] => format!("{one} ({})", format_bytes(bytes)),
                many => format!("{} tensors ({})", many.len(), format_bytes(bytes)),
            };
            parts.push((what, self.name(device).to_string(), rule));
        }
        writeln!(f, "  {:<46} {:<16} why", "part", "where")?;
        for (what, at, why) in parts {
            writeln!(f, "  {what:<46} {at:<16} {why}")?;
        }
        if !self.op_offload {
            writeln!(f, "  --no-op-offload: CPU-resident weights are never uploaded for a prompt's products")?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        write!(f, "{}", self.cpu)
    }
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = &self.needed;
        let over = n.total().saturating_sub(self.budget.bytes);
        write!(
            f,
            "{} cannot hold what {} puts on it: it needs {} = weights {} + cache {} (-c {}) + compute {}, and its budget is {}: {} too much",
            self.device,
            self.cause,
            format_bytes(n.total()),
            format_bytes(n.weights),
            format_bytes(n.cache),
            self.n_ctx,
            format_bytes(n.compute),
            budget_text(&self.budget),
            format_bytes(over),
        )?;
        let mut hints: Vec<String> = self.fixes.iter().map(|x| format!("`{x}` fits")).collect();
        if self.cause.contains("-ot ") {
            hints.push(format!(
                "-ot rules that send fewer tensors to {}",
                self.device
            ));
        }
        hints.push("a smaller -c".into());
        hints.push(match self.budget.source {
            DeviceBudgetSource::Flag => "a larger --gpu-mem if the device has the room".into(),
            DeviceBudgetSource::Reported => "--gpu-mem SIZE to set the budget yourself".into(),
        });
        write!(f, " (hint: {})", hints.join("; "))
    }
}
