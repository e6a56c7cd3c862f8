//! Expert paging parts on real (tiny) DeepSeek V4 files: every expert's slabs read with `pread` equal the mapped
//! tensor bytes, in one file and split over several; and the planner, the policy and the reader together serve a
//! trace of requests through a pool smaller than a micro-batch's experts, every wave's slots holding the right bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ferrite::experts::{
    direct_room, ExpertKey, ExpertLayout, ExpertReader, ExpertStats, PolicyConfig, ReadJob,
    ReadOptions, SlotBuffers, SlotPolicy, StatsSnapshot, DIRECT_ALIGN,
};
use ferrite::model::sizes::weight_sizes;
use ferrite::model::tiny::{write_tiny_model, TinyConfig, WeightTypes};
use ferrite::plan::{plan_memory, Budget, ExpertPlacement, PlanInputs, PlanRequest};
use gguf::{GgmlType, Model, Writer};
use testkit::expert_io::{mapped_slabs, slot_jobs, verify_slot};

fn tiny(dir: &Path, types: WeightTypes) -> (PathBuf, TinyConfig) {
    let cfg = TinyConfig::small().with_types(types);
    let path = dir.join("tiny.gguf");
    write_tiny_model(&path, &cfg, 7).unwrap();
    (path, cfg)
}

/// Reads every expert of every layer (one batch per layer) into packed slots and checks each against the map of
/// `reference` (the same tensors, possibly laid out in other files).
fn read_all_and_verify(model: &Model, reference: &Model, opts: ReadOptions, cfg: &TinyConfig) {
    let reader = ExpertReader::open(model, opts).unwrap();
    let layout = reader.layout();
    let ref_layout = ExpertLayout::from_model(reference).unwrap();
    assert_eq!(layout.layers().count(), cfg.n_layer as usize);
    let sizes = weight_sizes(model);
    for l in &sizes.layers {
        assert_eq!(layout.expert_bytes(l.layer), Some(l.bytes_per_expert));
    }
    let parts = layout.max_slab_bytes();
    for l in layout.layers() {
        assert_eq!(l.n_expert, cfg.n_expert);
        let mut bufs: Vec<Vec<u8>> = (0..l.n_expert)
            .map(|_| vec![0xA5; layout.slot_bytes() as usize])
            .collect();
        let jobs = bufs
            .iter_mut()
            .enumerate()
            .map(|(e, b)| ReadJob {
                key: ExpertKey::new(l.layer, e as u32),
                dest: SlotBuffers::packed(b, parts).unwrap(),
            })
            .collect();
        let report = reader.read(jobs).unwrap();
        assert_eq!(report.bytes, u64::from(l.n_expert) * l.expert_bytes());
        assert_eq!(report.experts, u64::from(l.n_expert));
        for (e, b) in bufs.iter().enumerate() {
            let key = ExpertKey::new(l.layer, e as u32);
            let (g, rest) = b.split_at(parts[0] as usize);
            let (u, d) = rest.split_at(parts[1] as usize);
            verify_slot(reference, &ref_layout, key, [g, u, d]).unwrap();
            let mapped = mapped_slabs(model, layout, key).unwrap();
            assert_eq!(
                [
                    &g[..mapped[0].len()],
                    &u[..mapped[1].len()],
                    &d[..mapped[2].len()]
                ],
                mapped
            );
        }
    }
}

#[test]
fn every_expert_of_a_tiny_model_reads_back_as_mapped() {
    let dir = tempfile::tempdir().unwrap();
    for types in [
        WeightTypes::F32,
        WeightTypes {
            experts: GgmlType::Q8_0,
            ..WeightTypes::F32
        },
    ] {
        let (path, cfg) = tiny(dir.path(), types);
        let model = Model::open(&path).unwrap();
        let layout = ExpertLayout::from_model(&model).unwrap();
        let l0 = layout.layer(0).unwrap();
        let slab =
            types.experts.row_bytes(u64::from(cfg.n_embd)).unwrap() * u64::from(cfg.expert_ffn);
        assert_eq!(l0.parts[0].slab_bytes, slab);
        for opts in [
            ReadOptions::default(),
            ReadOptions {
                threads: 1,
                split_bytes: 0,
                drop_cache: false,
                direct: false,
            },
            ReadOptions {
                threads: 5,
                split_bytes: 4096,
                drop_cache: true,
                direct: true,
            },
        ] {
            read_all_and_verify(&model, &model, opts, &cfg);
        }
    }
}

/// Slabs of whole pages (F32 experts: 64 KiB) are read with O_DIRECT into page-aligned rooms, each slab at its
/// offset within a page in the file (the pages before and after it in the room take the rest of the read);
/// a destination at another offset within a page is read buffered. Both hold exactly the mapped bytes.
#[test]
fn direct_reads_land_at_the_slabs_offset_within_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let (path, cfg) = tiny(dir.path(), WeightTypes::F32);
    let model = Model::open(&path).unwrap();
    let page = DIRECT_ALIGN as u64;
    let split = ReadOptions {
        split_bytes: 3 * 4096 + 1,
        ..ReadOptions::default()
    };
    for (opts, shift) in [
        (ReadOptions::default(), 0),
        (split, 0),
        (ReadOptions::default(), 32),
    ] {
        let reader = ExpertReader::open(&model, opts).unwrap();
        let layout = reader.layout();
        let rooms = layout.max_slab_bytes().map(direct_room);
        let stride = rooms.iter().sum::<u64>() as usize;
        for l in layout.layers() {
            assert!(l.parts.iter().all(|p| p.slab_bytes % page == 0));
            let lead = l
                .parts
                .each_ref()
                .map(|p| (p.file_offset % page) as usize + shift);
            let n = cfg.n_expert as usize;
            let mut pool = memmap2::MmapMut::map_anon(n * stride).unwrap();
            pool.fill(0xA5);
            let jobs = pool
                .chunks_exact_mut(stride)
                .enumerate()
                .map(|(e, slot)| ReadJob {
                    key: ExpertKey::new(l.layer, e as u32),
                    dest: SlotBuffers::packed(slot, rooms).unwrap().at(lead),
                })
                .collect();
            let report = reader.read(jobs).unwrap();
            assert_eq!(report.bytes, n as u64 * l.expert_bytes());
            let want_direct = if shift == 0 && reader.can_read_direct(0) {
                report.bytes
            } else {
                0
            };
            assert_eq!(
                report.direct_bytes, want_direct,
                "layer {} shift {shift}",
                l.layer
            );
            for (e, slot) in pool.chunks_exact(stride).enumerate() {
                let (g, rest) = slot.split_at(rooms[0] as usize);
                let (u, d) = rest.split_at(rooms[1] as usize);
                let parts = [&g[lead[0]..], &u[lead[1]..], &d[lead[2]..]];
                verify_slot(&model, layout, ExpertKey::new(l.layer, e as u32), parts).unwrap();
            }
        }
    }
    if !ExpertReader::open(&model, ReadOptions::default())
        .unwrap()
        .can_read_direct(0)
    {
        eprintln!(
            "note: this file system refuses O_DIRECT; only the buffered fallback was checked"
        );
    }
}

#[test]
fn a_split_model_reads_from_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (path, cfg) = tiny(dir.path(), WeightTypes::F32);
    let whole = Model::open(&path).unwrap();
    let src = &whole.shards()[0];
    let writer = Writer::from_header(src.header()).unwrap();
    let shards = writer.split_by_size(whole.file_bytes() / 4).unwrap();
    assert!(shards.len() >= 4, "{} shards", shards.len());
    let out = dir.path().join("split.gguf");
    let written = Writer::write_files(&shards, &out, false, |i, _, sink| {
        sink.write_all(src.tensor_data(&src.header().tensors[i]))
    })
    .unwrap();
    let split = Model::open(&written[1].0).unwrap();
    assert_eq!(split.shards().len(), shards.len());
    let layout = ExpertLayout::from_model(&split).unwrap();
    let mut used: Vec<usize> = layout
        .layers()
        .flat_map(|l| l.parts.iter().map(|p| p.shard))
        .collect();
    used.sort();
    used.dedup();
    assert!(used.len() >= 2, "experts lie in shards {used:?}");
    assert_eq!(layout.paths().len(), shards.len());
    read_all_and_verify(&split, &whole, ReadOptions::default(), &cfg);
}

/// Plans a cache of `n_slots` slots from a budget, then serves 30 steps of 4-token micro-batches through it:
/// policy waves, reads of the misses into the slot buffers, and a check of every key's slot before "computing".
fn serve_trace(model: &Model, cfg: &TinyConfig, n_slots: u64) -> StatsSnapshot {
    let sizes = weight_sizes(model);
    let inputs = PlanInputs::from_sizes(&sizes, u64::from(cfg.n_expert_used), 64, 1 << 20, 1 << 20);
    let slot = inputs.slot_bytes();
    let budget = Budget::from_flag(inputs.fixed_bytes() + n_slots * slot + slot / 2);
    let plan = plan_memory(&inputs, &budget, &PlanRequest::default()).unwrap();
    assert_eq!(
        plan.placement,
        ExpertPlacement::Paged {
            slots: n_slots,
            slot_bytes: slot
        }
    );
    print!("{plan}");

    let reader = ExpertReader::open(model, ReadOptions::default()).unwrap();
    let layout = reader.layout();
    assert_eq!(layout.slot_bytes(), slot);
    let parts = layout.max_slab_bytes();
    // Three slot tensors {n_in, n_out, n_slots}, as the expert matmuls will run over.
    let mut tensors: Vec<Vec<u8>> = parts
        .iter()
        .map(|&b| vec![0u8; (b * n_slots) as usize])
        .collect();
    let mut policy = SlotPolicy::new(PolicyConfig::new(
        n_slots as usize,
        cfg.n_layer,
        cfg.n_expert,
    ))
    .unwrap();
    let mut stats = ExpertStats::new();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _step in 0..30 {
        policy.begin_step();
        stats.record_step(4);
        for layer in 0..cfg.n_layer {
            // 4 tokens x 2 experts, skewed towards low ids.
            let keys: Vec<ExpertKey> = (0..8)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let r = (x % 64) as u32;
                    ExpertKey::new(layer, r * r / 64 % cfg.n_expert)
                })
                .collect();
            let req = policy.request(&keys).unwrap();
            stats.record_request(&req);
            let mut served = Vec::new();
            for wave in &req.waves {
                // Read the wave's misses into their slots.
                let [g, u, d] = &mut tensors[..] else {
                    unreachable!()
                };
                let jobs = slot_jobs(&wave.misses, [g, u, d], parts).unwrap();
                stats.record_read(&reader.read(jobs).unwrap());
                // "Compute": every key of the wave must be in its slot now.
                for (key, s) in wave.entries() {
                    let slab = |i: usize| {
                        let n = parts[i] as usize;
                        &tensors[i][s as usize * n..][..n]
                    };
                    let [g, u, d] = [slab(0), slab(1), slab(2)];
                    verify_slot(model, layout, key, [g, u, d]).unwrap();
                    served.push(key);
                }
            }
            let mut want = keys.clone();
            want.sort();
            want.dedup();
            served.sort();
            assert_eq!(served, want);
        }
    }
    let s = stats.snapshot();
    assert_eq!(s.tokens, 120);
    assert_eq!(s.bytes_read, s.misses * slot);
    println!("{s}\n{}", s.to_json());
    s
}

#[test]
fn planner_policy_and_reader_serve_a_trace_through_a_small_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (path, cfg) = tiny(dir.path(), WeightTypes::F32);
    let model = Model::open(&path).unwrap();
    // 3 slots: fewer than a micro-batch's union of one layer's experts, so requests take several waves.
    let small = serve_trace(&model, &cfg, 3);
    assert!(small.waves > small.requests);
    assert!(small.misses > 0);
    // 30 slots of the 48 experts: one wave each, and the popular experts stay.
    let large = serve_trace(&model, &cfg, 30);
    assert_eq!(large.waves, large.requests);
    assert!(large.hit_rate() > 0.5, "{large}");
    assert!(large.misses < small.misses);
}

/// Hit rates on a synthetic Flash-shaped decode trace (43 layers x 256 experts, 6 per token, Zipf popularity per
/// layer): the policy against LRU over the same trace. Not timing: deterministic counts.
#[test]
fn the_policy_beats_lru_on_a_skewed_decode_trace() {
    let (n_layer, n_expert, n_used, n_tokens) = (43u32, 256u32, 6usize, 1500usize);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    // Zipf(1) weights over a per-layer permutation.
    let weights: Vec<f64> = (1..=n_expert).map(|r| 1.0 / f64::from(r)).collect();
    let total: f64 = weights.iter().sum();
    let perms: Vec<Vec<u32>> = (0..n_layer)
        .map(|_| {
            let mut p: Vec<u32> = (0..n_expert).collect();
            for i in (1..p.len()).rev() {
                let j = (rnd() * (i + 1) as f64) as usize;
                p.swap(i, j.min(i));
            }
            p
        })
        .collect();
    let mut trace = Vec::new();
    for _ in 0..n_tokens {
        for layer in 0..n_layer {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < n_used {
                let mut t = rnd() * total;
                let mut r = 0;
                while r + 1 < weights.len() && t >= weights[r] {
                    t -= weights[r];
                    r += 1;
                }
                let e = perms[layer as usize][r];
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            trace.push((layer, chosen));
        }
    }
    for frac in [8usize, 4, 2] {
        let n_slots = (n_layer * n_expert) as usize / frac;
        let mut policy = SlotPolicy::new(PolicyConfig::new(n_slots, n_layer, n_expert)).unwrap();
        // LRU: last-use tick per cached key, keys by tick.
        let mut lru_tick: HashMap<ExpertKey, usize> = HashMap::new();
        let mut lru_order: BTreeMap<usize, ExpertKey> = BTreeMap::new();
        let (mut hits, mut lru_hits, mut total) = (0usize, 0usize, 0usize);
        for (i, (layer, experts)) in trace.iter().enumerate() {
            if i % n_layer as usize == 0 {
                policy.begin_step();
            }
            let keys: Vec<ExpertKey> = experts.iter().map(|&e| ExpertKey::new(*layer, e)).collect();
            hits += policy.request(&keys).unwrap().n_hits();
            for (j, &k) in keys.iter().enumerate() {
                let now = i * n_used + j;
                if let Some(old) = lru_tick.insert(k, now) {
                    lru_order.remove(&old);
                    lru_hits += 1;
                } else if lru_tick.len() > n_slots {
                    if let Some((_, victim)) = lru_order.pop_first() {
                        lru_tick.remove(&victim);
                    }
                }
                lru_order.insert(now, k);
            }
            total += keys.len();
        }
        let (rate, lru_rate) = (hits as f64 / total as f64, lru_hits as f64 / total as f64);
        println!(
            "1/{frac} of the experts cached: policy {:.1} % hits, LRU {:.1} %",
            rate * 100.0,
            lru_rate * 100.0
        );
        assert!(rate > lru_rate, "1/{frac}: {rate} vs LRU {lru_rate}");
    }
}

/// Layout checks and read errors on small handcrafted files.
mod handcrafted {
    use std::path::{Path, PathBuf};

    use ferrite::experts::{
        ExpertIoError, ExpertKey, ExpertLayout, ExpertReader, Load, ReadJob, ReadOptions,
        SlabRange, SlotBuffers,
    };
    use gguf::{GgmlType, Model, Writer};
    use testkit::expert_io::{mapped_slabs, packed_slot_jobs, read_one, slot_jobs, verify_slot};

    /// Writes a model with a non-expert tensor first (so offsets are not 0) and the given expert tensors of layer
    /// 0, every byte a function of its position and tensor.
    fn write_model(dir: &Path, tensors: &[(&str, Vec<u64>)], ty: GgmlType) -> PathBuf {
        let mut w = Writer::new();
        w.add_tensor("token_embd.weight", &[7, 3], GgmlType::F32)
            .unwrap();
        for (kind, dims) in tensors {
            w.add_tensor(&format!("blk.0.{kind}.weight"), dims, ty)
                .unwrap();
        }
        let path = dir.join("m.gguf");
        w.write_file(&path, true, |i, t, sink| {
            let bytes: Vec<u8> = (0..t.n_bytes as usize)
                .map(|b| (b * 7 + i * 31 + (b >> 8)) as u8)
                .collect();
            sink.write_all(&bytes)
        })
        .unwrap();
        path
    }

    /// Expert tensors of layer 0: kind and shape.
    type Tensors<'a> = &'a [(&'a str, Vec<u64>)];

    /// One layer of 3 Q8_0 experts, 64 -> 32 -> 64.
    fn q8_model(dir: &Path) -> PathBuf {
        let t = [
            ("ffn_gate_exps", vec![64, 32, 3]),
            ("ffn_up_exps", vec![64, 32, 3]),
            ("ffn_down_exps", vec![32, 64, 3]),
        ];
        write_model(dir, &t, GgmlType::Q8_0)
    }

    fn slot(layout: &ExpertLayout) -> Vec<u8> {
        vec![0u8; layout.slot_bytes() as usize]
    }

    #[test]
    fn slabs_read_back_equal_the_map() {
        let dir = tempfile::tempdir().unwrap();
        let model = Model::open(q8_model(dir.path())).unwrap();
        let layout = ExpertLayout::from_model(&model).unwrap();
        let l = layout.layer(0).unwrap();
        assert_eq!(l.n_expert, 3);
        assert_eq!(
            l.parts.iter().map(|p| p.slab_bytes).collect::<Vec<_>>(),
            [2 * 34 * 32, 2 * 34 * 32, 34 * 64]
        );
        assert_eq!(layout.expert_bytes(0), Some(3 * 2176));
        assert_eq!(layout.slot_bytes(), 3 * 2176);
        let gate = model.tensor("blk.0.ffn_gate_exps.weight").unwrap();
        let data_offset = model.shards()[0].header().data_offset;
        assert_eq!(
            layout.ranges(ExpertKey::new(0, 2)).unwrap()[0],
            SlabRange {
                part: 0,
                shard: 0,
                offset: data_offset + gate.info.offset + 2 * 2176,
                len: 2176,
            }
        );
        for opts in [
            ReadOptions::default(),
            ReadOptions {
                threads: 1,
                split_bytes: 0,
                drop_cache: false,
                direct: false,
            },
            ReadOptions {
                threads: 3,
                split_bytes: 100,
                drop_cache: true,
                direct: true,
            },
        ] {
            let reader = ExpertReader::with_layout(layout.clone(), opts).unwrap();
            let part_bytes = layout.max_slab_bytes();
            let mut bufs: Vec<Vec<u8>> = (0..3).map(|_| slot(&layout)).collect();
            let jobs = bufs
                .iter_mut()
                .enumerate()
                .map(|(e, b)| ReadJob {
                    key: ExpertKey::new(0, 2 - e as u32),
                    dest: SlotBuffers::packed(b, part_bytes).unwrap(),
                })
                .collect();
            let report = reader.read(jobs).unwrap();
            assert_eq!((report.bytes, report.experts), (3 * 3 * 2176, 3));
            let want_reads = if opts.split_bytes == 100 {
                3 * 3 * 22
            } else {
                9
            };
            assert_eq!(report.reads, want_reads);
            for (e, b) in bufs.iter().enumerate() {
                let (g, rest) = b.split_at(2176);
                let (u, d) = rest.split_at(2176);
                verify_slot(&model, &layout, ExpertKey::new(0, 2 - e as u32), [g, u, d]).unwrap();
                // And not another expert's bytes.
                let other = ExpertKey::new(0, (3 - e as u32) % 3);
                assert!(matches!(
                    verify_slot(&model, &layout, other, [g, u, d]),
                    Err(ExpertIoError::Mismatch { .. })
                ));
            }
        }
    }

    #[test]
    fn separate_part_buffers_and_unaligned_f32_slabs() {
        let dir = tempfile::tempdir().unwrap();
        let t = [
            ("ffn_gate_exps", vec![5, 3, 4]),
            ("ffn_up_exps", vec![5, 3, 4]),
            ("ffn_down_exps", vec![3, 5, 4]),
        ];
        let model = Model::open(write_model(dir.path(), &t, GgmlType::F32)).unwrap();
        let reader = ExpertReader::open(&model, ReadOptions::default()).unwrap();
        let layout = reader.layout();
        for e in 0..4 {
            let key = ExpertKey::new(0, e);
            // Buffers larger than the slabs: the prefix is filled.
            let (mut g, mut u, mut d) = (vec![0u8; 64], vec![0u8; 60], vec![0u8; 61]);
            let report = read_one(&reader, key, SlotBuffers::new(&mut g, &mut u, &mut d)).unwrap();
            assert_eq!((report.bytes, report.reads), (180, 3));
            verify_slot(&model, layout, key, [&g, &u, &d]).unwrap();
            let mapped = mapped_slabs(&model, layout, key).unwrap();
            assert_eq!(&g[..60], mapped[0]);
            assert!(g[60..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn bad_keys_and_buffers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let model = Model::open(q8_model(dir.path())).unwrap();
        let reader = ExpertReader::open(&model, ReadOptions::default()).unwrap();
        let mut b = slot(reader.layout());
        let parts = reader.layout().max_slab_bytes();
        for key in [ExpertKey::new(0, 3), ExpertKey::new(1, 0)] {
            let err =
                read_one(&reader, key, SlotBuffers::packed(&mut b, parts).unwrap()).unwrap_err();
            assert!(matches!(err, ExpertIoError::NoSuchExpert { .. }), "{err}");
        }
        let (mut g, mut u, mut d) = (vec![0u8; 2176], vec![0u8; 2175], vec![0u8; 2176]);
        let err = read_one(
            &reader,
            ExpertKey::new(0, 0),
            SlotBuffers::new(&mut g, &mut u, &mut d),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "layer 0 expert 0: the up buffer holds 2175 bytes, its slab of blk.0.ffn_up_exps.weight needs 2176");
        assert!(SlotBuffers::packed(&mut b[1..], parts).is_none());
        assert!(SlotBuffers::packed(&mut b, [u64::MAX, 1, 1]).is_none());
    }

    #[test]
    fn a_truncated_file_is_a_short_read_naming_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = q8_model(dir.path());
        let reader = {
            let model = Model::open(&path).unwrap();
            ExpertReader::open(
                &model,
                ReadOptions {
                    threads: 4,
                    split_bytes: 0,
                    drop_cache: false,
                    direct: true,
                },
            )
            .unwrap()
        };
        let down = reader.layout().layer(0).unwrap().parts[2].clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(down.slab_offset(1) + 10)
            .unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..3).map(|_| slot(reader.layout())).collect();
        let parts = reader.layout().max_slab_bytes();
        let jobs = bufs
            .iter_mut()
            .enumerate()
            .map(|(e, b)| ReadJob {
                key: ExpertKey::new(0, e as u32),
                dest: SlotBuffers::packed(b, parts).unwrap(),
            })
            .collect();
        let err = reader.read(jobs).unwrap_err();
        match &err {
            ExpertIoError::ShortRead {
                path: p,
                tensor,
                key,
                offset,
                len,
            } => {
                assert_eq!(p, &path);
                assert_eq!(tensor, "blk.0.ffn_down_exps.weight");
                assert_eq!(
                    (*key, *offset, *len),
                    (ExpertKey::new(0, 1), down.slab_offset(1), 2176)
                );
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string()
                .contains("m.gguf: short read of blk.0.ffn_down_exps.weight for layer 0 expert 1"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_expert_tensors_are_layout_errors() {
        let cases: [(Tensors, &str); 3] = [
            (
                &[
                    ("ffn_gate_exps", vec![4, 3, 2]),
                    ("ffn_up_exps", vec![4, 3, 2]),
                ],
                "blk.0.ffn_down_exps.weight: is missing",
            ),
            (
                &[
                    ("ffn_gate_exps", vec![4, 3, 2]),
                    ("ffn_up_exps", vec![4, 3, 3]),
                    ("ffn_down_exps", vec![3, 4, 2]),
                ],
                "blk.0.ffn_up_exps.weight: has 3 experts",
            ),
            (
                &[
                    ("ffn_gate_exps", vec![4, 6]),
                    ("ffn_up_exps", vec![4, 3, 2]),
                    ("ffn_down_exps", vec![3, 4, 2]),
                ],
                "blk.0.ffn_gate_exps.weight: has shape [4, 6]",
            ),
        ];
        for (tensors, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let model = Model::open(write_model(dir.path(), tensors, GgmlType::F32)).unwrap();
            let err = ExpertLayout::from_model(&model).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn slot_jobs_cut_slot_tensors_and_packed_pools() {
        let dir = tempfile::tempdir().unwrap();
        let model = Model::open(q8_model(dir.path())).unwrap();
        let reader = ExpertReader::open(&model, ReadOptions::default()).unwrap();
        let layout = reader.layout();
        let parts = layout.max_slab_bytes();
        let load = |e, slot| Load {
            key: ExpertKey::new(0, e),
            slot,
            evicted: None,
        };
        let loads = [load(2, 3), load(0, 1)];
        // Separate slot tensors of 4 slots.
        let mut t: Vec<Vec<u8>> = parts.iter().map(|&b| vec![0; 4 * b as usize]).collect();
        let [g, u, d] = &mut t[..] else {
            unreachable!()
        };
        reader
            .read(slot_jobs(&loads, [g, u, d], parts).unwrap())
            .unwrap();
        for l in &loads {
            let slab = |i: usize| &t[i][l.slot as usize * parts[i] as usize..][..parts[i] as usize];
            verify_slot(&model, layout, l.key, [slab(0), slab(1), slab(2)]).unwrap();
        }
        // A packed pool of 4 slots.
        let stride = layout.slot_bytes() as usize;
        let mut pool = vec![0u8; 4 * stride];
        reader
            .read(packed_slot_jobs(&loads, &mut pool, parts).unwrap())
            .unwrap();
        for l in &loads {
            let b = &pool[l.slot as usize * stride..][..stride];
            let (g, rest) = b.split_at(parts[0] as usize);
            let (u, d) = rest.split_at(parts[1] as usize);
            verify_slot(&model, layout, l.key, [g, u, d]).unwrap();
        }
        // A slot past the pool, or twice in one batch: errors, not panics.
        let err = packed_slot_jobs(&[load(0, 4)], &mut pool, parts).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("layer 0 expert 0: cannot read into slot 4: the buffer holds 4 slots of {stride} bytes")
        );
        let twice = [load(0, 2), load(1, 2)];
        assert!(matches!(
            packed_slot_jobs(&twice, &mut pool, parts),
            Err(ExpertIoError::Slot { slot: 2, .. })
        ));
        let [g, u, d] = &mut t[..] else {
            unreachable!()
        };
        assert!(slot_jobs(&twice, [g, u, d], parts).is_err());
        let [g, u, d] = &mut t[..] else {
            unreachable!()
        };
        assert!(slot_jobs(&loads, [g, u, d], [parts[0], parts[1], 0]).is_err());
        assert!(packed_slot_jobs(&loads, &mut pool, [u64::MAX, 1, 1]).is_err());
    }
}
