//! The memory planner: from the model's sizes (resident weights, routed experts), the context and compute
//! buffers, and a [`Budget`] (see [`budget`]: `--mem`, or what the machine and its cgroup really allow), decide
//! whether the routed experts stay resident or are paged through a cache of N slots; print the plan as one table;
//! refuse clearly when nothing fits. Pure arithmetic. [`devices`] places the model on ggml's devices first and hands
//! the CPU's share to this planner.
//!
//! ANCHORS.md (c) item 2: keep the non-routed weights resident, size the cache automatically from what is left,
//! and leave headroom ("an oversized expert cache can displace those weights and slow decoding").

pub mod budget;
mod device_layout;
mod device_table;
pub mod devices;
pub mod rules;

use std::fmt;

use crate::model::sizes::{LayerExperts, WeightSizes};
use crate::units::format_bytes;

pub use budget::{Budget, BudgetSource};
pub use devices::{
    plan_devices, DevicePlan, DeviceSelection, GpuLayers, PlacementError, PlacementModel,
    PlacementRequest,
};

/// `--expert-cache`: a plain number is a slot count, a number with a unit a byte size, `auto` the planner's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertCacheArg {
    Auto,
    Slots(u64),
    Bytes(u64),
}

/// What the planner is given.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInputs {
    /// Weights that are always resident (everything but the routed experts).
    pub resident_bytes: u64,
    /// Routed experts per layer: count and bytes of one.
    pub experts: Vec<LayerExperts>,
    /// Experts one token uses per layer: the smallest cache that can work.
    pub n_expert_used: u64,
    /// The context (`-c`) and its cache bytes.
    pub n_ctx: u64,
    pub context_bytes: u64,
    /// How the cache grows per token of context (0: not known; see [`crate::cache::CacheBytes::per_token`]).
    pub context_per_token: f64,
    /// Compute buffers (activations, graph scratch) estimate.
    pub compute_bytes: u64,
    /// Output the run keeps in memory beyond the compute buffers (`ferrite logits`: every position's logits).
    pub output_bytes: u64,
}

impl PlanInputs {
    /// Inputs from a model's [`WeightSizes`].
    pub fn from_sizes(
        sizes: &WeightSizes,
        n_expert_used: u64,
        n_ctx: u64,
        context_bytes: u64,
        compute_bytes: u64,
    ) -> PlanInputs {
        PlanInputs {
            resident_bytes: sizes.bytes_other(),
            experts: sizes.layers.clone(),
            n_expert_used,
            n_ctx,
            context_bytes,
            context_per_token: 0.0,
            compute_bytes,
            output_bytes: 0,
        }
    }

    /// Bytes of all routed experts.
    pub fn routed_bytes(&self) -> u64 {
        let each = self
            .experts
            .iter()
            .map(|l| l.n_expert.saturating_mul(l.bytes_per_expert));
        each.fold(0, u64::saturating_add)
    }

    /// Routed experts over all layers.
    pub fn n_experts(&self) -> u64 {
        self.experts
            .iter()
            .map(|l| l.n_expert)
            .fold(0, u64::saturating_add)
    }

    /// Bytes of a slot that holds any layer's expert (the largest).
    pub fn slot_bytes(&self) -> u64 {
        self.experts
            .iter()
            .map(|l| l.bytes_per_expert)
            .max()
            .unwrap_or(0)
    }

    /// The smallest pool that works: the experts one token uses in a layer (at least 1).
    pub fn min_slots(&self) -> u64 {
        self.n_expert_used.max(1)
    }

    /// Weights, context, compute and output: what the plan needs whatever the experts do.
    pub fn fixed_bytes(&self) -> u64 {
        self.resident_bytes
            .saturating_add(self.context_bytes)
            .saturating_add(self.compute_bytes)
            .saturating_add(self.output_bytes)
    }
}

/// How the user asked for the experts to be placed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanRequest {
    /// `--expert-cache`; `None` or `Auto` lets the planner choose.
    pub expert_cache: Option<ExpertCacheArg>,
    /// `--no-paging`: experts stay in the map whatever the budget (the OS pages them).
    pub no_paging: bool,
}

/// Where the routed experts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertPlacement {
    /// All experts computed from the map; nothing paged.
    Resident,
    /// A pool of `slots` slots of `slot_bytes` each, filled on demand.
    Paged { slots: u64, slot_bytes: u64 },
}

/// Why the placement was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanReason {
    /// Everything fits the budget.
    Fits,
    /// The budget is unknown: nothing to page for.
    NoBudget,
    /// The model has no routed experts.
    NoExperts,
    /// `--no-paging`.
    NoPaging,
    /// The cache takes what the budget leaves.
    Fitted,
    /// `--expert-cache N` or `SIZE`.
    Override(ExpertCacheArg),
}

/// The plan printed at start-up.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub inputs: PlanInputs,
    pub budget: Budget,
    pub placement: ExpertPlacement,
    pub reason: PlanReason,
    /// Things the user should know (over budget by an override, ...).
    pub warnings: Vec<String>,
}

impl MemoryPlan {
    /// Expert slots, when paged.
    pub fn slots(&self) -> Option<u64> {
        match self.placement {
            ExpertPlacement::Paged { slots, .. } => Some(slots),
            ExpertPlacement::Resident => None,
        }
    }

    /// Bytes of routed experts in memory: all of them, or the cache.
    pub fn expert_bytes(&self) -> u64 {
        match self.placement {
            ExpertPlacement::Resident => self.inputs.routed_bytes(),
            ExpertPlacement::Paged { slots, slot_bytes } => slots.saturating_mul(slot_bytes),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.inputs
            .fixed_bytes()
            .saturating_add(self.expert_bytes())
    }

    /// Bytes the run allocates and cannot give back to the file: everything but routed experts left in the map
    /// (the OS pages those in and out). What the budget must hold.
    pub fn allocated_bytes(&self) -> u64 {
        match self.placement {
            ExpertPlacement::Resident => self.inputs.fixed_bytes(),
            ExpertPlacement::Paged { .. } => self.total_bytes(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The cache would hold fewer experts than one token uses.
    #[error("{0}")]
    TooSmall(Box<Refusal>),
    /// What the run must allocate exceeds the budget (with `--no-paging`, `--expert-cache N`, or no routed experts
    /// to page).
    #[error("{0}")]
    OverBudget(Box<OverBudget>),
}

/// The numbers behind a refused plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub inputs: PlanInputs,
    pub budget: Budget,
    /// Slots the budget or the override gives.
    pub slots: u64,
    /// The `--expert-cache` value, or `Auto` when the budget decided.
    pub cause: ExpertCacheArg,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&too_small_message(self))
    }
}

fn too_small_message(r: &Refusal) -> String {
    let Refusal {
        inputs,
        budget,
        slots,
        cause,
    } = r;
    let slot = format_bytes(inputs.slot_bytes());
    let need = inputs.min_slots();
    let min_cache = need.saturating_mul(inputs.slot_bytes());
    let head = format!("the expert cache would hold {slots} experts, fewer than the {need} one token uses per layer (slots of {slot})");
    match cause {
        ExpertCacheArg::Slots(n) => format!("{head}: --expert-cache {n} (hint: give at least {need} slots, or a size of at least {})", format_bytes(min_cache)),
        ExpertCacheArg::Bytes(b) => format!("{head}: --expert-cache {} (hint: give at least {})", format_bytes(*b), format_bytes(min_cache)),
        ExpertCacheArg::Auto => {
            let budget_bytes = budget.bytes.unwrap_or(0);
            let needed = inputs.fixed_bytes().saturating_add(min_cache);
            format!(
                "{head}: the budget is {budget}; it needs at least {} = {} + {need} expert slots {}, {} more (hint: raise --mem, lower -c, use a smaller quantization, or pass --no-paging to let the OS page the file, slowly)",
                format_bytes(needed),
                fixed_parts(inputs),
                format_bytes(min_cache),
                format_bytes(needed.saturating_sub(budget_bytes)),
            )
        }
    }
}

/// Plans where the routed experts live. Resident when they fit the budget (or there is no budget, no experts, or
/// `--no-paging`); else paged with as many slots as the budget leaves, or as `--expert-cache` says (a larger manual
/// cache can beat the automatic one, ANCHORS.md (c) item 2, as long as it fits the budget). Refuses a cache smaller
/// than the experts one token uses, and any plan whose allocations (resident weights, context, compute, output,
/// expert cache: [`MemoryPlan::allocated_bytes`]) exceed a known budget. Routed experts left in the map may exceed
/// it, with a warning: the OS pages them.
pub fn plan_memory(
    inputs: &PlanInputs,
    budget: &Budget,
    req: &PlanRequest,
) -> Result<MemoryPlan, PlanError> {
    let mut plan = MemoryPlan {
        inputs: inputs.clone(),
        budget: budget.clone(),
        placement: ExpertPlacement::Resident,
        reason: PlanReason::Fits,
        warnings: Vec::new(),
    };
    let slot_bytes = inputs.slot_bytes();
    let n_experts = inputs.n_experts();
    let min_slots = inputs.min_slots();
    let over = |total: u64| budget.bytes.filter(|&b| total > b).map(|b| total - b);
    if n_experts == 0 || slot_bytes == 0 {
        plan.reason = PlanReason::NoExperts;
        if req.expert_cache.is_some_and(|c| c != ExpertCacheArg::Auto) {
            plan.warnings
                .push("--expert-cache is ignored: the model has no routed experts".into());
        }
    } else if req.no_paging {
        plan.reason = PlanReason::NoPaging;
    } else if let Some(arg @ (ExpertCacheArg::Slots(_) | ExpertCacheArg::Bytes(_))) =
        req.expert_cache
    {
        let asked = match arg {
            ExpertCacheArg::Slots(n) => n,
            ExpertCacheArg::Bytes(b) => b / slot_bytes,
            ExpertCacheArg::Auto => 0,
        };
        if asked < min_slots {
            return Err(too_small(inputs, budget, asked, arg));
        }
        let slots = asked.min(n_experts);
        if slots < asked {
            plan.warnings.push(format!("--expert-cache asks for {asked} slots; the model has {n_experts} routed experts, so {slots} are used"));
        }
        plan.placement = ExpertPlacement::Paged { slots, slot_bytes };
        plan.reason = PlanReason::Override(arg);
    } else if let Some(b) = budget.bytes {
        if inputs.fixed_bytes().saturating_add(inputs.routed_bytes()) > b {
            let slots = (b.saturating_sub(inputs.fixed_bytes()) / slot_bytes).min(n_experts);
            if slots < min_slots {
                return Err(too_small(inputs, budget, slots, ExpertCacheArg::Auto));
            }
            plan.placement = ExpertPlacement::Paged { slots, slot_bytes };
            plan.reason = PlanReason::Fitted;
        }
    } else {
        plan.reason = PlanReason::NoBudget;
    }
    if over(plan.allocated_bytes()).is_some() {
        return Err(PlanError::OverBudget(Box::new(OverBudget(plan))));
    }
    if let Some(by) = over(plan.total_bytes()) {
        let what = match plan.placement {
            ExpertPlacement::Resident => {
                "the OS will page weights in from the file as they are used (slow)"
            }
            ExpertPlacement::Paged { .. } => "the expert cache may push other memory out",
        };
        plan.warnings.push(format!(
            "the plan exceeds the budget by {}: {what}",
            format_bytes(by)
        ));
    }
    Ok(plan)
}

/// [`PlanInputs::fixed_bytes`] part by part: "non-routed weights X + context Y (-c N) + compute Z" and the
/// logits output when there is one.
fn fixed_parts(i: &PlanInputs) -> String {
    let mut parts = format!(
        "non-routed weights {} + context {} (-c {}) + compute {}",
        format_bytes(i.resident_bytes),
        format_bytes(i.context_bytes),
        i.n_ctx,
        format_bytes(i.compute_bytes),
    );
    if i.output_bytes > 0 {
        parts.push_str(&format!(
            " + logits output {}",
            format_bytes(i.output_bytes)
        ));
    }
    parts
}

/// Why an over-budget plan was refused: the allocations part by part against the budget, and what would fit.
fn over_budget_message(plan: &MemoryPlan) -> String {
    let i = &plan.inputs;
    let budget_bytes = plan.budget.bytes.unwrap_or(0);
    let needed = plan.allocated_bytes();
    let mut parts = fixed_parts(i);
    let mut hints = Vec::new();
    if let ExpertPlacement::Paged { slots, slot_bytes } = plan.placement {
        parts.push_str(&format!(
            " + expert cache {}",
            format_bytes(slots.saturating_mul(slot_bytes))
        ));
        let room = budget_bytes.saturating_sub(i.fixed_bytes()) / slot_bytes.max(1);
        if room >= i.min_slots() {
            hints.push(format!("give --expert-cache {room} or fewer slots"));
        }
    }
    if i.output_bytes > 0 {
        hints.push("ask for the logits of fewer tokens per run".to_string());
    }
    hints.push("lower -c".to_string());
    hints.push("raise --mem".to_string());
    if plan.reason == PlanReason::NoPaging && i.routed_bytes() > 0 {
        hints.push("use a smaller quantization".to_string());
    }
    format!(
        "the run needs {} = {parts}, but the budget is {}: {} more (hint: {})",
        format_bytes(needed),
        plan.budget,
        format_bytes(needed.saturating_sub(budget_bytes)),
        hints.join(", ")
    )
}

/// The plan refused as [`PlanError::OverBudget`].
#[derive(Clone, Debug, PartialEq)]
pub struct OverBudget(pub MemoryPlan);

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&over_budget_message(&self.0))
    }
}

fn too_small(inputs: &PlanInputs, budget: &Budget, slots: u64, cause: ExpertCacheArg) -> PlanError {
    PlanError::TooSmall(Box::new(Refusal {
        inputs: inputs.clone(),
        budget: budget.clone(),
        slots,
        cause,
    }))
}

/// One table: what each part takes, the total, the budget and where it came from, then any warnings.
impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inputs;
        let routed = i.routed_bytes();
        let why = match self.reason {
            PlanReason::Fits => "they fit the budget".to_string(),
            PlanReason::NoBudget => "no memory limit is known".to_string(),
            PlanReason::NoExperts => "the model has no routed experts".to_string(),
            PlanReason::NoPaging => "--no-paging".to_string(),
            PlanReason::Fitted => "sized to the budget".to_string(),
            PlanReason::Override(ExpertCacheArg::Slots(n)) => format!("--expert-cache {n}"),
            PlanReason::Override(ExpertCacheArg::Bytes(b)) => {
                format!("--expert-cache {}", format_bytes(b))
            }
            PlanReason::Override(ExpertCacheArg::Auto) => "--expert-cache auto".to_string(),
        };
        let (head, expert_row, expert_note) = match self.placement {
            ExpertPlacement::Resident => (
                format!("routed experts resident ({why})"),
                "routed experts (resident)".to_string(),
                String::new(),
            ),
            ExpertPlacement::Paged { slots, slot_bytes } => {
                let share = if routed > 0 {
                    slots.saturating_mul(slot_bytes) as f64 / routed as f64 * 100.0
                } else {
                    0.0
                };
                (
                    format!(
                        "routed experts paged through {slots} slots of {} ({why})",
                        format_bytes(slot_bytes)
                    ),
                    format!("expert cache ({slots} x {})", format_bytes(slot_bytes)),
                    format!("{:.1} % of {} routed", share, format_bytes(routed)),
                )
            }
        };
        let context = if i.n_ctx > 0 {
            format!("context (-c {})", i.n_ctx)
        } else {
            "context".to_string()
        };
        let context_note = match i.context_per_token {
            t if t > 0.0 => format!("{} per token", format_bytes(t.round() as u64)),
            _ => String::new(),
        };
        let budget = match self.budget.bytes {
            Some(b) => format_bytes(b),
            None => "-".to_string(),
        };
        let budget_note = match (&self.budget.source, self.budget.bytes) {
            (BudgetSource::Unknown, _) | (_, None) => self.budget.to_string(),
            _ => self
                .budget
                .to_string()
                .split_once(" (")
                .map_or(String::new(), |(_, r)| format!("({r}")),
        };
        writeln!(f, "memory plan: {head}")?;
        let output = (i.output_bytes > 0).then(|| {
            (
                "logits output".to_string(),
                format_bytes(i.output_bytes),
                String::new(),
            )
        });
        let rows = [
            Some((
                "non-routed weights (resident)".to_string(),
                format_bytes(i.resident_bytes),
                String::new(),
            )),
            Some((context, format_bytes(i.context_bytes), context_note)),
            Some((
                "compute buffers".to_string(),
                format_bytes(i.compute_bytes),
                String::new(),
            )),
            output,
            Some((expert_row, format_bytes(self.expert_bytes()), expert_note)),
            Some((
                "total".to_string(),
                format_bytes(self.total_bytes()),
                String::new(),
            )),
            Some(("budget".to_string(), budget, budget_note)),
        ];
        for (name, bytes, note) in rows.into_iter().flatten() {
            let line = format!("  {name:<34} {bytes:>11}  {note}");
            writeln!(f, "{}", line.trim_end())?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod device_tests;
