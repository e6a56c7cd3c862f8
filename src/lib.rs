//! ferrite: DeepSeek V4 on ggml. The library behind the `ferrite` binary, so integration tests and examples can use it.

pub mod cache;
pub mod chat;
pub mod engine;
pub mod exec;
pub mod experts;
pub mod generate;
pub mod ggml;
pub mod membw;
pub mod model;
pub mod npy;
pub mod os;
pub mod placement;
pub mod plan;
pub mod reference;
pub mod sampler;
pub mod session_file;
pub mod tokenizer;
pub mod units;
