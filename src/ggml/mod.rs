//! ggml binding (placeholder until the binding lands).
