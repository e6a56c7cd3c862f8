//! NumPy `.npy` files of little-endian float32 (format 1.0, C order): the writer behind `ferrite logits`, which
//! replaces its output atomically, and a strict reader for tests and tools.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY";
/// Magic, two version bytes and the header length: the bytes before the header dictionary in format 1.0.
const PREAMBLE_V1: usize = MAGIC.len() + 2 + 2;
/// NumPy pads the preamble plus header to a multiple of 64 bytes so the data is aligned.
const ALIGN: usize = 64;
/// Headers longer than this are not something NumPy writes; a reader refuses them (hostile input).
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {err}", path = .path.display())]
    Io { path: PathBuf, err: io::Error },
    #[error("shape {shape:?} holds {expected} values, got {got}")]
    ShapeMismatch {
        shape: Vec<usize>,
        expected: String,
        got: usize,
    },
    #[error("{path}: not a float32 .npy file: {detail}", path = .path.display())]
    Format { path: PathBuf, detail: String },
}

impl NpyError {
    fn io(path: &Path, err: io::Error) -> NpyError {
        NpyError::Io {
            path: path.to_path_buf(),
            err,
        }
    }

    fn format(path: &Path, detail: impl Into<String>) -> NpyError {
        NpyError::Format {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }
}

/// An n-dimensional float32 array in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Values a shape holds, or `None` on overflow.
fn n_values(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The complete header (magic to the `\n` that ends the padded dictionary) for `shape`.
pub fn header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Pad with spaces so that preamble + dictionary + '\n' is a multiple of ALIGN.
    let unpadded = PREAMBLE_V1 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(ALIGN) - unpadded));
    dict.push('\n');
    let mut out = Vec::with_capacity(PREAMBLE_V1 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    // Format 1.0 stores the length in a u16; shapes with that many digits do not exist in practice.
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Writes `data` (C order, `shape`) to `path` through a temporary file in the same folder renamed into place:
/// on any error, `path` is left as it was and the temporary file is removed.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    if n_values(shape) != Some(data.len()) {
        return Err(NpyError::ShapeMismatch {
            shape: shape.to_vec(),
            expected: n_values(shape).map_or("too many".into(), |n| n.to_string()),
            got: data.len(),
        });
    }
    gguf::atomic::write_atomically(
        path,
        1 << 20,
        |_, out| write_data(out, shape, data),
        |_, e| e,
    )
    .map_err(|err| NpyError::io(path, err))
}

fn write_data(out: &mut impl Write, shape: &[usize], data: &[f32]) -> io::Result<()> {
    out.write_all(&header(shape))?;
    for chunk in data.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes)?;
    }
    Ok(())
}

/// Reads a little-endian float32 C-order `.npy` file (format 1.x, 2.x or 3.x); anything else is an error.
pub fn read_f32(path: &Path) -> Result<ArrayF32, NpyError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| NpyError::io(path, e))?;
    parse_f32(&bytes).map_err(|detail| NpyError::format(path, detail))
}

/// Parses the bytes of a `.npy` file; the error says what is wrong.
pub fn parse_f32(bytes: &[u8]) -> Result<ArrayF32, String> {
    if bytes.len() < PREAMBLE_V1 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let major = bytes[MAGIC.len()];
    let (len_bytes, start) = match major {
        1 => (2, PREAMBLE_V1),
        2 | 3 => (4, PREAMBLE_V1 + 2),
        v => return Err(format!("format version {v}, expected 1, 2 or 3")),
    };
    if bytes.len() < start {
        return Err("truncated header".into());
    }
    let len_field = &bytes[MAGIC.len() + 2..MAGIC.len() + 2 + len_bytes];
    let header_len = len_field
        .iter()
        .rev()
        .fold(0usize, |n, &b| (n << 8) | b as usize);
    if header_len > MAX_HEADER {
        return Err(format!("header length {header_len} is implausible"));
    }
    let data_start = start + header_len;
    let dict = bytes
        .get(start..data_start)
        .ok_or_else(|| format!("header of {header_len} bytes runs past the end of the file"))?;
    let dict = std::str::from_utf8(dict).map_err(|_| "header is not text".to_string())?;
    let shape = parse_header(dict)?;
    let n = n_values(&shape).ok_or_else(|| format!("shape {shape:?} overflows"))?;
    let data = &bytes[data_start..];
    if Some(data.len()) != n.checked_mul(4) {
        return Err(format!(
            "shape {shape:?} needs {n} float32 values, the file has {} data bytes",
            data.len()
        ));
    }
    let data = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(ArrayF32 { shape, data })
}

/// The shape from a header dictionary, after checking it says `'<f4'` and C order.
fn parse_header(dict: &str) -> Result<Vec<usize>, String> {
    let field = |key: &str| -> Result<&str, String> {
        let at = dict
            .find(&format!("'{key}':"))
            .ok_or_else(|| format!("header has no '{key}'"))?;
        Ok(dict[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    if !descr.starts_with("'<f4'") {
        return Err(format!(
            "dtype {}, expected '<f4'",
            descr.split(',').next().unwrap_or("")
        ));
    }
    if !field("fortran_order")?.starts_with("False") {
        return Err("Fortran order, expected C order".into());
    }
    let shape = field("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(inner, _)| inner)
        .ok_or_else(|| "shape is not a tuple".to_string())?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| format!("bad dimension {s:?} in shape"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_names_the_shape() {
        for shape in [vec![], vec![7], vec![3, 1024], vec![123_456, 129_280, 2]] {
            let h = header(&shape);
            assert_eq!(h.len() % ALIGN, 0, "{shape:?}");
            assert_eq!(*h.last().unwrap(), b'\n');
            let text = String::from_utf8_lossy(&h[PREAMBLE_V1..]).into_owned();
            assert_eq!(parse_header(&text).unwrap(), shape);
        }
        let h = header(&[2, 3]);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert!(String::from_utf8_lossy(&h).contains("'shape': (2, 3), }"));
        assert!(String::from_utf8_lossy(&header(&[5])).contains("'shape': (5,), }"));
    }

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[3, 4], &data).unwrap();
        let a = read_f32(&path).unwrap();
        assert_eq!(a.shape, vec![3, 4]);
        assert_eq!(a.data, data);
        // A bad call leaves the old file and no temporary behind.
        assert!(matches!(
            write_f32(&path, &[5, 4], &data),
            Err(NpyError::ShapeMismatch { .. })
        ));
        let missing_dir = dir.path().join("no/such/dir/b.npy");
        assert!(matches!(
            write_f32(&missing_dir, &[3, 4], &data),
            Err(NpyError::Io { .. })
        ));
        assert_eq!(read_f32(&path).unwrap().data, data);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn reader_rejects_bad_files() {
        let good = {
            let mut b = header(&[2]);
            b.extend_from_slice(&[0; 8]);
            b
        };
        assert!(parse_f32(&good).is_ok());
        assert!(parse_f32(b"hello").unwrap_err().contains("magic"));
        assert!(parse_f32(&good[..good.len() - 1])
            .unwrap_err()
            .contains("data bytes"));
        let replace = |from: &[u8], to: &[u8]| {
            let at = good.windows(from.len()).position(|w| w == from).unwrap();
            let mut b = good.clone();
            b[at..at + to.len()].copy_from_slice(to);
            b
        };
        assert!(parse_f32(&replace(b"<f4", b"<f8"))
            .unwrap_err()
            .contains("dtype"));
        assert!(parse_f32(&replace(b"False", b"True "))
            .unwrap_err()
            .contains("Fortran"));
        let mut huge = good.clone();
        huge[8] = 0xff;
        huge[9] = 0xff;
        assert!(parse_f32(&huge).is_err());
    }
}
