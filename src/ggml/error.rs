//! `GgmlError`: what can go wrong building, allocating or running ggml graphs (what, where, expected vs got).

/// A failure reported by the ggml binding instead of letting ggml abort the process.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgmlError {
    /// `ggml_init` or a backend constructor returned NULL.
    #[error("ggml: could not create {what} (out of memory?)")]
    Init { what: &'static str },
    /// The context's metadata pool cannot hold another object.
    #[error(
        "ggml context full: needs {needed} more bytes of tensor metadata, {available} left; \
         hint: create the context with a larger mem_size"
    )]
    ContextFull { needed: usize, available: usize },
    /// An operator's inputs break a rule ggml would assert on.
    #[error("ggml {op}: {detail}")]
    Op { op: &'static str, detail: String },
    /// A tensor was used with a context that does not own it.
    #[error("ggml {op}: tensor '{tensor}' does not belong to this context")]
    ForeignTensor { op: &'static str, tensor: String },
    /// A tensor has no data (not allocated in a buffer, not bound to a region).
    #[error(
        "ggml tensor '{tensor}' has no data; hint: allocate its context on a backend or bind it to a region"
    )]
    Unallocated { tensor: String },
    /// A write into a read-only (borrowed, mapped) region was refused.
    #[error("ggml tensor '{tensor}' lives in a read-only mapped region and cannot be written")]
    ReadOnly { tensor: String },
    /// A backend buffer could not be allocated.
    #[error("ggml: could not allocate {what}")]
    Alloc { what: String },
    /// A host slice does not match a tensor's size or type.
    #[error("ggml tensor '{tensor}': {detail}")]
    Data { tensor: String, detail: String },
    /// Binding a tensor into a mapped region failed a bounds or alignment check.
    #[error("ggml: cannot bind tensor '{tensor}' to a mapped region: {detail}")]
    Bind { tensor: String, detail: String },
    /// A graph cannot take more nodes.
    #[error(
        "ggml graph full: holds {size} tensors, needs {needed}; hint: create it with a larger size"
    )]
    GraphFull { size: usize, needed: usize },
    /// `ggml_backend_graph_compute` (or the check before it) failed.
    #[error("ggml graph compute failed (status {status}): {detail}")]
    Compute { status: i32, detail: String },
    /// Quantization input is invalid.
    #[error("ggml quantize to {ty}: {detail}")]
    Quantize { ty: String, detail: String },
    /// A ggml type id has no `gguf::GgmlType`.
    #[error("ggml type id {id} is unknown to ferrite")]
    UnknownType { id: u32 },
    /// A backend module (`libggml-NAME.so`) could not be loaded.
    #[error("cannot load the ggml backend module {path}: {detail}; hint: {hint}")]
    Module {
        path: String,
        detail: String,
        hint: String,
    },
    /// A tensor name is too long or contains NUL.
    #[error("ggml tensor name '{name}': {detail}")]
    Name { name: String, detail: &'static str },
}

/// Result with [`GgmlError`].
pub type Result<T, E = GgmlError> = std::result::Result<T, E>;

/// Returns `Err(GgmlError::Op)` unless `cond` holds; `detail` is only built on failure.
pub(crate) fn ensure(cond: bool, op: &'static str, detail: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(GgmlError::Op {
            op,
            detail: detail(),
        })
    }
}
