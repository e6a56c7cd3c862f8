//! The demo vocabulary.

use gguf::{Array, Value, Writer};

use crate::model::names::key;

/// ferrite's demo vocabulary: byte-level BPE in GPT-2's byte-to-unicode alphabet with DeepSeek V4's pre-tokenizer
/// (`deepseek-v3`), a few English merges, DeepSeek's special tokens, padded with placeholders to `n_vocab`.
///
/// Layout: 0 BOS, 1 EOS, 2..258 the 256 byte tokens (in byte order), then one token per merge, then `<｜User｜>`,
/// `<｜Assistant｜>`, `<think>`, `</think>`, then `<｜place▁holder▁no▁K｜>` up to `n_vocab`.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoVocab {
    pub tokens: Vec<String>,
    /// llama.cpp token types: 1 normal, 3 control, 4 user-defined.
    pub token_types: Vec<i32>,
    /// `"left right"` pairs in rank order.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub user: u32,
    pub assistant: u32,
    pub think: u32,
    pub think_end: u32,
}

pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";
pub const USER_TEXT: &str = "<｜User｜>";
pub const ASSISTANT_TEXT: &str = "<｜Assistant｜>";
pub const THINK_TEXT: &str = "<think>";
pub const THINK_END_TEXT: &str = "</think>";

/// llama.cpp's `llama_token_type` values used here.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Common English pairs, in the GPT-2 alphabet (`Ġ` is a space), in rank order. Each result is a token, and every
/// pair's parts are bytes or results of earlier merges.
pub(super) const DEMO_MERGES: &[&str] = &[
    "Ġ t", "h e", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "Ġ w", "Ġ o", "Ġ c", "Ġ b",
    "Ġ f", "Ġ m", "Ġ p", "e n", "o u", "a t", "i s", "o r", "e s", "i t", "a r", "n d", "l l",
    "Ġt he", "in g", "Ġ i", "Ġ h", "e d", "Ġo f", "Ġa nd", "Ġt o", "Ġi n", "Ġi s", "Ġ d", "Ġ l",
    "Ġw he", "o w",
];

impl DemoVocab {
    /// Tokens before padding: 2 + 256 + merges + 4 added tokens.
    pub fn base_len() -> usize {
        2 + 256 + DEMO_MERGES.len() + 4
    }

    /// The vocabulary padded to `n_vocab` entries (at least [`DemoVocab::base_len`]; fewer gives the base only).
    pub fn new(n_vocab: u32) -> DemoVocab {
        let mut tokens = vec![BOS_TEXT.to_string(), EOS_TEXT.to_string()];
        let mut token_types = vec![TOKEN_CONTROL, TOKEN_CONTROL];
        tokens.extend(gpt2_byte_chars().iter().map(|c| c.to_string()));
        token_types.resize(tokens.len(), TOKEN_NORMAL);
        let mut merges = Vec::with_capacity(DEMO_MERGES.len());
        for merge in DEMO_MERGES {
            merges.push(merge.to_string());
            tokens.push(merge.replace(' ', ""));
            token_types.push(TOKEN_NORMAL);
        }
        let first_added = tokens.len() as u32;
        for (text, ty) in [
            (USER_TEXT, TOKEN_CONTROL),
            (ASSISTANT_TEXT, TOKEN_CONTROL),
            (THINK_TEXT, TOKEN_USER_DEFINED),
            (THINK_END_TEXT, TOKEN_USER_DEFINED),
        ] {
            tokens.push(text.into());
            token_types.push(ty);
        }
        let mut k = 0;
        while tokens.len() < n_vocab as usize {
            tokens.push(format!("<｜place▁holder▁no▁{k}｜>"));
            token_types.push(TOKEN_CONTROL);
            k += 1;
        }
        DemoVocab {
            tokens,
            token_types,
            merges,
            bos: 0,
            eos: 1,
            user: first_added,
            assistant: first_added + 1,
            think: first_added + 2,
            think_end: first_added + 3,
        }
    }

    pub(super) fn write_metadata(self, w: &mut Writer) {
        w.set(key::TOKENIZER_MODEL, Value::String("gpt2".into()));
        w.set(key::TOKENIZER_PRE, Value::String("deepseek-v3".into()));
        w.set(
            key::TOKENIZER_TOKENS,
            Value::Array(Array::String(self.tokens)),
        );
        w.set(
            key::TOKENIZER_TOKEN_TYPE,
            Value::Array(Array::I32(self.token_types)),
        );
        w.set(
            key::TOKENIZER_MERGES,
            Value::Array(Array::String(self.merges)),
        );
        w.set(key::TOKENIZER_BOS, Value::U32(self.bos));
        w.set(key::TOKENIZER_EOS, Value::U32(self.eos));
        w.set(key::TOKENIZER_ADD_BOS, Value::Bool(false));
        w.set(key::TOKENIZER_ADD_EOS, Value::Bool(false));
    }
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the other 68 to U+0100.. in byte order.
pub fn gpt2_byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("code points below 0x200 are valid");
    }
    table
}
