//! `ferrite quantize` without the ggml binding: the exact decoders of the checkpoint's small float formats, a
//! zero-copy reader of safetensors checkpoints, the mapping of a Hugging Face DeepSeek V4 checkpoint onto llama.cpp's
//! `deepseek4` GGUF (metadata, tensors, tokenizer), llama.cpp's importance matrices, the named recipes, and the
//! streaming conversion pipeline (blocks are made by a [`convert::Codec`] the binary implements over ggml).

pub mod convert;
pub mod dequant;
pub mod fp;
pub mod hf;
pub mod imatrix;
pub mod recipe;
pub mod safetensors;
pub mod safetensors_write;
pub mod vocab;
