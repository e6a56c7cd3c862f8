//! Checkpoint decoding and quantization recipes.
