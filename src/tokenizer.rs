//! The model's vocabulary (`tokenizer.ggml.*` in the GGUF) as a tokenizer that turns text into exactly the ids
//! llama.cpp's `llama_tokenize` gives, and ids back into bytes: byte-level BPE (a `tokenizers::Tokenizer` with
//! DeepSeek's pre-tokenizer regexes), llama.cpp's special-token rules, end-of-generation ids, and a streaming
//! detokenizer that only ever hands out complete UTF-8.
//!
//! Special tokens are split out of the text before BPE by llama.cpp's own algorithm (`tokenizer_st_partition`:
//! token by token, longest first, every occurrence; USER_DEFINED always, CONTROL only with `parse_special`), not by
//! the tokenizers crate's added-token matcher: that one takes leftmost-longest non-overlapping matches in one pass,
//! and with special tokens switched off a skipped special still hides the tokens it overlaps. Only the GGUF's
//! token types decide what is special (tokenizer.json's `special` flags differ: `<｜User｜>` is not special there).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use gguf::{GgufError, Metadata, Model};
use thiserror::Error;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::model::names::key;
use crate::model::tiny::gpt2_byte_chars;

/// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEEPSEEK3_LLM` regexes, applied in order, each splitting every piece the one
/// before left (matches and the text between them become pieces), then byte-level encoding.
const DEEPSEEK3_REGEXES: [&str; 3] = [
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// Text goes through the pre-tokenizer in chunks of about this many bytes (bounded memory, same ids).
const CHUNK_BYTES: usize = 1 << 16;

/// The longest whitespace run (in characters) the regex engine gets in one piece. Oniguruma backtracks once per
/// character of a run and gives up (panicking in the `onig` crate) past 10 million steps; longer runs are cut
/// here, so their ids are those of the pieces. llama.cpp cannot tokenize such runs at all: its `std::regex`
/// overflows the stack on runs of about ten thousand characters.
const MAX_WHITESPACE_RUN: usize = 1 << 20;

/// `tokenizer.ggml.pre` values llama.cpp maps to the DeepSeek V3 pre-tokenizer (DSV4.md section 6).
const DEEPSEEK3_PRE: [&str; 2] = ["deepseek-v3", "joyai-llm"];

/// Texts llama.cpp treats as end of generation whatever the metadata says (`llama_vocab::impl::load`), and makes
/// CONTROL tokens when the file did not.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle pad, repo and file-separator texts: llama.cpp makes them CONTROL and end of generation.
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// Fill-in-the-middle prefix, suffix and middle texts: llama.cpp makes them CONTROL (they do not end generation).
const FIM_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

/// Metadata keys of further end-of-generation ids.
const EOT_KEY: &str = "tokenizer.ggml.eot_token_id";
const EOM_KEY: &str = "tokenizer.ggml.eom_token_id";
const FIM_EOG_KEYS: [&str; 3] = [
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
];

/// llama.cpp's token attributes (`llama_token_attr`), as bit flags.
mod attr {
    pub const UNDEFINED: u8 = 0;
    pub const UNKNOWN: u8 = 1 << 0;
    pub const UNUSED: u8 = 1 << 1;
    pub const NORMAL: u8 = 1 << 2;
    pub const CONTROL: u8 = 1 << 3;
    pub const USER_DEFINED: u8 = 1 << 4;
    pub const BYTE: u8 = 1 << 5;

    /// `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`) to attributes.
    pub fn from_type(ty: i64) -> u8 {
        match ty {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => UNDEFINED,
        }
    }
}

/// Why a GGUF's vocabulary cannot be used.
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("the model has no vocabulary (tokenizer.ggml.model = {model:?}): it runs from token ids only (`ferrite logits --tokens`), it cannot read or write text")]
    NoVocabulary { model: String },
    #[error("tokenizer.ggml.model is {model:?}: ferrite reads only \"gpt2\" vocabularies (byte-level BPE, as DeepSeek V4 uses)")]
    UnsupportedModel { model: String },
    #[error("tokenizer.ggml.pre is {pre:?}: ferrite knows only DeepSeek's pre-tokenizer (\"deepseek-v3\" or \"joyai-llm\")")]
    UnsupportedPre { pre: String },
    #[error("{key}: {detail}")]
    Invalid { key: &'static str, detail: String },
    #[error("reading the vocabulary: {0}")]
    Metadata(#[from] GgufError),
    #[error("building the BPE tokenizer: {0}")]
    Build(String),
}

fn invalid(key: &'static str, detail: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        key,
        detail: detail.into(),
    }
}

/// A GGUF vocabulary ready to encode and decode. Cheap to share (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    /// Byte-level BPE with DeepSeek's pre-tokenizer and no added tokens: encodes text between special tokens.
    bpe: tokenizers::Tokenizer,
    tokens: Vec<String>,
    attrs: Vec<u8>,
    ids: HashMap<String, u32>,
    /// Bytes of every token, back to back; token `i` is `piece_bytes[piece_ends[i - 1]..piece_ends[i]]`.
    piece_bytes: Vec<u8>,
    piece_ends: Vec<usize>,
    specials: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: HashSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Reads `tokenizer.ggml.*` of `model`. Every value is checked: token types and ids in range, unique token
    /// texts, well-formed merges whose parts and results are tokens, all 256 byte tokens present.
    pub fn from_gguf(model: &Model) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_metadata(model.metadata())
    }

    /// As [`Tokenizer::from_gguf`], from the metadata alone.
    pub fn from_metadata(md: &Metadata) -> Result<Tokenizer, TokenizerError> {
        let kind = match md.get(key::TOKENIZER_MODEL) {
            None => "none".to_string(),
            Some(_) => md.str(key::TOKENIZER_MODEL)?.to_string(),
        };
        match kind.as_str() {
            "gpt2" => {}
            "none" | "no_vocab" => return Err(TokenizerError::NoVocabulary { model: kind }),
            _ => return Err(TokenizerError::UnsupportedModel { model: kind }),
        }
        let pre = match md.get(key::TOKENIZER_PRE) {
            None => "(absent)".to_string(),
            Some(_) => md.str(key::TOKENIZER_PRE)?.to_string(),
        };
        if !DEEPSEEK3_PRE.contains(&pre.as_str()) {
            return Err(TokenizerError::UnsupportedPre { pre });
        }

        let tokens = md.str_array(key::TOKENIZER_TOKENS)?.to_vec();
        if tokens.is_empty() || tokens.len() > i32::MAX as usize {
            return Err(invalid(
                key::TOKENIZER_TOKENS,
                format!("{} tokens (expected 1 to {})", tokens.len(), i32::MAX),
            ));
        }
        let ids = token_ids(&tokens)?;
        let mut attrs = token_attrs(md, tokens.len())?;
        mark_control_looking(&ids, &mut attrs);
        let merges = read_merges(md, &ids)?;
        let bos = special_id(md, key::TOKENIZER_BOS, tokens.len())?;
        let eos = special_id(md, key::TOKENIZER_EOS, tokens.len())?;
        let add_bos = optional_bool(md, key::TOKENIZER_ADD_BOS)?.unwrap_or(false);
        let add_eos = optional_bool(md, key::TOKENIZER_ADD_EOS)?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(invalid(
                key::TOKENIZER_ADD_BOS,
                "is true but the vocabulary has no tokenizer.ggml.bos_token_id",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(invalid(
                key::TOKENIZER_ADD_EOS,
                "is true but the vocabulary has no tokenizer.ggml.eos_token_id",
            ));
        }
        let eog = eog_ids(md, &ids, eos, tokens.len())?;
        let byte_of = byte_decoder();
        for (b, c) in gpt2_byte_chars().iter().enumerate() {
            if !ids.contains_key(&c.to_string()) {
                return Err(invalid(
                    key::TOKENIZER_TOKENS,
                    format!("the byte-level vocabulary lacks the token for byte 0x{b:02x} ({c:?})"),
                ));
            }
        }
        let (piece_bytes, piece_ends) = pieces(&tokens, &attrs, &byte_of);
        let bpe = build_bpe(&ids, merges)?;
        let specials = SpecialMatcher::new(&tokens, &attrs);
        Ok(Tokenizer {
            bpe,
            tokens,
            attrs,
            ids,
            piece_bytes,
            piece_ends,
            specials,
            bos,
            eos,
            add_bos,
            add_eos,
            eog,
        })
    }

    /// The ids of `text`, as `llama_tokenize(vocab, text, add_special = false, parse_special)`: never adds BOS or
    /// EOS. USER_DEFINED tokens (`<think>`, `｜DSML｜`) are always matched in the text; CONTROL tokens
    /// (`<｜User｜>`, BOS, EOS) only when `parse_special`, else their text is tokenized like any other.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        for fragment in self.specials.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(range) => self.encode_plain(&text[range], &mut ids),
            }
        }
        ids
    }

    /// Byte-level BPE of text with no special tokens in it, a chunk at a time (see [`plain_chunks`]).
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for chunk in plain_chunks(text) {
            // The pipeline has no step that can fail here: no normalizer, the Split and ByteLevel pre-tokenizers
            // always succeed, the BPE model has no unknown token to miss (every byte has a token, checked in
            // `from_metadata`), and there is no post-processor, padding or truncation.
            let encoding = self
                .bpe
                .encode_fast(chunk, false)
                .unwrap_or_else(|e| panic!("byte-level BPE failed on a checked vocabulary: {e}"));
            out.extend_from_slice(encoding.get_ids());
        }
    }

    /// The text of `ids`: their pieces (special tokens as their text) joined; invalid UTF-8 (a cut multi-byte
    /// character) becomes U+FFFD. `decode(encode(s, _)) == s` for every string.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_piece(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes of one token: byte-level tokens decoded to their bytes (possibly part of a UTF-8 character),
    /// CONTROL, USER_DEFINED and UNKNOWN tokens as their text; empty for UNUSED and undefined tokens and for ids
    /// past the vocabulary. (llama.cpp's `llama_token_to_piece` with `special = true`.)
    pub fn token_piece(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i >= self.piece_ends.len() {
            return &[];
        }
        let start = if i == 0 { 0 } else { self.piece_ends[i - 1] };
        &self.piece_bytes[start..self.piece_ends[i]]
    }

    /// The token's text as stored in the vocabulary (GPT-2 byte alphabet for byte-level tokens, e.g. `Ġthe`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the token whose vocabulary text is exactly `text` (e.g. `<｜User｜>`, `</think>`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// `tokenizer.ggml.add_bos_token` (false when absent): whether a prompt should start with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// `tokenizer.ggml.add_eos_token` (false when absent).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether `id` ends generation: EOS, EOT/EOM and fill-in-the-middle pad/repo/separator ids from the metadata,
    /// and the tokens llama.cpp recognises by text (`<｜end▁of▁sentence｜>`, `<|eot_id|>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Every end-of-generation id, ascending.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether `id` is a CONTROL token (matched in text only with `parse_special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// Whether `id` is matched as a whole in text (CONTROL and UNKNOWN with `parse_special`, USER_DEFINED always)
    /// instead of being reached through BPE merges.
    pub fn is_special(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// A streaming detokenizer over this vocabulary.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Turns ids into text one at a time, handing out only complete UTF-8: bytes of a character split over tokens
/// wait for the rest; bytes that can never be valid come out as U+FFFD. Call [`StreamDecoder::flush`] at the end.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> StreamDecoder<'t> {
        StreamDecoder {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that became complete (often empty mid-character).
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tokenizer.token_piece(id));
        let mut out = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The first `valid_up_to` bytes are valid UTF-8: this never falls back to "".
                    out.push_str(std::str::from_utf8(&self.pending[start..valid]).unwrap_or(""));
                    start = valid;
                    match e.error_len() {
                        // An incomplete character at the end: keep it for the next token.
                        None => break,
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// The bytes still held (an unfinished character), as text with U+FFFD; empties the decoder.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reading the metadata.

fn token_ids(tokens: &[String]) -> Result<HashMap<String, u32>, TokenizerError> {
    let mut ids = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() {
            return Err(invalid(
                key::TOKENIZER_TOKENS,
                format!("token {i} is empty"),
            ));
        }
        if let Some(first) = ids.insert(t.clone(), i as u32) {
            return Err(invalid(
                key::TOKENIZER_TOKENS,
                format!("tokens {first} and {i} are both {t:?} (token texts must be unique)"),
            ));
        }
    }
    Ok(ids)
}

/// Attributes from `tokenizer.ggml.token_type`; all NORMAL when the key is absent (as llama.cpp does).
fn token_attrs(md: &Metadata, n: usize) -> Result<Vec<u8>, TokenizerError> {
    if md.get(key::TOKENIZER_TOKEN_TYPE).is_none() {
        return Ok(vec![attr::NORMAL; n]);
    }
    let types = md.int_array(key::TOKENIZER_TOKEN_TYPE)?;
    if types.len() != n {
        return Err(invalid(
            key::TOKENIZER_TOKEN_TYPE,
            format!("has {} entries, expected one per token ({n})", types.len()),
        ));
    }
    Ok(types.into_iter().map(attr::from_type).collect())
}

/// llama.cpp makes tokens with end-of-turn, end-of-generation and fill-in-the-middle texts CONTROL.
fn mark_control_looking(ids: &HashMap<String, u32>, attrs: &mut [u8]) {
    for text in EOG_TEXTS.iter().chain(FIM_EOG_TEXTS).chain(FIM_TEXTS) {
        if let Some(&id) = ids.get(*text) {
            attrs[id as usize] |= attr::CONTROL;
        }
    }
}

/// `"left right"` strings split at the first space after the first byte (as llama.cpp does), in rank order.
fn read_merges(md: &Metadata, ids: &HashMap<String, u32>) -> Result<Merges, TokenizerError> {
    let list = md.str_array(key::TOKENIZER_MERGES)?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(split) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            return Err(invalid(
                key::TOKENIZER_MERGES,
                format!("merge {i} ({m:?}) is not two tokens separated by a space"),
            ));
        };
        let (left, right) = (&m[..split], &m[split + 1..]);
        for part in [left, right, &format!("{left}{right}")] {
            if !ids.contains_key(part) {
                return Err(invalid(
                    key::TOKENIZER_MERGES,
                    format!("merge {i} ({m:?}) uses or makes {part:?}, which is not a token"),
                ));
            }
        }
        merges.push((left.to_string(), right.to_string()));
    }
    Ok(merges)
}

/// A token id stored under `key`, if present, checked against the vocabulary size.
fn special_id(md: &Metadata, key: &'static str, n: usize) -> Result<Option<u32>, TokenizerError> {
    if md.get(key).is_none() {
        return Ok(None);
    }
    let id = md.uint(key)?;
    if id >= n as u64 {
        return Err(invalid(
            key,
            format!("token id {id} is past the vocabulary ({n} tokens)"),
        ));
    }
    Ok(Some(id as u32))
}

fn optional_bool(md: &Metadata, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(md.bool(key)?)),
    }
}

fn eog_ids(
    md: &Metadata,
    ids: &HashMap<String, u32>,
    eos: Option<u32>,
    n: usize,
) -> Result<HashSet<u32>, TokenizerError> {
    let mut eog: HashSet<u32> = EOG_TEXTS
        .iter()
        .chain(FIM_EOG_TEXTS)
        .filter_map(|t| ids.get(*t).copied())
        .collect();
    eog.extend(eos);
    for key in [EOT_KEY, EOM_KEY].into_iter().chain(FIM_EOG_KEYS) {
        eog.extend(special_id(md, key, n)?);
    }
    Ok(eog)
}

/// GPT-2's unicode-to-byte table (the inverse of [`gpt2_byte_chars`]).
fn byte_decoder() -> HashMap<char, u8> {
    gpt2_byte_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

/// The bytes of every token (see [`Tokenizer::token_piece`]), back to back, and where each ends.
fn pieces(tokens: &[String], attrs: &[u8], byte_of: &HashMap<char, u8>) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::with_capacity(tokens.iter().map(String::len).sum());
    let mut ends = Vec::with_capacity(tokens.len());
    for (text, &a) in tokens.iter().zip(attrs) {
        if a & (attr::CONTROL | attr::UNKNOWN | attr::USER_DEFINED) != 0 {
            bytes.extend_from_slice(text.as_bytes());
        } else if a & attr::NORMAL != 0 {
            for c in text.chars() {
                match byte_of.get(&c) {
                    Some(&b) => bytes.push(b),
                    // Not in the byte alphabet (a malformed vocabulary): keep the character itself.
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        } else if a & attr::BYTE != 0 {
            // SentencePiece-style byte tokens `<0xAB>`.
            let hex = text.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'));
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                bytes.push(b);
            }
        }
        ends.push(bytes.len());
    }
    (bytes, ends)
}

fn build_bpe(
    ids: &HashMap<String, u32>,
    merges: Merges,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let build = |e: tokenizers::Error| TokenizerError::Build(e.to_string());
    let vocab: Vocab = ids.iter().map(|(t, &i)| (t.clone(), i)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(build)?;
    let mut steps = Vec::with_capacity(DEEPSEEK3_REGEXES.len() + 1);
    for re in DEEPSEEK3_REGEXES {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(build)?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    // add_prefix_space = false, trim_offsets = true, use_regex = false: bytes to GPT-2 characters only.
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    )));
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// `text` cut where the DeepSeek pre-tokenizer splits anyway, so the chunks' ids joined are the ids of the whole:
/// once a chunk has [`CHUNK_BYTES`], before the first letter, digit or ASCII symbol that follows a `\n`. No regex
/// match spans such a point: a match containing `\n` ends with whitespace (`[\r\n]*`, `\s*[\r\n]+`, `\s+`),
/// the letter and symbol rules cannot contain `\n`, and a whitespace run ending in `\n` is always taken by
/// `\s*[\r\n]+`, whatever follows. Whitespace runs longer than [`MAX_WHITESPACE_RUN`] are cut too (not exact).
fn plain_chunks(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let (mut start, mut run, mut prev) = (0, 0, '\0');
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if run == MAX_WHITESPACE_RUN {
                chunks.push(&text[start..i]);
                (start, run) = (i, 0);
            }
            run += 1;
        } else {
            run = 0;
            let safe = prev == '\n' && (c.is_alphanumeric() || c.is_ascii_graphic());
            if safe && i - start >= CHUNK_BYTES {
                chunks.push(&text[start..i]);
                start = i;
            }
        }
        prev = c;
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

// ---------------------------------------------------------------------------------------------------------------
// Special tokens in text: llama.cpp's `tokenizer_st_partition`.

/// A piece of the text being tokenized: a special token, or a byte range still to encode with BPE.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fragment {
    Token(u32),
    Text(Range<usize>),
}

/// Finds special tokens in text. llama.cpp splits the text at every occurrence of each special token, taking the
/// tokens longest first; only the tokens that occur in the text matter, so those are found first through an index
/// by their first two bytes.
#[derive(Debug)]
struct SpecialMatcher {
    texts: HashMap<u32, String>,
    /// Every special token (CONTROL, USER_DEFINED, UNKNOWN), longest text first, then by id.
    order: Vec<u32>,
    control: HashSet<u32>,
    /// Token ids by their first two bytes; one-byte tokens under `short`.
    by_prefix: HashMap<[u8; 2], Vec<u32>>,
    short: Vec<u32>,
}

impl SpecialMatcher {
    fn new(tokens: &[String], attrs: &[u8]) -> SpecialMatcher {
        let mut m = SpecialMatcher {
            texts: HashMap::new(),
            order: Vec::new(),
            control: HashSet::new(),
            by_prefix: HashMap::new(),
            short: Vec::new(),
        };
        for (i, (text, &a)) in tokens.iter().zip(attrs).enumerate() {
            if a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) == 0 {
                continue;
            }
            let id = i as u32;
            if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                m.control.insert(id);
            }
            match text.as_bytes() {
                [a, b, ..] => m.by_prefix.entry([*a, *b]).or_default().push(id),
                _ => m.short.push(id),
            }
            m.texts.insert(id, text.clone());
            m.order.push(id);
        }
        m.order
            .sort_by_key(|id| (std::cmp::Reverse(m.texts[id].len()), *id));
        m
    }

    /// Whether llama.cpp looks for `id` in text: CONTROL and UNKNOWN tokens only when parsing specials.
    fn wanted(&self, id: u32, parse_special: bool) -> bool {
        parse_special || !self.control.contains(&id)
    }

    /// The special tokens that occur somewhere in `text` (overlapping occurrences included).
    fn present(&self, text: &str, parse_special: bool) -> HashSet<u32> {
        let bytes = text.as_bytes();
        let mut found = HashSet::new();
        for i in 0..bytes.len() {
            let rest = &bytes[i..];
            let mut check = |id: u32| {
                if !found.contains(&id)
                    && self.wanted(id, parse_special)
                    && rest.starts_with(self.texts[&id].as_bytes())
                {
                    found.insert(id);
                }
            };
            self.short.iter().for_each(|&id| check(id));
            if let [a, b, ..] = rest {
                if let Some(list) = self.by_prefix.get(&[*a, *b]) {
                    list.iter().for_each(|&id| check(id));
                }
            }
        }
        found
    }

    /// `text` cut into special tokens and the text between them, exactly as llama.cpp's `tokenizer_st_partition`:
    /// for each special token, longest first, every occurrence in every remaining text fragment, left to right.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];
        let present = self.present(text, parse_special);
        if present.is_empty() {
            return fragments;
        }
        for &id in self.order.iter().filter(|id| present.contains(id)) {
            let needle = self.texts[&id].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut start = range.start;
                while let Some(pos) = text[start..range.end].find(needle) {
                    let at = start + pos;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }
}

#[cfg(test)]
mod tests;
