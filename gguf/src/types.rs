//! The tensor types of the pinned ggml (0.26, llama-cpp-sys-2 0.1.161): ids, names, block sizes, bytes per block.

use std::fmt;

/// A ggml tensor type as stored in a GGUF tensor info.
///
/// Ids follow `enum ggml_type` of the pinned ggml; removed ids (4, 5, 31..33, 36..38) are unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2K = 10,
    Q3K = 11,
    Q4K = 12,
    Q5K = 13,
    Q6K = 14,
    Q8K = 15,
    Iq2Xxs = 16,
    Iq2Xs = 17,
    Iq3Xxs = 18,
    Iq1S = 19,
    Iq4Nl = 20,
    Iq3S = 21,
    Iq2S = 22,
    Iq4Xs = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    Iq1M = 29,
    Bf16 = 30,
    Tq1_0 = 34,
    Tq2_0 = 35,
    Mxfp4 = 39,
    Nvfp4 = 40,
    Q1_0 = 41,
    Q2_0 = 42,
}

/// (type, name as ggml prints it, elements per block, bytes per block).
const TABLE: &[(GgmlType, &str, u64, u64)] = &[
    (GgmlType::F32, "f32", 1, 4),
    (GgmlType::F16, "f16", 1, 2),
    (GgmlType::Q4_0, "q4_0", 32, 18),
    (GgmlType::Q4_1, "q4_1", 32, 20),
    (GgmlType::Q5_0, "q5_0", 32, 22),
    (GgmlType::Q5_1, "q5_1", 32, 24),
    (GgmlType::Q8_0, "q8_0", 32, 34),
    (GgmlType::Q8_1, "q8_1", 32, 36),
    (GgmlType::Q2K, "q2_K", 256, 84),
    (GgmlType::Q3K, "q3_K", 256, 110),
    (GgmlType::Q4K, "q4_K", 256, 144),
    (GgmlType::Q5K, "q5_K", 256, 176),
    (GgmlType::Q6K, "q6_K", 256, 210),
    (GgmlType::Q8K, "q8_K", 256, 292),
    (GgmlType::Iq2Xxs, "iq2_xxs", 256, 66),
    (GgmlType::Iq2Xs, "iq2_xs", 256, 74),
    (GgmlType::Iq3Xxs, "iq3_xxs", 256, 98),
    (GgmlType::Iq1S, "iq1_s", 256, 50),
    (GgmlType::Iq4Nl, "iq4_nl", 32, 18),
    (GgmlType::Iq3S, "iq3_s", 256, 110),
    (GgmlType::Iq2S, "iq2_s", 256, 82),
    (GgmlType::Iq4Xs, "iq4_xs", 256, 136),
    (GgmlType::I8, "i8", 1, 1),
    (GgmlType::I16, "i16", 1, 2),
    (GgmlType::I32, "i32", 1, 4),
    (GgmlType::I64, "i64", 1, 8),
    (GgmlType::F64, "f64", 1, 8),
    (GgmlType::Iq1M, "iq1_m", 256, 56),
    (GgmlType::Bf16, "bf16", 1, 2),
    (GgmlType::Tq1_0, "tq1_0", 256, 54),
    (GgmlType::Tq2_0, "tq2_0", 256, 66),
    (GgmlType::Mxfp4, "mxfp4", 32, 17),
    (GgmlType::Nvfp4, "nvfp4", 64, 36),
    (GgmlType::Q1_0, "q1_0", 128, 18),
    (GgmlType::Q2_0, "q2_0", 64, 18),
];

impl GgmlType {
    /// Every known type, in id order.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TABLE.iter().map(|row| row.0)
    }

    /// The type with ggml id `id`, or `None` for ids the pinned ggml does not know.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TABLE.iter().find(|row| row.0 as u32 == id).map(|row| row.0)
    }

    /// The type named `name` (ggml's spelling, case-insensitive: `q4_K`, `Q4_K`, `bf16`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TABLE
            .iter()
            .find(|row| row.1.eq_ignore_ascii_case(name))
            .map(|row| row.0)
    }

    fn row(self) -> &'static (GgmlType, &'static str, u64, u64) {
        // Every variant has exactly one row; the unit test `table_is_complete` holds this.
        TABLE.iter().find(|row| row.0 == self).unwrap_or(&TABLE[0])
    }

    /// The ggml type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// ggml's name for the type (`q4_K`, `mxfp4`, ...).
    pub fn name(self) -> &'static str {
        self.row().1
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        self.row().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().3
    }

    /// True for block-quantized types (block size > 1).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of a row of `n` elements, or `None` when `n` is not a whole number of blocks or overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        if n % self.block_size() != 0 {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }

    /// Bytes of a tensor of shape `dims` (ggml order, `ne0` first), or `None` as for [`Self::row_bytes`].
    pub fn tensor_bytes(self, dims: &[u64]) -> Option<u64> {
        let (&ne0, rest) = match dims.split_first() {
            Some(split) => split,
            None => return Some(self.type_size()),
        };
        let rows = rest.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.row_bytes(ne0)?.checked_mul(rows)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete_and_ids_round_trip() {
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert_eq!(TABLE.iter().filter(|r| r.0 == t).count(), 1);
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(
            GgmlType::Q4K.tensor_bytes(&[4096, 2048, 256]),
            Some(4096 / 256 * 144 * 2048 * 256)
        );
        assert_eq!(GgmlType::Q8_0.row_bytes(33), None);
        assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None);
        assert_eq!(
            GgmlType::I32.tensor_bytes(&[6, 129280]),
            Some(6 * 129280 * 4)
        );
    }
}
