//! GGUF for ferrite: a zero-copy reader over a memory map that treats every number in a file as hostile,
//! split models opened as one, the ggml tensor type table, and a writer that plans its layout before writing.
//!
//! No ggml dependency: this crate only knows the file format.

pub mod atomic;
pub mod deepseek4;
mod error;
mod file;
mod metadata;
mod reader;
mod types;
mod value;
mod writer;

pub use error::{GgufError, Result, Section};
pub use file::{
    release_pages, split_path, split_prefix, GgufFile, Model, ModelTensor, MAX_SPLITS, SPLIT_COUNT,
    SPLIT_NO, SPLIT_TENSORS_COUNT,
};
pub use metadata::Metadata;
pub use reader::{
    align_up, Header, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, MAX_NESTING,
};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use writer::{Layout, PlannedTensor, Writer};
