//! The DeepSeek V4 prompt format: a conversation rendered to the text the tokenizer reads (special tokens as their
//! text), the same text rendered through a GGUF's Jinja `tokenizer.chat_template` for cross-checks, the shared
//! prefix of two renderings so a chat session can keep its cache, and [`PromptFormat`]: the one policy every command
//! renders prompts with.
//!
//! Source of truth: DeepSeek's reference encoder `encoding/encoding_dsv4.py` (`encode_messages`, `render_message`,
//! `merge_tool_messages`, `_drop_thinking_messages`) shipped in the DeepSeek-V4 Hugging Face repositories. The HF
//! release has no Jinja template; llama.cpp's `models/templates/deepseek-ai-DeepSeek-V4.jinja` (and
//! `…-V4-Flash-0731.jinja`) port that encoder. Tools, DSML tool calls, tasks and the `latest_reminder` /
//! `developer` roles are not rendered here.

use std::collections::BTreeMap;
use std::str::FromStr;

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};

/// Beginning of the prompt (token 0).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// End of a completed assistant turn (token 1); also where generation stops.
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// Opens a user turn (token 128803).
pub const USER: &str = "<｜User｜>";
/// Opens an assistant turn (token 128804).
pub const ASSISTANT: &str = "<｜Assistant｜>";
/// Opens the reasoning block (token 128821).
pub const THINK_START: &str = "<think>";
/// Closes the reasoning block; alone after `ASSISTANT` it means "answer without reasoning" (token 128822).
pub const THINK_END: &str = "</think>";

/// Preview encoder's `REASONING_EFFORT_MAX`; the 0731 encoder's `high` prompt. Verified against copies of
/// `encoding_dsv4.py` (preview), DeepSeek's `encoding/README.md` and llama.cpp's two DeepSeek V4 templates.
pub const EFFORT_ABSOLUTE_MAXIMUM: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, \
rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered \
alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The 0731 encoder's `max` prompt (`REASONING_EFFORT_PROMPTS["max"]`). Verified against a copy of the 0731
/// `encoding_dsv4.py` and llama.cpp's `deepseek-ai-DeepSeek-V4-Flash-0731.jinja`.
pub const EFFORT_BEYOND_MAXIMUM: &str = "Reasoning Effort: Beyond maximum — exhaustive, relentless, and \
uncompromising.\n\
You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the \
problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying \
cause rather than any surface symptom.\n\
Do not stop reasoning until you have independently verified the solution from multiple angles and are certain \
that no assumption remains unchecked and no error remains undiscovered.\n\n";

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The OpenAI / Hugging Face name templates compare against.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The assistant's reasoning (`reasoning_content`); ignored on other roles.
    pub reasoning: Option<String>,
}

impl Message {
    pub fn system(content: impl Into<String>) -> Message {
        Message {
            role: Role::System,
            content: content.into(),
            reasoning: None,
        }
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
            reasoning: None,
        }
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
            reasoning: None,
        }
    }
    pub fn assistant_with_reasoning(
        reasoning: impl Into<String>,
        content: impl Into<String>,
    ) -> Message {
        Message {
            role: Role::Assistant,
            content: content.into(),
            reasoning: Some(reasoning.into()),
        }
    }
}

/// Requested depth of reasoning (the API's `reasoning_effort`). Only thinking mode renders it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effort {
    Low,
    High,
    Max,
}

impl Effort {
    pub fn as_str(self) -> &'static str {
        match self {
            Effort::Low => "low",
            Effort::High => "high",
            Effort::Max => "max",
        }
    }
}

impl FromStr for Effort {
    type Err = ChatError;
    fn from_str(s: &str) -> Result<Effort, ChatError> {
        match s.to_ascii_lowercase().as_str() {
            "low" => Ok(Effort::Low),
            "high" => Ok(Effort::High),
            "max" => Ok(Effort::Max),
            _ => Err(ChatError::UnknownEffort(s.to_string())),
        }
    }
}

/// Which release of DeepSeek's encoder the model was trained with. They differ only in the effort prompts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PromptRevision {
    /// DeepSeek-V4-Flash / V4-Pro (preview): `max` prepends [`EFFORT_ABSOLUTE_MAXIMUM`]; `high` and `low` add nothing.
    #[default]
    Preview,
    /// DeepSeek-V4-Flash-0731 / V4-Pro-0813: `high` prepends [`EFFORT_ABSOLUTE_MAXIMUM`], `max` prepends
    /// [`EFFORT_BEYOND_MAXIMUM`], `low` adds nothing.
    R0731,
}

/// How a conversation is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatOptions {
    /// Thinking mode (`thinking_mode="thinking"`): the answer starts with `<think>`; otherwise with `</think>`.
    pub thinking: bool,
    /// `None` renders like `low`.
    pub reasoning_effort: Option<Effort>,
    /// The encoder's `drop_thinking` (default `true`): in thinking mode, assistant turns before the last user turn
    /// lose their reasoning. `false` keeps every turn's `<think>reasoning</think>` (the encoder's behaviour when tools
    /// are present), which keeps a chat session's rendering append-only.
    pub drop_thinking: bool,
    pub revision: PromptRevision,
}

impl Default for ChatOptions {
    /// Thinking on (DeepSeek's default mode), no effort prompt, earlier reasoning dropped, preview encoder.
    fn default() -> Self {
        ChatOptions {
            thinking: true,
            reasoning_effort: None,
            drop_thinking: true,
            revision: PromptRevision::Preview,
        }
    }
}

impl ChatOptions {
    /// The text prepended before the first message: empty unless thinking with an effort that has a prompt.
    pub fn effort_prefix(&self) -> &'static str {
        if !self.thinking {
            return "";
        }
        match (self.revision, self.reasoning_effort) {
            (PromptRevision::Preview, Some(Effort::Max)) => EFFORT_ABSOLUTE_MAXIMUM,
            (PromptRevision::R0731, Some(Effort::High)) => EFFORT_ABSOLUTE_MAXIMUM,
            (PromptRevision::R0731, Some(Effort::Max)) => EFFORT_BEYOND_MAXIMUM,
            _ => "",
        }
    }
}

/// What can go wrong outside the built-in renderer.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("unknown reasoning effort {0:?}: expected low, high or max")]
    UnknownEffort(String),
    #[error("the chat template failed to render: {detail}\nhint: the built-in DeepSeek V4 renderer needs no template")]
    Template { detail: String },
}

impl From<minijinja::Error> for ChatError {
    fn from(e: minijinja::Error) -> Self {
        let detail = match e.kind() {
            ErrorKind::OutOfFuel => format!(
                "it ran past {TEMPLATE_FUEL} steps without finishing (a template of the model file: loops that \
                 never end, or nested far beyond what a prompt needs)"
            ),
            // `{:#}` carries minijinja's template name, line and source excerpt.
            _ => format!("{e:#}"),
        };
        ChatError::Template { detail }
    }
}

/// Steps (minijinja's fuel: about one per instruction) a chat template may take for one rendering. The DeepSeek V4
/// templates take a few thousand on a short conversation; a hostile one stops here instead of hanging.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// Renders `messages` as DeepSeek's `encode_messages(messages, thinking_mode, drop_thinking, reasoning_effort)` does.
///
/// BOS first; system text raw; a user turn is `<｜User｜>` + text, consecutive user turns merge into one joined by
/// `"\n\n"`; a user turn followed by an assistant turn (or last, when `add_generation_prompt`) is followed by
/// `<｜Assistant｜>` + `<think>` (thinking, at or after the last user turn) or `</think>`; an assistant turn is
/// `[reasoning</think>]content<｜end▁of▁sentence｜>`, the reasoning part only in thinking mode and only after the
/// last user turn (all turns when `drop_thinking` is off). The effort prompt precedes the first message.
/// `add_generation_prompt = false` omits the trailing `<｜Assistant｜>…` (the encoder always writes it).
pub fn render(messages: &[Message], options: &ChatOptions, add_generation_prompt: bool) -> String {
    let turns = merge_user_turns(messages);
    let last_user = turns.iter().rposition(|t| t.role == Role::User);
    // Index comparisons follow the encoder: "after the last user turn" is true everywhere when there is none.
    let after_last_user = |i: usize| last_user.is_none_or(|u| i > u);
    let mut out = String::from(BOS);
    for (i, turn) in turns.iter().enumerate() {
        if i == 0 {
            out.push_str(options.effort_prefix());
        }
        match turn.role {
            Role::System => out.push_str(&turn.content),
            Role::User => {
                out.push_str(USER);
                out.push_str(&turn.content);
            }
            Role::Assistant => {
                if options.thinking && (!options.drop_thinking || after_last_user(i)) {
                    out.push_str(turn.reasoning.unwrap_or(""));
                    out.push_str(THINK_END);
                }
                out.push_str(&turn.content);
                out.push_str(EOS);
            }
        }
        let next = turns.get(i + 1).map(|t| t.role);
        let opens_answer = match next {
            Some(role) => role == Role::Assistant,
            None => add_generation_prompt,
        };
        if turn.role == Role::User && opens_answer {
            out.push_str(ASSISTANT);
            let open_thinking =
                options.thinking && (!options.drop_thinking || last_user == Some(i));
            out.push_str(if open_thinking {
                THINK_START
            } else {
                THINK_END
            });
        }
    }
    out
}

/// A turn after the encoder's `merge_tool_messages`: consecutive user messages become one turn.
struct Turn<'a> {
    role: Role,
    content: std::borrow::Cow<'a, str>,
    reasoning: Option<&'a str>,
}

fn merge_user_turns(messages: &[Message]) -> Vec<Turn<'_>> {
    let mut turns: Vec<Turn<'_>> = Vec::with_capacity(messages.len());
    for m in messages {
        if let (Role::User, Some(prev)) = (m.role, turns.last_mut()) {
            if prev.role == Role::User {
                let merged = prev.content.to_mut();
                merged.push_str("\n\n");
                merged.push_str(&m.content);
                continue;
            }
        }
        turns.push(Turn {
            role: m.role,
            content: m.content.as_str().into(),
            reasoning: m.reasoning.as_deref(),
        });
    }
    turns
}

/// Renders a GGUF's `tokenizer.chat_template` the way [`render`] renders with `add_generation_prompt = true`.
pub fn render_with_template(
    template: &str,
    messages: &[Message],
    options: &ChatOptions,
) -> Result<String, ChatError> {
    render_with_template_ext(template, messages, options, true)
}

/// Renders a Jinja chat template with the variables llama.cpp and Hugging Face pass: `messages` (`role`, `content`,
/// and `reasoning_content` where present), `add_generation_prompt`, `bos_token`, `eos_token`, `enable_thinking` and
/// `thinking`, `reasoning_effort` (absent when `None`), `tools = none`. `add_generation_prompt` is passed only when
/// the conversation ends with a user turn, as [`render`] treats it. Jinja whitespace options match Hugging Face's
/// (`trim_blocks`, `lstrip_blocks`); the Python methods templates commonly call are provided.
pub fn render_with_template_ext(
    template: &str,
    messages: &[Message],
    options: &ChatOptions,
    add_generation_prompt: bool,
) -> Result<String, ChatError> {
    let env = template_environment()?;
    let tmpl = env.template_from_str(template)?;
    let ends_with_user = messages.last().is_some_and(|m| m.role == Role::User);
    let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
    ctx.insert(
        "messages",
        messages
            .iter()
            .map(message_value)
            .collect::<Vec<_>>()
            .into(),
    );
    ctx.insert(
        "add_generation_prompt",
        (add_generation_prompt && ends_with_user).into(),
    );
    ctx.insert("bos_token", BOS.into());
    ctx.insert("eos_token", EOS.into());
    ctx.insert("enable_thinking", options.thinking.into());
    ctx.insert("thinking", options.thinking.into());
    ctx.insert("drop_thinking", options.drop_thinking.into());
    ctx.insert("tools", Value::from(()));
    if let Some(effort) = options.reasoning_effort {
        ctx.insert("reasoning_effort", effort.as_str().into());
    }
    Ok(tmpl.render(Value::from(ctx))?)
}

fn message_value(m: &Message) -> Value {
    let mut map: BTreeMap<&str, Value> = BTreeMap::new();
    map.insert("role", m.role.as_str().into());
    map.insert("content", m.content.as_str().into());
    if let Some(r) = &m.reasoning {
        map.insert("reasoning_content", r.as_str().into());
    }
    Value::from(map)
}

fn template_environment() -> Result<Environment<'static>, ChatError> {
    let mut env = Environment::new();
    // Hugging Face renders chat templates with trim_blocks and lstrip_blocks; llama.cpp's engine emulates that.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()?;
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(python_method);
    env.add_filter("from_json", from_json);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("template raised: {msg}"),
            ))
        },
    );
    Ok(env)
}

/// llama.cpp's `from_json` filter (DeepSeek V4 templates parse tool-call arguments with it).
fn from_json(text: String) -> Result<Value, minijinja::Error> {
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("from_json: {e}"))
    })?;
    Ok(json_to_value(&json))
}

fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            items.iter().map(json_to_value).collect::<Vec<_>>().into()
        }
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect::<BTreeMap<String, Value>>()
            .into(),
    }
}

/// The Python `str` / `dict` methods chat templates call (a subset of minijinja-contrib's pycompat).
fn python_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let unknown = || -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::from(ErrorKind::UnknownMethod))
    };
    let arg_str = |i: usize| args.get(i).and_then(|a| a.as_str());
    match value.kind() {
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(value.try_iter()?.collect::<Vec<_>>().into()),
            "values" => Ok(value
                .try_iter()?
                .map(|k| value.get_item(&k).unwrap_or_default())
                .collect::<Vec<_>>()
                .into()),
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let got = value.get_item(&key).unwrap_or_default();
                Ok(if got.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    got
                })
            }
            _ => unknown(),
        },
        ValueKind::String => {
            let s = value.as_str().unwrap_or("");
            let chars: Option<Vec<char>> = arg_str(0).map(|c| c.chars().collect());
            let strip = |c: char| {
                chars
                    .as_ref()
                    .map_or(c.is_whitespace(), |set| set.contains(&c))
            };
            let text = match method {
                "strip" => s.trim_matches(strip).to_string(),
                "lstrip" => s.trim_start_matches(strip).to_string(),
                "rstrip" => s.trim_end_matches(strip).to_string(),
                "upper" => s.to_uppercase(),
                "lower" => s.to_lowercase(),
                "replace" => s.replace(arg_str(0).unwrap_or(""), arg_str(1).unwrap_or("")),
                "startswith" => {
                    return Ok(Value::from(arg_str(0).is_some_and(|p| s.starts_with(p))))
                }
                "endswith" => return Ok(Value::from(arg_str(0).is_some_and(|p| s.ends_with(p)))),
                "split" => {
                    let parts: Vec<Value> = match arg_str(0) {
                        Some(sep) if !sep.is_empty() => s.split(sep).map(Value::from).collect(),
                        _ => s.split_whitespace().map(Value::from).collect(),
                    };
                    return Ok(parts.into());
                }
                _ => return unknown(),
            };
            Ok(Value::from(text))
        }
        _ => unknown(),
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
pub fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// The markers the renderer writes. The tokenizer splits text at special tokens before BPE, so a prefix that ends
/// right after one tokenizes to a prefix of the whole prompt's tokens.
const MARKERS: [&str; 6] = [BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END];

/// How much of `previous` (an earlier rendering, already in a session's cache) `current` can reuse: the common
/// prefix, cut back to the end of the last special-token marker inside it so that both tokenize alike up to there.
/// Token sequences remain the final judge: generated tokens need not equal the tokenization of their text.
pub fn reusable_prefix_len(previous: &str, current: &str) -> usize {
    let common = &current[..common_prefix_len(previous, current)];
    MARKERS
        .iter()
        .filter_map(|m| common.rfind(m).map(|at| at + m.len()))
        .max()
        .unwrap_or(0)
}

/// A rendering for a chat session that already holds an earlier one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncrementalPrompt {
    /// The whole prompt for the new conversation.
    pub prompt: String,
    /// Bytes of `prompt` the session can keep from the previous prompt ([`reusable_prefix_len`]).
    pub reuse_bytes: usize,
}

impl IncrementalPrompt {
    /// The text the session still has to evaluate.
    pub fn suffix(&self) -> &str {
        &self.prompt[self.reuse_bytes..]
    }
}

/// Renders the new conversation and says how much of `previous_prompt` it shares. With `drop_thinking` on, the
/// last answer's reasoning disappears from the rendering once a new user turn follows, so reuse stops at that
/// answer's `<｜Assistant｜>`.
pub fn render_incremental(
    previous_prompt: &str,
    messages: &[Message],
    options: &ChatOptions,
    add_generation_prompt: bool,
) -> IncrementalPrompt {
    let prompt = render(messages, options, add_generation_prompt);
    let reuse_bytes = reusable_prefix_len(previous_prompt, &prompt);
    IncrementalPrompt {
        prompt,
        reuse_bytes,
    }
}

/// Conversations the model's own template is checked on: ones where llama.cpp's DeepSeek V4 templates and
/// DeepSeek's encoder agree (a lone user turn, a system prompt, a finished exchange with reasoning before a new turn).
fn probe_conversations() -> Vec<Vec<Message>> {
    vec![
        vec![Message::user("Hi")],
        vec![Message::system("You are helpful."), Message::user("Hi")],
        vec![
            Message::user("q1"),
            Message::assistant_with_reasoning("r1", "a1"),
            Message::user("q2"),
        ],
    ]
}

/// What a model's `tokenizer.chat_template` says about the built-in format, checked once when the model opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateCheck {
    /// The model has no chat template.
    Absent,
    /// The template renders every probe conversation as the built-in renderer does.
    Agrees,
    /// The template renders a probe conversation differently: `template` where the built-in renderer wrote
    /// `builtin`.
    Differs { builtin: String, template: String },
    /// The template does not render (a syntax error, a feature minijinja lacks).
    Fails(String),
}

/// The one prompt format `complete` and `chat` (and any other caller) use: DeepSeek V4's own, written by the
/// built-in renderer ([`render`], a port of DeepSeek's reference encoder). A GGUF's `tokenizer.chat_template` is
/// checked against it on probe conversations; where it agrees the two are the same text, where it differs or
/// cannot render the built-in format still wins (DeepSeek ships no Jinja template: a GGUF's is a port, and a chat
/// keeps its conversation as tokens, which only an append-only renderer allows), and [`PromptFormat::note`] says so.
#[derive(Clone, Debug)]
pub struct PromptFormat {
    check: TemplateCheck,
}

impl PromptFormat {
    /// The format for a model whose chat template is `template` (`None`: it has none).
    pub fn new(template: Option<&str>) -> PromptFormat {
        let Some(template) = template else {
            return PromptFormat {
                check: TemplateCheck::Absent,
            };
        };
        let mut check = TemplateCheck::Agrees;
        'probes: for messages in probe_conversations() {
            for thinking in [true, false] {
                let options = ChatOptions {
                    thinking,
                    ..ChatOptions::default()
                };
                let builtin = render(&messages, &options, true);
                match render_with_template(template, &messages, &options) {
                    Ok(text) if text == builtin => {}
                    Ok(text) => {
                        check = TemplateCheck::Differs {
                            builtin,
                            template: text,
                        };
                        break 'probes;
                    }
                    Err(e) => {
                        check = TemplateCheck::Fails(e.to_string());
                        break 'probes;
                    }
                }
            }
        }
        PromptFormat { check }
    }

    /// How the model's template compared with the built-in format.
    pub fn template_check(&self) -> &TemplateCheck {
        &self.check
    }

    /// A line for the user when the model's template was set aside (it differs or fails); `None` otherwise.
    pub fn note(&self) -> Option<String> {
        match &self.check {
            TemplateCheck::Absent | TemplateCheck::Agrees => None,
            TemplateCheck::Differs { builtin, template } => Some(format!(
                "the model's chat template renders differently from DeepSeek V4's own format (e.g. {template:?} \
                 instead of {builtin:?}); using DeepSeek V4's format"
            )),
            TemplateCheck::Fails(e) => Some(format!(
                "the model's chat template cannot be rendered ({e}); using DeepSeek V4's own format"
            )),
        }
    }

    /// The prompt for `messages`: see [`render`].
    pub fn render(
        &self,
        messages: &[Message],
        options: &ChatOptions,
        add_generation_prompt: bool,
    ) -> String {
        render(messages, options, add_generation_prompt)
    }
}
