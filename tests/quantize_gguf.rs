//! `ferrite quantize` on GGUF inputs (requantization): every recipe's output loads in llama.cpp and runs like
//! ferrite on it; blocks are byte-identical to ggml's quantizer and to llama.cpp's own `llama_model_quantize`;
//! `--dry-run` sizes equal the written files; split outputs load; bad inputs fail cleanly without output.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferrite::ggml::{dequantize_rows, quantize_rows};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::reference::llama::llama_quantize;
use gguf::{GgmlType, GgufFile, Model};
use support::compare::{prompt, relative_errors};
use support::quantize::{assert_same_model, ferrite_logits, llama_logits, quantize, quantize_ok};

const BIN: &str = env!("CARGO_BIN_EXE_ferrite");
/// `ferrite quantize ARGS` with this file's thread count.
fn quantize_args(args: &[&str]) -> Output {
    quantize(args, THREADS)
}

const THREADS: usize = 1;
const N_TOKENS: usize = 200;

/// The F32 tiny model with experts 256 wide, so the K-quants fit without fallbacks.
fn f32_model(dir: &Path) -> PathBuf {
    let path = dir.join("f32.gguf");
    let cfg = TinyConfig {
        expert_ffn: 256,
        ..TinyConfig::small()
    };
    write_tiny_model(&path, &cfg, 3).unwrap();
    path
}

fn tensor_type(file: &GgufFile, name: &str) -> GgmlType {
    file.header()
        .tensor(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .ty
}

#[test]
fn every_recipe_loads_in_llama_and_runs_like_ferrite() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let tokens = prompt(N_TOKENS, 1024, 17);
    let original = ferrite_logits(&src, &tokens);
    for (recipe, experts, dense, file_type) in [
        ("Q4_K_M", GgmlType::Q4K, GgmlType::Q8_0, 15),
        ("Q8_0", GgmlType::Q8_0, GgmlType::Q8_0, 7),
        ("Q2_K", GgmlType::Q2K, GgmlType::Q8_0, 10),
        ("MXFP4", GgmlType::Mxfp4, GgmlType::Q8_0, 38),
        ("F16", GgmlType::F16, GgmlType::F16, 1),
    ] {
        let out = dir.path().join(format!("{recipe}.gguf"));
        quantize_ok(&src, &out, recipe, &[], THREADS);
        let f = GgufFile::open(&out).unwrap();
        assert_eq!(
            f.metadata().u32("general.file_type").unwrap(),
            file_type,
            "{recipe}"
        );
        assert_eq!(f.metadata().u32("general.quantization_version").unwrap(), 2);
        assert_eq!(
            tensor_type(&f, "blk.3.ffn_down_exps.weight"),
            experts,
            "{recipe}"
        );
        assert_eq!(
            tensor_type(&f, "blk.3.ffn_gate_exps.weight"),
            experts,
            "{recipe}"
        );
        assert_eq!(tensor_type(&f, "blk.3.attn_q_b.weight"), dense, "{recipe}");
        assert_eq!(
            tensor_type(&f, "blk.3.ffn_up_shexp.weight"),
            dense,
            "{recipe}"
        );
        assert_eq!(tensor_type(&f, "token_embd.weight"), dense, "{recipe}");
        for keep in [
            "blk.3.attn_norm.weight",
            "blk.3.ffn_gate_inp.weight",
            "blk.3.hc_attn_fn.weight",
            "blk.3.attn_sinks.weight",
        ] {
            assert_eq!(tensor_type(&f, keep), GgmlType::F32, "{recipe} {keep}");
        }
        assert_eq!(
            tensor_type(&f, "blk.0.ffn_gate_tid2eid.weight"),
            GgmlType::I32
        );
        // Every other key is carried over unchanged.
        let before = GgufFile::open(&src).unwrap();
        for (k, v) in before.metadata().iter() {
            if k != "general.file_type" {
                assert_eq!(f.metadata().get(k), Some(v), "{recipe}: key {k}");
            }
        }

        let ours = ferrite_logits(&out, &tokens);
        assert_same_model(recipe, &ours, &llama_logits(&out, &tokens));
        // Quantization moved the logits, but the model is still the same model.
        let errs = relative_errors(&ours, &original);
        let worst = errs.iter().fold(0f32, |m, &e| m.max(e));
        eprintln!("{recipe}: worst relative error against F32 {worst:.2e}");
        if recipe != "F16" {
            assert!(
                worst > 1e-6,
                "{recipe}: logits identical to F32: was anything quantized?"
            );
        }
    }
}

/// Tensor bytes of a file, by name.
fn data<'a>(m: &'a Model, name: &str) -> (&'a [u8], GgmlType, Vec<u64>) {
    let t = m.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
    (m.tensor_data(t), t.info.ty, t.info.dims.clone())
}

#[test]
fn blocks_equal_ggml_and_llama_quantize() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let source = Model::open(&src).unwrap();

    // Q8_0: ferrite's recipe vs llama_model_quantize's MOSTLY_Q8_0 (7), and vs ggml's quantizer on the whole tensor.
    let ours_path = dir.path().join("ours-q8.gguf");
    quantize_ok(&src, &ours_path, "Q8_0", &[], THREADS);
    let llama_path = dir.path().join("llama-q8.gguf");
    llama_quantize(&src, &llama_path, 7, 1, false, &[]).unwrap();
    // Q4_K pure (every quantizable tensor Q4_K): ferrite's Q4_K_M experts must equal llama.cpp's.
    let ours_q4 = dir.path().join("ours-q4.gguf");
    quantize_ok(&src, &ours_q4, "Q4_K_M", &[], THREADS);
    let llama_q4 = dir.path().join("llama-q4.gguf");
    llama_quantize(&src, &llama_q4, 15, 1, true, &[]).unwrap();

    // Q8_0: every 2-D weight but the router and hyper-connection mixers (which ferrite keeps F32); Q4_K: the
    // 6 x 3 expert tensors.
    for (ours, theirs, at_least) in [(&ours_path, &llama_path, 80), (&ours_q4, &llama_q4, 18)] {
        let ours = Model::open(ours).unwrap();
        let theirs = Model::open(theirs).unwrap();
        let mut same_type = 0;
        for t in ours.tensors() {
            let name = &t.info.name;
            let (a, ty, dims) = data(&ours, name);
            let (b, ty_l, _) = data(&theirs, name);
            if ty != ty_l || !ty.is_quantized() {
                continue;
            }
            same_type += 1;
            assert!(
                a == b,
                "{name} ({ty}): bytes differ from llama_model_quantize's"
            );
            // And from ggml's quantizer over the whole source tensor (ferrite works in chunks of rows).
            let (raw, _, _) = data(&source, name);
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let whole = quantize_rows(ty, &values, dims[0] as usize, None).unwrap();
            assert!(
                a == whole.as_slice(),
                "{name}: bytes differ from one ggml_quantize_chunk call"
            );
        }
        eprintln!("{same_type} tensors of the same quantized type compared");
        assert!(same_type >= at_least, "only {same_type} tensors compared");
    }
}

#[test]
fn requantizing_a_quantized_gguf_dequantizes_with_ggml() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let q8 = dir.path().join("q8.gguf");
    quantize_ok(&src, &q8, "Q8_0", &[], THREADS);
    let q4 = dir.path().join("q4.gguf");
    quantize_ok(&q8, &q4, "Q4_K_M", &["--attention", "Q8_0"], THREADS);
    let (m8, m4) = (Model::open(&q8).unwrap(), Model::open(&q4).unwrap());
    // Experts: Q8_0 -> f32 (ggml) -> Q4_K (ggml), per expert; attention: Q8_0 copied as it is.
    let name = "blk.2.ffn_up_exps.weight";
    let (q8_bytes, _, dims) = data(&m8, name);
    let values = dequantize_rows(GgmlType::Q8_0, q8_bytes, dims[0] as usize).unwrap();
    let want = quantize_rows(GgmlType::Q4K, &values, dims[0] as usize, None).unwrap();
    assert!(data(&m4, name).0 == want.as_slice());
    assert!(data(&m4, "blk.2.attn_q_b.weight").0 == data(&m8, "blk.2.attn_q_b.weight").0);
    let tokens = prompt(N_TOKENS, 1024, 5);
    assert_same_model(
        "Q8_0 -> Q4_K_M",
        &ferrite_logits(&q4, &tokens),
        &llama_logits(&q4, &tokens),
    );
}

/// `total: N tensors, B bytes` of the dry run.
fn dry_run_total(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("total:"))
        .expect("a total line");
    line.split(", ")
        .nth(1)
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn dry_run_sizes_equal_the_written_files_split_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let out = dir.path().join("q.gguf");
    let dry = quantize_args(&[
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--type",
        "Q4_K_M",
        "--dry-run",
    ]);
    assert!(dry.status.success());
    assert!(!out.exists(), "a dry run wrote the output");
    let stdout = String::from_utf8(dry.stdout).unwrap();
    assert!(
        stdout.contains("blk.3.ffn_down_exps.weight") && stdout.contains("q4_K"),
        "{stdout}"
    );
    let planned = dry_run_total(&stdout);
    quantize_ok(&src, &out, "Q4_K_M", &[], THREADS);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), planned);

    // Shards of at most 1 MB: several files whose sizes add up to the plan; llama.cpp and ferrite load them and
    // run exactly as the single file.
    let split = dir.path().join("split.gguf");
    let args = [
        src.to_str().unwrap(),
        split.to_str().unwrap(),
        "--type",
        "Q4_K_M",
        "--split-max-size",
        "1M",
    ];
    let dry = quantize_args(&[&args[..], &["--dry-run"]].concat());
    let planned = dry_run_total(&String::from_utf8(dry.stdout).unwrap());
    quantize_ok(&src, &split, "Q4_K_M", &["--split-max-size", "1M"], THREADS);
    let shards: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("split-")
        })
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    assert_eq!(
        shards
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum::<u64>(),
        planned
    );
    let first = dir
        .path()
        .join(format!("split-00001-of-{:05}.gguf", shards.len()));
    let tokens = prompt(64, 1024, 3);
    let single = ferrite_logits(&out, &tokens);
    assert_eq!(
        ferrite_logits(&first, &tokens),
        single,
        "split vs single file"
    );
    assert_same_model(
        "split in llama.cpp",
        &llama_logits(&first, &tokens),
        &single,
    );
}

fn leftovers(dir: &Path, keep: &[&Path]) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !keep.contains(&p.as_path()))
        .collect()
}

#[test]
fn bad_inputs_and_flags_fail_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let out = dir.path().join("out.gguf");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // An existing output needs --overwrite and is left alone.
    std::fs::write(&out, b"keep me").unwrap();
    let r = quantize_args(&[&s(&src), &s(&out), "--type", "Q8_0"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    quantize_ok(&src, &out, "Q8_0", &["--overwrite"], THREADS);
    std::fs::remove_file(&out).unwrap();

    // A truncated GGUF.
    let bytes = std::fs::read(&src).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let r = quantize_args(&[&s(&cut), &s(&out), "--type", "Q8_0"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("cut.gguf"), "{err}");

    // Another architecture.
    let other = dir.path().join("other.gguf");
    let mut w = gguf::Writer::new();
    w.set("general.architecture", gguf::Value::String("llama".into()));
    w.write_file(&other, true, |_, _, _| Ok(())).unwrap();
    let r = quantize_args(&[&s(&other), &s(&out), "--type", "Q8_0"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        err.contains("\"llama\"") && err.contains("deepseek4"),
        "{err}"
    );

    // Missing input, unknown recipe, unknown type, bad size: usage errors are exit 2.
    let r = quantize_args(&[
        &s(&dir.path().join("nope.gguf")),
        &s(&out),
        "--type",
        "Q8_0",
    ]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("nope.gguf"));
    for bad in [
        vec!["--type", "Q5_X"],
        vec!["--type", "Q8_0", "--experts", "Q9_9"],
        vec!["--type", "Q8_0", "--split-max-size", "lots"],
    ] {
        let r = quantize_args(&[&[s(&src).as_str(), s(&out).as_str()][..], &bad[..]].concat());
        assert_eq!(r.status.code(), Some(2), "{bad:?}");
    }
    // A type ggml cannot put in these rows at all: experts of width 256 as Q8_K (activation-only type).
    let r = quantize_args(&[&s(&src), &s(&out), "--type", "Q8_0", "--experts", "q8_K"]);
    assert_eq!(r.status.code(), Some(2));

    // A write that fails midway (here the file-size limit, as a full disk would): a message naming the file, no
    // output, no temporary file.
    let script = format!(
        "trap '' XFSZ; ulimit -f 1024; exec {BIN} quantize {} {} --type Q8_0 -t 1",
        s(&src),
        s(&out)
    );
    let r = Command::new("sh").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("out.gguf") && err.contains("too large"),
        "{err}"
    );

    assert!(!out.exists());
    let left = leftovers(dir.path(), &[&src, &cut, &other]);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn importance_matrix_guides_the_iq_types_as_in_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let source = Model::open(&src).unwrap();
    // An importance matrix in llama.cpp's GGUF format for every 2-D and 3-D weight: in_sum2 {n_per_row, n_mat} and
    // counts {1, n_mat}; the weights are in_sum2 / counts.
    let mut w = gguf::Writer::new();
    w.set("general.type", gguf::Value::String("imatrix".into()));
    let mut weights: Vec<(String, Vec<f32>)> = Vec::new();
    let mut sums: Vec<Vec<u8>> = Vec::new();
    for t in source.tensors() {
        let dims = &t.info.dims;
        if dims.len() < 2 || t.info.ty != GgmlType::F32 {
            continue;
        }
        let (n, n_mat) = (dims[0] as usize, dims.get(2).copied().unwrap_or(1) as usize);
        let count = 4.0f32;
        let sum2: Vec<f32> = (0..n * n_mat)
            .map(|i| 0.5 + ((i * 7919) % 97) as f32)
            .collect();
        weights.push((
            t.info.name.clone(),
            sum2.iter().map(|v| v / count).collect(),
        ));
        w.add_tensor(
            &format!("{}.in_sum2", t.info.name),
            &[n as u64, n_mat as u64],
            GgmlType::F32,
        )
        .unwrap();
        w.add_tensor(
            &format!("{}.counts", t.info.name),
            &[1, n_mat as u64],
            GgmlType::F32,
        )
        .unwrap();
        sums.push(sum2.iter().flat_map(|v| v.to_le_bytes()).collect());
        sums.push(
            vec![count; n_mat]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
    }
    let imatrix = dir.path().join("imatrix.gguf");
    w.write_file(&imatrix, true, |i, _, out| out.write_all(&sums[i]))
        .unwrap();

    // Without an importance matrix IQ2_XXS falls back to Q2_K, and says so.
    let plain = dir.path().join("plain.gguf");
    let stderr = quantize_ok(&src, &plain, "IQ2_XXS", &[], THREADS);
    assert!(
        stderr.contains("importance matrix") && stderr.contains("Q2_K"),
        "{stderr}"
    );
    assert_eq!(
        tensor_type(
            &GgufFile::open(&plain).unwrap(),
            "blk.1.ffn_gate_exps.weight"
        ),
        GgmlType::Q2K
    );

    let ours = dir.path().join("iq2.gguf");
    quantize_ok(
        &src,
        &ours,
        "IQ2_XXS",
        &["--imatrix", imatrix.to_str().unwrap()],
        THREADS,
    );
    let theirs = dir.path().join("llama-iq2.gguf");
    llama_quantize(&src, &theirs, 19, 1, true, &weights).unwrap();
    let (ours, theirs) = (Model::open(&ours).unwrap(), Model::open(&theirs).unwrap());
    let mut compared = 0;
    for layer in 0..6 {
        for kind in ["ffn_gate_exps", "ffn_up_exps"] {
            let name = format!("blk.{layer}.{kind}.weight");
            let (a, ty, dims) = data(&ours, &name);
            let (b, ty_l, _) = data(&theirs, &name);
            assert_eq!((ty, ty_l), (GgmlType::Iq2Xxs, GgmlType::Iq2Xxs), "{name}");
            assert!(
                a == b,
                "{name}: IQ2_XXS bytes differ from llama_model_quantize's with the same matrix"
            );
            // And from ggml expert by expert with that expert's weights.
            let (raw, _, _) = data(&source, &name);
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let imw = &weights.iter().find(|(n, _)| *n == name).unwrap().1;
            let (n, per_expert) = (dims[0] as usize, (dims[0] * dims[1]) as usize);
            let expected: Vec<u8> = (0..dims[2] as usize)
                .flat_map(|e| {
                    quantize_rows(
                        GgmlType::Iq2Xxs,
                        &values[e * per_expert..(e + 1) * per_expert],
                        n,
                        Some(&imw[e * n..(e + 1) * n]),
                    )
                    .unwrap()
                })
                .collect();
            assert!(
                a == expected.as_slice(),
                "{name}: differs from ggml with the per-expert weights"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 12);
    // The matrix mattered: with uniform weights the same expert quantizes differently.
    let name = "blk.2.ffn_up_exps.weight";
    let (raw, _, dims) = data(&source, name);
    let n = dims[0] as usize;
    let first: Vec<f32> = raw[..n * dims[1] as usize * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let uniform = quantize_rows(GgmlType::Iq2Xxs, &first, n, Some(&vec![1.0; n])).unwrap();
    assert!(
        data(&ours, name).0[..uniform.len()] != uniform[..],
        "the importance matrix changed nothing"
    );
}

/// A copy of `src` with the tensors `edit` changes (name -> new dims and bytes; None keeps a tensor as it is).
fn edited_copy(
    src: &Path,
    out: &Path,
    edit: impl Fn(&str, &[u64], &[u8]) -> Option<(Vec<u64>, Vec<u8>)>,
) {
    let model = Model::open(src).unwrap();
    let mut w = gguf::Writer::new();
    for (k, v) in model.metadata().iter() {
        w.set(k.to_string(), v.clone());
    }
    let mut data = Vec::new();
    for t in model.tensors() {
        let bytes = model.tensor_data(t);
        let (dims, bytes) = edit(&t.info.name, &t.info.dims, bytes)
            .unwrap_or_else(|| (t.info.dims.clone(), bytes.to_vec()));
        w.add_tensor(&t.info.name, &dims, t.info.ty).unwrap();
        data.push(bytes);
    }
    w.write_file(out, true, |i, _, sink| {
        std::io::Write::write_all(sink, &data[i])
    })
    .unwrap();
}

/// Hostile tensors in a GGUF input (issue 15): a tensor with no dimensions (planning indexed its first), an empty
/// one, and expert ids beyond `expert_count` (they were copied into the output unchecked) are refused with exit 1,
/// the tensor named, and no output, with `--dry-run` too.
#[test]
fn hostile_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let out = dir.path().join("out.gguf");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "no-dims",
            "blk.0.attn_norm.weight",
            &["0 dimensions", "expected 1 to 4"],
        ),
        ("empty", "blk.1.attn_q_a.weight", &["is 0: an empty tensor"]),
        (
            "ids",
            "blk.0.ffn_gate_tid2eid.weight",
            &["expert id 100000", "expert_count"],
        ),
    ];
    for (what, tensor, want) in cases {
        let bad = dir.path().join(format!("{what}.gguf"));
        edited_copy(&src, &bad, |name, dims, bytes| {
            (name == tensor).then(|| match what {
                "no-dims" => (Vec::new(), vec![0; 4]),
                "empty" => (vec![dims[0], 0], Vec::new()),
                _ => (
                    dims.to_vec(),
                    bytes
                        .chunks(4)
                        .flat_map(|_| 100_000i32.to_le_bytes())
                        .collect(),
                ),
            })
        });
        let (bad_s, out_s) = (s(&bad), s(&out));
        for extra in [&[][..], &["--dry-run"][..]] {
            let args = [
                &[bad_s.as_str(), out_s.as_str(), "--type", "Q8_0"][..],
                extra,
            ]
            .concat();
            let r = quantize_args(&args);
            let err = String::from_utf8_lossy(&r.stderr);
            assert_eq!(r.status.code(), Some(1), "{what} {extra:?}: {err}");
            assert!(err.contains(tensor), "{what}: {err}");
            for w in want {
                assert!(err.contains(w), "{what}: wanted {w:?} in {err}");
            }
            assert!(!out.exists(), "{what}");
        }
    }
}

/// Outputs of an earlier run with another split (issue 15): the new files are written, and the old single file or
/// shards of another count, which a loader could still be given, are named in a note; none is deleted.
#[test]
fn stale_files_of_an_earlier_split_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = f32_model(dir.path());
    let out = dir.path().join("q.gguf");
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let stderr = quantize_ok(&src, &out, "Q8_0", &[], THREADS);
    assert!(!stderr.contains("earlier output"), "{stderr}");
    // Now split: q.gguf is stale.
    let stderr = quantize_ok(
        &src,
        &out,
        "Q8_0",
        &["--split-max-size", "1M", "--overwrite"],
        THREADS,
    );
    let shards: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| name(p).starts_with("q-00"))
        .collect();
    assert!(shards.len() >= 2, "{shards:?}");
    assert!(
        stderr.contains("earlier output") && stderr.contains(&name(&out)),
        "{stderr}"
    );
    assert!(out.exists());
    // Split again into fewer, larger shards: every old shard is named, the new ones are not.
    let stderr = quantize_ok(
        &src,
        &out,
        "Q8_0",
        &["--split-max-size", "4M", "--overwrite"],
        THREADS,
    );
    for old in &shards {
        assert!(
            stderr.contains(&name(old)),
            "{} not named: {stderr}",
            name(old)
        );
    }
    let note = stderr
        .lines()
        .find(|l| l.contains("earlier output"))
        .unwrap();
    let fresh = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| name(p).starts_with("q-00") && !shards.contains(p))
        .collect::<Vec<_>>();
    assert!(!fresh.is_empty());
    for new in &fresh {
        assert!(!note.contains(&name(new)), "{} named: {note}", name(new));
    }
}
