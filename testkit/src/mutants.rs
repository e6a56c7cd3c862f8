//! Mutants of a model file past the GGUF parser (issue 15): a seeded generator of metadata and tensor mutations
//! (values, types, shapes, contents, names), and a supervisor that runs each mutant in a forked child with a time and
//! memory limit and classifies how it ended.
//!
//! The same generator drives `tests/mutants.rs` (a bounded, deterministic run in the test suite: a seed per mutant)
//! and the cargo-fuzz target `fuzz/fuzz_targets/model.rs` (the fuzzer's bytes choose the mutations).

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use gguf::{Array, GgmlType, GgufFile, Value, Writer};

// ---------------------------------------------------------------------------------------------------------------
// Choices: where the mutations come from.

/// A source of choices: a seeded PRNG for the test suite, the fuzzer's bytes for cargo-fuzz.
pub trait Choices {
    fn next_u64(&mut self) -> u64;

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// SplitMix64: every mutant of a run is `SplitMix::new(seed)` for its own seed.
pub struct SplitMix(pub u64);

impl Choices for SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Choices read from a fuzzer's input, 2 bytes each (zeros once it is used up): small inputs make small mutants.
pub struct ByteChoices<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteChoices<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        ByteChoices { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl Choices for ByteChoices<'_> {
    fn next_u64(&mut self) -> u64 {
        let n = self.bytes.len().min(2);
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        head.iter().fold(0u64, |acc, &b| acc << 8 | b as u64)
    }

    fn below(&mut self, n: usize) -> usize {
        // Wide ranges take two draws so every value is reachable.
        let v = if n > 1 << 16 {
            self.next_u64() << 16 | self.next_u64()
        } else {
            self.next_u64()
        };
        (v % n.max(1) as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The model, taken apart.

/// One tensor of a model being mutated: its data borrowed from the original file until a mutation changes it.
#[derive(Clone, Debug)]
pub struct TensorPart<'a> {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    pub data: Cow<'a, [u8]>,
}

/// A GGUF file's metadata and tensors, to be mutated and written again.
#[derive(Clone, Debug)]
pub struct Parts<'a> {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorPart<'a>>,
}

impl<'a> Parts<'a> {
    pub fn of(file: &'a GgufFile) -> Parts<'a> {
        let metadata = file
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let tensors = file
            .header()
            .tensors
            .iter()
            .map(|t| TensorPart {
                name: t.name.clone(),
                ty: t.ty,
                dims: t.dims.clone(),
                data: Cow::Borrowed(file.tensor_data(t)),
            })
            .collect();
        Parts { metadata, tensors }
    }

    fn writer(&self) -> io::Result<Writer> {
        let mut w = Writer::new();
        for (k, v) in &self.metadata {
            w.set(k.as_str(), v.clone());
        }
        for t in &self.tensors {
            w.add_tensor(&t.name, &t.dims, t.ty).map_err(invalid)?;
        }
        Ok(w)
    }

    /// Writes the parts as a GGUF file (no temporary file, no sync: mutants live on a tmpfs for a moment).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let w = self.writer()?;
        let layout = w.plan().map_err(invalid)?;
        if layout.total_bytes > MAX_FILE_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the mutant would take {} bytes", layout.total_bytes),
            ));
        }
        // Written over the file's old pages without truncating it first: freeing and allocating tmpfs pages costs
        // more than the copy.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        w.write(&mut out, |i, _, sink| sink.write_all(&self.tensors[i].data))
            .map_err(invalid)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.set_len(layout.total_bytes)
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn set(&mut self, key: &str, value: Value) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }
}

/// A metadata key of padding: mutants whose tensors keep their sizes get the base file's header size, so their data
/// sits where the base file's does (see [`FastWriter`]). ferrite ignores keys it does not know.
pub const PAD_KEY: &str = "mutant.padding";

/// Headroom of the padded header over the base file's.
const PAD_BYTES: usize = 256 << 10;

/// A writer of mutants that rewrites, in a file already holding the base model, only the header and the tensors a
/// mutant changed: a few KiB instead of the whole file, for most mutants. Mutants whose tensor layout differs (a
/// tensor retyped to another size, reshaped, removed; a header past the headroom) are written whole elsewhere.
pub struct FastWriter<'a> {
    base: Parts<'a>,
    layout: gguf::Layout,
}

/// A sink that keeps the first `keep` bytes written to it and counts the rest.
struct HeaderSink {
    keep: usize,
    bytes: Vec<u8>,
}

impl io::Write for HeaderSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.keep.saturating_sub(self.bytes.len()).min(buf.len());
        self.bytes.extend_from_slice(&buf[..room]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

impl<'a> FastWriter<'a> {
    pub fn new(base: &Parts<'a>) -> io::Result<FastWriter<'a>> {
        let mut padded = base.clone();
        padded.set(PAD_KEY, Value::String(" ".repeat(PAD_BYTES)));
        let layout = padded.writer()?.plan().map_err(invalid)?;
        Ok(FastWriter {
            base: base.clone(),
            layout,
        })
    }

    /// Writes the padded base model to `slot` (once per slot file).
    pub fn prepare(&self, slot: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(dirty_list(slot));
        let mut padded = self.base.clone();
        padded.set(PAD_KEY, Value::String(" ".repeat(PAD_BYTES)));
        padded.write(slot)
    }

    /// Writes `mutant` into `slot` (prepared, possibly holding an earlier mutant) when its layout matches, else whole
    /// to `whole`; returns the path written.
    pub fn write<'p>(
        &self,
        mutant: &Parts<'_>,
        slot: &'p Path,
        whole: &'p Path,
    ) -> io::Result<&'p Path> {
        use std::os::unix::fs::FileExt as _;
        // The padding that gives the mutant the base header's size.
        let mut m = mutant.clone();
        m.metadata.retain(|(k, _)| k != PAD_KEY);
        m.metadata
            .push((PAD_KEY.to_string(), Value::String(String::new())));
        let unpadded = m.writer()?.plan().map_err(invalid)?.header_bytes;
        let fits = unpadded <= self.layout.header_bytes;
        let pad = self.layout.header_bytes.saturating_sub(unpadded) as usize;
        m.metadata.last_mut().unwrap().1 = Value::String(" ".repeat(pad));
        let w = m.writer()?;
        let layout = w.plan().map_err(invalid)?;
        let same = fits
            && layout.data_offset == self.layout.data_offset
            && layout.tensor_offsets == self.layout.tensor_offsets
            && layout.total_bytes == self.layout.total_bytes;
        if !same {
            mutant.write(whole)?;
            return Ok(whole);
        }
        let file = std::fs::OpenOptions::new().write(true).open(slot)?;
        // Undo the tensors an earlier mutant changed, then note the ones this one changes before changing them.
        let list = dirty_list(slot);
        if let Ok(text) = std::fs::read_to_string(&list) {
            for i in text.lines().filter_map(|l| l.parse::<usize>().ok()) {
                if let Some(t) = self.base.tensors.get(i) {
                    file.write_all_at(
                        &t.data,
                        self.layout.data_offset + self.layout.tensor_offsets[i],
                    )?;
                }
            }
        }
        let changed: Vec<usize> = (0..m.tensors.len())
            .filter(|&i| {
                let (a, b) = (&m.tensors[i].data[..], &self.base.tensors[i].data[..]);
                !std::ptr::eq(a, b) && a != b
            })
            .collect();
        let text: String = changed.iter().map(|i| format!("{i}\n")).collect();
        std::fs::write(&list, text)?;
        let mut sink = HeaderSink {
            keep: layout.data_offset as usize,
            bytes: Vec::new(),
        };
        w.write(&mut sink, |i, _, out| out.write_all(&m.tensors[i].data))
            .map_err(invalid)?;
        file.write_all_at(&sink.bytes, 0)?;
        for &i in &changed {
            file.write_all_at(
                &m.tensors[i].data,
                layout.data_offset + layout.tensor_offsets[i],
            )?;
        }
        Ok(slot)
    }
}

fn dirty_list(slot: &Path) -> std::path::PathBuf {
    slot.with_extension("dirty")
}

// ---------------------------------------------------------------------------------------------------------------
// Mutations.

/// Interesting integers: boundaries of every width, small counts, and values near the demo model's own.
const INTS: &[i128] = &[
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    15,
    16,
    17,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    511,
    512,
    1023,
    1024,
    4096,
    65535,
    65536,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    -1,
    -2,
    -128,
    -(1 << 31),
];

const FLOATS: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    0.0,
    -0.0,
    -1.0,
    1.0,
    1e-45,
    1e-30,
    1e30,
    3.4e38,
    1e300,
    -1e30,
    0.5,
    2.0,
    1e6,
];

/// Strings a key could plausibly hold, and hostile ones (a chat template with nested loops).
const STRINGS: &[&str] = &[
    "",
    "deepseek4",
    "deepseek2",
    "llama",
    "gpt2",
    "none",
    "llama-bpe",
    "deepseek-v3",
    "yarn",
    "linear",
    "\u{0}",
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ raise_exception('x') }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{",
    "\u{FFFD}\u{FFFD}",
];

/// Keys the demo model lacks that ferrite reads.
const EXTRA_KEYS: &[&str] = &[
    "deepseek4.swiglu_clamp_shexp",
    "deepseek4.expert_group_count",
    "deepseek4.expert_group_used_count",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
    "general.alignment",
];

/// One change to a model file.
#[derive(Clone, Debug, PartialEq)]
pub enum Mutation {
    /// Metadata key set to a value (of any type; a key the file lacks is added).
    SetKey(String, Value),
    RemoveKey(String),
    /// A tensor's type changed, its bytes kept (cut or zero-padded to the new size).
    Retype(String, GgmlType),
    /// A tensor's shape changed, its bytes kept (cut or zero-padded to the new size).
    Reshape(String, Vec<u64>),
    RemoveTensor(String),
    /// A tensor renamed (to a name of another block, role or nonsense).
    Rename(String, String),
    /// Elements of an F32 (or F16/BF16: the element's bytes) tensor set to a value: `(name, first, count, value)`.
    SetFloats(String, usize, usize, f64),
    /// Elements of an integer tensor (`tid2eid`) set: `(name, first, count, value)`.
    SetInts(String, usize, usize, i64),
    /// Bytes of any tensor overwritten: `(name, offset, bytes)`.
    SetBytes(String, usize, Vec<u8>),
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mutation::SetKey(k, v) => write!(f, "set {k} = {} ({})", v.summary(4), v.value_type()),
            Mutation::RemoveKey(k) => write!(f, "remove {k}"),
            Mutation::Retype(t, ty) => write!(f, "retype {t} to {ty}"),
            Mutation::Reshape(t, d) => write!(f, "reshape {t} to {d:?}"),
            Mutation::RemoveTensor(t) => write!(f, "remove {t}"),
            Mutation::Rename(t, n) => write!(f, "rename {t} to {n}"),
            Mutation::SetFloats(t, at, n, v) => write!(f, "{t}[{at}..+{n}] = {v}"),
            Mutation::SetInts(t, at, n, v) => write!(f, "{t}[{at}..+{n}] = {v} (int)"),
            Mutation::SetBytes(t, at, b) => write!(f, "{t} bytes at {at} = {b:02x?}"),
        }
    }
}

/// The mutations of one mutant, printed one per line.
pub struct Described<'a>(pub &'a [Mutation]);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

/// Largest tensor a mutation may make (the file must hold its bytes).
const MAX_TENSOR_BYTES: u64 = 48 << 20;

/// Largest mutant file [`Parts::write`] writes (an alignment of 2^31 would pad every tensor to 2 GiB).
pub const MAX_FILE_BYTES: u64 = 96 << 20;

fn int_value(like: &Value, v: i128, c: &mut impl Choices) -> Value {
    // Mostly the key's own type (wrapped into its range), sometimes another integer type.
    let ty = if c.chance(3, 4) {
        like.value_type()
    } else {
        c.pick(&[
            gguf::ValueType::U8,
            gguf::ValueType::I32,
            gguf::ValueType::U64,
            gguf::ValueType::I64,
            gguf::ValueType::U16,
        ])
        .to_owned()
    };
    use gguf::ValueType as T;
    match ty {
        T::U8 => Value::U8(v as u8),
        T::I8 => Value::I8(v as i8),
        T::U16 => Value::U16(v as u16),
        T::I16 => Value::I16(v as i16),
        T::I32 => Value::I32(v as i32),
        T::U64 => Value::U64(v as u64),
        T::I64 => Value::I64(v as i64),
        _ => Value::U32(v as u32),
    }
}

fn float_value(like: &Value, v: f64) -> Value {
    match like {
        Value::F64(_) => Value::F64(v),
        _ => Value::F32(v as f32),
    }
}

/// A new value for a key that holds `old`.
fn new_value(old: &Value, c: &mut impl Choices) -> Value {
    // Sometimes a value of another kind altogether.
    if c.chance(1, 10) {
        return match c.below(6) {
            0 => Value::String(c.pick(STRINGS).to_string()),
            1 => Value::Bool(c.chance(1, 2)),
            2 => Value::F32(*c.pick(FLOATS) as f32),
            3 => Value::I32(*c.pick(INTS) as i32),
            4 => Value::Array(Array::U32(vec![4; c.below(6)])),
            _ => Value::Array(Array::String(vec!["a".into(); c.below(4)])),
        };
    }
    match old {
        Value::Bool(b) => match c.below(3) {
            0 => Value::Bool(!b),
            1 => Value::U8(2),
            _ => Value::U32(*c.pick(INTS) as u32),
        },
        Value::F32(_) | Value::F64(_) => {
            let base = match old {
                Value::F32(x) => *x as f64,
                Value::F64(x) => *x,
                _ => unreachable!(),
            };
            let v = match c.below(3) {
                0 => base * *c.pick(&[-1.0, 0.5, 2.0, 1e3, 1e-3, 1e9]),
                _ => *c.pick(FLOATS),
            };
            float_value(old, v)
        }
        Value::String(s) => match c.below(4) {
            0 => Value::String(s.chars().take(c.below(s.len().max(1))).collect()),
            1 => Value::String(s.repeat(1 + c.below(64))),
            _ => Value::String(c.pick(STRINGS).to_string()),
        },
        Value::Array(a) => Value::Array(new_array(a, c)),
        _ => {
            let base = old.as_i128().unwrap_or(0);
            let v = match c.below(4) {
                0 => base + [-2, -1, 1, 2, 8][c.below(5)],
                1 => base * [2, 3, 16, 1024][c.below(4)],
                _ => *c.pick(INTS),
            };
            int_value(old, v, c)
        }
    }
}

fn resize<T: Clone>(v: &mut Vec<T>, n: usize, fill: impl Fn(&[T]) -> T) {
    if n <= v.len() {
        v.truncate(n);
    } else {
        while v.len() < n {
            let x = fill(v);
            v.push(x);
        }
    }
}

/// A new array for a key that holds `a`: another length, changed elements, another element type.
fn new_array(a: &Array, c: &mut impl Choices) -> Array {
    let len = a.len();
    let new_len = match c.below(6) {
        0 => 0,
        1 => 1,
        2 => len.saturating_sub(1),
        3 => len + 1,
        4 => len * 2 + 1,
        _ => len,
    };
    let mut a = a.clone();
    if c.chance(1, 8) {
        // Another element type, the same length.
        let ints: Vec<i128> = a.to_i128s().unwrap_or_else(|| vec![1; len]);
        return match c.below(4) {
            0 => Array::U8(ints.iter().map(|&v| v as u8).collect()),
            1 => Array::F32(ints.iter().map(|&v| v as f32).collect()),
            2 => Array::String(ints.iter().map(|v| v.to_string()).collect()),
            _ => Array::I64(ints.iter().map(|&v| v as i64).collect()),
        };
    }
    macro_rules! lengthen {
        ($v:expr, $default:expr) => {
            resize($v, new_len, |v| v.last().cloned().unwrap_or($default))
        };
    }
    match &mut a {
        Array::U8(v) => lengthen!(v, 0),
        Array::I8(v) => lengthen!(v, 0),
        Array::U16(v) => lengthen!(v, 0),
        Array::I16(v) => lengthen!(v, 0),
        Array::U32(v) => lengthen!(v, 0),
        Array::I32(v) => lengthen!(v, 0),
        Array::F32(v) => lengthen!(v, 0.0),
        Array::Bool(v) => lengthen!(v, false),
        Array::String(v) => lengthen!(v, String::new()),
        Array::Array(v) => lengthen!(v, Array::U8(Vec::new())),
        Array::U64(v) => lengthen!(v, 0),
        Array::I64(v) => lengthen!(v, 0),
        Array::F64(v) => lengthen!(v, 0.0),
    }
    // Then up to 3 elements changed.
    for _ in 0..c.below(4) {
        let n = a.len();
        if n == 0 {
            break;
        }
        let i = c.below(n);
        let int = *c.pick(INTS);
        let float = *c.pick(FLOATS);
        match &mut a {
            Array::U8(v) => v[i] = int as u8,
            Array::I8(v) => v[i] = int as i8,
            Array::U16(v) => v[i] = int as u16,
            Array::I16(v) => v[i] = int as i16,
            Array::U32(v) => v[i] = int as u32,
            Array::I32(v) => v[i] = int as i32,
            Array::U64(v) => v[i] = int as u64,
            Array::I64(v) => v[i] = int as i64,
            Array::F32(v) => v[i] = float as f32,
            Array::F64(v) => v[i] = float,
            Array::Bool(v) => v[i] = !v[i],
            Array::String(v) => {
                v[i] = match c.below(4) {
                    0 => String::new(),
                    1 => v[(i + 1) % n].clone(),
                    2 => c.pick(STRINGS).to_string(),
                    _ => "Ġ Ġ Ġ".into(),
                }
            }
            Array::Array(_) => {}
        }
    }
    a
}

/// Types a tensor of first dimension `d0` can be stored as (whole blocks per row).
fn types_for(d0: u64) -> Vec<GgmlType> {
    GgmlType::all()
        .filter(|ty| d0 % ty.block_size() == 0)
        .collect()
}

fn bytes_of(ty: GgmlType, dims: &[u64]) -> Option<u64> {
    ty.tensor_bytes(dims).filter(|&b| b <= MAX_TENSOR_BYTES)
}

/// A new shape for a tensor of shape `dims` and type `ty` (`None` when the try gives none that can be stored).
fn new_shape(ty: GgmlType, dims: &[u64], c: &mut impl Choices) -> Option<Vec<u64>> {
    let mut d = dims.to_vec();
    let i = c.below(d.len().max(1)).min(d.len().saturating_sub(1));
    match c.below(9) {
        0 if !d.is_empty() => d[i] += 1,
        1 if !d.is_empty() => d[i] = d[i].saturating_sub(1),
        2 if !d.is_empty() => d[i] = 0,
        3 if !d.is_empty() => d[i] = 1,
        4 if !d.is_empty() => d[i] *= 2,
        5 if d.len() >= 2 => d.swap(0, 1),
        6 if !d.is_empty() => {
            d.pop();
        }
        7 if d.len() < 4 => d.push(1 + c.below(3) as u64),
        8 if !d.is_empty() => {
            // A huge dimension with the others 0 (no bytes), or as large as the size cap allows.
            d[i] = *c.pick(&[1 << 20, 1 << 31, u32::MAX as u64, 1 << 40]);
            if c.chance(1, 2) {
                let j = (i + 1) % d.len();
                if j != i {
                    d[j] = 0;
                }
            }
        }
        _ => return None,
    }
    (d != dims && bytes_of(ty, &d).is_some()).then_some(d)
}

/// Another name for a tensor: another block's, a block past the count, another role, nonsense.
fn new_name(name: &str, c: &mut impl Choices) -> String {
    let roles = [
        "attn_compressor_kv.weight",
        "indexer.attn_q_b.weight",
        "ffn_gate_tid2eid.weight",
        "exp_probs_b.bias",
        "attn_norm.weight",
        "nextn.eh_proj.weight",
    ];
    match (name.strip_prefix("blk."), c.below(3)) {
        (Some(rest), 0) => {
            let suffix = rest.split_once('.').map_or("", |(_, s)| s);
            format!(
                "blk.{}.{suffix}",
                c.pick(&[0u64, 1, 2, 3, 4, 7, 4_000_000_000])
            )
        }
        (Some(rest), 1) => {
            let block = rest.split_once('.').map_or("0", |(b, _)| b);
            format!("blk.{block}.{}", c.pick(&roles))
        }
        _ => format!("{name}.x"),
    }
}

/// One mutation of `parts`, or `None` when the try hit a case it does not apply to (the caller tries again).
fn one_mutation(parts: &Parts<'_>, c: &mut impl Choices) -> Option<Mutation> {
    let kind = c.below(100);
    if kind < 40 {
        // Metadata (weighted to the model's hyper-parameters).
        let model_keys: Vec<usize> = (0..parts.metadata.len())
            .filter(|&i| parts.metadata[i].0.starts_with("deepseek4."))
            .collect();
        let i = if c.chance(3, 4) && !model_keys.is_empty() {
            *c.pick(&model_keys)
        } else {
            c.below(parts.metadata.len())
        };
        let (key, old) = &parts.metadata[i];
        return Some(match c.below(20) {
            0 => Mutation::RemoveKey(key.clone()),
            1 => {
                let key = *c.pick(EXTRA_KEYS);
                let value = match key {
                    "tokenizer.chat_template" => Value::String(c.pick(STRINGS).to_string()),
                    "deepseek4.swiglu_clamp_shexp" => {
                        Value::Array(Array::F32(vec![*c.pick(FLOATS) as f32; c.below(6)]))
                    }
                    _ => int_value(&Value::U32(0), *c.pick(INTS), c),
                };
                Mutation::SetKey(key.to_string(), value)
            }
            _ => Mutation::SetKey(key.clone(), new_value(old, c)),
        });
    }
    let t = &parts.tensors[c.below(parts.tensors.len())];
    // Small tensors (norms, hyper-connection, sinks, biases, routing tables) get most of the value mutations.
    let small: Vec<&TensorPart<'_>> = parts
        .tensors
        .iter()
        .filter(|t| t.data.len() <= 4096)
        .collect();
    match kind {
        40..=51 => {
            let d0 = t.dims.first().copied().unwrap_or(1);
            let ty = *c.pick(&types_for(d0));
            let ok = ty != t.ty && bytes_of(ty, &t.dims).is_some();
            ok.then(|| Mutation::Retype(t.name.clone(), ty))
        }
        52..=63 => new_shape(t.ty, &t.dims, c).map(|d| Mutation::Reshape(t.name.clone(), d)),
        64..=66 => Some(Mutation::RemoveTensor(t.name.clone())),
        67..=69 => Some(Mutation::Rename(t.name.clone(), new_name(&t.name, c))),
        70..=93 => {
            let t = if c.chance(3, 4) && !small.is_empty() {
                *c.pick(&small)
            } else {
                t
            };
            let n = t.dims.iter().product::<u64>() as usize;
            if n == 0 {
                return None;
            }
            let (first, count) = match c.below(3) {
                0 => (0, n),
                1 => (c.below(n), 1),
                _ => {
                    let first = c.below(n);
                    (first, 1 + c.below(n - first))
                }
            };
            match t.ty {
                GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::F64 => Some(
                    Mutation::SetFloats(t.name.clone(), first, count, *c.pick(FLOATS)),
                ),
                GgmlType::I32 | GgmlType::I16 | GgmlType::I8 | GgmlType::I64 => {
                    let v = match c.below(3) {
                        0 => c.below(20) as i64 - 2,
                        1 => *c.pick(INTS) as i64,
                        _ => 7 + c.below(3) as i64,
                    };
                    Some(Mutation::SetInts(t.name.clone(), first, count, v))
                }
                _ => None,
            }
        }
        _ => {
            if t.data.is_empty() {
                return None;
            }
            let at = c.below(t.data.len());
            let len = (1 + c.below(8)).min(t.data.len() - at);
            let bytes = (0..len)
                .map(|_| *c.pick(&[0x00u8, 0xff, 0x7f, 0x80, 0x7c, 0xfc, 0x01]))
                .collect();
            Some(Mutation::SetBytes(t.name.clone(), at, bytes))
        }
    }
}

/// The mutations of one mutant of `parts`: 1 to 4 (mostly 1), each drawn from `c`.
pub fn mutations(parts: &Parts<'_>, c: &mut impl Choices) -> Vec<Mutation> {
    let n = match c.below(8) {
        0..=3 => 1,
        4..=5 => 2,
        6 => 3,
        _ => 4,
    };
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 32 {
        tries += 1;
        if let Some(m) = one_mutation(parts, c) {
            out.push(m);
        }
    }
    out
}

/// Bytes of `data` cut or zero-padded to `n`.
fn fit(data: &[u8], n: u64) -> Vec<u8> {
    let mut v = data[..data.len().min(n as usize)].to_vec();
    v.resize(n as usize, 0);
    v
}

fn encode_float(ty: GgmlType, v: f64) -> Vec<u8> {
    match ty {
        GgmlType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        GgmlType::Bf16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        GgmlType::F64 => v.to_le_bytes().to_vec(),
        _ => (v as f32).to_le_bytes().to_vec(),
    }
}

fn encode_int(ty: GgmlType, v: i64) -> Vec<u8> {
    match ty {
        GgmlType::I8 => (v as i8).to_le_bytes().to_vec(),
        GgmlType::I16 => (v as i16).to_le_bytes().to_vec(),
        GgmlType::I64 => v.to_le_bytes().to_vec(),
        _ => (v as i32).to_le_bytes().to_vec(),
    }
}

/// Writes `elem` over elements `first..first + count` of `data` (clamped to its length).
fn set_elements(data: &mut [u8], first: usize, count: usize, elem: &[u8]) {
    let size = elem.len();
    let n = data.len() / size;
    for i in first.min(n)..(first.saturating_add(count)).min(n) {
        data[i * size..(i + 1) * size].copy_from_slice(elem);
    }
}

/// `parts` with `mutations` applied (mutations naming a tensor or key that is gone by then change nothing).
pub fn apply<'a>(parts: &Parts<'a>, mutations: &[Mutation]) -> Parts<'a> {
    let mut p = parts.clone();
    for m in mutations {
        let find = |p: &mut Parts<'a>, name: &str| p.tensors.iter().position(|t| t.name == name);
        match m {
            Mutation::SetKey(k, v) => p.set(k, v.clone()),
            Mutation::RemoveKey(k) => p.metadata.retain(|(key, _)| key != k),
            Mutation::Retype(name, ty) => {
                if let Some(i) = find(&mut p, name) {
                    let t = &mut p.tensors[i];
                    if let Some(n) = bytes_of(*ty, &t.dims) {
                        t.data = Cow::Owned(fit(&t.data, n));
                        t.ty = *ty;
                    }
                }
            }
            Mutation::Reshape(name, dims) => {
                if let Some(i) = find(&mut p, name) {
                    let t = &mut p.tensors[i];
                    if let Some(n) = bytes_of(t.ty, dims) {
                        t.data = Cow::Owned(fit(&t.data, n));
                        t.dims = dims.clone();
                    }
                }
            }
            Mutation::RemoveTensor(name) => p.tensors.retain(|t| &t.name != name),
            Mutation::Rename(name, new) => {
                let taken = p.tensors.iter().any(|t| &t.name == new);
                if let (Some(i), false) = (find(&mut p, name), taken) {
                    p.tensors[i].name = new.clone();
                }
            }
            Mutation::SetFloats(name, first, count, v) => {
                if let Some(i) = find(&mut p, name) {
                    let t = &mut p.tensors[i];
                    if matches!(
                        t.ty,
                        GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::F64
                    ) {
                        set_elements(t.data.to_mut(), *first, *count, &encode_float(t.ty, *v));
                    }
                }
            }
            Mutation::SetInts(name, first, count, v) => {
                if let Some(i) = find(&mut p, name) {
                    let t = &mut p.tensors[i];
                    if matches!(
                        t.ty,
                        GgmlType::I8 | GgmlType::I16 | GgmlType::I32 | GgmlType::I64
                    ) {
                        set_elements(t.data.to_mut(), *first, *count, &encode_int(t.ty, *v));
                    }
                }
            }
            Mutation::SetBytes(name, at, bytes) => {
                if let Some(i) = find(&mut p, name) {
                    let data = p.tensors[i].data.to_mut();
                    let end = (at + bytes.len()).min(data.len());
                    if *at < end {
                        data[*at..end].copy_from_slice(&bytes[..end - at]);
                    }
                }
            }
        }
    }
    p
}

/// The value of metadata key `key` in `parts`, for callers that check a mutant's premise.
pub fn value<'p>(parts: &'p Parts<'_>, key: &str) -> Option<&'p Value> {
    parts.value(key)
}

// ---------------------------------------------------------------------------------------------------------------
// Byte-level mutations (session and imatrix files, safetensors headers).

/// A byte-level mutant of `base`: truncated, bits flipped, bytes set to boundary values, ranges duplicated or
/// removed. Returns the bytes and what was done.
pub fn mutate_bytes(base: &[u8], c: &mut impl Choices) -> (Vec<u8>, String) {
    let mut b = base.to_vec();
    let mut what = Vec::new();
    for _ in 0..1 + c.below(3) {
        if b.is_empty() {
            break;
        }
        // Headers matter most: half of the positions fall in the first 256 bytes.
        let at = if c.chance(1, 2) {
            c.below(b.len().min(256))
        } else {
            c.below(b.len())
        };
        match c.below(6) {
            0 => {
                b.truncate(at);
                what.push(format!("truncate to {at}"));
            }
            1 => {
                let bit = c.below(8);
                b[at] ^= 1 << bit;
                what.push(format!("flip bit {bit} of byte {at}"));
            }
            2 => {
                let v = *c.pick(&[0u8, 0xff, 0x7f, 0x80, 1]);
                let n = (1 + c.below(8)).min(b.len() - at);
                b[at..at + n].fill(v);
                what.push(format!("set {n} bytes at {at} to {v:#x}"));
            }
            3 => {
                let v = *c.pick(INTS) as u64;
                let n = 8.min(b.len() - at);
                b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
                what.push(format!("write {v:#x} at {at}"));
            }
            4 => {
                let n = c.below(64).min(b.len() - at);
                b.drain(at..at + n);
                what.push(format!("remove {n} bytes at {at}"));
            }
            _ => {
                let n = c.below(64).min(b.len() - at);
                let copy = b[at..at + n].to_vec();
                b.splice(at..at, copy);
                what.push(format!("duplicate {n} bytes at {at}"));
            }
        }
    }
    (b, what.join("; "))
}

// ---------------------------------------------------------------------------------------------------------------
// Supervisor: each mutant in a forked child.

/// How a child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0 (the mutant ran) or 1 (refused with a message).
    Ok(i32),
    /// Could not be written as a file (not a test of the product): exit code [`SKIPPED`].
    Skipped,
    /// Any other exit code (101: a panic).
    Exit(i32),
    /// Killed by a signal (SIGABRT from a GGML_ASSERT or an allocation failure, SIGSEGV, ...).
    Signal(i32),
    /// Still running at the time limit (killed).
    Hang,
    /// Peak resident memory over the limit, in KiB.
    Memory(u64),
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        !matches!(self, Outcome::Ok(_) | Outcome::Skipped)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(c) => write!(f, "exit {c}"),
            Outcome::Skipped => f.write_str("skipped (mutant not writable)"),
            Outcome::Exit(101) => f.write_str("exit 101 (a panic)"),
            Outcome::Exit(c) => write!(f, "exit {c}"),
            Outcome::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            Outcome::Hang => f.write_str("still running at the time limit (a hang)"),
            Outcome::Memory(kib) => write!(f, "peak RSS {} MiB, over the limit", kib / 1024),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGABRT => "SIGABRT: an abort, e.g. GGML_ASSERT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGXCPU => "SIGXCPU: CPU time limit",
        _ => "other",
    }
}

/// The exit code of a child whose mutant could not be written.
pub const SKIPPED: i32 = 3;

/// Limits of every child.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock time before the child is killed and called a hang.
    pub time: Duration,
    /// Address space of the child (`RLIMIT_AS`): an allocation past it fails (an abort, reported as a signal).
    pub address_space: u64,
    /// Peak resident memory (`ru_maxrss`) above which an outcome is a failure.
    pub rss: u64,
    /// Largest file the child may write (`RLIMIT_FSIZE`).
    pub file_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(20),
            address_space: 3 << 30,
            rss: 2 << 30,
            file_size: 256 << 20,
        }
    }
}

/// A forked child running one mutant.
pub struct Child {
    pub pid: libc::pid_t,
    pub started: Instant,
    /// The caller's tag (the mutant's index).
    pub tag: u64,
}

/// Forks a child that runs `f` and exits with its code (101 after a panic). The child's stdout and stderr go to `stderr`
/// (truncated first) so the parent can show it for a failure. Call only from a single-threaded process: the child
/// has only the calling thread, and locks other threads held would stay locked in it.
pub fn spawn(
    tag: u64,
    limits: &Limits,
    stderr: &Path,
    f: impl FnOnce() -> i32,
) -> io::Result<Child> {
    let err = File::create(stderr)?;
    // SAFETY: fork in a single-threaded parent (the caller's contract); the child only calls `f` and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        use std::os::fd::AsRawFd as _;
        // SAFETY: plain system calls on the child's own descriptors and limits.
        unsafe {
            libc::dup2(err.as_raw_fd(), 2);
            libc::dup2(err.as_raw_fd(), 1);
            // Files past the limit fail to write (EFBIG) instead of filling the disk; the signal is ignored so the
            // write fails with an error the product reports (the disposition survives an exec).
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let fsize = libc::rlimit {
                rlim_cur: limits.file_size,
                rlim_max: limits.file_size,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &fsize);
            let rl = libc::rlimit {
                rlim_cur: limits.address_space,
                rlim_max: limits.address_space,
            };
            libc::setrlimit(libc::RLIMIT_AS, &rl);
            // No core dumps from aborting mutants.
            let core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &core);
        }
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        let _ = io::stderr().flush();
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    Ok(Child {
        pid,
        started: Instant::now(),
        tag,
    })
}

/// Waits for the first of `children` to end (killing those past the time limit) and returns it with its outcome.
pub fn wait_any(children: &mut Vec<Child>, limits: &Limits) -> (Child, Outcome) {
    assert!(!children.is_empty());
    loop {
        let mut status = 0;
        // SAFETY: `rusage` is plain data, written by the kernel.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for any child of this process without blocking.
        let pid = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut usage) };
        if pid > 0 {
            if let Some(i) = children.iter().position(|c| c.pid == pid) {
                let child = children.swap_remove(i);
                let hung = child.started.elapsed() > limits.time;
                let outcome = classify(status, usage.ru_maxrss as u64, hung, limits);
                return (child, outcome);
            }
            continue;
        }
        for c in children.iter() {
            if c.started.elapsed() > limits.time {
                // SAFETY: kills our own child; its exit is collected above on the next turn.
                unsafe { libc::kill(c.pid, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn classify(status: i32, maxrss_kib: u64, hung: bool, limits: &Limits) -> Outcome {
    if hung && libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL {
        return Outcome::Hang;
    }
    if libc::WIFSIGNALED(status) {
        return Outcome::Signal(libc::WTERMSIG(status));
    }
    if maxrss_kib * 1024 > limits.rss {
        return Outcome::Memory(maxrss_kib);
    }
    match libc::WEXITSTATUS(status) {
        c @ (0 | 1) => Outcome::Ok(c),
        SKIPPED => Outcome::Skipped,
        c => Outcome::Exit(c),
    }
}

/// Runs `f` in one child and waits for it (replays, single checks).
pub fn run_one(limits: &Limits, stderr: &Path, f: impl FnOnce() -> i32) -> io::Result<Outcome> {
    let mut children = vec![spawn(0, limits, stderr, f)?];
    Ok(wait_any(&mut children, limits).1)
}

/// The last `max` bytes of a child's stderr file.
pub fn stderr_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

// ---------------------------------------------------------------------------------------------------------------
// JSON mutations (Hugging Face `config.json`, safetensors headers, the shard index).

use serde_json::Value as Json;

/// Paths (object keys and array indices) of every value in `v`, containers included.
fn json_paths(v: &Json, prefix: &mut Vec<Json>, out: &mut Vec<Vec<Json>>) {
    match v {
        Json::Object(m) => {
            for (k, x) in m {
                prefix.push(Json::String(k.clone()));
                out.push(prefix.clone());
                json_paths(x, prefix, out);
                prefix.pop();
            }
        }
        Json::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                prefix.push(Json::from(i));
                out.push(prefix.clone());
                json_paths(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'j>(v: &'j mut Json, path: &[Json]) -> Option<&'j mut Json> {
    path.iter().try_fold(v, |v, step| match step {
        Json::String(k) => v.get_mut(k.as_str()),
        Json::Number(i) => v.get_mut(i.as_u64()? as usize),
        _ => None,
    })
}

/// A new JSON value for one that holds `old`.
fn new_json(old: &Json, c: &mut impl Choices) -> Json {
    if c.chance(1, 8) {
        return match c.below(5) {
            0 => Json::Null,
            1 => Json::from(c.pick(STRINGS).to_string()),
            2 => Json::Bool(c.chance(1, 2)),
            3 => serde_json::json!([]),
            _ => serde_json::json!({}),
        };
    }
    match old {
        Json::Number(n) => {
            if c.chance(1, 4) {
                // Floats JSON can spell (NaN and inf cannot be written).
                return Json::from(*c.pick(&[-1.0, 0.0, 1e-45, 1e30, 1e300, -1e300, 0.5, 3.7]));
            }
            let base = n.as_i64().map(i128::from).unwrap_or(0);
            let v = match c.below(3) {
                0 => base + [-2, -1, 1, 2, 8][c.below(5)],
                1 => base * [2, 3, 16, 1 << 20][c.below(4)],
                _ => *c.pick(INTS),
            };
            match (u64::try_from(v), i64::try_from(v)) {
                (Ok(u), _) => Json::from(u),
                (_, Ok(i)) => Json::from(i),
                _ => Json::from(u64::MAX),
            }
        }
        Json::String(s) => match c.below(3) {
            0 => Json::from(c.pick(STRINGS).to_string()),
            1 => Json::from(s.repeat(2)),
            _ => Json::from(String::new()),
        },
        Json::Bool(b) => Json::Bool(!b),
        Json::Array(a) => {
            let mut a = a.clone();
            match c.below(4) {
                0 => a.clear(),
                1 => {
                    a.pop();
                }
                2 => {
                    if let Some(x) = a.last().cloned() {
                        a.push(x);
                    }
                }
                _ => a.push(Json::from(*c.pick(INTS) as i64)),
            }
            Json::Array(a)
        }
        _ => Json::from(*c.pick(INTS) as i64),
    }
}

/// Up to 3 changes to `v` (values replaced, keys removed); returns what was done.
pub fn mutate_json(v: &mut Json, c: &mut impl Choices) -> String {
    let mut what = Vec::new();
    for _ in 0..1 + c.below(3) {
        let mut paths = Vec::new();
        json_paths(v, &mut Vec::new(), &mut paths);
        if paths.is_empty() {
            break;
        }
        let path = c.pick(&paths).clone();
        let shown: Vec<String> = path
            .iter()
            .map(|p| match p {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let shown = shown.join(".");
        if c.chance(1, 8) {
            // Remove the key (or array element).
            let (last, parent) = path.split_last().unwrap();
            if let Some(p) = json_at(v, parent) {
                match (p, last) {
                    (Json::Object(m), Json::String(k)) => {
                        m.remove(k);
                    }
                    (Json::Array(a), Json::Number(i)) => {
                        a.remove(i.as_u64().unwrap_or(0) as usize);
                    }
                    _ => {}
                }
            }
            what.push(format!("remove {shown}"));
            continue;
        }
        if let Some(slot) = json_at(v, &path) {
            let new = new_json(slot, c);
            what.push(format!("{shown} = {new}"));
            *slot = new;
        }
    }
    what.join("; ")
}

/// Dtype names a safetensors header can hold (every one the format defines, and nonsense).
const DTYPES: &[&str] = &[
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8",
    "U8", "BOOL", "U64", "X", "",
];

/// A mutant of a safetensors file: its JSON header changed (an entry's dtype, shape or offsets, an entry removed or
/// renamed, `__metadata__`), or the header's bytes mutated; the data kept. Returns the bytes and what was done.
pub fn mutate_safetensors(file: &[u8], c: &mut impl Choices) -> (Vec<u8>, String) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (header, data) = (&file[8..8 + n], &file[8 + n..]);
    if c.chance(1, 5) {
        // Bytes of the length and header.
        let (mut h, what) = mutate_bytes(&file[..8 + n], c);
        h.extend_from_slice(data);
        return (h, format!("header bytes: {what}"));
    }
    let mut json: Json = serde_json::from_slice(header).unwrap();
    let names: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
    let name = c.pick(&names).clone();
    let entry = json.get_mut(&name).unwrap();
    let what = match (name.as_str(), c.below(6)) {
        ("__metadata__", _) => format!("__metadata__: {}", mutate_json(entry, c)),
        (_, 0) => {
            let d = *c.pick(DTYPES);
            entry["dtype"] = Json::from(d);
            format!("{name}.dtype = {d}")
        }
        (_, 1) => {
            let shape = entry["shape"].clone();
            let mut dims: Vec<i128> = shape
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_i64().map(i128::from))
                        .collect()
                })
                .unwrap_or_default();
            match c.below(5) {
                0 if !dims.is_empty() => {
                    let i = c.below(dims.len());
                    dims[i] = *c.pick(INTS);
                }
                1 => dims.push(*c.pick(&[1, 2, 0])),
                2 => {
                    dims.pop();
                }
                3 if dims.len() >= 2 => dims.swap(0, 1),
                _ => dims.iter_mut().for_each(|d| *d = 0),
            }
            let json_dims: Vec<Json> = dims
                .iter()
                .map(|&d| match u64::try_from(d) {
                    Ok(u) => Json::from(u),
                    Err(_) => Json::from(d as i64),
                })
                .collect();
            entry["shape"] = Json::Array(json_dims);
            format!("{name}.shape = {}", entry["shape"])
        }
        (_, 2) => {
            let offsets = &mut entry["data_offsets"];
            let what = mutate_json(offsets, c);
            format!("{name}.data_offsets: {what}")
        }
        (_, 3) => {
            json.as_object_mut().unwrap().remove(&name);
            format!("remove {name}")
        }
        (_, 4) => {
            let v = json.as_object_mut().unwrap().remove(&name).unwrap();
            let new = match c.below(3) {
                0 => format!("{name}.x"),
                1 => name.replace("layers.0.", "layers.7."),
                _ => name.replace("weight", "scale"),
            };
            json.as_object_mut().unwrap().insert(new.clone(), v);
            format!("rename {name} to {new}")
        }
        _ => format!("{name}: {}", mutate_json(entry, c)),
    };
    let mut text = serde_json::to_vec(&json).unwrap();
    // Headers are padded with spaces to 8 bytes, as the format's writers do.
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    (out, what)
}

// ---------------------------------------------------------------------------------------------------------------
// What a mutant runs: one token of `ferrite complete`.

use std::ops::ControlFlow;

use ferrite::chat::{ChatOptions, Message};
use ferrite::engine::{Engine, EngineOptions};
use ferrite::generate::{generate, GenerateOptions};
use ferrite::sampler::{Sampler, SamplerConfig};

/// How mutant `seed` opens its engine: mostly as `complete` does (repacked weights, fused operators), one in four
/// from the map, one in eight unfused, one in five with the routed experts paged through a cache of a few slots,
/// one in seven with a context of 8 to 64 tokens; one thread.
pub fn engine_options(seed: u64) -> EngineOptions {
    use ferrite::engine::PagingOptions;
    use ferrite::plan::ExpertCacheArg;
    EngineOptions {
        n_threads: 1,
        repack: seed % 4 != 0,
        fused_ops: seed % 8 != 1,
        paging: PagingOptions {
            expert_cache: (seed % 5 == 3).then_some(ExpertCacheArg::Slots(2 + seed % 4)),
            ctx_size: (seed % 7 == 5).then_some(8 << (seed % 4)),
            ..PagingOptions::default()
        },
        ..Default::default()
    }
}

/// One token of `ferrite complete -p hi` on the opened engine: the prompt rendered with the model's template,
/// tokenized, processed, one token sampled (greedy, or `complete`'s default sampling for odd seeds, which NaN
/// logits reach differently) and fed.
///
/// A model without a vocabulary (which `complete` refuses) runs from token ids instead, as `ferrite logits
/// --tokens` does, so the mutant still reaches the graph.
pub fn one_token(engine: &Engine, seed: u64) -> anyhow::Result<()> {
    let prompt = match engine.tokenizer() {
        Ok(tokenizer) => {
            let text = engine.prompt_format().render(
                &[Message::user("hi")],
                &ChatOptions::default(),
                true,
            );
            tokenizer.encode(&text, true)
        }
        Err(_) => {
            let last = engine.n_vocab().saturating_sub(1) as u32;
            let prompt = vec![0, 1.min(last), 5.min(last)];
            let mut session = engine.session()?;
            session.feed(&prompt, ferrite::engine::Logits::Last)?;
            return Ok(());
        }
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty after tokenization");
    anyhow::ensure!(
        prompt.len() < engine.n_ctx(),
        "the prompt does not fit the context"
    );
    let mut session = engine.session()?;
    let mut sampler = Sampler::new(match seed % 2 {
        0 => SamplerConfig::greedy(),
        _ => SamplerConfig {
            seed,
            ..SamplerConfig::default()
        },
    });
    let opts = GenerateOptions {
        max_tokens: Some(1),
        interrupt: None,
        after_prompt: None,
    };
    generate(&mut session, &mut sampler, &prompt, &opts, |_| {
        ControlFlow::Continue(())
    })?;
    Ok(())
}

/// `Engine::open` of `path` with [`engine_options`], then [`one_token`].
pub fn open_and_run(path: &Path, seed: u64) -> anyhow::Result<()> {
    let engine = Engine::open(path, engine_options(seed))?;
    one_token(&engine, seed)
}

// ---------------------------------------------------------------------------------------------------------------
// Consistent mutants: another configuration, its tensors shaped to match (what metadata and tensor mutations one at a
// time rarely reach: a file that passes every shape check with numbers the checks did not foresee).

use ferrite::model::tiny::{
    encode_values, tensor_specs, tensor_values, write_specs, TinyConfig, Values, Vocabulary,
    WeightTypes,
};

/// Largest model a configuration mutant may be (its values are generated for every mutant).
const MAX_CONFIG_BYTES: u64 = 24 << 20;

/// The demo configuration with 1 to 3 fields set to boundary values (not checked by `TinyConfig::validate`: the
/// product must refuse what it cannot run). Returns the configuration and what changed.
pub fn config_mutant(c: &mut impl Choices) -> (TinyConfig, String) {
    let mut cfg = TinyConfig::demo();
    let mut what = Vec::new();
    for _ in 0..1 + c.below(3) {
        let small = |c: &mut dyn FnMut(usize) -> usize, options: &[u32]| options[c(options.len())];
        let mut b = |n: usize| c.below(n);
        let field = b(26);
        let change = match field {
            0 => {
                cfg.n_layer = small(&mut b, &[1, 2, 3, 5, 6]);
                let n = cfg.n_layer as usize;
                cfg.compress_ratios.resize(n, 4);
                cfg.hash_layer_count = cfg.hash_layer_count.min(cfg.n_layer);
                format!("n_layer {}", cfg.n_layer)
            }
            1 => {
                cfg.n_embd = small(&mut b, &[4, 8, 32, 64, 100, 128, 260, 512]);
                format!("n_embd {}", cfg.n_embd)
            }
            2 => {
                cfg.n_vocab = small(&mut b, &[1, 2, 300, 511, 513, 1024, 4096]);
                if cfg.n_vocab < 512 {
                    cfg.vocab = Vocabulary::None;
                }
                format!("n_vocab {}", cfg.n_vocab)
            }
            3 => {
                cfg.n_head = small(&mut b, &[1, 2, 3, 8, 16]);
                format!("n_head {}", cfg.n_head)
            }
            4 => {
                cfg.head_dim = small(&mut b, &[2, 32, 34, 64, 96, 130, 192, 256, 512]);
                format!("head_dim {}", cfg.head_dim)
            }
            5 => {
                cfg.n_rot = small(&mut b, &[0, 1, 2, 4, 30, 33, 64, 128]);
                format!("n_rot {}", cfg.n_rot)
            }
            6 => {
                cfg.q_lora_rank = small(&mut b, &[1, 3, 8, 256]);
                format!("q_lora_rank {}", cfg.q_lora_rank)
            }
            7 => {
                cfg.o_lora_rank = small(&mut b, &[1, 3, 8, 256]);
                format!("o_lora_rank {}", cfg.o_lora_rank)
            }
            8 => {
                cfg.o_groups = small(&mut b, &[1, 3, 4, 8]);
                format!("o_groups {}", cfg.o_groups)
            }
            9 => {
                cfg.sliding_window = small(&mut b, &[1, 2, 3, 7, 128, 4096]);
                format!("sliding_window {}", cfg.sliding_window)
            }
            10 => {
                let n = cfg.compress_ratios.len();
                let i = b(n);
                cfg.compress_ratios[i] = small(&mut b, &[0, 4, 128]);
                format!("compress_ratios {:?}", cfg.compress_ratios)
            }
            11 => {
                cfg.indexer_n_head = small(&mut b, &[1, 2, 3, 64]);
                format!("indexer_n_head {}", cfg.indexer_n_head)
            }
            12 => {
                cfg.indexer_head_dim = small(&mut b, &[32, 64, 96, 128, 256]);
                format!("indexer_head_dim {}", cfg.indexer_head_dim)
            }
            13 => {
                cfg.indexer_top_k = small(&mut b, &[1, 2, 3, 64, 512, 4096]);
                format!("indexer_top_k {}", cfg.indexer_top_k)
            }
            14 => {
                cfg.n_expert = small(&mut b, &[1, 2, 3, 16, 64]);
                cfg.n_expert_used = cfg.n_expert_used.min(cfg.n_expert);
                format!("n_expert {}", cfg.n_expert)
            }
            15 => {
                cfg.n_expert_used = small(&mut b, &[1, 3, 7, 8]).min(cfg.n_expert);
                format!("n_expert_used {}", cfg.n_expert_used)
            }
            16 => {
                cfg.expert_ffn = small(&mut b, &[1, 3, 32, 33, 256]);
                format!("expert_ffn {}", cfg.expert_ffn)
            }
            17 => {
                cfg.n_expert_shared = small(&mut b, &[0, 1, 2]);
                format!("n_expert_shared {}", cfg.n_expert_shared)
            }
            18 => {
                cfg.hash_layer_count = small(&mut b, &[0, 1, 3, 4]).min(cfg.n_layer);
                format!("hash_layer_count {}", cfg.hash_layer_count)
            }
            19 => {
                cfg.yarn_factor = [1.0, 0.5, 40.0, 1e6][b(4)];
                format!("yarn_factor {}", cfg.yarn_factor)
            }
            20 => {
                cfg.yarn_orig_ctx = small(&mut b, &[1, 16, 4096, 1 << 20]);
                format!("yarn_orig_ctx {}", cfg.yarn_orig_ctx)
            }
            21 => {
                cfg.context_length = small(&mut b, &[1, 2, 8, 16, 17, 100, 1 << 20]);
                format!("context_length {}", cfg.context_length)
            }
            22 => {
                cfg.hc_sinkhorn_iters = small(&mut b, &[1, 2, 100]);
                format!("hc_sinkhorn_iters {}", cfg.hc_sinkhorn_iters)
            }
            23 => {
                let ty = [
                    GgmlType::F16,
                    GgmlType::Bf16,
                    GgmlType::Q8_0,
                    GgmlType::Q4_0,
                    GgmlType::Q4K,
                    GgmlType::Q2K,
                    GgmlType::Mxfp4,
                    GgmlType::Iq4Nl,
                ][b(8)];
                match b(4) {
                    0 => cfg.types.dense = ty,
                    1 => cfg.types.experts = ty,
                    2 => cfg.types.shared = ty,
                    _ => cfg.types.embed = ty,
                }
                format!("types {:?}", cfg.types)
            }
            24 => {
                cfg.types = WeightTypes::all(GgmlType::Q8_0);
                "all Q8_0".to_string()
            }
            _ => {
                cfg.nextn_predict_layers = small(&mut b, &[1, 2]);
                format!("nextn_predict_layers {}", cfg.nextn_predict_layers)
            }
        };
        what.push(change);
    }
    (cfg, what.join(", "))
}

/// Writes the model of `cfg` (values of `seed`) without `TinyConfig::validate`. `None` when the configuration has
/// no such model (a type whose blocks do not divide a row, a size past the cap, ids the generator cannot draw).
pub fn write_config_model(path: &Path, cfg: &TinyConfig, seed: u64) -> Option<()> {
    let specs = tensor_specs(cfg);
    let total = specs
        .iter()
        .try_fold(0u64, |acc, s| Some(acc + s.ty.tensor_bytes(&s.dims)?))?;
    let ids_ok = specs.iter().all(|s| match s.init {
        ferrite::model::tiny::Init::ExpertIds { n_expert } => s.dims[0] <= n_expert as u64,
        _ => true,
    });
    if total > MAX_CONFIG_BYTES || !ids_ok {
        return None;
    }
    write_specs(path, cfg, &specs, |spec| match tensor_values(spec, seed) {
        Values::Ids(ids) => Ok(ids.into_iter().flat_map(i32::to_le_bytes).collect()),
        Values::F32(v) => encode_values(spec, &v),
    })
    .ok()
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------------------------
// Sweeps: every single change of a kind, enumerated (random mutants reach a given tensor-and-type pair rarely).

/// Every tensor role (the first tensor of each name once `blk.N.` is dropped) retyped to every type its rows can be
/// stored in, and every metadata key set to each interesting value of its kind (and removed).
pub fn sweep(parts: &Parts<'_>) -> Vec<Vec<Mutation>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for t in &parts.tensors {
        let role = match t.name.strip_prefix("blk.") {
            Some(rest) => rest.split_once('.').map_or(rest, |(_, r)| r).to_string(),
            None => t.name.clone(),
        };
        if !seen.insert(role) {
            continue;
        }
        for ty in types_for(t.dims.first().copied().unwrap_or(1)) {
            if ty != t.ty && bytes_of(ty, &t.dims).is_some() {
                out.push(vec![Mutation::Retype(t.name.clone(), ty)]);
            }
        }
    }
    for (key, old) in &parts.metadata {
        out.push(vec![Mutation::RemoveKey(key.clone())]);
        let values: Vec<Value> = match old {
            Value::F32(_) | Value::F64(_) => FLOATS.iter().map(|&f| float_value(old, f)).collect(),
            Value::Array(_) | Value::String(_) | Value::Bool(_) => continue,
            _ => INTS
                .iter()
                .map(|&v| match old {
                    Value::U32(_) => Value::U32(v as u32),
                    Value::I32(_) => Value::I32(v as i32),
                    Value::U64(_) => Value::U64(v as u64),
                    Value::I64(_) => Value::I64(v as i64),
                    Value::U8(_) => Value::U8(v as u8),
                    _ => Value::U32(v as u32),
                })
                .collect(),
        };
        for v in values {
            if v != *old {
                out.push(vec![Mutation::SetKey(key.clone(), v)]);
            }
        }
    }
    out
}
