//! tokenizer.json: vocabulary and merges.

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::{
    invalid, read_text, show, VocabError, CONTROL, MAX_TOKENS, NORMAL, UNUSED, USER_DEFINED,
};

/// An entry of tokenizer.json's `added_tokens`.
pub(super) struct AddedToken {
    pub(super) id: u64,
    pub(super) content: String,
    special: bool,
}

pub(super) fn bpe_model<'a>(
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

pub(super) fn model_vocab(
    model: &Map<String, Json>,
    path: &Path,
) -> Result<Vec<(String, u64)>, VocabError> {
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

pub(super) fn added_tokens(
    tokenizer: &Map<String, Json>,
    path: &Path,
) -> Result<Vec<AddedToken>, VocabError> {
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
pub(super) fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Tokens and token types by id (`get_vocab_base`, as `vocab_gguf.py`'s `vocabulary`).
pub(super) fn vocabulary(
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
pub(super) fn model_merges(
    model: &Map<String, Json>,
    path: &Path,
) -> Result<Vec<String>, VocabError> {
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
pub(super) fn merges_txt(path: &Path) -> Result<Vec<String>, VocabError> {
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
