//! ggml binding: the only module with FFI `unsafe`. Contexts, tensors, operators, graphs, the CPU backend,
//! zero-copy mapped weights, quantization and the device list, behind a safe API whose errors
//! replace ggml's aborts.
//!
//! Ownership: a [`Context`] holds tensor metadata and owns the buffers (and mapped regions) its tensors' data live
//! in; a [`Tensor`] is a `Copy` handle borrowing its context; a [`Graph`] borrows every context it reaches. So no
//! handle can outlive the memory it points to. Shapes are in ggml order `{ne0, ne1, ne2, ne3}`, `ne0` fastest.

mod backend;
mod context;
mod devices;
mod dsv4;
mod error;
mod gallocr;
mod graph;
mod grouped;
mod isa;
mod log;
pub mod modules;
mod ops;
mod owned;
mod pool;
mod quant;
mod region;
mod repack;
pub mod rpc;
mod sched;
mod shape;
mod tensor;
#[cfg(test)]
mod testutil;
mod types;

pub use backend::CpuBackend;
pub use context::{context_mem_size, Context};
pub use devices::{
    backend_names, devices, Device, DeviceBackend, DeviceInfo, DeviceKind, PinnedHost,
};
pub use dsv4::{RopeMode, RopeParams};
pub use error::{GgmlError, Result};
pub use gallocr::GraphAllocator;
pub use graph::{Graph, DEFAULT_GRAPH_SIZE};
pub use grouped::{GroupedKernel, GroupedRows};
pub use isa::{cpu_features, dot_lane_rows, repack_layout, CpuFeatures, RepackLayout};
pub use log::capture as capture_log;
pub use ops::SortOrder;
pub use owned::{BuildScope, OwnedGraph};
pub use pool::{SlotPart, SlotPool};
pub use quant::{can_quantize_to, dequantize_rows, quantize_rows, requires_imatrix, GgmlCodec};
pub use region::{RegionId, BIND_ALIGNMENT, REGION_ALIGNMENT};
pub use repack::{RepackType, RepackWeight, RepackedStats, WeightOp};
pub use sched::Scheduler;
pub use tensor::{Tensor, MAX_NAME_LEN};
pub use types::{
    block_size, cpu_vec_dot_type, from_ggml, has_to_float, row_size, to_ggml, type_name, type_size,
    TYPE_COUNT,
};
