use serde_json::Value as Json;

use super::special::{sanitize_name, truthy};
use super::tokenizer::looks_special;

#[test]
fn special_looking_tokens() {
    for t in [
        "<|im_start|>",
        "<｜User｜>",
        "<pad>",
        "<mask>",
        "<2mass>",
        "[@BOS@]",
        "<unused12>",
        "<|>",
    ] {
        assert!(looks_special(t), "{t}");
    }
    for t in ["<think>", "｜DSML｜", "<|x", "<｜User", "unused>", "<PAD>"] {
        assert!(!looks_special(t), "{t}");
    }
}

#[test]
fn python_truthiness() {
    assert!(!truthy(None));
    assert!(!truthy(Some(&Json::Null)));
    assert!(!truthy(Some(&Json::from(""))));
    assert!(!truthy(Some(&serde_json::json!({}))));
    assert!(!truthy(Some(&Json::from(0))));
    assert!(truthy(Some(&Json::from("<s>"))));
    assert!(truthy(Some(&serde_json::json!({"content": "<s>"}))));
}

#[test]
fn template_names_are_sanitized() {
    assert_eq!(sanitize_name("tool-use v2"), "tool_use_v2");
    assert_eq!(sanitize_name("rag"), "rag");
    assert_eq!(sanitize_name("é"), "_");
}
