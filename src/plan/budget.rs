//! The machine budget: what the plan may use, from `--mem` or what the machine and its cgroup really allow
//! (`MemAvailable` of `/proc/meminfo`, cgroup v1 and v2 limits over this process's cgroup and its ancestors), less a
//! safety margin. Readers take the files' contents as strings, so tests pass fixtures.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::units::{format_bytes, KIB, MIB};

/// Where the budget came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BudgetSource {
    /// `--mem SIZE`.
    Flag,
    /// `MemAvailable` of `/proc/meminfo`.
    MemAvailable,
    /// A cgroup memory limit: `version` 1 (`memory.limit_in_bytes`) or 2 (`memory.max`), and its file.
    Cgroup { version: u8, file: PathBuf },
    /// The machine's physical memory (`sysconf`), where neither `MemAvailable` nor a cgroup limit is readable
    /// (not Linux): an upper bound, so a plan over it is known not to fit.
    Physical,
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
            (None, None) => match sys.physical {
                Some(bytes) => (bytes, BudgetSource::Physical),
                None => {
                    return Budget {
                        bytes: None,
                        limit: None,
                        margin: 0,
                        source: BudgetSource::Unknown,
                    }
                }
            },
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
            BudgetSource::Physical => "physical memory".to_string(),
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
    /// The machine's physical memory, the budget when neither of the above is readable.
    pub physical: Option<u64>,
}

impl SystemMemory {
    /// Reads `/proc/meminfo`, `/proc/self/cgroup`, `/proc/self/mountinfo` and the cgroup limit files, and the
    /// physical memory size.
    pub fn read() -> SystemMemory {
        SystemMemory {
            physical: physical_memory(),
            ..SystemMemory::read_with(&|p: &Path| std::fs::read_to_string(p).ok())
        }
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
            physical: None,
        }
    }
}

/// Physical memory: `_SC_PHYS_PAGES` pages of `_SC_PAGESIZE` bytes.
fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (pages, page) = (u64::try_from(pages).ok()?, u64::try_from(page).ok()?);
    pages.checked_mul(page).filter(|&b| b > 0)
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
