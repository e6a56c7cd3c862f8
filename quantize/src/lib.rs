//! Checkpoint decoding and quantization recipes (issue 5): so far the exact decoders of the checkpoint's small
//! float formats.

pub mod fp;
