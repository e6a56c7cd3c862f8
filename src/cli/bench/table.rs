//! The table `ferrite bench` prints, and the expert cache's line under it.

use ferrite::units::{format_bytes, format_params};

use super::{ModelFacts, Row};

/// The line under the table when the experts are paged: each test's hit rate, MB read and I/O wait per token.
pub(super) fn expert_line(slots: u64, rows: &[Row]) -> String {
    let tests: Vec<String> = rows
        .iter()
        .map(|r| {
            let p = r.experts.per_token();
            format!(
                "{} ({} threads) {:.1} % hits, {:.2} MB read/token, I/O wait {:.2} ms/token",
                r.test.name(),
                r.threads,
                r.experts.hit_rate() * 100.0,
                p.bytes_read / 1e6,
                p.io_wait_ms
            )
        })
        .collect();
    format!("expert cache ({slots} slots): {}", tests.join("; "))
}

/// The line under the table with a device expert cache: each test's share of the needed experts computed on the
/// device, and the bytes uploaded per token. `cache`: its experts, bytes and device.
pub(super) fn device_line(cache: &(usize, usize, String), rows: &[Row]) -> String {
    let tests: Vec<String> = rows
        .iter()
        .map(|r| {
            let e = &r.experts;
            let needed = e.device_hits + e.hits + e.misses;
            let share = if needed == 0 {
                0.0
            } else {
                e.device_hits as f64 / needed as f64
            };
            let per_token = if e.tokens == 0 {
                0.0
            } else {
                e.device_bytes as f64 / e.tokens as f64
            };
            format!(
                "{} ({} threads) {:.1} % on the device, {:.2} MB uploaded/token",
                r.test.name(),
                r.threads,
                share * 100.0,
                per_token / 1e6
            )
        })
        .collect();
    format!(
        "device expert cache ({} experts, {} on {}): {}",
        cache.0,
        format_bytes(cache.1 as u64),
        cache.2,
        tests.join("; ")
    )
}

pub(super) fn table(facts: &ModelFacts, rows: &[Row], vs_llama: bool) -> String {
    let mut header = vec![
        "model",
        "size",
        "params",
        "backend",
        "threads",
        "test",
        "t/s (median ± sd)",
    ];
    if vs_llama {
        header.extend(["llama.cpp t/s", "ferrite / llama.cpp"]);
    }
    let right = |i: usize| i != 0 && i != 3;
    let size = format_bytes(facts.bytes);
    let mut cells: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let mut line = vec![
            facts.name.clone(),
            size.clone(),
            format_params(facts.params),
            facts.backend.clone(),
            r.threads.to_string(),
            r.test.name(),
            r.ferrite.cell(),
        ];
        if vs_llama {
            match &r.llama {
                Some(l) => {
                    line.push(l.cell());
                    line.push(format!(
                        "{:.2}",
                        r.ratio().unwrap_or(r.ferrite.median / l.median)
                    ));
                }
                None => line.extend(["-".to_string(), "-".to_string()]),
            }
        }
        cells.push(line);
    }
    let width = |i: usize| {
        cells
            .iter()
            .map(|l| l[i].chars().count())
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(1)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let pad = |s: &str, i: usize| {
        let fill = widths[i].saturating_sub(s.chars().count());
        if right(i) {
            format!("{}{s}", " ".repeat(fill))
        } else {
            format!("{s}{}", " ".repeat(fill))
        }
    };
    let mut out = String::new();
    let line = |items: Vec<String>| format!("| {} |\n", items.join(" | "));
    out += &line(header.iter().enumerate().map(|(i, h)| pad(h, i)).collect());
    out += &line(
        widths
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                if right(i) {
                    format!("{}:", "-".repeat(w - 1))
                } else {
                    "-".repeat(w)
                }
            })
            .collect(),
    );
    for l in &cells {
        out += &line(l.iter().enumerate().map(|(i, c)| pad(c, i)).collect());
    }
    out
}
