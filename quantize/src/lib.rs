//! Checkpoint decoding and quantization recipes (issue 5): so far the exact decoders of the checkpoint's small
//! float formats, and a zero-copy reader of the safetensors checkpoint files and their sharded index.

pub mod dequant;
pub mod fp;
pub mod safetensors;
