//! Shared helpers of the integration tests (the in-process llama.cpp reference is `ferrite::reference::llama`).
#![allow(dead_code)]

pub mod chat_cases;
pub mod cli;
pub mod compare;
pub mod quantize;
pub mod rpc;
