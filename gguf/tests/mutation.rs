//! Bounded, deterministic mutation testing of `Header::parse`.
//!
//! Valid seed files are built with the `Writer` (every value type, arrays of every element type, nested arrays,
//! non-default alignments, tensors of plain and quantized types with 0 to 4 dimensions), then mutated well over
//! 100,000 times with a seeded PRNG: bit flips, special bytes, interesting 32/64-bit values, length and count fields
//! nudged by small deltas, truncation, insertion, deletion and duplication of byte ranges. Every mutant is parsed
//! inside `catch_unwind`; a panic fails the test with the seed, the mutations and a hex dump. Every mutant that
//! parses has its tensor ranges checked against the bytes, every metadata getter called on every key, and is
//! rewritten with `Writer::from_header` and parsed again. A counting global allocator fails the test when one parse
//! makes an allocation (or allocates in total) more than `64 x input + 1 MiB`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use gguf::{Array, GgmlType, Header, Value, ValueType, Writer};

// ---------------------------------------------------------------------------------------------------------------
// Allocation guard: records the largest single allocation and the bytes requested in total while armed (per thread).

struct CountingAlloc;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static MAX_ONE: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = MAX_ONE.try_with(|m| m.set(m.get().max(size)));
            let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(size)));
        }
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes in allocation-free thread locals.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f` with the guard armed; returns its result, the largest single allocation and the total requested.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    MAX_ONE.with(|m| m.set(0));
    TOTAL.with(|t| t.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, MAX_ONE.with(Cell::get), TOTAL.with(Cell::get))
}

fn alloc_limit(input_len: usize) -> usize {
    64 * input_len + (1 << 20)
}

// ---------------------------------------------------------------------------------------------------------------
// A small deterministic PRNG (SplitMix64).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Seed files.

struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    fields: Vec<Field>,
}

fn build(w: &Writer, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    w.write(&mut out, |_, t, sink| {
        let data: Vec<u8> = (0..t.n_bytes).map(|_| rng.next() as u8).collect();
        sink.write_all(&data)
    })
    .expect("seed writes");
    let layout = w.plan().expect("seed plans");
    assert_eq!(out.len() as u64, layout.total_bytes);
    out
}

fn every_scalar(w: &mut Writer) {
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set("general.name", Value::String("Tëst ✓ model".into()));
    w.set("general.empty", Value::String(String::new()));
    w.set("t.u8", Value::U8(0xAB));
    w.set("t.i8", Value::I8(-7));
    w.set("t.u16", Value::U16(0xBEEF));
    w.set("t.i16", Value::I16(-12345));
    w.set("t.u32", Value::U32(4096));
    w.set("t.i32", Value::I32(-1));
    w.set("t.f32", Value::F32(1e-6));
    w.set("t.bool", Value::Bool(true));
    w.set("t.u64", Value::U64(u64::MAX - 1));
    w.set("t.i64", Value::I64(i64::MIN));
    w.set("t.f64", Value::F64(std::f64::consts::PI));
}

fn every_array(w: &mut Writer) {
    w.set("a.u8", Value::Array(Array::U8(vec![0, 1, 2, 255])));
    w.set("a.i8", Value::Array(Array::I8(vec![-128, 0, 127])));
    w.set("a.u16", Value::Array(Array::U16(vec![1, 65535])));
    w.set("a.i16", Value::Array(Array::I16(vec![-2, 3, 4])));
    w.set("a.u32", Value::Array(Array::U32(vec![7, 8, 9, 10])));
    w.set("a.i32", Value::Array(Array::I32(vec![-3, 2, 1])));
    w.set(
        "a.f32",
        Value::Array(Array::F32(vec![0.5, -0.25, f32::INFINITY])),
    );
    w.set("a.bool", Value::Array(Array::Bool(vec![true, false, true])));
    w.set(
        "a.str",
        Value::string_array(["a", "", "bcd", "ëf", "<|end▁of▁sentence|>"]),
    );
    w.set("a.u64", Value::Array(Array::U64(vec![0, u64::MAX])));
    w.set(
        "a.i64",
        Value::Array(Array::I64(vec![i64::MIN, -1, i64::MAX])),
    );
    w.set("a.f64", Value::Array(Array::F64(vec![1.5, -0.0])));
    w.set("a.empty_u32", Value::Array(Array::U32(vec![])));
    w.set("a.empty_str", Value::Array(Array::String(vec![])));
    w.set(
        "a.nested",
        Value::Array(Array::Array(vec![
            Array::U32(vec![1, 2]),
            Array::String(vec!["x".into(), "yz".into()]),
            Array::Array(vec![
                Array::I8(vec![-1]),
                Array::Array(vec![Array::Bool(vec![false])]),
                Array::F64(vec![]),
            ]),
            Array::Array(vec![]),
        ])),
    );
}

fn tensor_seed(w: &mut Writer, tensors: &[(&str, &[u64], GgmlType)]) {
    for &(name, dims, ty) in tensors {
        w.add_tensor(name, dims, ty).expect("seed tensor");
    }
}

fn seeds() -> Vec<Seed> {
    let mut rng = Rng::new(0x5eed);
    let mut out = Vec::new();

    // 1. Every scalar type, default alignment, tensors of 1 to 4 dimensions, plain and quantized.
    let mut w = Writer::new();
    every_scalar(&mut w);
    tensor_seed(
        &mut w,
        &[
            ("tok_embd.weight", &[8], GgmlType::F32),
            ("blk.0.attn_q.weight", &[4, 3], GgmlType::F16),
            ("blk.0.ffn_up.weight", &[32, 2], GgmlType::Q4_0),
            ("blk.0.ffn_gate_exps.weight", &[32, 1, 2], GgmlType::Q8_0),
            ("blk.0.ffn_down_exps.weight", &[256, 1, 1, 2], GgmlType::Q4K),
        ],
    );
    out.push(("scalars+tensors", build(&w, &mut rng)));

    // 2. Arrays of every element type, nested arrays, alignment 64.
    let mut w = Writer::new();
    w.set_alignment(64).unwrap();
    every_array(&mut w);
    tensor_seed(
        &mut w,
        &[
            ("q6k", &[256, 1], GgmlType::Q6K),
            ("mxfp4", &[32, 2, 1], GgmlType::Mxfp4),
            ("i32", &[3, 2], GgmlType::I32),
            ("bf16", &[5], GgmlType::Bf16),
        ],
    );
    out.push(("arrays+align64", build(&w, &mut rng)));

    // 3. Alignment 1 (tensors back to back, unaligned), a scalar tensor, a zero-sized tensor, odd types.
    let mut w = Writer::new();
    w.set_alignment(1).unwrap();
    w.set("s", Value::String("x".into()));
    w.set("b", Value::Array(Array::Bool(vec![true])));
    tensor_seed(
        &mut w,
        &[
            ("i8", &[3], GgmlType::I8),
            ("iq4nl", &[32], GgmlType::Iq4Nl),
            ("f64", &[1, 1, 1, 1], GgmlType::F64),
            ("scalar", &[], GgmlType::F32),
            ("empty", &[0, 4], GgmlType::Q8_0),
            ("q2k", &[256], GgmlType::Q2K),
        ],
    );
    out.push(("align1+odd tensors", build(&w, &mut rng)));

    // 4. The smallest file: no metadata, no tensors.
    out.push(("empty", build(&Writer::new(), &mut rng)));

    // 5. A vocabulary-like file (string arrays with many entries), version 2, alignment 16.
    let mut w = Writer::new();
    w.set_alignment(16).unwrap();
    w.set("general.architecture", Value::String("deepseek4".into()));
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    let tokens: Vec<String> = (0..48).map(|i| format!("tok{i}")).collect();
    w.set("tokenizer.ggml.tokens", Value::string_array(tokens));
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32((0..48).map(|i| i as f32).collect())),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32((0..48).map(|i| i % 4).collect())),
    );
    w.set(
        "tokenizer.ggml.merges",
        Value::string_array(["t o", "to k", "1 2"]),
    );
    w.set("deepseek4.block_count", Value::U32(2));
    w.set("split.count", Value::U16(1));
    tensor_seed(
        &mut w,
        &[
            ("output.weight", &[64, 2], GgmlType::Q2_0),
            ("blk.1.x", &[128], GgmlType::Q1_0),
            ("blk.1.y", &[64], GgmlType::Nvfp4),
            ("blk.1.z", &[256], GgmlType::Tq2_0),
        ],
    );
    let mut bytes = build(&w, &mut rng);
    bytes[4] = 2; // GGUF version 2 has the same layout
    out.push(("vocab+v2+align16", bytes));

    // 6. Everything at once: every value type, every array type, alignment 256, a tensor of every ggml type.
    let mut w = Writer::new();
    w.set_alignment(256).unwrap();
    every_scalar(&mut w);
    every_array(&mut w);
    for (i, ty) in GgmlType::all().enumerate() {
        w.add_tensor(
            &format!("t{i}.{ty}"),
            &[ty.block_size(), 1 + (i as u64 % 2)],
            ty,
        )
        .expect("seed tensor");
    }
    out.push(("everything+align256", build(&w, &mut rng)));

    // 7. Arrays nested as deep as the reader allows (MAX_NESTING levels), and a deep array of strings.
    let mut w = Writer::new();
    let mut deep = Array::String(vec!["leaf".into()]);
    for _ in 1..gguf::MAX_NESTING {
        deep = Array::Array(vec![deep, Array::U8(vec![1])]);
    }
    w.set("deep", Value::Array(deep));
    w.set("after", Value::U32(1));
    tensor_seed(
        &mut w,
        &[
            ("q5k", &[256, 1, 1], GgmlType::Q5K),
            ("q3k", &[256], GgmlType::Q3K),
        ],
    );
    out.push(("deep nesting", build(&w, &mut rng)));

    out.into_iter()
        .map(|(name, bytes)| {
            let fields = field_map(&bytes);
            Header::parse(&bytes).unwrap_or_else(|e| panic!("seed {name} does not parse: {e}"));
            Seed {
                name,
                bytes,
                fields,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// A map of the numeric fields of a valid file, so mutations can target counts, lengths, type ids and offsets.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Version,
    Count,
    StrLen,
    ValueTypeId,
    ArrayLen,
    NDims,
    Dim,
    TensorType,
    TensorOffset,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

fn field_map(b: &[u8]) -> Vec<Field> {
    struct W<'a> {
        b: &'a [u8],
        pos: usize,
        fields: Vec<Field>,
    }
    impl W<'_> {
        fn take(&mut self, width: usize, kind: Option<Kind>) -> u64 {
            if let Some(kind) = kind {
                self.fields.push(Field {
                    at: self.pos,
                    width,
                    kind,
                });
            }
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(&self.b[self.pos..self.pos + width]);
            self.pos += width;
            u64::from_le_bytes(v)
        }
        fn string(&mut self) {
            let n = self.take(8, Some(Kind::StrLen));
            self.pos += n as usize;
        }
        fn value(&mut self, ty: u64) {
            match ty {
                0 | 1 | 7 => self.pos += 1,
                2 | 3 => self.pos += 2,
                4..=6 => self.pos += 4,
                10..=12 => self.pos += 8,
                8 => self.string(),
                9 => {
                    let elem = self.take(4, Some(Kind::ValueTypeId));
                    let n = self.take(8, Some(Kind::ArrayLen));
                    for _ in 0..n {
                        self.value(elem);
                    }
                }
                _ => unreachable!("seed value type {ty}"),
            }
        }
    }
    let mut w = W {
        b,
        pos: 4,
        fields: Vec::new(),
    };
    w.take(4, Some(Kind::Version));
    let n_tensors = w.take(8, Some(Kind::Count));
    let n_kv = w.take(8, Some(Kind::Count));
    for _ in 0..n_kv {
        w.string();
        let ty = w.take(4, Some(Kind::ValueTypeId));
        w.value(ty);
    }
    for _ in 0..n_tensors {
        w.string();
        let n_dims = w.take(4, Some(Kind::NDims));
        for _ in 0..n_dims {
            w.take(8, Some(Kind::Dim));
        }
        w.take(4, Some(Kind::TensorType));
        w.take(8, Some(Kind::TensorOffset));
    }
    w.fields
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations.

const SPECIAL_BYTES: [u8; 5] = [0x00, 0xFF, 0x7F, 0x80, 0x01];
const INTERESTING_U32: [u32; 18] = [
    0,
    1,
    2,
    3,
    4,
    5,
    8,
    9,
    12,
    13,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];
const INTERESTING_U64: [u64; 16] = [
    0,
    1,
    2,
    4,
    8,
    0x7F,
    0xFFFF_FFFF,
    1 << 32,
    1 << 31,
    1 << 62,
    1 << 63,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
    u64::MAX / 2 + 2,
    0x0101_0101_0101_0101,
];

fn write_le(buf: &mut [u8], at: usize, width: usize, v: u64) {
    let end = (at + width).min(buf.len());
    if at < end {
        buf[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
    }
}

fn read_le(buf: &[u8], at: usize, width: usize) -> u64 {
    let mut v = [0u8; 8];
    let end = (at + width).min(buf.len());
    if at < end {
        v[..end - at].copy_from_slice(&buf[at..end]);
    }
    u64::from_le_bytes(v)
}

fn interesting(rng: &mut Rng, width: usize) -> u64 {
    if width == 4 {
        u64::from(rng.pick(&INTERESTING_U32))
    } else {
        rng.pick(&INTERESTING_U64)
    }
}

/// Applies one random mutation to `buf` (a mutant of `seed`) and describes it.
fn mutate(rng: &mut Rng, buf: &mut Vec<u8>, seed: &Seed) -> String {
    let len = buf.len();
    if len == 0 {
        buf.push(rng.next() as u8);
        return "grow empty input by one byte".into();
    }
    let pos = rng.below(len);
    match rng.below(16) {
        0 | 1 => {
            let bit = rng.below(8);
            buf[pos] ^= 1 << bit;
            format!("flip bit {bit} of byte {pos}")
        }
        2 => {
            let v = rng.pick(&SPECIAL_BYTES);
            buf[pos] = v;
            format!("set byte {pos} to {v:#04x}")
        }
        3 => {
            let v = rng.next() as u8;
            buf[pos] = v;
            format!("set byte {pos} to random {v:#04x}")
        }
        4..=7 => {
            // A field of the seed's structure (offsets may be stale after an earlier insertion or deletion).
            let f = seed.fields[rng.below(seed.fields.len())];
            let old = read_le(buf, f.at, f.width);
            let new = match rng.below(4) {
                0 => interesting(rng, f.width),
                1 | 2 => {
                    let delta = rng.below(17) as i64 - 8;
                    let v = old.wrapping_add(delta as u64);
                    if f.width == 4 {
                        v & 0xFFFF_FFFF
                    } else {
                        v
                    }
                }
                _ => match f.kind {
                    Kind::ValueTypeId => rng.below(16) as u64,
                    Kind::TensorType => rng.below(48) as u64,
                    Kind::NDims => rng.below(7) as u64,
                    Kind::Version => rng.below(5) as u64,
                    Kind::TensorOffset => {
                        (rng.below(64) as u64) * rng.pick(&[1u64, 16, 32, 64, 4096])
                    }
                    Kind::Dim => {
                        rng.pick(&[0u64, 1, 2, 31, 32, 33, 64, 256, 257, 1 << 32, 1 << 62])
                    }
                    Kind::Count | Kind::StrLen | Kind::ArrayLen => {
                        let remaining = (len - f.at.min(len)) as u64;
                        rng.pick(&[
                            remaining,
                            remaining.wrapping_sub(8),
                            remaining / 8,
                            remaining / 12,
                            remaining + 1,
                        ])
                    }
                },
            };
            write_le(buf, f.at, f.width, new);
            format!(
                "{:?} field at {} ({} bytes): {old:#x} -> {new:#x}",
                f.kind, f.at, f.width
            )
        }
        8 => {
            let width = rng.pick(&[4usize, 8]);
            let v = interesting(rng, width);
            write_le(buf, pos, width, v);
            format!("write {width}-byte {v:#x} at {pos}")
        }
        9 => {
            let cut = rng.below(len);
            buf.truncate(cut);
            format!("truncate to {cut} bytes")
        }
        10 | 11 => {
            let n = 1 + rng.below(16);
            let fill: Vec<u8> = if rng.chance(2) {
                vec![0; n]
            } else {
                (0..n).map(|_| rng.next() as u8).collect()
            };
            buf.splice(pos..pos, fill);
            format!("insert {n} bytes at {pos}")
        }
        12 | 13 => {
            let n = (1 + rng.below(16)).min(len - pos);
            buf.drain(pos..pos + n);
            format!("delete {n} bytes at {pos}")
        }
        14 => {
            let n = (1 + rng.below(64)).min(len - pos);
            let at = rng.below(len + 1);
            let copy = buf[pos..pos + n].to_vec();
            buf.splice(at..at, copy);
            format!("duplicate bytes {pos}..{} at {at}", pos + n)
        }
        _ => {
            let n = (1 + rng.below(32)).min(len - pos);
            let to = rng.below(len - n + 1);
            let copy = buf[pos..pos + n].to_vec();
            buf[to..to + n].copy_from_slice(&copy);
            format!(
                "overwrite {to}..{} with a copy of {pos}..{}",
                to + n,
                pos + n
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// What a parsed file must satisfy, and every accessor exercised.

fn check_array(a: &Array, depth: u32) {
    assert!(
        depth <= gguf::MAX_NESTING,
        "array nested {depth} deep was accepted"
    );
    let n = a.len();
    assert_eq!(a.is_empty(), n == 0);
    let _ = a.elem_type();
    let _ = a.to_i128s();
    for i in [0, n / 2, n.saturating_sub(1), n, usize::MAX] {
        let v = a.get(i);
        assert_eq!(v.is_some(), i < n, "Array::get({i}) on {n} elements");
        if let Some(v) = v {
            assert_eq!(v.value_type(), a.elem_type());
        }
    }
    if let Array::Array(inner) = a {
        for x in inner {
            check_array(x, depth + 1);
        }
    }
}

fn exercise(bytes: &[u8], h: &Header) {
    assert!(h.version == 2 || h.version == 3);
    assert!(h.alignment.is_power_of_two());
    assert_eq!(h.file_len, bytes.len() as u64);
    assert_eq!(h.data_offset % h.alignment, 0);

    // Tensor data ranges exactly as GgufFile::tensor_data computes them.
    let mut ranges = Vec::new();
    for t in &h.tensors {
        assert!(
            h.data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes))
                .is_some(),
            "tensor {:?}: range overflows",
            t.name
        );
        let start = h.data_offset + t.offset;
        let end = start + t.n_bytes;
        assert!(
            end <= bytes.len() as u64,
            "tensor {:?}: data {start}..{end} past the end ({})",
            t.name,
            bytes.len()
        );
        let data = &bytes[start as usize..start as usize + t.n_bytes as usize];
        assert_eq!(data.len() as u64, t.n_bytes);
        assert_eq!(t.offset % h.alignment, 0, "tensor {:?} misaligned", t.name);
        assert!(t.dims.len() <= gguf::MAX_DIMS as usize);
        assert!(t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n <= i64::MAX as u64));
        let _ = t.n_elements();
        assert_eq!(t.ty.tensor_bytes(&t.dims), Some(t.n_bytes));
        assert!(std::ptr::eq(h.tensor(&t.name).expect("tensor index"), t));
        if t.n_bytes > 0 {
            ranges.push((t.offset, t.offset + t.n_bytes));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "overlapping tensors accepted: {pair:?}"
        );
    }
    assert!(h.tensor("no such tensor \u{0}").is_none());

    // Every getter on every key: errors are fine, panics are not.
    let md = &h.metadata;
    assert_eq!(md.iter().count(), md.len());
    assert_eq!(md.is_empty(), md.iter().next().is_none());
    for (key, value) in md.iter() {
        assert!(md.contains(key));
        assert_eq!(md.get(key).map(Value::value_type), Some(value.value_type()));
        let _ = md.require(key);
        let s = md.str(key);
        assert_eq!(s.is_ok(), value.value_type() == ValueType::String);
        assert_eq!(md.u32(key).is_ok(), value.value_type() == ValueType::U32);
        assert_eq!(md.f32(key).is_ok(), value.value_type() == ValueType::F32);
        assert_eq!(md.bool(key).is_ok(), value.value_type() == ValueType::Bool);
        let _ = md.uint(key).map_err(|e| e.to_string());
        let _ = md.int_array(key).map_err(|e| e.to_string());
        let _ = md.str_array(key).map_err(|e| e.to_string());
        if let Ok(a) = md.array(key) {
            check_array(a, 1);
        }
        let _ = value.summary(3);
        let _ = value.as_i128();
    }
    let _ = md.str("missing.key").unwrap_err().to_string();

    // The parsed header can be written back, and the rewrite parses to the same header (byte-identical when
    // written once more).
    let w = Writer::from_header(h).expect("a parsed header can be rewritten");
    // A file without tensors may declare a huge alignment (up to 2^31) that puts its data section past its end;
    // the rewrite would pad to it, so skip the round trip when it would be much bigger than the input.
    let planned = w.plan().expect("plan").total_bytes;
    if planned > 2 * bytes.len() as u64 + 4096 {
        assert!(
            h.tensors.is_empty(),
            "rewrite of {} bytes planned at {planned}",
            bytes.len()
        );
        return;
    }
    let fill = |i: usize, _: &gguf::PlannedTensor, sink: &mut dyn std::io::Write| {
        let t = &h.tensors[i];
        let start = (h.data_offset + t.offset) as usize;
        sink.write_all(&bytes[start..start + t.n_bytes as usize])
    };
    let mut once = Vec::new();
    w.write(&mut once, fill).expect("rewrite");
    let h2 = Header::parse(&once).expect("the rewritten file parses");
    assert_eq!(h2.metadata.len(), md.len());
    assert_eq!(h2.tensors.len(), h.tensors.len());
    for (a, b) in h.tensors.iter().zip(&h2.tensors) {
        assert_eq!(
            (&a.name, &a.dims, a.ty, a.n_bytes),
            (&b.name, &b.dims, b.ty, b.n_bytes)
        );
    }
    let w2 = Writer::from_header(&h2).expect("rewrite again");
    let mut twice = Vec::new();
    w2.write(&mut twice, |i, _, sink| {
        let t = &h2.tensors[i];
        let start = (h2.data_offset + t.offset) as usize;
        sink.write_all(&once[start..start + t.n_bytes as usize])
    })
    .expect("rewrite again");
    assert!(once == twice, "rewriting a rewritten file changed it");
}

// ---------------------------------------------------------------------------------------------------------------

fn hex_dump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "{:08x}:", i * 16);
        for b in line {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

fn variant(e: &gguf::GgufError) -> String {
    let debug = format!("{e:?}");
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or("")
        .to_string()
}

/// Mutants per seed file (7 seeds: 119,000 in all).
const PER_SEED: usize = 17_000;
/// At most this many mutations are stacked on one mutant.
const MAX_STACK: usize = 4;

#[test]
fn mutated_files_never_panic_or_overallocate() {
    let seeds = seeds();
    let started = Instant::now();
    let mut accepted = 0usize;
    let mut rejected = 0usize;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut worst_one = 0f64;
    let mut worst_total = 0f64;
    let mut failures = Vec::new();

    // Keep panic messages of caught panics out of the output until the report below.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));

    for (s, seed) in seeds.iter().enumerate() {
        for case in 0..PER_SEED {
            let mut rng = Rng::new(0x6767_7566 ^ ((s as u64) << 40) ^ case as u64);
            let mut buf = seed.bytes.clone();
            let mut steps = Vec::new();
            for _ in 0..1 + rng.below(MAX_STACK) {
                steps.push(mutate(&mut rng, &mut buf, seed));
            }
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                let (parsed, one, total) = measured(|| Header::parse(&buf));
                match parsed {
                    Ok(h) => {
                        exercise(&buf, &h);
                        (Ok(()), one, total)
                    }
                    Err(e) => {
                        let _ = e.to_string();
                        (Err(variant(&e)), one, total)
                    }
                }
            }));
            let failure = match outcome {
                Ok((result, one, total)) => {
                    worst_one = worst_one.max(one as f64 / buf.len().max(1) as f64);
                    worst_total = worst_total.max(total as f64 / buf.len().max(1) as f64);
                    match result {
                        Ok(()) => accepted += 1,
                        Err(v) => {
                            rejected += 1;
                            *errors.entry(v).or_default() += 1;
                        }
                    }
                    let limit = alloc_limit(buf.len());
                    (one > limit || total > limit).then(|| {
                        format!(
                            "parse allocated {one} bytes at once, {total} in all; limit {limit}"
                        )
                    })
                }
                Err(payload) => {
                    let msg = payload
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    Some(format!("panic: {msg}"))
                }
            };
            if let Some(what) = failure {
                failures.push(format!(
                    "seed {s} ({}), case {case}: {what}\nmutations:\n  {}\ninput ({} bytes):\n{}",
                    seed.name,
                    steps.join("\n  "),
                    buf.len(),
                    hex_dump(&buf)
                ));
                if failures.len() >= 5 {
                    break;
                }
            }
        }
        if failures.len() >= 5 {
            break;
        }
    }
    panic::set_hook(hook);

    let elapsed = started.elapsed();
    let total = accepted + rejected;
    println!(
        "mutation: {total} mutants of {} seeds in {:.2?}: {accepted} accepted, {rejected} rejected",
        seeds.len(),
        elapsed
    );
    println!(
        "mutation: largest allocation {worst_one:.1} x input, most allocated by one parse {worst_total:.1} x input"
    );
    for (variant, n) in &errors {
        println!("mutation:   {variant}: {n}");
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(total >= 100_000, "only {total} mutants");
    assert!(
        accepted > 1_000,
        "too few mutants parse ({accepted}): the mutations are too destructive"
    );
}

/// The guard itself works: an allocation beyond the limit is seen.
#[test]
fn allocation_guard_counts() {
    let (v, one, total) = measured(|| vec![0u8; 3 << 20]);
    assert_eq!(v.len(), 3 << 20);
    assert!(one >= 3 << 20 && total >= one);
    assert!(one > alloc_limit(16));
}

/// One level deeper than the seeds' deepest array is refused, not parsed or overflowed.
#[test]
fn nesting_past_the_limit_is_refused() {
    let mut deep = Array::U8(vec![]);
    for _ in 0..gguf::MAX_NESTING {
        deep = Array::Array(vec![deep]);
    }
    let mut w = Writer::new();
    w.set("deep", Value::Array(deep));
    let mut bytes = Vec::new();
    w.write(&mut bytes, |_, _, _| Ok(())).unwrap();
    let err = Header::parse(&bytes).unwrap_err();
    assert_eq!(variant(&err), "NestingTooDeep", "{err}");
}

/// Found by the fuzzer: a 79-byte file without tensors whose `general.alignment` is 2^24 parses with its data
/// section starting past the end of the file. Parsing it must stay cheap (rewriting it pads to 16 MiB, which is why
/// the round trip above skips such files).
#[test]
fn huge_alignment_without_tensors_is_cheap() {
    let mut w = Writer::new();
    w.set_alignment(1 << 24).unwrap();
    w.set("x", Value::U8(0));
    let mut bytes = Vec::new();
    // Write only the header: what follows the header is padding up to the data section.
    w.write(&mut bytes, |_, _, _| Ok(())).unwrap();
    let header_bytes = w.plan().unwrap().header_bytes as usize;
    bytes.truncate(header_bytes);
    let (parsed, one, total) = measured(|| Header::parse(&bytes));
    assert!(one <= alloc_limit(bytes.len()) && total <= alloc_limit(bytes.len()));
    if let Ok(h) = parsed {
        assert!(h.tensors.is_empty());
        assert_eq!(h.alignment, 1 << 24);
    }
}
