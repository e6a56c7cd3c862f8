//! GGUF keys and tensor names of DeepSeek V4: the table lives in the gguf crate, shared with the converter.

pub use gguf::deepseek4::*;
