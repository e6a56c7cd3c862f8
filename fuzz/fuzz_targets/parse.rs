//! Parses arbitrary bytes as a GGUF file. A parse may fail, but must never panic, read out of bounds or allocate
//! without bound; a file that parses must have every tensor range inside the bytes, every metadata getter must
//! answer (an error is an answer), and the header must be rewritable to a file that parses the same.

#![no_main]

use gguf::{Array, Header, Value, Writer};
use libfuzzer_sys::fuzz_target;

fn touch_array(a: &Array) -> usize {
    let n = a.len();
    let mut acc = n ^ a.elem_type() as usize;
    acc ^= a.to_i128s().map_or(0, |v| v.len());
    for i in [0, n / 2, n.saturating_sub(1), n] {
        assert_eq!(a.get(i).is_some(), i < n);
    }
    if let Array::Array(inner) = a {
        for x in inner {
            acc ^= touch_array(x);
        }
    }
    acc
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(h) = Header::parse(bytes).map_err(|e| e.to_string()) else {
        return;
    };
    assert!(h.alignment.is_power_of_two() && h.data_offset % h.alignment == 0);

    // Every tensor's data, sliced exactly as GgufFile::tensor_data does.
    let mut acc = 0u8;
    for t in &h.tensors {
        let end = h
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        assert!(
            end.is_some_and(|e| e <= bytes.len() as u64),
            "tensor {:?} past the end",
            t.name
        );
        let start = (h.data_offset + t.offset) as usize;
        let data = &bytes[start..start + t.n_bytes as usize];
        acc ^= data.first().copied().unwrap_or(0) ^ data.last().copied().unwrap_or(0);
        assert_eq!(t.ty.tensor_bytes(&t.dims), Some(t.n_bytes));
        assert!(std::ptr::eq(h.tensor(&t.name).unwrap(), t));
        let _ = t.n_elements();
    }

    // Every getter on every key.
    let md = &h.metadata;
    for (key, value) in md.iter() {
        let _ = md.str(key).map_err(|e| e.to_string());
        let _ = md.u32(key).map_err(|e| e.to_string());
        let _ = md.f32(key).map_err(|e| e.to_string());
        let _ = md.bool(key).map_err(|e| e.to_string());
        let _ = md.uint(key).map_err(|e| e.to_string());
        let _ = md.int_array(key).map_err(|e| e.to_string());
        let _ = md.str_array(key).map_err(|e| e.to_string());
        if let Ok(a) = md.array(key) {
            acc ^= touch_array(a) as u8;
        }
        let _ = value.summary(4);
        let _ = value.as_i128();
        assert_eq!(md.get(key).map(Value::value_type), Some(value.value_type()));
    }
    std::hint::black_box(acc);

    // Round trip: the parsed header writes back to a file that parses to the same tensors and metadata count.
    let w = Writer::from_header(&h).expect("a parsed header can be rewritten");
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
    let mut out = Vec::new();
    w.write(&mut out, |i, _, sink| {
        let t = &h.tensors[i];
        let start = (h.data_offset + t.offset) as usize;
        sink.write_all(&bytes[start..start + t.n_bytes as usize])
    })
    .expect("rewrite");
    let h2 = Header::parse(&out).expect("the rewritten file parses");
    assert_eq!(h2.metadata.len(), md.len());
    assert_eq!(h2.tensors.len(), h.tensors.len());
    for (a, b) in h.tensors.iter().zip(&h2.tensors) {
        assert_eq!((&a.name, &a.dims, a.ty, a.n_bytes), (&b.name, &b.dims, b.ty, b.n_bytes));
    }
});
