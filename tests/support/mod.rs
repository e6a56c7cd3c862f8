//! Shared helpers of the integration tests: the in-process llama.cpp reference.
#![allow(dead_code)]

pub mod chat_cases;
pub mod cli;
pub mod compare;
pub mod llama_ref;
pub mod quantize;
