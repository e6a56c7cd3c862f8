//! Typed errors of the GGUF reader and writer: each says what is wrong, where (byte offset, key or tensor), expected vs got.

use std::path::PathBuf;

use crate::value::ValueType;

/// Which part of a GGUF file a byte range belongs to (for truncation and count errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Header,
    MetadataKey,
    MetadataValue,
    TensorInfo,
    TensorData,
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Section::Header => "header",
            Section::MetadataKey => "metadata key",
            Section::MetadataValue => "metadata value",
            Section::TensorInfo => "tensor info",
            Section::TensorData => "tensor data",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// A format error in the file at `path` (the error itself is the source).
    #[error("{path}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },

    #[error("not a GGUF file: magic bytes are {got:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { got: Vec<u8> },

    #[error("GGUF version {got} is not supported (this reader reads versions 2 and 3){hint}")]
    UnsupportedVersion { got: u32, hint: &'static str },

    #[error("file truncated in the {section} at byte {offset}: {what} needs {needed} bytes, only {available} remain")]
    Truncated {
        section: Section,
        offset: u64,
        what: String,
        needed: u64,
        available: u64,
    },

    #[error("{what} at byte {offset} is {count}, more than the file could hold (at most {max})")]
    CountTooLarge {
        what: &'static str,
        offset: u64,
        count: u64,
        max: u64,
    },

    #[error("{what} at byte {offset} is not valid UTF-8")]
    BadUtf8 { what: &'static str, offset: u64 },

    #[error("unknown metadata value type id {id} at byte {offset} (valid ids are 0..=12)")]
    UnknownValueType { id: u32, offset: u64 },

    #[error("arrays nested deeper than {max} levels at byte {offset}")]
    NestingTooDeep { offset: u64, max: u32 },

    #[error("metadata key {key:?} appears twice (second time at byte {offset})")]
    DuplicateKey { key: String, offset: u64 },

    #[error("general.alignment is {got}; it must be a non-zero power of two")]
    BadAlignment { got: u64 },

    #[error("tensor {name:?} appears twice (second time at byte {offset})")]
    DuplicateTensor { name: String, offset: u64 },

    #[error("tensor {name:?} (info at byte {offset}) has unknown ggml type id {id}")]
    UnknownTensorType { name: String, offset: u64, id: u32 },

    #[error("tensor {name:?} (info at byte {offset}) has {got} dimensions; ggml allows 1 to 4")]
    BadDimCount { name: String, offset: u64, got: u32 },

    #[error("tensor {name:?} (info at byte {offset}) has shape {dims:?}: {why}")]
    BadShape {
        name: String,
        offset: u64,
        dims: Vec<u64>,
        why: String,
    },

    #[error("tensor {name:?} has data offset {data_offset}, not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        name: String,
        data_offset: u64,
        alignment: u64,
    },

    #[error("tensors {first:?} and {second:?} overlap: {first:?} ends at data offset {first_end}, {second:?} starts at {second_start}")]
    OverlappingTensors {
        first: String,
        second: String,
        first_end: u64,
        second_start: u64,
    },

    #[error("tensor {name:?} ends at byte {end} of the file, past its end ({file_len} bytes): truncated or corrupt file")]
    DataPastEnd {
        name: String,
        end: u64,
        file_len: u64,
    },

    #[error("metadata key {key:?} is missing")]
    MissingKey { key: String },

    #[error("metadata key {key:?} has type {got}, expected {expected}")]
    WrongType {
        key: String,
        expected: String,
        got: String,
    },

    #[error("metadata key {key:?} has value {got}, expected {expected}")]
    BadValue {
        key: String,
        expected: String,
        got: String,
    },

    #[error("tensor {name:?} not found")]
    MissingTensor { name: String },

    #[error("split model {path}: {why}")]
    Split { path: PathBuf, why: String },

    #[error("cannot write GGUF: {0}")]
    Write(String),
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.into(),
            err,
        }
    }

    /// The error itself, without the file it happened in.
    pub fn kind(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.kind(),
            other => other,
        }
    }

    /// What the user can do about it, when there is something to say.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self.kind() {
            GgufError::Truncated { .. } | GgufError::DataPastEnd { .. } | GgufError::CountTooLarge { .. } => {
                "the file is incomplete or damaged: download or convert it again, and compare its size and checksum"
            }
            GgufError::BadMagic { .. } => {
                "ferrite reads GGUF files; to convert a Hugging Face checkpoint use `ferrite quantize CHECKPOINT_DIR OUT.gguf`"
            }
            GgufError::UnknownTensorType { .. } => "the file uses a tensor type this ggml does not know: it may need a newer ferrite",
            GgufError::Split { .. } => "keep all shards of a split model in one folder with their original names",
            GgufError::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => "check the path",
            GgufError::Io { err, .. } if err.kind() == std::io::ErrorKind::StorageFull => {
                "the disk is full: free space or write the output elsewhere"
            }
            GgufError::Io { .. } | GgufError::InFile { .. } => return None,
            GgufError::MissingKey { .. } | GgufError::WrongType { .. } | GgufError::BadValue { .. } | GgufError::MissingTensor { .. } => {
                "the file was written by a converter ferrite does not know, or is damaged"
            }
            _ => "the file is damaged, or was not written by a GGUF writer",
        })
    }

    pub(crate) fn wrong_type(key: &str, expected: impl ToString, got: ValueType) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
