//! The memory planner: from the model's sizes (resident weights, routed experts), the context and compute
//! buffers, and a budget (`--mem`, or what the machine and its cgroup really allow), decide whether the routed
//! experts stay resident or are paged through a cache of N slots; print the plan as one table; refuse clearly when
//! nothing fits. Pure arithmetic plus readers of `/proc` and cgroup files that take the files' contents as strings.
//!
//! ANCHORS.md (c) item 2: keep the non-routed weights resident, size the cache automatically from what is left,
//! and leave headroom ("an oversized expert cache can displace those weights and slow decoding").

use std::fmt;
use std::path::{Path, PathBuf};

use crate::model::sizes::{LayerExperts, WeightSizes};
use crate::units::{format_bytes, KIB, MIB};

/// `--expert-cache`: a plain number is a slot count, a number with a unit a byte size, `auto` the planner's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertCacheArg {
    Auto,
    Slots(u64),
    Bytes(u64),
}

// ---------------------------------------------------------------------------------------------------------------
// The budget

/// Where the budget came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--mem SIZE`.
    Flag,
    /// `MemAvailable` of `/proc/meminfo`.
    MemAvailable,
    /// A cgroup memory limit: `version` 1 (`memory.limit_in_bytes`) or 2 (`memory.max`), and its file.
    Cgroup { version: u8, file: PathBuf },
    /// Nothing readable limits memory (not Linux, or `/proc` unreadable).
    Unknown,
}

/// What the plan may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Bytes the plan may use; `None` when nothing limits it.
    pub bytes: Option<u64>,
    /// The limit read (or given) before the margin.
    pub limit: Option<u64>,
    /// Bytes left free for the OS, the page cache of expert reads, allocator slack and stacks.
    pub margin: u64,
    pub source: BudgetSource,
}

impl Budget {
    /// `--mem SIZE`: the user's budget for everything, taken whole.
    pub fn from_flag(bytes: u64) -> Budget {
        Budget {
            bytes: Some(bytes),
            limit: Some(bytes),
            margin: 0,
            source: BudgetSource::Flag,
        }
    }

    /// The smaller of `MemAvailable` and the cgroup limit, minus [`safety_margin`].
    pub fn from_system(sys: &SystemMemory) -> Budget {
        let cgroup = sys.cgroup.as_ref();
        let (limit, source) = match (sys.mem_available, cgroup) {
            (Some(avail), Some(cg)) if cg.bytes < avail => (cg.bytes, cgroup_source(cg)),
            (Some(avail), _) => (avail, BudgetSource::MemAvailable),
            (None, Some(cg)) => (cg.bytes, cgroup_source(cg)),
            (None, None) => {
                return Budget {
                    bytes: None,
                    limit: None,
                    margin: 0,
                    source: BudgetSource::Unknown,
                }
            }
        };
        let margin = safety_margin(limit);
        Budget {
            bytes: Some(limit - margin),
            limit: Some(limit),
            margin,
            source,
        }
    }

    /// Reads the machine's limits ([`SystemMemory::read`]).
    pub fn from_machine() -> Budget {
        Budget::from_system(&SystemMemory::read())
    }
}

fn cgroup_source(cg: &CgroupLimit) -> BudgetSource {
    BudgetSource::Cgroup {
        version: cg.version,
        file: cg.file.clone(),
    }
}

/// Bytes kept free of a machine limit: 5 %, and at least 512 MiB where that is under 10 % of the limit.
pub fn safety_margin(limit: u64) -> u64 {
    (limit / 20).max((limit / 10).min(512 * MIB))
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = match &self.source {
            BudgetSource::Flag => "--mem".to_string(),
            BudgetSource::MemAvailable => "MemAvailable in /proc/meminfo".to_string(),
            BudgetSource::Cgroup { version, file } => {
                format!("cgroup v{version} limit {}", file.display())
            }
            BudgetSource::Unknown => {
                return f.write_str("not limited (no readable MemAvailable or cgroup limit)")
            }
        };
        match (self.bytes, self.limit) {
            (Some(b), Some(l)) if self.margin > 0 => write!(
                f,
                "{} ({from} {} minus {} margin)",
                format_bytes(b),
                format_bytes(l),
                format_bytes(self.margin)
            ),
            (Some(b), _) => write!(f, "{} ({from})", format_bytes(b)),
            (None, _) => write!(f, "not limited ({from})"),
        }
    }
}

/// A cgroup memory limit and the file it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLimit {
    pub bytes: u64,
    pub version: u8,
    pub file: PathBuf,
}

/// The machine's memory limits as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemMemory {
    pub mem_available: Option<u64>,
    /// The smallest cgroup limit over this process's cgroup and its ancestors, v1 and v2; `None` when unlimited.
    pub cgroup: Option<CgroupLimit>,
}

impl SystemMemory {
    /// Reads `/proc/meminfo`, `/proc/self/cgroup`, `/proc/self/mountinfo` and the cgroup limit files.
    pub fn read() -> SystemMemory {
        SystemMemory::read_with(&|p: &Path| std::fs::read_to_string(p).ok())
    }

    /// As [`Self::read`], with `read` giving a file's contents (tests pass fixtures).
    pub fn read_with(read: &dyn Fn(&Path) -> Option<String>) -> SystemMemory {
        let mem_available = read(Path::new("/proc/meminfo")).and_then(|s| parse_mem_available(&s));
        let cgroup = read(Path::new("/proc/self/cgroup")).and_then(|cg| {
            let mountinfo = read(Path::new("/proc/self/mountinfo")).unwrap_or_default();
            cgroup_limit(&parse_proc_cgroup(&cg), &parse_mountinfo(&mountinfo), read)
        });
        SystemMemory {
            mem_available,
            cgroup,
        }
    }
}

/// `MemAvailable:   24025232 kB` of `/proc/meminfo`, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let mult = match words.next() {
        Some(u) if u.eq_ignore_ascii_case("kb") => KIB,
        None => 1,
        Some(_) => return None,
    };
    n.checked_mul(mult)
}

/// cgroup v2 `memory.max`: "max" (no limit) or a byte count.
pub fn parse_cgroup_v2_max(s: &str) -> Option<u64> {
    let t = s.trim();
    if t == "max" {
        return None;
    }
    t.parse().ok()
}

/// Values of cgroup v1 `memory.limit_in_bytes` at or above this mean no limit (the kernel writes
/// `PAGE_COUNTER_MAX` pages, 9223372036854771712 with 4 KiB pages).
pub const CGROUP_V1_UNLIMITED: u64 = 1 << 62;

/// cgroup v1 `memory.limit_in_bytes`: a byte count, huge for "no limit".
pub fn parse_cgroup_v1_limit(s: &str) -> Option<u64> {
    let n: u64 = s.trim().parse().ok()?;
    (n < CGROUP_V1_UNLIMITED).then_some(n)
}

/// This process's cgroups from `/proc/self/cgroup`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// The unified (v2) path: the line `0::/PATH`.
    pub v2: Option<String>,
    /// The v1 memory controller's path: the line `N:...memory...:/PATH`.
    pub v1_memory: Option<String>,
}

pub fn parse_proc_cgroup(s: &str) -> ProcCgroup {
    let mut out = ProcCgroup::default();
    for line in s.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            out.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            out.v1_memory = Some(path.to_string());
        }
    }
    out
}

/// A cgroup file system mount: the hierarchy path mounted (`root`) and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMount {
    pub root: String,
    pub point: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMounts {
    pub v2: CgroupMount,
    pub v1_memory: CgroupMount,
}

/// The cgroup mounts of `/proc/self/mountinfo`; the usual places when it does not say.
pub fn parse_mountinfo(s: &str) -> CgroupMounts {
    let mut v2 = None;
    let mut v1 = None;
    for line in s.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let mount = CgroupMount {
            root: unescape_mount(root),
            point: PathBuf::from(unescape_mount(point)),
        };
        let options = right.get(2).copied().unwrap_or("");
        if *fstype == "cgroup2" && v2.is_none() {
            v2 = Some(mount);
        } else if *fstype == "cgroup" && v1.is_none() && options.split(',').any(|o| o == "memory") {
            v1 = Some(mount);
        }
    }
    let default = |point: &str| CgroupMount {
        root: "/".into(),
        point: PathBuf::from(point),
    };
    CgroupMounts {
        v2: v2.unwrap_or_else(|| default("/sys/fs/cgroup")),
        v1_memory: v1.unwrap_or_else(|| default("/sys/fs/cgroup/memory")),
    }
}

/// Mount paths escape space, tab, newline and backslash as `\040`-style octal.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup folder of `path` (a `/proc/self/cgroup` path) under `mount`, and its ancestors up to the mount.
fn cgroup_dirs(mount: &CgroupMount, path: &str) -> Vec<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    // A path outside the mounted root (a container without a cgroup namespace) is taken as the mount itself.
    let rel = path
        .strip_prefix(root)
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .unwrap_or("");
    let mut dirs = vec![mount.point.clone()];
    let mut dir = mount.point.clone();
    for part in rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != "." && *p != "..")
    {
        dir.push(part);
        dirs.push(dir.clone());
    }
    dirs.reverse();
    dirs
}

/// The smallest memory limit over this process's v2 and v1 memory cgroups and their ancestors.
pub fn cgroup_limit(
    cg: &ProcCgroup,
    mounts: &CgroupMounts,
    read: &dyn Fn(&Path) -> Option<String>,
) -> Option<CgroupLimit> {
    let mut best: Option<CgroupLimit> = None;
    let mut consider = |version: u8, file: PathBuf, bytes: Option<u64>| {
        if let Some(bytes) = bytes {
            if best.as_ref().is_none_or(|b| bytes < b.bytes) {
                best = Some(CgroupLimit {
                    bytes,
                    version,
                    file,
                });
            }
        }
    };
    if let Some(path) = &cg.v2 {
        for dir in cgroup_dirs(&mounts.v2, path) {
            let file = dir.join("memory.max");
            let limit = read(&file).and_then(|s| parse_cgroup_v2_max(&s));
            consider(2, file, limit);
        }
    }
    if let Some(path) = &cg.v1_memory {
        for dir in cgroup_dirs(&mounts.v1_memory, path) {
            let file = dir.join("memory.limit_in_bytes");
            let limit = read(&file).and_then(|s| parse_cgroup_v1_limit(&s));
            consider(1, file, limit);
        }
    }
    best
}

// ---------------------------------------------------------------------------------------------------------------
// The plan

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
    /// Compute buffers (activations, graph scratch) estimate.
    pub compute_bytes: u64,
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
            compute_bytes,
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

    /// Weights, context and compute: what the plan needs whatever the experts do.
    pub fn fixed_bytes(&self) -> u64 {
        self.resident_bytes
            .saturating_add(self.context_bytes)
            .saturating_add(self.compute_bytes)
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
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The cache would hold fewer experts than one token uses.
    #[error("{0}")]
    TooSmall(Box<Refusal>),
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
                "{head}: the budget is {budget}; it needs at least {} = non-routed weights {} + context {} (-c {}) + compute {} + {need} expert slots {}, {} more (hint: raise --mem, lower -c, use a smaller quantization, or pass --no-paging to let the OS page the file, slowly)",
                format_bytes(needed),
                format_bytes(inputs.resident_bytes),
                format_bytes(inputs.context_bytes),
                inputs.n_ctx,
                format_bytes(inputs.compute_bytes),
                format_bytes(min_cache),
                format_bytes(needed.saturating_sub(budget_bytes)),
            )
        }
    }
}

/// Plans where the routed experts live. Resident when they fit the budget (or there is no budget, no experts, or
/// `--no-paging`); else paged with as many slots as the budget leaves, or as `--expert-cache` says (honoured even
/// over the budget, with a warning: a larger manual cache can beat the automatic one, ANCHORS.md (c) item 2).
/// Refuses a cache smaller than the experts one token uses.
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
        let rows = [
            (
                "non-routed weights (resident)".to_string(),
                format_bytes(i.resident_bytes),
                String::new(),
            ),
            (context, format_bytes(i.context_bytes), String::new()),
            (
                "compute buffers".to_string(),
                format_bytes(i.compute_bytes),
                String::new(),
            ),
            (expert_row, format_bytes(self.expert_bytes()), expert_note),
            (
                "total".to_string(),
                format_bytes(self.total_bytes()),
                String::new(),
            ),
            ("budget".to_string(), budget, budget_note),
        ];
        for (name, bytes, note) in rows {
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
