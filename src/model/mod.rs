//! DeepSeek V4 (GGUF arch `deepseek4`): what the files hold and, later, the forward pass.

pub mod sizes;
