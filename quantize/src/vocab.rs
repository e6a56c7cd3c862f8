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
use serde_json::{Map, Value as Json};

/// ferrite's own Jinja chat template for DeepSeek V4 (used when tokenizer_config.json has no chat_template).
pub const DEEPSEEK_V4_CHAT_TEMPLATE: &str = include_str!("deepseek_v4_chat_template.jinja");

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
    /// vocab_size (ids above the tokenizer's get "[PAD<i>]" UNUSED entries like the converter; fewer -> error).
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

// ---------------------------------------------------------------------------------------------------------------
// tokenizer.json: vocabulary and merges.

/// An entry of tokenizer.json's `added_tokens`.
struct AddedToken {
    id: u64,
    content: String,
    special: bool,
}

fn bpe_model<'a>(
    tokenizer: &'a Map<String, Json>,
    path: &Path,
) -> Result<&'a Map<String, Json>, VocabError> {
    let model = match tokenizer.get("model") {
        Some(Json::Object(model)) => model,
        Some(other) => {
            return Err(invalid(
                path,
                format!(
                    "model is {}, expected the tokenizer model object",
                    show(other)
                ),
            ))
        }
        None => {
            return Err(invalid(
                path,
                "model is missing, expected the tokenizer model object",
            ))
        }
    };
    match model.get("type") {
        // Files written before the model type was serialised have none; the vocabulary and merges decide.
        None | Some(Json::Null) => Ok(model),
        Some(Json::String(t)) if t == "BPE" => Ok(model),
        Some(other) => Err(invalid(
            path,
            format!(
                "model.type is {}, expected \"BPE\" (DeepSeek V4's byte-level BPE)",
                show(other)
            ),
        )),
    }
}

/// A non-negative integer id (JSON integer), or `None`.
fn as_id(v: &Json) -> Option<u64> {
    v.as_u64()
}

fn model_vocab(model: &Map<String, Json>, path: &Path) -> Result<Vec<(String, u64)>, VocabError> {
    let vocab = match model.get("vocab") {
        Some(Json::Object(vocab)) => vocab,
        Some(other) => {
            return Err(invalid(
                path,
                format!(
                    "model.vocab is {}, expected an object of token -> id",
                    show(other)
                ),
            ))
        }
        None => {
            return Err(invalid(
                path,
                "model.vocab is missing, expected an object of token -> id",
            ))
        }
    };
    let mut out = Vec::with_capacity(vocab.len());
    for (token, id) in vocab {
        let id = as_id(id).ok_or_else(|| {
            invalid(
                path,
                format!(
                    "model.vocab[{token:?}] is {}, expected a non-negative integer id",
                    show(id)
                ),
            )
        })?;
        out.push((token.clone(), id));
    }
    Ok(out)
}

fn added_tokens(tokenizer: &Map<String, Json>, path: &Path) -> Result<Vec<AddedToken>, VocabError> {
    let list = match tokenizer.get("added_tokens") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(list)) => list,
        Some(other) => {
            return Err(invalid(
                path,
                format!("added_tokens is {}, expected an array", show(other)),
            ))
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let what = |detail: &str| invalid(path, format!("added_tokens[{i}]: {detail}"));
        let entry = entry
            .as_object()
            .ok_or_else(|| what(&format!("is {}, expected an object", show(entry))))?;
        let id = match entry.get("id") {
            Some(v) => as_id(v).ok_or_else(|| {
                what(&format!(
                    "id is {}, expected a non-negative integer",
                    show(v)
                ))
            })?,
            None => return Err(what("id is missing, expected a non-negative integer")),
        };
        let content = match entry.get("content") {
            Some(Json::String(s)) => s.clone(),
            Some(v) => return Err(what(&format!("content is {}, expected a string", show(v)))),
            None => return Err(what("content is missing, expected a string")),
        };
        let special = match entry.get("special") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(v) => {
                return Err(what(&format!(
                    "special is {}, expected true or false",
                    show(v)
                )))
            }
        };
        out.push(AddedToken {
            id,
            content,
            special,
        });
    }
    Ok(out)
}

/// `TextModel.does_token_look_special` of llama.cpp's converter.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Tokens and token types by id (`get_vocab_base`, as `vocab_gguf.py`'s `vocabulary`).
fn vocabulary(
    vocab: &[(String, u64)],
    added: &[AddedToken],
    vocab_size: Option<u32>,
    path: &Path,
) -> Result<(Vec<String>, Vec<i32>), VocabError> {
    let max_id = vocab
        .iter()
        .map(|(_, id)| *id)
        .chain(added.iter().map(|a| a.id))
        .max()
        .ok_or_else(|| invalid(path, "no tokens: model.vocab and added_tokens are empty"))?;
    if max_id >= MAX_TOKENS as u64 {
        return Err(invalid(
            path,
            format!(
                "token id {max_id} is too large: at most {} ids are supported",
                MAX_TOKENS
            ),
        ));
    }
    let n = match vocab_size {
        None => max_id as usize + 1,
        Some(size) if u64::from(size) <= max_id => {
            return Err(VocabError::VocabSizeTooSmall {
                path: path.to_path_buf(),
                vocab_size: size,
                max_id,
            })
        }
        Some(size) if size as usize > MAX_TOKENS => {
            return Err(invalid(
                path,
                format!("config.json's vocab_size {size} is too large: at most {MAX_TOKENS} ids are supported"),
            ))
        }
        Some(size) => size as usize,
    };
    // The BPE vocabulary first, then the added tokens, which take an id over (the last one listed wins).
    let mut by_id: Vec<Option<(&str, Option<bool>)>> = vec![None; n];
    for (token, id) in vocab {
        let slot = &mut by_id[*id as usize];
        if let Some((other, _)) = slot {
            let (a, b) = if *other < token.as_str() {
                (*other, token.as_str())
            } else {
                (token.as_str(), *other)
            };
            return Err(invalid(
                path,
                format!(
                    "model.vocab gives id {id} to both {a:?} and {b:?}; expected one token per id"
                ),
            ));
        }
        *slot = Some((token, None));
    }
    for a in added {
        by_id[a.id as usize] = Some((&a.content, Some(a.special)));
    }
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (i, entry) in by_id.into_iter().enumerate() {
        match entry {
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
            Some((token, None)) => {
                tokens.push(token.to_string());
                types.push(NORMAL);
            }
            Some((token, Some(special))) => {
                if special || looks_special(token) {
                    tokens.push(token.to_string());
                    types.push(CONTROL);
                } else {
                    tokens.push(token.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
            }
        }
    }
    Ok((tokens, types))
}

/// `model.merges` as `"a b"` strings (`SpecialVocab._try_load_from_tokenizer_json`).
fn model_merges(model: &Map<String, Json>, path: &Path) -> Result<Vec<String>, VocabError> {
    let list = match model.get("merges") {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(list)) => list,
        Some(other) => {
            return Err(invalid(
                path,
                format!(
                "model.merges is {}, expected an array of \"a b\" strings or [\"a\", \"b\"] pairs",
                show(other)
            ),
            ))
        }
    };
    let Some(first) = list.first() else {
        return Ok(Vec::new());
    };
    let mut merges = Vec::with_capacity(list.len());
    if first.is_string() {
        for (i, m) in list.iter().enumerate() {
            match m {
                Json::String(s) => merges.push(s.clone()),
                other => {
                    return Err(invalid(
                        path,
                        format!(
                            "model.merges[{i}] is {}, expected a string like model.merges[0]",
                            show(other)
                        ),
                    ))
                }
            }
        }
        return Ok(merges);
    }
    // The pair form (transformers 4.45 and later), which allows spaces inside the parts: the converter writes such
    // a space as U+0120, the byte-level alphabet's character for the space byte.
    let part = |s: &str| s.replace(' ', "\u{120}");
    for (i, m) in list.iter().enumerate() {
        match m.as_array().map(Vec::as_slice) {
            Some([Json::String(a), Json::String(b)]) => merges.push(format!("{} {}", part(a), part(b))),
            _ => {
                return Err(invalid(
                    path,
                    format!(
                        "model.merges[{i}] is {}, expected a pair [\"a\", \"b\"] of strings (or every merge as an \
                         \"a b\" string)",
                        show(m)
                    ),
                ))
            }
        }
    }
    Ok(merges)
}

/// merges.txt (`SpecialVocab._try_load_merges_txt`): one `a b` per line, an optional `#` first line; malformed lines
/// are skipped as the converter skips them. No file: no merges.
fn merges_txt(path: &Path) -> Result<Vec<String>, VocabError> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with('#')) {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [a, b] = parts.as_slice() {
            merges.push(format!("{a} {b}"));
        }
    }
    Ok(merges)
}

// ---------------------------------------------------------------------------------------------------------------
// Special tokens and chat templates (gguf.SpecialVocab).

/// Python truthiness of a JSON value (`None` for an absent key).
fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
    }
}

/// `entry.get('SpecialToken', {}).get('id')` of a `TemplateProcessing` template entry.
fn template_special(entry: &Json) -> Json {
    entry
        .get("SpecialToken")
        .and_then(|s| s.get("id"))
        .cloned()
        .unwrap_or(Json::Null)
}

/// `entry.get('Sequence', {}).get('id')`.
fn template_sequence(entry: &Json) -> Json {
    entry
        .get("Sequence")
        .and_then(|s| s.get("id"))
        .cloned()
        .unwrap_or(Json::Null)
}

/// The chat templates a folder gives: the default one (when any) and named others.
struct ChatTemplates {
    default: Option<String>,
    named: BTreeMap<String, String>,
}

/// The special token texts `SpecialVocab` tracks while it reads the post-processor, as raw JSON (it compares a
/// string, an `{"content": …}` object or null as they are), and the tokenizer_config.json it edits along the way.
struct ConfigTokens {
    config: Option<Map<String, Json>>,
    bos: Json,
    cls: Json,
    eos: Json,
    sep: Json,
}

impl ConfigTokens {
    /// The config's tokens; a missing BOS (EOS) falls back to the CLS (SEP) token.
    fn new(config: Option<Map<String, Json>>) -> ConfigTokens {
        let get = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .cloned()
                .unwrap_or(Json::Null)
        };
        let mut names = ConfigTokens {
            bos: get("bos_token"),
            cls: get("cls_token"),
            eos: get("eos_token"),
            sep: get("sep_token"),
            config,
        };
        if names.config.is_some() {
            if !truthy(Some(&names.bos)) && truthy(Some(&names.cls)) {
                names.bos = names.cls.clone();
                names.edit("bos_token", names.bos.clone());
            }
            if !truthy(Some(&names.eos)) && truthy(Some(&names.sep)) {
                names.eos = names.sep.clone();
                names.edit("eos_token", names.eos.clone());
            }
        }
        names
    }

    /// Sets a key of tokenizer_config.json, when there is one.
    fn edit(&mut self, key: &str, value: Json) {
        if let Some(config) = self.config.as_mut() {
            config.insert(key.to_string(), value);
        }
    }
}

/// The post-processor's processors: the list of a `Sequence`, else the post-processor itself.
fn post_processors(tokenizer: &Map<String, Json>) -> Vec<&Map<String, Json>> {
    let Some(Json::Object(post)) = tokenizer.get("post_processor") else {
        return Vec::new();
    };
    match post.get("processors") {
        Some(Json::Array(list)) => list.iter().filter_map(Json::as_object).collect(),
        Some(_) => Vec::new(),
        None => vec![post],
    }
}

struct Specials {
    types: Vec<&'static str>,
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
    n_vocab: usize,
}

impl Specials {
    fn new(n_vocab: usize) -> Specials {
        Specials {
            types: SPECIAL_TYPES.to_vec(),
            ids: Vec::new(),
            add: Vec::new(),
            n_vocab,
        }
    }

    fn set_add(&mut self, typ: &'static str, flag: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(entry) => entry.1 = flag,
            None => self.add.push((typ, flag)),
        }
    }

    /// `_set_special_token`: integers only (a JSON bool counts, as Python's bool is an int); the first id of a type
    /// wins; ids outside the vocabulary are skipped; a negative id is an error.
    fn set_id(
        &mut self,
        typ: &'static str,
        tid: &Json,
        path: &Path,
        what: &str,
    ) -> Result<(), VocabError> {
        let id: i128 = match tid {
            Json::Bool(b) => i128::from(*b),
            Json::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i128::from(i),
                (None, Some(u)) => i128::from(u),
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        if id < 0 {
            return Err(invalid(
                path,
                format!("{what} is {id}, expected a non-negative token id"),
            ));
        }
        if id < self.n_vocab as i128 && !self.ids.iter().any(|(t, _)| *t == typ) {
            // Below n_vocab <= MAX_TOKENS, so it fits.
            self.ids.push((typ, id as u32));
        }
        Ok(())
    }

    /// `_try_load_from_tokenizer_json` after the merges: the post-processor's rules, then tokenizer_config.json's
    /// special tokens, `add_*_token` flags and chat templates. Returns the templates when tokenizer_config.json is
    /// there (and not empty).
    fn load_tokenizer_config(
        &mut self,
        tokenizer: &Map<String, Json>,
        added: &[AddedToken],
        config: Option<Map<String, Json>>,
        dir: &Path,
    ) -> Result<Option<ChatTemplates>, VocabError> {
        let mut names = ConfigTokens::new(config);
        for processor in post_processors(tokenizer) {
            match processor.get("type").and_then(Json::as_str) {
                Some("RobertaProcessing") => self.roberta_processing(processor, &mut names),
                Some("TemplateProcessing") => self.template_processing(processor, &mut names),
                _ => {}
            }
        }
        let Some(config) = names.config else {
            return Ok(None);
        };
        let config_path = dir.join(TOKENIZER_CONFIG_JSON);
        let templates = chat_templates(&config, dir)?;
        for typ in self.types.clone() {
            if let Some(Json::Bool(flag)) = config.get(&format!("add_{typ}_token")) {
                self.set_add(typ, *flag);
            }
            let content = match config.get(&format!("{typ}_token")) {
                Some(Json::String(s)) => s.as_str(),
                Some(Json::Object(entry)) => match entry.get("content") {
                    Some(Json::String(s)) => s.as_str(),
                    _ => continue,
                },
                _ => continue,
            };
            // The first added token with that text (the converter does not look in the BPE vocabulary).
            if let Some(token) = added.iter().find(|a| a.content == content) {
                let what = format!("the id of {typ}_token {content:?}");
                self.set_id(typ, &Json::from(token.id), &config_path, &what)?;
            }
        }
        Ok(Some(templates))
    }

    /// `RobertaProcessing` adds BOS, EOS and SEP; its `cls` / `sep` name those tokens when the config does not.
    fn roberta_processing(&mut self, processor: &Map<String, Json>, names: &mut ConfigTokens) {
        self.set_add("bos", true);
        self.set_add("eos", true);
        self.set_add("sep", true);
        // `processor.get(key, [fallback])[0]`.
        let first_of = |key: &str, fallback: &Json| -> Json {
            match processor.get(key) {
                None => fallback.clone(),
                Some(Json::Array(a)) => a.first().cloned().unwrap_or(Json::Null),
                Some(_) => Json::Null,
            }
        };
        if names.config.is_none() {
            return;
        }
        if !truthy(Some(&names.cls)) {
            names.cls = first_of("cls", &names.bos);
            names.edit("cls_token", names.cls.clone());
        }
        if !truthy(Some(&names.sep)) {
            names.sep = first_of("sep", &names.eos);
            names.edit("sep_token", names.sep.clone());
        }
    }

    /// The converter's "crude parsing" of `TemplateProcessing`: a leading special token means `add_bos_token`
    /// (true when it is the BOS or CLS), a trailing one `add_eos_token` (a trailing token other than the EOS becomes
    /// the EOS, the old EOS the EOT, or the EOM when there is an EOT already), and the pair template's separator
    /// `add_sep_token`.
    fn template_processing(&mut self, processor: &Map<String, Json>, names: &mut ConfigTokens) {
        let list = |key: &str| -> &[Json] {
            processor
                .get(key)
                .and_then(Json::as_array)
                .map_or(&[], Vec::as_slice)
        };
        let single = list("single");
        let pair = list("pair");
        let mut first = Json::Null;
        let mut last = Json::Null;
        if let [head, .., tail] = single {
            first = template_special(head);
            if truthy(Some(&first)) {
                if names.config.is_none() {
                    names.bos = first.clone();
                }
                let is_bos = first == names.bos || first == names.cls;
                self.set_add("bos", is_bos);
            }
            last = template_special(tail);
            if truthy(Some(&last)) {
                if names.config.is_none() {
                    names.eos = last.clone();
                } else if last != names.eos {
                    if !self.types.contains(&"eot") {
                        self.types.push("eot");
                        names.edit("eot_token", names.eos.clone());
                    } else if !self.types.contains(&"eom") {
                        self.types.push("eom");
                        names.edit("eom_token", names.eos.clone());
                    }
                    names.eos = last.clone();
                    names.edit("eos_token", last.clone());
                }
                self.set_add("eos", last == names.eos);
            }
        }
        if pair.is_empty() {
            return;
        }
        // The pair template without the single template's leading and trailing tokens: `A [sep] [sep] B`.
        let start = usize::from(truthy(Some(&first)) && template_special(&pair[0]) == first);
        let stop = pair.len()
            - usize::from(truthy(Some(&last)) && template_special(&pair[pair.len() - 1]) == last);
        let Some(middle) = pair.get(start..stop) else {
            return;
        };
        let [a, inner @ .., b] = middle else {
            return;
        };
        if template_sequence(a) != "A" || template_sequence(b) != "B" || inner.is_empty() {
            return;
        }
        let is_separator =
            |entry: &Json| truthy(Some(entry)) && (*entry == names.sep || *entry == names.eos);
        let add_sep = (is_separator(&template_special(&inner[0])) && !truthy(Some(&last)))
            || (inner.len() == 2 && is_separator(&template_special(&inner[1])));
        self.set_add("sep", add_sep);
        if add_sep && !truthy(Some(&names.sep)) {
            names.edit("sep_token", names.eos.clone());
        }
    }

    /// `_try_load_from_config_json`: `<type>_token_id` (or `text_config.<type>_token_id`) for types not yet set.
    fn load_model_config(&mut self, config: &Json, path: &Path) -> Result<(), VocabError> {
        let config = config
            .as_object()
            .ok_or_else(|| invalid(path, "expected a JSON object at the top level"))?;
        for typ in self.types.clone() {
            let key = format!("{typ}_token_id");
            let mut what = key.clone();
            let mut tid = config.get(&key).cloned().unwrap_or(Json::Null);
            if tid.is_null() {
                if let Some(text) = config.get("text_config") {
                    tid = text.get(&key).cloned().unwrap_or(Json::Null);
                    what = format!("text_config.{key}");
                }
            }
            self.set_id(typ, &tid, path, &what)?;
        }
        Ok(())
    }
}

/// A template name as the GGUF writer keys it: ASCII letters and digits, anything else `_`.
fn sanitize_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The chat template(s) of tokenizer_config.json, else of chat_template.jinja or chat_template.json.
fn chat_templates(config: &Map<String, Json>, dir: &Path) -> Result<ChatTemplates, VocabError> {
    let from_config = config.get("chat_template");
    let alternative = if from_config.is_some() {
        // The converter reads the alternative files even then but uses tokenizer_config.json's key; reading them
        // only when needed keeps a broken unused file from failing the import.
        Json::Null
    } else {
        alternative_templates(dir)?
    };
    let chosen = from_config.unwrap_or(&alternative);
    let mut out = ChatTemplates {
        default: None,
        named: BTreeMap::new(),
    };
    match chosen {
        Json::String(s) => out.default = Some(s.clone()),
        Json::Array(choices) => {
            for choice in choices {
                let name = choice.get("name").and_then(Json::as_str).unwrap_or("");
                let Some(template) = choice.get("template").and_then(Json::as_str) else {
                    continue;
                };
                let name = sanitize_name(name);
                if name.is_empty() {
                    continue;
                }
                if name == "default" {
                    out.default = Some(template.to_string());
                } else {
                    out.named.insert(name, template.to_string());
                }
            }
        }
        // The converter ignores any other type (with a warning).
        _ => {}
    }
    Ok(out)
}

/// chat_template.jinja (with additional_chat_templates/*.jinja as named templates), else chat_template.json's
/// `chat_template`; `Null` when neither file is there.
fn alternative_templates(dir: &Path) -> Result<Json, VocabError> {
    let jinja = dir.join(CHAT_TEMPLATE_JINJA);
    if jinja.is_file() {
        let default = read_text(&jinja)?;
        let extra_dir = dir.join(ADDITIONAL_CHAT_TEMPLATES);
        let mut extra: Vec<(String, PathBuf)> = Vec::new();
        if extra_dir.is_dir() {
            let entries = fs::read_dir(&extra_dir).map_err(|source| VocabError::Read {
                path: extra_dir.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| VocabError::Read {
                    path: extra_dir.clone(),
                    source,
                })?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".jinja") {
                    if path.is_file() {
                        extra.push((stem.to_string(), path));
                    }
                }
            }
        }
        if extra.is_empty() {
            return Ok(Json::String(default));
        }
        extra.sort();
        let mut list = vec![serde_json::json!({"name": "default", "template": default})];
        for (name, path) in extra {
            list.push(serde_json::json!({"name": name, "template": read_text(&path)?}));
        }
        return Ok(Json::Array(list));
    }
    let json_path = dir.join(CHAT_TEMPLATE_JSON);
    match read_optional_json(&json_path)? {
        None => Ok(Json::Null),
        Some(Json::Object(map)) => Ok(map.get("chat_template").cloned().unwrap_or(Json::Null)),
        Some(_) => Err(invalid(
            &json_path,
            "expected a JSON object with a chat_template key",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
