//! Special tokens and chat templates (gguf.SpecialVocab).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use super::tokenizer::AddedToken;
use super::{
    invalid, read_optional_json, read_text, VocabError, ADDITIONAL_CHAT_TEMPLATES,
    CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON, SPECIAL_TYPES, TOKENIZER_CONFIG_JSON,
};

/// Python truthiness of a JSON value (`None` for an absent key).
pub(super) fn truthy(v: Option<&Json>) -> bool {
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
pub(super) struct ChatTemplates {
    pub(super) default: Option<String>,
    pub(super) named: BTreeMap<String, String>,
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

pub(super) struct Specials {
    types: Vec<&'static str>,
    pub(super) ids: Vec<(&'static str, u32)>,
    pub(super) add: Vec<(&'static str, bool)>,
    n_vocab: usize,
}

impl Specials {
    pub(super) fn new(n_vocab: usize) -> Specials {
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
    pub(super) fn load_tokenizer_config(
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
    pub(super) fn load_model_config(
        &mut self,
        config: &Json,
        path: &Path,
    ) -> Result<(), VocabError> {
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
pub(super) fn sanitize_name(name: &str) -> String {
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
