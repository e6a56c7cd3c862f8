//! Handcrafted corrupt GGUF files, each rejected with its own error variant, and every truncation of a valid file rejected.

use gguf::{GgufError, Header, Section};

/// A raw little-endian GGUF byte builder, so corrupt files can say exactly what they contain.
#[derive(Clone, Default)]
struct Raw(Vec<u8>);

const U32: u32 = 4;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const F32_TYPE: u32 = 0;
const Q8_0_TYPE: u32 = 8;

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        Raw::default()
            .bytes(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn bytes(mut self, b: &[u8]) -> Raw {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(self, v: u32) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Raw {
        self.bytes(&v.to_le_bytes())
    }
    fn str(self, s: &[u8]) -> Raw {
        self.u64(s.len() as u64).bytes(s)
    }
    fn kv_u32(self, key: &str, v: u32) -> Raw {
        self.str(key.as_bytes()).u32(U32).u32(v)
    }
    fn kv_str(self, key: &str, v: &[u8]) -> Raw {
        self.str(key.as_bytes()).u32(STRING).str(v)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Raw {
        let mut r = self.str(name.as_bytes()).u32(dims.len() as u32);
        for &d in dims {
            r = r.u64(d);
        }
        r.u32(ty).u64(offset)
    }
    /// Pads to `align` and appends `n` bytes of data.
    fn data(mut self, align: usize, n: usize) -> Raw {
        while self.0.len() % align != 0 {
            self.0.push(0);
        }
        self.0.extend((0..n).map(|i| i as u8));
        self
    }
    fn parse(&self) -> Result<Header, GgufError> {
        Header::parse(&self.0)
    }
}

/// A small valid file: two metadata keys, two F32 tensors of 16 bytes each.
fn valid() -> Raw {
    Raw::header(3, 2, 2)
        .kv_str("general.architecture", b"test")
        .kv_u32("test.count", 7)
        .tensor("a", &[4], F32_TYPE, 0)
        .tensor("b", &[2, 2], F32_TYPE, 32)
        .data(32, 48)
}

macro_rules! rejects {
    ($raw:expr, $pat:pat $(if $guard:expr)?) => {{
        let err = $raw.parse().expect_err("corrupt file was accepted");
        assert!(matches!(err, $pat $(if $guard)?), "wrong error: {err:?} ({err})");
        let msg = err.to_string();
        assert!(!msg.is_empty());
        msg
    }};
}

#[test]
fn valid_file_parses() {
    let h = valid().parse().unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(h.metadata.u32("test.count").unwrap(), 7);
}

#[test]
fn bad_magic() {
    let mut raw = valid();
    raw.0[..4].copy_from_slice(b"GGML");
    let msg = rejects!(raw, GgufError::BadMagic { .. });
    assert!(msg.contains("47 47 55 46"), "{msg}");
}

#[test]
fn unsupported_versions() {
    rejects!(
        Raw::header(1, 0, 0),
        GgufError::UnsupportedVersion { got: 1, .. }
    );
    rejects!(
        Raw::header(4, 0, 0),
        GgufError::UnsupportedVersion { got: 4, .. }
    );
    let msg = rejects!(
        Raw::header(3u32.swap_bytes(), 0, 0),
        GgufError::UnsupportedVersion { .. }
    );
    assert!(msg.contains("big-endian"), "{msg}");
}

#[test]
fn version_2_is_read() {
    let mut raw = valid();
    raw.0[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(raw.parse().unwrap().version, 2);
}

#[test]
fn truncation_in_each_section() {
    let full = valid();
    let cut = |n: usize| Raw(full.0[..n].to_vec());
    rejects!(
        cut(0),
        GgufError::Truncated {
            section: Section::Header,
            offset: 0,
            ..
        }
    );
    rejects!(
        cut(6),
        GgufError::Truncated {
            section: Section::Header,
            offset: 4,
            ..
        }
    );
    rejects!(
        cut(20),
        GgufError::Truncated {
            section: Section::Header,
            offset: 16,
            ..
        }
    );
    // Header is 24 bytes; the first key's length is at 24, its text at 32.
    let in_key = Raw::header(3, 0, 1).str(b"general.architecture");
    rejects!(
        Raw(in_key.0[..40].to_vec()),
        GgufError::Truncated {
            section: Section::MetadataKey,
            ..
        }
    );
    let in_value = Raw::header(3, 0, 1).kv_str("k", b"a long string value");
    let n = in_value.0.len() - 5;
    rejects!(
        Raw(in_value.0[..n].to_vec()),
        GgufError::Truncated {
            section: Section::MetadataValue,
            ..
        }
    );
    let in_info = Raw::header(3, 1, 0).tensor("a_tensor_name", &[4, 4], F32_TYPE, 0);
    let n = in_info.0.len() - 3;
    rejects!(
        Raw(in_info.0[..n].to_vec()),
        GgufError::Truncated {
            section: Section::TensorInfo,
            ..
        }
    );
    let n = full.0.len() - 1;
    rejects!(cut(n), GgufError::DataPastEnd { .. });
}

#[test]
fn every_prefix_of_a_valid_file_is_rejected() {
    let full = valid();
    for n in 0..full.0.len() {
        let r = Header::parse(&full.0[..n]);
        assert!(r.is_err(), "prefix of {n} bytes accepted");
    }
}

#[test]
fn huge_counts_and_lengths() {
    let msg = rejects!(
        Raw::header(3, u64::MAX, 0),
        GgufError::CountTooLarge {
            what: "tensor count",
            offset: 8,
            ..
        }
    );
    assert!(msg.contains("18446744073709551615"), "{msg}");
    rejects!(
        Raw::header(3, 0, u64::MAX),
        GgufError::CountTooLarge {
            what: "metadata count",
            offset: 16,
            ..
        }
    );
    rejects!(
        Raw::header(3, 0, 1 << 40).kv_u32("k", 1),
        GgufError::CountTooLarge { .. }
    );
    let huge_array = Raw::header(3, 0, 1)
        .str(b"k")
        .u32(ARRAY)
        .u32(U32)
        .u64(u64::MAX / 2);
    rejects!(
        huge_array,
        GgufError::CountTooLarge {
            what: "array length",
            ..
        }
    );
    let huge_string = Raw::header(3, 0, 1).str(b"k").u32(STRING).u64(u64::MAX);
    rejects!(
        huge_string,
        GgufError::Truncated {
            section: Section::MetadataValue,
            ..
        }
    );
    let huge_key = Raw::header(3, 0, 1).u64(1 << 50).bytes(b"abcdefghijklmnop");
    rejects!(
        huge_key,
        GgufError::Truncated {
            section: Section::MetadataKey,
            ..
        }
    );
}

#[test]
fn duplicate_key_and_tensor() {
    let dup_key = Raw::header(3, 0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2);
    rejects!(dup_key, GgufError::DuplicateKey { .. });
    let dup_tensor = Raw::header(3, 2, 0)
        .tensor("t", &[4], F32_TYPE, 0)
        .tensor("t", &[4], F32_TYPE, 32)
        .data(32, 48);
    rejects!(dup_tensor, GgufError::DuplicateTensor { .. });
}

#[test]
fn misaligned_and_overlapping_offsets() {
    let misaligned = Raw::header(3, 1, 0)
        .tensor("t", &[4], F32_TYPE, 4)
        .data(32, 64);
    rejects!(
        misaligned,
        GgufError::MisalignedTensor {
            data_offset: 4,
            alignment: 32,
            ..
        }
    );
    let overlap = Raw::header(3, 2, 0)
        .tensor("a", &[16], F32_TYPE, 0)
        .tensor("b", &[4], F32_TYPE, 32)
        .data(32, 128);
    rejects!(
        overlap,
        GgufError::OverlappingTensors {
            first_end: 64,
            second_start: 32,
            ..
        }
    );
    let aligned64 = Raw::header(3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], F32_TYPE, 32)
        .data(64, 128);
    rejects!(aligned64, GgufError::MisalignedTensor { alignment: 64, .. });
}

#[test]
fn data_past_end() {
    let past = Raw::header(3, 1, 0)
        .tensor("t", &[1024], F32_TYPE, 0)
        .data(32, 100);
    let msg = rejects!(past, GgufError::DataPastEnd { .. });
    assert!(msg.contains("\"t\""), "{msg}");
    let overflow = Raw::header(3, 1, 0)
        .tensor("t", &[4], F32_TYPE, u64::MAX - 31)
        .data(32, 16);
    rejects!(overflow, GgufError::DataPastEnd { .. });
}

#[test]
fn bad_utf8() {
    let key = Raw::header(3, 0, 1).str(b"bad\xffkey").u32(U32).u32(1);
    rejects!(
        key,
        GgufError::BadUtf8 {
            what: "metadata key",
            offset: 32
        }
    );
    let value = Raw::header(3, 0, 1).kv_str("k", b"\xc3\x28");
    rejects!(
        value,
        GgufError::BadUtf8 {
            what: "string value",
            ..
        }
    );
    let name = Raw::header(3, 1, 0)
        .tensor("t\u{0}", &[4], F32_TYPE, 0)
        .data(32, 16);
    assert!(name.parse().is_ok(), "NUL is valid UTF-8");
    let mut bad_name = Raw::header(3, 1, 0)
        .tensor("tx", &[4], F32_TYPE, 0)
        .data(32, 16);
    let at = bad_name.0.iter().position(|&b| b == b'x').unwrap();
    bad_name.0[at] = 0xfe;
    rejects!(
        bad_name,
        GgufError::BadUtf8 {
            what: "tensor name",
            ..
        }
    );
}

#[test]
fn unknown_type_ids() {
    let value_type = Raw::header(3, 0, 1).str(b"k").u32(13).u32(0);
    rejects!(
        value_type,
        GgufError::UnknownValueType { id: 13, offset: 33 }
    );
    let elem_type = Raw::header(3, 0, 1).str(b"k").u32(ARRAY).u32(99).u64(0);
    rejects!(elem_type, GgufError::UnknownValueType { id: 99, .. });
    for removed in [4u32, 31, 36, 43, 0xffff_ffff] {
        let tensor_type = Raw::header(3, 1, 0)
            .tensor("t", &[32], removed, 0)
            .data(32, 64);
        rejects!(tensor_type, GgufError::UnknownTensorType { id, .. } if id == removed);
    }
}

#[test]
fn bad_shapes() {
    let five = Raw::header(3, 1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], F32_TYPE, 0)
        .data(32, 4);
    rejects!(five, GgufError::BadDimCount { got: 5, .. });
    let overflow = Raw::header(3, 1, 0)
        .tensor("t", &[1 << 32, 1 << 32], F32_TYPE, 0)
        .data(32, 4);
    rejects!(overflow, GgufError::BadShape { .. });
    let partial_block = Raw::header(3, 1, 0)
        .tensor("t", &[33, 2], Q8_0_TYPE, 0)
        .data(32, 256);
    let msg = rejects!(partial_block, GgufError::BadShape { .. });
    assert!(msg.contains("q8_0"), "{msg}");
}

#[test]
fn bad_alignment() {
    rejects!(
        Raw::header(3, 0, 1).kv_u32("general.alignment", 0),
        GgufError::BadAlignment { got: 0 }
    );
    rejects!(
        Raw::header(3, 0, 1).kv_u32("general.alignment", 48),
        GgufError::BadAlignment { got: 48 }
    );
    let wrong_type = Raw::header(3, 0, 1).kv_str("general.alignment", b"32");
    rejects!(wrong_type, GgufError::WrongType { .. });
}

#[test]
fn nesting_too_deep() {
    let mut raw = Raw::header(3, 0, 1).str(b"k").u32(ARRAY);
    for _ in 0..20 {
        raw = raw.u32(ARRAY).u64(1);
    }
    let raw = raw.u32(U32).u64(0);
    rejects!(raw, GgufError::NestingTooDeep { .. });
}

#[test]
fn typed_getters_name_the_key() {
    let h = valid().parse().unwrap();
    let e = h.metadata.f32("test.count").unwrap_err();
    assert!(matches!(e, GgufError::WrongType { .. }));
    assert_eq!(
        e.to_string(),
        "metadata key \"test.count\" has type uint32, expected float32"
    );
    let e = h.metadata.u32("test.missing").unwrap_err();
    assert_eq!(e.to_string(), "metadata key \"test.missing\" is missing");
}
