//! Clap value parsers for sizes: `--mem`, `--expert-cache`, `quantize --split-max-size`. The library takes the
//! typed values (bytes, [`ExpertCacheArg`]); this file depends on nothing but `ferrite` and std, so the
//! `disk_read` example includes it too.

use ferrite::plan::ExpertCacheArg;
use ferrite::units::{GIB, KIB, MIB, TIB};

/// "50G", "4000M", "1.5G", "512MiB", "1000000": decimal units like llama.cpp's tools and gguf-split (K = 1000),
/// binary ones with "iB" (KiB = 1024). Used by `--mem`, `--expert-cache`,
/// `quantize --split-max-size` (and the `disk_read` example's `--split`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 50G, 4000M, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "KIB" => KIB as f64,
        "MIB" => MIB as f64,
        "GIB" => GIB as f64,
        "TIB" => TIB as f64,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (K, M, G, T or KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = value * mult;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(format!("{s:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Parses `--expert-cache`: "64" (slots), "64M" / "24GiB" (bytes, as [`parse_size`]), "auto".
pub fn parse_expert_cache(s: &str) -> Result<ExpertCacheArg, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(ExpertCacheArg::Auto);
    }
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        return t
            .parse()
            .map(ExpertCacheArg::Slots)
            .map_err(|_| format!("{s:?} is too many expert slots"));
    }
    parse_size(t).map(ExpertCacheArg::Bytes).map_err(|e| {
        format!(
            "{e}; --expert-cache takes a slot count (64), a size with a unit (24G, 512MiB) or auto"
        )
    })
}

/// Parses `--gpu-experts`: "64" (experts), "12G" (bytes, as [`parse_size`]), "auto".
pub fn parse_gpu_experts(s: &str) -> Result<ferrite::experts::device::GpuExpertsArg, String> {
    use ferrite::experts::device::GpuExpertsArg;
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(GpuExpertsArg::Auto);
    }
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        return t
            .parse()
            .map(GpuExpertsArg::Slots)
            .map_err(|_| format!("{s:?} is too many experts"));
    }
    parse_size(t).map(GpuExpertsArg::Bytes).map_err(|e| {
        format!("{e}; --gpu-experts takes a number of experts (64), a size with a unit (12G, 512MiB) or auto")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50G"), Ok(50_000_000_000));
        assert_eq!(parse_size("4000M"), Ok(4_000_000_000));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("24g"), Ok(24_000_000_000));
        assert_eq!(parse_size(" 512 M "), Ok(512_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("G").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size("99999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn expert_cache_args() {
        assert_eq!(parse_expert_cache("64"), Ok(ExpertCacheArg::Slots(64)));
        assert_eq!(
            parse_expert_cache("64M"),
            Ok(ExpertCacheArg::Bytes(64_000_000))
        );
        assert_eq!(
            parse_expert_cache("2GiB"),
            Ok(ExpertCacheArg::Bytes(2 << 30))
        );
        assert_eq!(parse_expert_cache("AUTO"), Ok(ExpertCacheArg::Auto));
        assert_eq!(parse_expert_cache("0"), Ok(ExpertCacheArg::Slots(0)));
        assert!(parse_expert_cache("99999999999999999999999").is_err());
        assert!(parse_expert_cache("lots")
            .unwrap_err()
            .contains("slot count"));
        assert!(parse_expert_cache("").is_err());
    }
}
