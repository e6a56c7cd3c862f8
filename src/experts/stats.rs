//! Counters of the expert stores: hits, misses, prefetches, bytes read, time spent reading and waiting for reads;
//! snapshots that subtract (per step, per turn) and print (`ferrite bench`, `/stats`, `--verbose`).

use std::fmt;
use std::time::Duration;

use super::io::ReadReport;
use super::policy::{PrefetchPlan, RequestPlan};

/// The counters at one moment. Plain numbers: subtract two snapshots for an interval ([`StatsSnapshot::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Tokens processed (prompt and generated).
    pub tokens: u64,
    /// Steps (micro-batches; a decoded token is one).
    pub steps: u64,
    /// Layer requests planned, and the waves they took (more waves than requests: the cache is smaller than a
    /// micro-batch's experts of one layer).
    pub requests: u64,
    pub waves: u64,
    /// Needed experts found in a slot, and those read on demand.
    pub hits: u64,
    pub misses: u64,
    /// Hits on experts a prefetch had loaded (useful prefetches).
    pub prefetch_hits: u64,
    /// Experts read ahead, and guesses dropped for lack of a slot worth giving up.
    pub prefetch_loads: u64,
    pub prefetch_dropped: u64,
    /// Slots whose expert was replaced (on demand or by a prefetch).
    pub evictions: u64,
    /// Bytes and read calls issued, and the wall time of the read batches.
    pub bytes_read: u64,
    /// Of `bytes_read`, the bytes read with `O_DIRECT` (straight into slots).
    pub direct_bytes: u64,
    pub reads: u64,
    pub read_time: Duration,
    /// Time the computation stood still waiting for reads (zero when reads were fully hidden).
    pub io_wait: Duration,
    /// The device expert cache (`--gpu-experts`): needed experts found there (computed on the device; `hits` and
    /// `misses` count the others, computed on the host), experts uploaded into it, and their bytes.
    pub device_hits: u64,
    pub device_loads: u64,
    pub device_bytes: u64,
    /// Of `device_loads`, the uploads made ahead of their layer (hash-routed layers' experts from the token ids,
    /// the next layer's experts as its router guesses them), and how many of those were used.
    pub device_ahead: u64,
    pub device_ahead_used: u64,
}

/// Averages over the tokens of a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerToken {
    pub hits: f64,
    pub misses: f64,
    pub bytes_read: f64,
    pub io_wait_ms: f64,
}

impl StatsSnapshot {
    /// The counts of the interval from `earlier` (a snapshot of the same counters) to `self`.
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            tokens: self.tokens.saturating_sub(earlier.tokens),
            steps: self.steps.saturating_sub(earlier.steps),
            requests: self.requests.saturating_sub(earlier.requests),
            waves: self.waves.saturating_sub(earlier.waves),
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            prefetch_hits: self.prefetch_hits.saturating_sub(earlier.prefetch_hits),
            prefetch_loads: self.prefetch_loads.saturating_sub(earlier.prefetch_loads),
            prefetch_dropped: self
                .prefetch_dropped
                .saturating_sub(earlier.prefetch_dropped),
            evictions: self.evictions.saturating_sub(earlier.evictions),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            direct_bytes: self.direct_bytes.saturating_sub(earlier.direct_bytes),
            reads: self.reads.saturating_sub(earlier.reads),
            read_time: self.read_time.saturating_sub(earlier.read_time),
            io_wait: self.io_wait.saturating_sub(earlier.io_wait),
            device_hits: self.device_hits.saturating_sub(earlier.device_hits),
            device_loads: self.device_loads.saturating_sub(earlier.device_loads),
            device_bytes: self.device_bytes.saturating_sub(earlier.device_bytes),
            device_ahead: self.device_ahead.saturating_sub(earlier.device_ahead),
            device_ahead_used: self
                .device_ahead_used
                .saturating_sub(earlier.device_ahead_used),
        }
    }

    /// The counts of `self` and `other` together (runs of several engines).
    pub fn plus(&self, other: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            tokens: self.tokens.saturating_add(other.tokens),
            steps: self.steps.saturating_add(other.steps),
            requests: self.requests.saturating_add(other.requests),
            waves: self.waves.saturating_add(other.waves),
            hits: self.hits.saturating_add(other.hits),
            misses: self.misses.saturating_add(other.misses),
            prefetch_hits: self.prefetch_hits.saturating_add(other.prefetch_hits),
            prefetch_loads: self.prefetch_loads.saturating_add(other.prefetch_loads),
            prefetch_dropped: self.prefetch_dropped.saturating_add(other.prefetch_dropped),
            evictions: self.evictions.saturating_add(other.evictions),
            bytes_read: self.bytes_read.saturating_add(other.bytes_read),
            direct_bytes: self.direct_bytes.saturating_add(other.direct_bytes),
            reads: self.reads.saturating_add(other.reads),
            read_time: self.read_time.saturating_add(other.read_time),
            io_wait: self.io_wait.saturating_add(other.io_wait),
            device_hits: self.device_hits.saturating_add(other.device_hits),
            device_loads: self.device_loads.saturating_add(other.device_loads),
            device_bytes: self.device_bytes.saturating_add(other.device_bytes),
            device_ahead: self.device_ahead.saturating_add(other.device_ahead),
            device_ahead_used: self
                .device_ahead_used
                .saturating_add(other.device_ahead_used),
        }
    }

    /// Hits over needed experts, 0 when nothing was needed.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.hits.saturating_add(self.misses))
    }

    /// Useful prefetches over prefetch loads.
    pub fn prefetch_accuracy(&self) -> f64 {
        ratio(self.prefetch_hits, self.prefetch_loads)
    }

    /// Read throughput while reading, bytes per second.
    pub fn read_bandwidth(&self) -> f64 {
        let secs = self.read_time.as_secs_f64();
        if secs > 0.0 {
            self.bytes_read as f64 / secs
        } else {
            0.0
        }
    }

    /// Averages per token (all zero before the first token).
    pub fn per_token(&self) -> PerToken {
        let n = self.tokens as f64;
        if self.tokens == 0 {
            return PerToken::default();
        }
        PerToken {
            hits: self.hits as f64 / n,
            misses: self.misses as f64 / n,
            bytes_read: self.bytes_read as f64 / n,
            io_wait_ms: self.io_wait.as_secs_f64() * 1e3 / n,
        }
    }

    /// One JSON object (no serde): the counters, durations in seconds, and the derived rates.
    pub fn to_json(&self) -> String {
        let p = self.per_token();
        format!(
            concat!(
                "{{\"tokens\":{},\"steps\":{},\"requests\":{},\"waves\":{},\"hits\":{},\"misses\":{},",
                "\"prefetch_hits\":{},\"prefetch_loads\":{},\"prefetch_dropped\":{},\"evictions\":{},",
                "\"bytes_read\":{},\"direct_bytes\":{},\"reads\":{},\"read_time_s\":{},\"io_wait_s\":{},\"hit_rate\":{},",
                "\"prefetch_accuracy\":{},\"read_bytes_per_s\":{},\"per_token\":{{\"hits\":{},\"misses\":{},",
                "\"bytes_read\":{},\"io_wait_ms\":{}}},\"device_hits\":{},\"device_loads\":{},",
                "\"device_bytes_uploaded\":{},\"device_bytes_per_token\":{},\"device_loads_ahead\":{},",
                "\"device_loads_ahead_used\":{}}}"
            ),
            self.tokens,
            self.steps,
            self.requests,
            self.waves,
            self.hits,
            self.misses,
            self.prefetch_hits,
            self.prefetch_loads,
            self.prefetch_dropped,
            self.evictions,
            self.bytes_read,
            self.direct_bytes,
            self.reads,
            json_f64(self.read_time.as_secs_f64()),
            json_f64(self.io_wait.as_secs_f64()),
            json_f64(self.hit_rate()),
            json_f64(self.prefetch_accuracy()),
            json_f64(self.read_bandwidth()),
            json_f64(p.hits),
            json_f64(p.misses),
            json_f64(p.bytes_read),
            json_f64(p.io_wait_ms),
            self.device_hits,
            self.device_loads,
            self.device_bytes,
            json_f64(ratio(self.device_bytes, self.tokens)),
            self.device_ahead,
            self.device_ahead_used,
        )
    }
}

/// One line: "experts: 81.0 % hits (1234 hits, 289 misses), 1.21 GiB read (30.9 MiB/token, 2.1 GB/s), I/O wait
/// 3.1 ms/token, 100 % read direct, prefetch ...".
impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.per_token();
        write!(
            f,
            "experts: {:.1} % hits ({} hits, {} misses), {} read ({}/token, {:.2} GB/s), I/O wait {:.1} ms/token",
            self.hit_rate() * 100.0,
            self.hits,
            self.misses,
            crate::units::format_bytes(self.bytes_read),
            crate::units::format_bytes(p.bytes_read as u64),
            self.read_bandwidth() / 1e9,
            p.io_wait_ms,
        )?;
        if self.direct_bytes > 0 {
            let share = ratio(self.direct_bytes, self.bytes_read) * 100.0;
            write!(f, ", {share:.0} % read direct")?;
        }
        if self.prefetch_loads > 0 {
            write!(
                f,
                ", prefetch {} loads ({:.0} % used)",
                self.prefetch_loads,
                self.prefetch_accuracy() * 100.0
            )?;
        }
        if self.device_hits > 0 || self.device_loads > 0 {
            let needed = self.device_hits + self.hits + self.misses;
            write!(
                f,
                "; device cache: {:.1} % of needed experts ({} hits), {} uploaded ({}, {}/token)",
                ratio(self.device_hits, needed) * 100.0,
                self.device_hits,
                self.device_loads,
                crate::units::format_bytes(self.device_bytes),
                crate::units::format_bytes(ratio(self.device_bytes, self.tokens) as u64),
            )?;
            if self.device_ahead > 0 {
                write!(
                    f,
                    ", {} ahead of their layer ({:.0} % used)",
                    self.device_ahead,
                    ratio(self.device_ahead_used, self.device_ahead) * 100.0
                )?;
            }
        }
        Ok(())
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// A finite JSON number (non-finite values, which the counters cannot produce, print as 0).
fn json_f64(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "0".into()
    }
}

/// The counters a store updates as it works.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpertStats {
    totals: StatsSnapshot,
}

impl ExpertStats {
    pub fn new() -> ExpertStats {
        ExpertStats::default()
    }

    /// `n` tokens processed in one step (a micro-batch of `n`, or one decoded token).
    pub fn record_step(&mut self, n_tokens: u64) {
        let t = &mut self.totals;
        t.steps = t.steps.saturating_add(1);
        t.tokens = t.tokens.saturating_add(n_tokens);
    }

    /// A planned layer request of the paged store.
    pub fn record_request(&mut self, plan: &RequestPlan) {
        let t = &mut self.totals;
        t.requests = t.requests.saturating_add(1);
        t.waves = t.waves.saturating_add(plan.waves.len() as u64);
        t.hits = t.hits.saturating_add(plan.n_hits() as u64);
        t.misses = t.misses.saturating_add(plan.n_misses() as u64);
        t.prefetch_hits = t
            .prefetch_hits
            .saturating_add(plan.n_prefetch_hits() as u64);
        t.evictions = t.evictions.saturating_add(plan.n_evictions() as u64);
    }

    /// A layer's `n_experts` needed experts served by the resident store (all hits, nothing read).
    pub fn record_resident(&mut self, n_experts: u64) {
        let t = &mut self.totals;
        t.requests = t.requests.saturating_add(1);
        t.waves = t.waves.saturating_add(1);
        t.hits = t.hits.saturating_add(n_experts);
    }

    pub fn record_prefetch(&mut self, plan: &PrefetchPlan) {
        let t = &mut self.totals;
        t.prefetch_loads = t.prefetch_loads.saturating_add(plan.loads.len() as u64);
        t.prefetch_dropped = t.prefetch_dropped.saturating_add(plan.dropped.len() as u64);
        t.evictions = t.evictions.saturating_add(plan.n_evictions() as u64);
    }

    /// A batch of reads finished (demand or prefetch).
    pub fn record_read(&mut self, report: &ReadReport) {
        let t = &mut self.totals;
        t.bytes_read = t.bytes_read.saturating_add(report.bytes);
        t.direct_bytes = t.direct_bytes.saturating_add(report.direct_bytes);
        t.reads = t.reads.saturating_add(report.reads);
        t.read_time = t.read_time.saturating_add(report.elapsed);
    }

    /// A layer's `hits` needed experts computed from the device cache, and `loads` experts of `bytes` uploaded
    /// into it.
    pub fn record_device(&mut self, hits: u64, loads: u64, bytes: u64) {
        let t = &mut self.totals;
        t.device_hits = t.device_hits.saturating_add(hits);
        t.device_loads = t.device_loads.saturating_add(loads);
        t.device_bytes = t.device_bytes.saturating_add(bytes);
    }

    /// `loads` of a layer's uploads into the device cache made ahead of the layer (also counted by
    /// [`Self::record_device`]), and `used` experts uploaded ahead that a layer has used since.
    pub fn record_device_ahead(&mut self, loads: u64, used: u64) {
        let t = &mut self.totals;
        t.device_ahead = t.device_ahead.saturating_add(loads);
        t.device_ahead_used = t.device_ahead_used.saturating_add(used);
    }

    /// The computation waited `d` for reads to finish.
    pub fn record_io_wait(&mut self, d: Duration) {
        self.totals.io_wait = self.totals.io_wait.saturating_add(d);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        self.totals
    }

    pub fn reset(&mut self) {
        self.totals = StatsSnapshot::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::policy::{ExpertKey, PolicyConfig, SlotPolicy};

    #[test]
    fn counts_plans_reads_and_waits() {
        let mut p = SlotPolicy::new(PolicyConfig::new(2, 2, 8)).unwrap();
        let mut s = ExpertStats::new();
        let k = ExpertKey::new;
        s.record_step(1);
        s.record_request(&p.request(&[k(0, 0), k(0, 1), k(0, 2)]).unwrap());
        s.record_read(&ReadReport {
            bytes: 3000,
            direct_bytes: 2000,
            reads: 9,
            experts: 3,
            elapsed: Duration::from_millis(3),
        });
        s.record_prefetch(&p.prefetch(&[k(1, 0)], 1.0).unwrap());
        let first = s.snapshot();
        assert_eq!(
            (first.hits, first.misses, first.waves, first.requests),
            (0, 3, 2, 1)
        );
        assert_eq!(first.evictions, 1);
        assert_eq!((first.bytes_read, first.direct_bytes), (3000, 2000));
        assert_eq!(
            first.prefetch_dropped, 1,
            "both slots hold keys requested in this step"
        );
        p.begin_step();
        s.record_step(1);
        s.record_request(&p.request(&[k(0, 1), k(0, 2)]).unwrap());
        s.record_io_wait(Duration::from_millis(4));
        let all = s.snapshot();
        let second = all.since(&first);
        assert_eq!(
            (second.hits, second.misses, second.tokens, second.bytes_read),
            (2, 0, 1, 0)
        );
        assert_eq!(second.io_wait, Duration::from_millis(4));
        assert_eq!(first.plus(&second), all, "plus undoes since");
        assert_eq!(all.hit_rate(), 2.0 / 5.0);
        let pt = all.per_token();
        assert_eq!((pt.hits, pt.misses, pt.bytes_read), (1.0, 1.5, 1500.0));
        assert!((pt.io_wait_ms - 2.0).abs() < 1e-9);
        assert!((all.read_bandwidth() - 1e6).abs() < 1e-3);
        s.record_resident(6);
        assert_eq!(s.snapshot().hits, 8);
        s.reset();
        assert_eq!(s.snapshot(), StatsSnapshot::default());
    }

    #[test]
    fn json_and_display() {
        let zero = StatsSnapshot::default();
        assert_eq!(zero.per_token(), PerToken::default());
        assert_eq!(zero.hit_rate(), 0.0);
        let json = zero.to_json();
        assert!(
            json.starts_with("{\"tokens\":0,") && json.ends_with("\"device_loads_ahead_used\":0}"),
            "{json}"
        );
        let s = StatsSnapshot {
            tokens: 2,
            hits: 3,
            misses: 1,
            bytes_read: 2 << 20,
            direct_bytes: 1 << 20,
            read_time: Duration::from_millis(500),
            io_wait: Duration::from_millis(10),
            prefetch_loads: 4,
            prefetch_hits: 1,
            ..StatsSnapshot::default()
        };
        let parsed: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(parsed["hits"], 3);
        assert_eq!(parsed["hit_rate"], 0.75);
        assert_eq!(parsed["per_token"]["bytes_read"], 1048576.0);
        assert_eq!(parsed["io_wait_s"], 0.01);
        assert_eq!(parsed["direct_bytes"], 1 << 20);
        let line = s.to_string();
        assert!(
            line.contains("75.0 % hits")
                && line.contains("1.00 MiB/token")
                && line.contains("50 % read direct")
                && line.contains("25 % used")
                && !line.contains("device cache"),
            "{line}"
        );
        // With the device expert cache: its share of the needed experts and the bytes uploaded per token.
        let d = StatsSnapshot {
            device_hits: 4,
            device_loads: 2,
            device_bytes: 4 << 20,
            device_ahead: 2,
            device_ahead_used: 1,
            ..s
        };
        let parsed: serde_json::Value = serde_json::from_str(&d.to_json()).unwrap();
        assert_eq!(parsed["device_hits"], 4);
        assert_eq!(parsed["device_loads"], 2);
        assert_eq!(parsed["device_bytes_uploaded"], 4 << 20);
        assert_eq!(parsed["device_bytes_per_token"], 2097152.0);
        assert_eq!(parsed["device_loads_ahead"], 2);
        assert_eq!(parsed["device_loads_ahead_used"], 1);
        let line = d.to_string();
        assert!(
            line.contains("; device cache: 50.0 % of needed experts (4 hits), 2 uploaded (4.00 MiB, 2.00 MiB/token), 2 ahead of their layer (50 % used)"),
            "{line}"
        );
        assert_eq!(d.since(&s).device_hits, 4);
        assert_eq!(s.plus(&d.since(&s)), d);
    }
}
