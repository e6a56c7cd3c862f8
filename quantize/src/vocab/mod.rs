//! The tokenizer of a Hugging Face DeepSeek V4 checkpoint folder as GGUF metadata, laid out as llama.cpp's converter
//! writes it (`convert_hf_to_gguf.py`: `TextModel.get_vocab_base`, `_set_vocab_gpt2`, and `gguf.SpecialVocab` of the
//! `gguf` Python package), plus the chat template.
//!
//! `tests/py/vocab_gguf.py` reimplements the converter's vocabulary rules in Python and is the reference this module
//! is checked against (tests/quantize_vocab.rs):
//!
//! * tokens by id: `model.vocab` of tokenizer.json, then `added_tokens` (which win on a shared id); ids without a token
//!   become `"[PAD<i>]"` of type UNUSED, up to config.json's `vocab_size` when given (it must exceed every id);
//! * token types: NORMAL for the BPE vocabulary; an added token is CONTROL when marked `special` or when it looks
//!   special (`<|…|>`, `<｜…｜>`, `<pad>`, `<mask>`, `<2mass>`, `[@BOS@]`, `<unused…>`), else USER_DEFINED with U+2581
//!   written as a space;
//! * merges: `model.merges` as `"a b"` strings, or `[["a", "b"], …]` pairs joined with a space (a space inside a pair's
//!   part written as U+0120, as `SpecialVocab` does); `merges.txt` when tokenizer.json has none;
//! * special token ids (`SpecialVocab`): tokenizer_config.json's `bos_token`, `eos_token`, `unk_token`, `sep_token`,
//!   `pad_token`, `cls_token`, `mask_token` (a string or an `{"content": …}` object) looked up among tokenizer.json's
//!   added tokens; the `post_processor`'s `RobertaProcessing` / `TemplateProcessing` rules for `add_bos_token`,
//!   `add_eos_token`, `add_sep_token` and the EOS/EOT override; tokenizer_config.json's `add_*_token` flags; then
//!   config.json's `*_token_id` (or `text_config.*_token_id`) for types still unset. Ids outside the vocabulary are
//!   skipped. The converter has no GGUF key for `cls`.
//! * chat template: tokenizer_config.json's `chat_template` (a string, or a list of named templates), else
//!   chat_template.jinja (with additional_chat_templates/*.jinja) or chat_template.json, as `SpecialVocab` reads them
//!   (only when tokenizer_config.json exists and is not empty, as there); when none of them gives a default template,
//!   [`DEEPSEEK_V4_CHAT_TEMPLATE`] (the DeepSeek V4 release has no Jinja template).
//!
//! Not done, as in `vocab_gguf.py`: the converter's `decode(encode(token))` round trip of added tokens that are not
//! `normalized` (the identity for DeepSeek V4's tokenizer.json, which has no normalizer), and its hash-based choice of
//! `tokenizer.ggml.pre` (always `"deepseek-v3"` here; DSV4.md section 6).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use gguf::{Array, Value};
use serde_json::Value as Json;

mod special;
#[cfg(test)]
mod tests;
mod tokenizer;

use special::{ChatTemplates, Specials};
use tokenizer::{added_tokens, bpe_model, merges_txt, model_merges, model_vocab, vocabulary};

/// ferrite's own Jinja chat template for DeepSeek V4 (used when tokenizer_config.json has no chat_template).
pub const DEEPSEEK_V4_CHAT_TEMPLATE: &str = include_str!("../deepseek_v4_chat_template.jinja");

/// The most token ids accepted (ids and `vocab_size` above it are rejected rather than allocated). The largest real
/// vocabularies have a few hundred thousand entries.
pub const MAX_TOKENS: usize = 1 << 24;

const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
const CONFIG_JSON: &str = "config.json";
const MERGES_TXT: &str = "merges.txt";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const CHAT_TEMPLATE_JSON: &str = "chat_template.json";
const ADDITIONAL_CHAT_TEMPLATES: &str = "additional_chat_templates";

// llama.cpp's `llama_token_type` values (gguf.TokenType).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_CHAT_TEMPLATES: &str = "tokenizer.chat_templates";

/// The special token types `SpecialVocab` reads, in its order (`eot` / `eom` are added by the EOS override).
const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// The GGUF key of a special token id type (`SpecialVocab.add_to_gguf`'s `add_<type>_token_id` handlers).
fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

/// The GGUF key of an `add_<type>_token` flag (`add_add_<type>_token` handlers).
fn add_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.add_bos_token",
        "eos" => "tokenizer.ggml.add_eos_token",
        "sep" => "tokenizer.ggml.add_sep_token",
        _ => return None,
    })
}

/// What can be wrong with a checkpoint folder's tokenizer files. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("{}: missing; expected the checkpoint's Hugging Face fast tokenizer ({TOKENIZER_JSON})", path.display())]
    MissingTokenizer { path: PathBuf },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: not valid UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "{}: the highest token id is {max_id}, but config.json's vocab_size is {vocab_size}; expected a vocab_size \
         above every token id",
        path.display()
    )]
    VocabSizeTooSmall {
        path: PathBuf,
        vocab_size: u32,
        max_id: u64,
    },
}

fn invalid(path: &Path, detail: impl Into<String>) -> VocabError {
    VocabError::Invalid {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// The tokenizer of a Hugging Face DeepSeek V4 folder as GGUF metadata (llama.cpp's converter's layout).
#[derive(Clone)]
pub struct HfVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    /// `(type, id)` in the order `SpecialVocab` sets them.
    special_ids: Vec<(&'static str, u32)>,
    /// `(type, flag)` in the order `SpecialVocab` sets them.
    add_flags: Vec<(&'static str, bool)>,
    /// The default chat template (the folder's, else [`DEEPSEEK_V4_CHAT_TEMPLATE`]).
    chat_template: String,
    /// Named templates besides the default (`tokenizer.chat_template.<name>`), by sanitised name.
    named_templates: BTreeMap<String, String>,
}

impl fmt::Debug for HfVocab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfVocab")
            .field("n_tokens", &self.tokens.len())
            .field("n_merges", &self.merges.len())
            .field("special_ids", &self.special_ids)
            .field("add_flags", &self.add_flags)
            .field("chat_template_bytes", &self.chat_template.len())
            .field("named_templates", &self.named_templates.keys())
            .finish()
    }
}

impl HfVocab {
    /// Reads DIR/tokenizer.json and DIR/tokenizer_config.json (the latter optional); `vocab_size` is config.json's
    /// vocab_size (ids above the tokenizer's get `"[PAD<i>]"` UNUSED entries like the converter; fewer -> error).
    pub fn read(dir: &Path, vocab_size: Option<u32>) -> Result<HfVocab, VocabError> {
        let tokenizer_path = dir.join(TOKENIZER_JSON);
        if !tokenizer_path.is_file() {
            return Err(VocabError::MissingTokenizer {
                path: tokenizer_path,
            });
        }
        let tokenizer = read_json(&tokenizer_path)?;
        let tokenizer = tokenizer
            .as_object()
            .ok_or_else(|| invalid(&tokenizer_path, "expected a JSON object at the top level"))?;
        let model = bpe_model(tokenizer, &tokenizer_path)?;
        let vocab = model_vocab(model, &tokenizer_path)?;
        let added = added_tokens(tokenizer, &tokenizer_path)?;
        let (tokens, types) = vocabulary(&vocab, &added, vocab_size, &tokenizer_path)?;
        let mut merges = model_merges(model, &tokenizer_path)?;
        if merges.is_empty() {
            merges = merges_txt(&dir.join(MERGES_TXT))?;
        }

        let config_path = dir.join(TOKENIZER_CONFIG_JSON);
        let config = match read_optional_json(&config_path)? {
            None => None,
            Some(Json::Object(map)) => Some(map),
            Some(_) => {
                return Err(invalid(
                    &config_path,
                    "expected a JSON object at the top level",
                ))
            }
        };
        // `SpecialVocab` treats an empty tokenizer_config.json as a missing one.
        let config = config.filter(|map| !map.is_empty());
        let mut specials = Specials::new(tokens.len());
        let chat = specials.load_tokenizer_config(tokenizer, &added, config, dir)?;
        let model_config_path = dir.join(CONFIG_JSON);
        if let Some(model_config) = read_optional_json(&model_config_path)? {
            specials.load_model_config(&model_config, &model_config_path)?;
        }

        let (chat_template, named_templates) = match chat {
            Some(ChatTemplates { default, named }) => (
                default.unwrap_or_else(|| DEEPSEEK_V4_CHAT_TEMPLATE.to_string()),
                named,
            ),
            None => (DEEPSEEK_V4_CHAT_TEMPLATE.to_string(), BTreeMap::new()),
        };
        Ok(HfVocab {
            tokens,
            types,
            merges,
            special_ids: specials.ids,
            add_flags: specials.add,
            chat_template,
            named_templates,
        })
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Every tokenizer.* key (and only those) in GGUF types: tokenizer.ggml.model "gpt2", tokenizer.ggml.pre
    /// "deepseek-v3", tokens (string array), token_type (i32 array), merges (string array "a b"),
    /// bos_token_id / eos_token_id / padding_token_id (u32, where known), add_bos_token / add_eos_token (bool),
    /// tokenizer.chat_template (string).
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let mut md: Vec<(String, Value)> = vec![
            (KEY_MODEL.into(), Value::String("gpt2".into())),
            (KEY_PRE.into(), Value::String("deepseek-v3".into())),
            (
                KEY_TOKENS.into(),
                Value::string_array(self.tokens.iter().cloned()),
            ),
            (
                KEY_TOKEN_TYPE.into(),
                Value::Array(Array::I32(self.types.clone())),
            ),
        ];
        if !self.merges.is_empty() {
            md.push((
                KEY_MERGES.into(),
                Value::string_array(self.merges.iter().cloned()),
            ));
        }
        for &(typ, id) in &self.special_ids {
            if let Some(key) = id_key(typ) {
                md.push((key.into(), Value::U32(id)));
            }
        }
        for &(typ, flag) in &self.add_flags {
            if let Some(key) = add_key(typ) {
                md.push((key.into(), Value::Bool(flag)));
            }
        }
        for (name, template) in &self.named_templates {
            md.push((
                format!("{KEY_CHAT_TEMPLATE}.{name}"),
                Value::String(template.clone()),
            ));
        }
        if !self.named_templates.is_empty() {
            md.push((
                KEY_CHAT_TEMPLATES.into(),
                Value::string_array(self.named_templates.keys().cloned()),
            ));
        }
        md.push((
            KEY_CHAT_TEMPLATE.into(),
            Value::String(self.chat_template.clone()),
        ));
        md
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Files.

fn read_file(path: &Path) -> Result<Vec<u8>, VocabError> {
    fs::read(path).map_err(|source| VocabError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, VocabError> {
    String::from_utf8(read_file(path)?).map_err(|_| VocabError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

fn read_json(path: &Path) -> Result<Json, VocabError> {
    serde_json::from_slice(&read_file(path)?).map_err(|source| VocabError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The file's JSON, or `None` when there is no such file (as the converter's `is_file()` checks).
fn read_optional_json(path: &Path) -> Result<Option<Json>, VocabError> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A short rendering of a JSON value for messages.
fn show(v: &Json) -> String {
    let text = v.to_string();
    if text.chars().count() > 60 {
        let cut: String = text.chars().take(57).collect();
        format!("{cut}...")
    } else {
        text
    }
}
