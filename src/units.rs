//! Numbers for people: byte sizes in binary units and parameter counts, one format each for every command.

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Bytes for people: "512 B", "1.50 KiB", "6.75 MiB", "72.56 GiB", "1.20 TiB".
pub fn format_bytes(b: u64) -> String {
    let f = b as f64;
    match b {
        _ if b < KIB => format!("{b} B"),
        _ if b < MIB => format!("{:.2} KiB", f / KIB as f64),
        _ if b < GIB => format!("{:.2} MiB", f / MIB as f64),
        _ if b < TIB => format!("{:.2} GiB", f / GIB as f64),
        _ => format!("{:.2} TiB", f / TIB as f64),
    }
}

/// A count of parameters as llama-bench writes it: "6.74 B", "13.11 M", "512.00 K", "999".
pub fn format_params(n: u64) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.2} B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.2} K", v / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_for_people() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1024), "1.00 KiB");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(MIB - 1), "1024.00 KiB");
        assert_eq!(format_bytes(6_750 * 1024 + 768), "6.59 MiB");
        assert_eq!(format_bytes(3 << 29), "1.50 GiB");
        assert_eq!(format_bytes(TIB + TIB / 5), "1.20 TiB");
        assert_eq!(format_bytes(u64::MAX), "16777216.00 TiB");
    }

    #[test]
    fn parameters_for_people() {
        assert_eq!(format_params(0), "0");
        assert_eq!(format_params(999), "999");
        assert_eq!(format_params(1000), "1.00 K");
        assert_eq!(format_params(512_000), "512.00 K");
        assert_eq!(format_params(13_107_200), "13.11 M");
        assert_eq!(format_params(6_738_415_616), "6.74 B");
        assert_eq!(format_params(284_333_000_000), "284.33 B");
    }
}
