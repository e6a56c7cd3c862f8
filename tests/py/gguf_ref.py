#!/usr/bin/env python3
"""Reference GGUF writer and reader for ferrite's tests, built on the PyPI `gguf` package.

The Rust tests run it as `$FERRITE_PYTHON tests/py/gguf_ref.py ...` (scripts/test.sh sets
FERRITE_PYTHON to .venv/bin/python, which has scripts/requirements.txt installed).

    gguf_ref.py write OUT.gguf [--alignment N] [--version 2|3] [--no-nested] [--seed S]
    gguf_ref.py dump FILE.gguf

`write` makes a deterministic file with gguf.GGUFWriter: metadata of every value type (edge
values, non-ASCII and empty strings, float specials), arrays of every scalar type, an array
of strings, an empty array, nested arrays (unless --no-nested: ggml's gguf_init_from_file
rejects them), `general.alignment` = N when given (uint32; must be a power of two), and one
tensor of each type in TENSORS (1-D to 4-D, content derived from SHAKE-256 of seed and name).
--version 2 patches the header's version field (v2 and v3 files have the same layout).

`dump` reads a file with gguf.GGUFReader and prints one JSON object to stdout:

    {
      "version": 3,              # header version
      "tensor_count": 21,        # header counts
      "kv_count": 40,
      "alignment": 64,           # general.alignment, or 32 when the key is absent
      "data_offset": 2368,       # absolute file offset of the tensor data section
      "metadata": [[key, type, value], ...],   # in file order
      "tensors": [                             # in file order
        {"name": "t.q4_k", "type": 12, "type_name": "Q4_K",
         "shape": [256, 3],      # ggml order: ne0 (contiguous) first, as stored in the file
         "offset": 1024,         # relative to data_offset, as stored in the file
         "n_bytes": 432,         # ggml_nbytes
         "sha256": "..."},       # of the n_bytes tensor bytes
        ...]
    }

Metadata `type` is the GGUF value type name: uint8 int8 uint16 int16 uint32 int32 float32
bool string uint64 int64 float64 array. `value` is:
    integers   JSON integer (exact, uint64 and int64 included)
    bool       true / false
    string     JSON string (the UTF-8 bytes decoded)
    float32    "0x3dcccccd": the IEEE bits as a string, "0x" + 8 lowercase hex digits,
    float64    "0x3fb999999999999a": "0x" + 16 digits (exact for every value: NaN, -0.0, ...)
    array      {"array": ELEMENT_TYPE, "items": [value, ...]}, items encoded by these rules;
               when ELEMENT_TYPE is "array" every item is itself {"array": ..., "items": ...}

GGUFReader quirks this file handles: `reader.fields` starts with three pseudo-fields
(GGUF.version, GGUF.tensor_count, GGUF.kv_count) that are not metadata; for nested arrays
`field.types` lists only the first element's types and `field.contents()` flattens, so values
are decoded here from `field.parts` (one part per scalar, two per string: length and bytes,
two per array header: element type and count); `tensor.shape` is the file order (ne0 first)
while `tensor.data` has the reversed NumPy shape; `tensor.data_offset` is absolute.
"""

import argparse
import hashlib
import json
import struct
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

# One tensor per type: (name, type, shape in ggml order, ne0 first).
TENSORS = [
    ("t.f32", Q.F32, [7, 3]),
    ("t.f32.1d", Q.F32, [5]),
    ("t.f16", Q.F16, [4, 3, 2]),
    ("t.bf16", Q.BF16, [6, 2]),
    ("t.f64", Q.F64, [3]),
    ("t.i8", Q.I8, [9]),
    ("t.i16", Q.I16, [5, 2]),
    ("t.i32", Q.I32, [4, 2, 2]),
    ("t.i64", Q.I64, [3, 1, 1, 2]),
    ("t.q8_0", Q.Q8_0, [64, 2]),
    ("t.q4_0", Q.Q4_0, [32]),
    ("t.q4_1", Q.Q4_1, [32, 3]),
    ("t.q5_0", Q.Q5_0, [64]),
    ("t.q5_1", Q.Q5_1, [32, 2, 2]),
    ("t.q2_k", Q.Q2_K, [256, 2]),
    ("t.q3_k", Q.Q3_K, [256]),
    ("t.q4_k", Q.Q4_K, [256, 3]),
    ("t.q5_k", Q.Q5_K, [256, 1, 2]),
    ("t.q6_k", Q.Q6_K, [512]),
    ("t.iq4_nl", Q.IQ4_NL, [32, 4]),
    ("t.iq4_xs", Q.IQ4_XS, [256, 2]),
    ("t.mxfp4", Q.MXFP4, [64, 2, 1, 2]),
]

NP_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64,
            Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}

F32_SPECIALS = [0.1, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4028234663852886e38]


class TypedArray:
    """An array GGUFWriter cannot express by itself: empty, or nested with a chosen element type."""

    def __init__(self, elem, items):
        self.elem, self.items = elem, items


class Writer(gguf.GGUFWriter):
    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if not isinstance(val, TypedArray):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        out = struct.pack("<I", V.ARRAY) if add_vtype else b""
        out += struct.pack("<IQ", val.elem, len(val.items))
        for item in val.items:
            out += self._pack_val(item, val.elem, add_vtype=False)
        return out


def stream(seed, name, n):
    """n deterministic pseudo-random bytes for tensor `name`."""
    return hashlib.shake_256(f"{seed}:{name}".encode()).digest(n)


def tensor_data(seed, name, qtype, shape):
    np_shape = tuple(reversed(shape))
    n = int(np.prod(np_shape))
    if qtype in (Q.F32, Q.F16, Q.F64, Q.BF16):
        u = np.frombuffer(stream(seed, name, 4 * n), dtype="<u4").astype(np.float64)
        f = (u / 2.0**32 * 8.0 - 4.0).reshape(np_shape)
        if qtype == Q.BF16:
            bits = f.astype(np.float32).view(np.uint32) >> 16
            return bits.astype(np.uint16), qtype
        return f.astype(NP_TYPES[qtype]), None
    if qtype in NP_TYPES:
        dt = np.dtype(NP_TYPES[qtype]).newbyteorder("<")
        return np.frombuffer(stream(seed, name, dt.itemsize * n), dtype=dt).reshape(np_shape), None
    byte_shape = gguf.quant_shape_to_byte_shape(np_shape, qtype)
    raw = stream(seed, name, int(np.prod(byte_shape)))
    return np.frombuffer(raw, dtype=np.uint8).reshape(byte_shape), qtype


def write(args):
    w = Writer(args.out, arch="ferrite-test")  # writes general.architecture first
    if args.alignment is not None:
        w.add_custom_alignment(args.alignment)
    kv = w.add_key_value
    kv("test.uint8", 255, V.UINT8)
    kv("test.int8", -128, V.INT8)
    kv("test.uint16", 65535, V.UINT16)
    kv("test.int16", -32768, V.INT16)
    kv("test.uint32", 4294967295, V.UINT32)
    kv("test.int32", -2147483648, V.INT32)
    kv("test.float32", 0.1, V.FLOAT32)
    kv("test.float32.neg_zero", -0.0, V.FLOAT32)
    kv("test.bool.true", True, V.BOOL)
    kv("test.bool.false", False, V.BOOL)
    kv("test.string", "hello, GGUF", V.STRING)
    kv("test.string.utf8", "héllo 世界 🦀", V.STRING)
    kv("test.string.empty", "", V.STRING)  # add_string() would silently skip it
    kv("test.uint64", 2**64 - 1, V.UINT64)
    kv("test.int64", -(2**63), V.INT64)
    kv("test.float64", 0.1, V.FLOAT64)
    kv("test.float64.pi", 3.141592653589793, V.FLOAT64)
    arrays = [
        (V.UINT8, [0, 1, 255]), (V.INT8, [-128, 0, 127]), (V.UINT16, [0, 65535]),
        (V.INT16, [-32768, 32767]), (V.UINT32, [0, 1, 4294967295]),
        (V.INT32, [-2147483648, 0, 2147483647]), (V.FLOAT32, F32_SPECIALS),
        (V.BOOL, [True, False, True]), (V.STRING, ["a", "", "ü世🦀"]),
        (V.UINT64, [0, 2**64 - 1]), (V.INT64, [-(2**63), 0, 2**63 - 1]),
        (V.FLOAT64, [0.1, -0.0, float("nan"), float("-inf"), 5e-324]),
    ]
    for t, items in arrays:
        kv(f"test.array.{t.name.lower()}", items, V.ARRAY, sub_type=t)
    kv("test.array.empty", TypedArray(V.UINT32, []), V.ARRAY)  # GGUFWriter refuses empty arrays
    if not args.no_nested:
        # GGUFWriter's own nesting: inner element types are inferred (int -> int32, str -> string).
        w.add_array("test.array.nested.int32", [[1, 2, 3], [4], [-5, 6]])
        w.add_array("test.array.nested.string", [["a", "b"], ["世界"]])
        # Explicit element types, an empty inner array, three levels.
        kv("test.array.nested.uint16", TypedArray(V.ARRAY, [
            TypedArray(V.UINT16, [1, 65535]), TypedArray(V.UINT16, []), TypedArray(V.UINT16, [7])]), V.ARRAY)
        kv("test.array.nested.deep", TypedArray(V.ARRAY, [
            TypedArray(V.ARRAY, [TypedArray(V.FLOAT64, [0.5, -2.0]), TypedArray(V.INT8, [-1])]),
            TypedArray(V.ARRAY, [])]), V.ARRAY)
    kv("test.last", "end", V.STRING)

    for name, qtype, shape in TENSORS:
        data, raw_dtype = tensor_data(args.seed, name, qtype, shape)
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if args.version != gguf.GGUF_VERSION:
        with open(args.out, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", args.version))


SCALARS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}


def decode(vtype, parts, i):
    """Decode one value of type vtype starting at parts[i]; return (json_value, next_index)."""
    vtype = V(int(vtype))
    if vtype == V.STRING:
        return bytes(parts[i + 1]).decode("utf-8"), i + 2
    if vtype in SCALARS:
        return int(parts[i][0]), i + 1
    if vtype == V.BOOL:
        return bool(parts[i][0]), i + 1
    if vtype in (V.FLOAT32, V.FLOAT64):
        p = parts[i]
        le = p.astype(p.dtype.newbyteorder("<"))  # bit-exact byte swap if needed
        width = 8 if vtype == V.FLOAT32 else 16
        bits = int(le.view("<u4" if vtype == V.FLOAT32 else "<u8")[0])
        return f"0x{bits:0{width}x}", i + 1
    if vtype == V.ARRAY:
        elem, n = V(int(parts[i][0])), int(parts[i + 1][0])
        i += 2
        items = []
        for _ in range(n):
            item, i = decode(elem, parts, i)
            items.append(item)
        return {"array": elem.name.lower(), "items": items}, i
    raise ValueError(f"unknown GGUF value type {vtype}")


def dump(args):
    r = gguf.GGUFReader(args.file)
    fields = list(r.fields.values())
    pseudo, kvs = fields[:3], fields[3:]
    assert [f.name for f in pseudo] == ["GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"]
    metadata = []
    for f in kvs:
        # parts: key length, key bytes, value type, then the value's parts
        vtype = V(int(f.parts[2][0]))
        value, end = decode(vtype, f.parts, 3)
        assert end == len(f.parts), f"{f.name}: {len(f.parts) - end} parts left undecoded"
        metadata.append([f.name, vtype.name.lower(), value])
    tensors = []
    for t in r.tensors:
        offset = int(t.field.parts[5][0])
        assert r.data_offset + offset == t.data_offset
        raw = r.data[t.data_offset:t.data_offset + t.n_bytes].tobytes()
        assert len(raw) == t.n_bytes, f"{t.name}: data runs past the end of the file"
        tensors.append({
            "name": t.name, "type": int(t.tensor_type), "type_name": t.tensor_type.name,
            "shape": [int(d) for d in t.shape], "offset": offset, "n_bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(raw).hexdigest(),
        })
    out = {
        "version": int(pseudo[0].parts[0][0]),
        "tensor_count": int(pseudo[1].parts[0][0]),
        "kv_count": int(pseudo[2].parts[0][0]),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pw = sub.add_parser("write", help="write the reference GGUF file")
    pw.add_argument("out")
    pw.add_argument("--alignment", type=int, help="set general.alignment (power of two)")
    pw.add_argument("--version", type=int, choices=[2, 3], default=3, help="header version")
    pw.add_argument("--no-nested", action="store_true", help="no nested arrays (ggml rejects them)")
    pw.add_argument("--seed", type=int, default=0, help="seed of the tensor contents")
    pd = sub.add_parser("dump", help="print a GGUF file as JSON")
    pd.add_argument("file")
    args = p.parse_args()
    write(args) if args.cmd == "write" else dump(args)


if __name__ == "__main__":
    main()
