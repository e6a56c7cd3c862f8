//! References ferrite is measured and tested against, never used by the engine: llama.cpp in-process.

pub mod llama;
