//! Goldens for the DeepSeek V4 prompt format (src/chat.rs), its agreement with llama.cpp's DeepSeek V4 Jinja
//! template, and the shared-prefix helper chat sessions use.
//!
//! Where the goldens come from:
//! * DeepSeek's `encoding/README.md` (DeepSeek-V4 HF repositories): the "Quick Start" example
//!   (`<BOS>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>`), the "Basic Chat" and
//!   "Interleaved Thinking Mode" patterns (the README breaks lines for display; the encoder joins turns with
//!   nothing), and the reasoning-effort paragraph.
//! * DeepSeek's `encoding/encoding_dsv4.py` (`render_message`, `_drop_thinking_messages`, `merge_tool_messages`):
//!   every rule the other goldens exercise; read from public copies of the preview encoder and of the 0731 one.
//! * The DeepSeek-V4-Pro-0813 model card example (`hello` / `Hello! I am DeepSeek.` / `1+1=?`, thinking, max).
//! * A public Rust serving project's DeepSeek V4 renderer tests (`reasoning_effort_max_adds_prefix_…`,
//!   `drop_thinking_false_keeps_prior_assistant_reasoning`), whose goldens match the encoder.
//! * `docs/DSV4.md` section 6's example.

mod support;

use ferrite::chat::{
    common_prefix_len, render, render_incremental, render_with_template, render_with_template_ext,
    reusable_prefix_len, ChatError, ChatOptions, Effort, Message, PromptFormat, PromptRevision,
    TemplateCheck, ASSISTANT, BOS, EFFORT_ABSOLUTE_MAXIMUM, EFFORT_BEYOND_MAXIMUM, EOS, USER,
};
use support::chat_cases::agreed_conversations;

fn thinking() -> ChatOptions {
    ChatOptions {
        thinking: true,
        ..ChatOptions::default()
    }
}

fn chat_mode() -> ChatOptions {
    ChatOptions {
        thinking: false,
        ..ChatOptions::default()
    }
}

fn effort(revision: PromptRevision, effort: Effort) -> ChatOptions {
    ChatOptions {
        reasoning_effort: Some(effort),
        revision,
        ..thinking()
    }
}

#[test]
fn readme_quick_start_system_and_user_in_thinking_mode() {
    let messages = [
        Message::system("You are a helpful assistant."),
        Message::user("What is 2+2?"),
    ];
    assert_eq!(
        render(&messages, &thinking(), true),
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜><think>"
    );
}

#[test]
fn dsv4_md_example_one_turn_thinking() {
    let messages = [Message::system("You are helpful."), Message::user("Hi")];
    assert_eq!(
        render(&messages, &thinking(), true),
        "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>Hi<｜Assistant｜><think>"
    );
}

#[test]
fn single_turn_without_thinking_closes_the_think_block() {
    let messages = [Message::user("Hi")];
    assert_eq!(
        render(&messages, &chat_mode(), true),
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>"
    );
}

#[test]
fn readme_basic_chat_two_completed_turns_in_chat_mode() {
    let messages = [
        Message::system("SYS"),
        Message::user("U1"),
        Message::assistant("A1"),
        Message::user("U2"),
        Message::assistant("A2"),
    ];
    assert_eq!(
        render(&messages, &chat_mode(), true),
        "<｜begin▁of▁sentence｜>SYS<｜User｜>U1<｜Assistant｜></think>A1<｜end▁of▁sentence｜>\
         <｜User｜>U2<｜Assistant｜></think>A2<｜end▁of▁sentence｜>"
    );
}

#[test]
fn chat_mode_never_renders_reasoning() {
    let messages = [
        Message::user("Q"),
        Message::assistant_with_reasoning("R", "A"),
    ];
    assert_eq!(
        render(&messages, &chat_mode(), true),
        "<｜begin▁of▁sentence｜><｜User｜>Q<｜Assistant｜></think>A<｜end▁of▁sentence｜>"
    );
}

#[test]
fn readme_interleaved_thinking_last_answer_keeps_its_reasoning() {
    let messages = [
        Message::system("SYS"),
        Message::user("Q"),
        Message::assistant_with_reasoning("R", "A"),
    ];
    assert_eq!(
        render(&messages, &thinking(), true),
        "<｜begin▁of▁sentence｜>SYS<｜User｜>Q<｜Assistant｜><think>R</think>A<｜end▁of▁sentence｜>"
    );
}

#[test]
fn multi_turn_thinking_drops_earlier_reasoning() {
    // The model card's example conversation, without an effort.
    let messages = [
        Message::user("hello"),
        Message::assistant_with_reasoning("thinking...", "Hello! I am DeepSeek."),
        Message::user("1+1=?"),
    ];
    assert_eq!(
        render(&messages, &thinking(), true),
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>\
         <｜User｜>1+1=?<｜Assistant｜><think>"
    );
}

#[test]
fn model_card_example_with_max_effort_preview_and_0731() {
    let messages = [
        Message::user("hello"),
        Message::assistant_with_reasoning("thinking...", "Hello! I am DeepSeek."),
        Message::user("1+1=?"),
    ];
    let rest = "<｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek.<｜end▁of▁sentence｜>\
                <｜User｜>1+1=?<｜Assistant｜><think>";
    let preview = render(
        &messages,
        &effort(PromptRevision::Preview, Effort::Max),
        true,
    );
    assert_eq!(preview, format!("{BOS}{EFFORT_ABSOLUTE_MAXIMUM}{rest}"));
    let r0731 = render(&messages, &effort(PromptRevision::R0731, Effort::Max), true);
    assert_eq!(r0731, format!("{BOS}{EFFORT_BEYOND_MAXIMUM}{rest}"));
}

#[test]
fn max_effort_paragraph_is_the_official_text() {
    // The README's block plus the encoder's trailing "\n\n"; the golden of the Rust renderer tests.
    let expected = "<｜begin▁of▁sentence｜>Reasoning Effort: Absolute maximum with no shortcuts permitted.\n\
You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, \
rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n\
Explicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, \
and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\
\n\
<｜User｜>solve it<｜Assistant｜><think>";
    let messages = [Message::user("solve it")];
    assert_eq!(
        render(
            &messages,
            &effort(PromptRevision::Preview, Effort::Max),
            true
        ),
        expected
    );
}

#[test]
fn effort_prefix_precedes_the_system_prompt() {
    let messages = [Message::system("SYS"), Message::user("Q")];
    assert_eq!(
        render(
            &messages,
            &effort(PromptRevision::Preview, Effort::Max),
            true
        ),
        format!("{BOS}{EFFORT_ABSOLUTE_MAXIMUM}SYS<｜User｜>Q<｜Assistant｜><think>")
    );
}

#[test]
fn effort_levels_per_revision() {
    let messages = [Message::user("Reply exactly: OK")];
    let tail = "<｜User｜>Reply exactly: OK<｜Assistant｜><think>";
    let cases = [
        (PromptRevision::Preview, Effort::Low, ""),
        (PromptRevision::Preview, Effort::High, ""),
        (
            PromptRevision::Preview,
            Effort::Max,
            EFFORT_ABSOLUTE_MAXIMUM,
        ),
        (PromptRevision::R0731, Effort::Low, ""),
        (PromptRevision::R0731, Effort::High, EFFORT_ABSOLUTE_MAXIMUM),
        (PromptRevision::R0731, Effort::Max, EFFORT_BEYOND_MAXIMUM),
    ];
    for (revision, level, prefix) in cases {
        let got = render(&messages, &effort(revision, level), true);
        assert_eq!(
            got,
            format!("{BOS}{prefix}{tail}"),
            "{revision:?} {level:?}"
        );
    }
    assert!(EFFORT_BEYOND_MAXIMUM.starts_with("Reasoning Effort: Beyond maximum — exhaustive"));
    assert!(EFFORT_BEYOND_MAXIMUM.ends_with("no error remains undiscovered.\n\n"));
}

#[test]
fn effort_is_ignored_without_thinking() {
    let messages = [Message::user("hello")];
    let options = ChatOptions {
        thinking: false,
        ..effort(PromptRevision::R0731, Effort::Max)
    };
    assert_eq!(
        render(&messages, &options, true),
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>"
    );
}

#[test]
fn keeping_reasoning_renders_every_turn_with_its_think_block() {
    // The Rust renderer tests' `drop_thinking_false_keeps_prior_assistant_reasoning`.
    let messages = [
        Message::assistant_with_reasoning("old reasoning", "old answer"),
        Message::user("next"),
    ];
    let options = ChatOptions {
        drop_thinking: false,
        ..thinking()
    };
    assert_eq!(
        render(&messages, &options, true),
        "<｜begin▁of▁sentence｜>old reasoning</think>old answer<｜end▁of▁sentence｜><｜User｜>next<｜Assistant｜><think>"
    );
    let two_turns = [
        Message::user("q1"),
        Message::assistant_with_reasoning("r1", "a1"),
        Message::user("q2"),
    ];
    assert_eq!(
        render(&two_turns, &options, true),
        "<｜begin▁of▁sentence｜><｜User｜>q1<｜Assistant｜><think>r1</think>a1<｜end▁of▁sentence｜>\
         <｜User｜>q2<｜Assistant｜><think>"
    );
}

#[test]
fn consecutive_user_messages_merge_into_one_turn() {
    let messages = [Message::user("first"), Message::user("second")];
    assert_eq!(
        render(&messages, &thinking(), true),
        "<｜begin▁of▁sentence｜><｜User｜>first\n\nsecond<｜Assistant｜><think>"
    );
}

#[test]
fn system_messages_are_written_raw_where_they_stand() {
    // The encoder's `system_msg_template` is "{content}" with no separator (llama.cpp's template and others join
    // several with "\n\n"; the encoder is the reference).
    let messages = [
        Message::system("First"),
        Message::system("Second"),
        Message::user("Hello"),
    ];
    assert_eq!(
        render(&messages, &chat_mode(), true),
        "<｜begin▁of▁sentence｜>FirstSecond<｜User｜>Hello<｜Assistant｜></think>"
    );
}

#[test]
fn mid_conversation_system_message_has_no_role_token() {
    let messages = [
        Message::system("sys"),
        Message::user("q1"),
        Message::assistant("a1"),
        Message::system("mid"),
        Message::user("q2"),
    ];
    assert_eq!(
        render(&messages, &chat_mode(), true),
        "<｜begin▁of▁sentence｜>sys<｜User｜>q1<｜Assistant｜></think>a1<｜end▁of▁sentence｜>mid\
         <｜User｜>q2<｜Assistant｜></think>"
    );
}

#[test]
fn without_generation_prompt_the_prompt_ends_after_the_user_text() {
    let messages = [Message::user("Hi")];
    assert_eq!(
        render(&messages, &thinking(), false),
        "<｜begin▁of▁sentence｜><｜User｜>Hi"
    );
    // Turns followed by an answer still open it.
    let two = [Message::user("Hi"), Message::assistant("Yo")];
    assert_eq!(
        render(&two, &chat_mode(), false),
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜></think>Yo<｜end▁of▁sentence｜>"
    );
}

#[test]
fn empty_conversation_is_just_bos() {
    assert_eq!(
        render(&[], &effort(PromptRevision::Preview, Effort::Max), true),
        BOS
    );
}

#[test]
fn effort_parses_from_text() {
    assert_eq!("max".parse::<Effort>().unwrap(), Effort::Max);
    assert_eq!("High".parse::<Effort>().unwrap(), Effort::High);
    assert!(matches!(
        "medium".parse::<Effort>(),
        Err(ChatError::UnknownEffort(_))
    ));
}

// ---------------------------------------------------------------------------------------------------------------
// Jinja: llama.cpp's `models/templates/deepseek-ai-DeepSeek-V4.jinja` (MIT License, Copyright (c) 2023-2026 The
// ggml authors), copied verbatim from the version that carries `drop_thinking` and the max-effort paragraph (as
// mirrored in a public llama.cpp fork at commit 6257e035f6b445c86883e117bd6c9b1bb5c736e3). It ports DeepSeek's
// encoder; GGUFs converted by llama.cpp carry it as `tokenizer.chat_template`.
// ---------------------------------------------------------------------------------------------------------------

const LLAMA_CPP_DEEPSEEK_V4_JINJA: &str = r##"{%- if not add_generation_prompt is defined -%}
  {%- set add_generation_prompt = false -%}
{%- endif -%}
{%- if not thinking is defined -%}
  {%- if enable_thinking is defined -%}
    {%- set thinking = enable_thinking -%}
  {%- else -%}
    {%- set thinking = false -%}
  {%- endif -%}
{%- endif -%}
{%- if not drop_thinking is defined -%}
  {%- set drop_thinking = true -%}
{%- endif -%}
{%- set dsml_token = '｜DSML｜' -%}
{%- set thinking_start_token = '<think>' -%}
{%- set thinking_end_token = '</think>' -%}
{%- set reasoning_effort_max = 'Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n' -%}
{%- set response_format_template = '## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n' -%}
{%- set has_tools = false -%}
{%- set tools_header = '## Tools\n\nYou have access to a set of tools to help answer the user\'s question. You can invoke tools by writing a "<' + dsml_token + 'tool_calls>" block like the following:\n\n<' + dsml_token + 'tool_calls>\n<' + dsml_token + 'invoke name="$TOOL_NAME">\n<' + dsml_token + 'parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</' + dsml_token + 'parameter>\n...\n</' + dsml_token + 'invoke>\n<' + dsml_token + 'invoke name="$TOOL_NAME2">\n...\n</' + dsml_token + 'invoke>\n</' + dsml_token + 'tool_calls>\n\nString parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\nIf thinking_mode is enabled (triggered by ' + thinking_start_token + '), you MUST output your complete reasoning inside ' + thinking_start_token + '...' + thinking_end_token + ' BEFORE any tool calls or final response.\n\nOtherwise, output directly after ' + thinking_end_token + ' with tool calls or final response.\n\n### Available Tool Schemas\n\n' -%}
{%- set tools_footer = '\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n' -%}
{%- set ns = namespace(system_prompt='', is_first_sp=true, has_tool_calls=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if ns.is_first_sp -%}
      {%- set ns.system_prompt = ns.system_prompt + (message['content'] or '') -%}
      {%- set ns.is_first_sp = false -%}
    {%- else -%}
      {%- set ns.system_prompt = ns.system_prompt + '\n\n' + (message['content'] or '') -%}
    {%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if tools is defined and tools -%}
  {%- set has_tools = true -%}
  {%- set ts = namespace(schemas='') -%}
  {%- for tool in tools -%}
    {%- if tool['type'] == 'function' -%}
      {%- set ts.schemas = ts.schemas + (tool['function'] | tojson) + '\n' -%}
    {%- endif -%}
  {%- endfor -%}
  {%- if ns.system_prompt -%}
    {%- set ns.system_prompt = ns.system_prompt + '\n\n' + tools_header + ts.schemas + tools_footer -%}
  {%- else -%}
    {%- set ns.system_prompt = tools_header + ts.schemas + tools_footer -%}
  {%- endif -%}
{%- endif -%}
{%- if response_format is defined -%}
  {%- if ns.system_prompt -%}
    {%- set ns.system_prompt = ns.system_prompt + '\n\n' -%}
  {%- endif -%}
  {%- set ns.system_prompt = ns.system_prompt + response_format_template + (response_format | tojson) -%}
{%- endif -%}
{{- bos_token -}}
{%- if messages and thinking and reasoning_effort is defined and reasoning_effort == 'max' -%}
  {{- reasoning_effort_max -}}
{%- endif -%}
{{- ns.system_prompt -}}
{%- set last_user_idx = namespace(value=-1) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'user' or message['role'] == 'developer' or message['role'] == 'tool' -%}
    {%- set last_user_idx.value = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- set state = namespace(in_user=false) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'tool' -%}
    {%- set ns.has_tool_calls = true -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- if message['role'] == 'user' or message['role'] == 'developer' -%}
    {%- if state.in_user -%}
      {{- '\n\n' -}}
    {%- else -%}
      {{- '<｜User｜>' -}}
      {%- set state.in_user = true -%}
    {%- endif -%}
    {{- message['content'] or '' -}}
  {%- elif message['role'] == 'tool' -%}
    {%- if state.in_user -%}
      {{- '\n\n' -}}
    {%- else -%}
      {{- '<｜User｜>' -}}
      {%- set state.in_user = true -%}
    {%- endif -%}
    {{- '<tool_result>' + (message['content'] or '') + '</tool_result>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- set state.in_user = false -%}
    {{- '<｜Assistant｜>' -}}
    {%- set is_after_last_user = loop.index0 > last_user_idx.value -%}
    {%- set keep_reasoning = thinking and ((not drop_thinking) or has_tools or is_after_last_user or ns.has_tool_calls) -%}
    {%- if keep_reasoning -%}
      {{- thinking_start_token -}}
      {%- if message['reasoning_content'] is defined and message['reasoning_content'] -%}
        {{- message['reasoning_content'] -}}
      {%- endif -%}
      {{- thinking_end_token -}}
    {%- else -%}
      {{- thinking_end_token -}}
    {%- endif -%}
    {%- if message['content'] is defined and message['content'] -%}
      {{- message['content'] -}}
    {%- endif -%}
    {%- if message['tool_calls'] -%}
      {{- '\n\n<' + dsml_token + 'tool_calls>\n' -}}
      {%- for tool in message['tool_calls'] -%}
        {%- set func = tool['function'] -%}
        {{- '<' + dsml_token + 'invoke name="' + func['name'] + '">\n' -}}
        {%- set args = func['arguments'] -%}
        {%- if args is string -%}
          {%- set args = args | from_json -%}
        {%- endif -%}
        {%- for key, val in args.items() -%}
          {%- if val is string -%}
            {{- '<' + dsml_token + 'parameter name="' + key + '" string="true">' + val + '</' + dsml_token + 'parameter>\n' -}}
          {%- else -%}
            {{- '<' + dsml_token + 'parameter name="' + key + '" string="false">' + (val | tojson) + '</' + dsml_token + 'parameter>\n' -}}
          {%- endif -%}
        {%- endfor -%}
        {%- if not args -%}
          {{- '\n' -}}
        {%- endif -%}
        {{- '</' + dsml_token + 'invoke>\n' -}}
      {%- endfor -%}
      {{- '</' + dsml_token + 'tool_calls>' -}}
    {%- endif -%}
    {{- '<｜end▁of▁sentence｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<｜Assistant｜>' -}}
  {%- if thinking -%}
    {{- thinking_start_token -}}
  {%- else -%}
    {{- thinking_end_token -}}
  {%- endif -%}
{%- endif -%}
"##;

/// llama.cpp's `deepseek-ai-DeepSeek-V4-Flash-0731.jinja` differs from the preview template only in its effort
/// prompts (checked line by line against the same fork); rebuilt here by substituting those lines.
fn llama_cpp_deepseek_v4_0731_jinja() -> String {
    let set_max = "{%- set reasoning_effort_max = 'Reasoning Effort: Absolute maximum";
    let emit_max =
        "{%- if messages and thinking and reasoning_effort is defined and reasoning_effort == 'max' -%}\n  {{- reasoning_effort_max -}}\n";
    assert!(
        LLAMA_CPP_DEEPSEEK_V4_JINJA.contains(set_max)
            && LLAMA_CPP_DEEPSEEK_V4_JINJA.contains(emit_max)
    );
    LLAMA_CPP_DEEPSEEK_V4_JINJA
        .replace(set_max, "{%- set reasoning_effort_high = 'Reasoning Effort: Absolute maximum")
        .replace(
            "{%- set response_format_template",
            "{%- set reasoning_effort_max = 'Reasoning Effort: Beyond maximum — exhaustive, relentless, and \
uncompromising.\\nYou MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively \
decompose the problem into its most fundamental components, trace every causal chain to its root, and resolve the \
underlying cause rather than any surface symptom.\\nDo not stop reasoning until you have independently verified the \
solution from multiple angles and are certain that no assumption remains unchecked and no error remains \
undiscovered.\\n\\n' -%}\n{%- set response_format_template",
        )
        .replace(
            emit_max,
            "{%- if messages and thinking and reasoning_effort is defined and reasoning_effort == 'high' -%}\n  \
{{- reasoning_effort_high -}}\n{%- elif messages and thinking and reasoning_effort is defined and reasoning_effort \
== 'max' -%}\n  {{- reasoning_effort_max -}}\n",
        )
}

fn option_grid(revision: PromptRevision) -> Vec<ChatOptions> {
    let mut grid = Vec::new();
    for thinking in [false, true] {
        for drop_thinking in [true, false] {
            for reasoning_effort in [
                None,
                Some(Effort::Low),
                Some(Effort::High),
                Some(Effort::Max),
            ] {
                grid.push(ChatOptions {
                    thinking,
                    reasoning_effort,
                    drop_thinking,
                    revision,
                });
            }
        }
    }
    grid
}

#[test]
fn llama_cpp_v4_template_renders_like_the_builtin_renderer() {
    for messages in agreed_conversations() {
        for options in option_grid(PromptRevision::Preview) {
            let builtin = render(&messages, &options, true);
            let jinja =
                render_with_template(LLAMA_CPP_DEEPSEEK_V4_JINJA, &messages, &options).unwrap();
            assert_eq!(jinja, builtin, "{messages:?} {options:?}");
        }
    }
}

#[test]
fn llama_cpp_v4_0731_template_renders_like_the_builtin_renderer() {
    let template = llama_cpp_deepseek_v4_0731_jinja();
    for messages in agreed_conversations() {
        for options in option_grid(PromptRevision::R0731) {
            let builtin = render(&messages, &options, true);
            let jinja = render_with_template(&template, &messages, &options).unwrap();
            assert_eq!(jinja, builtin, "{messages:?} {options:?}");
        }
    }
}

#[test]
fn template_without_generation_prompt_matches_too() {
    let messages = [Message::system("S"), Message::user("Q")];
    let options = thinking();
    let jinja =
        render_with_template_ext(LLAMA_CPP_DEEPSEEK_V4_JINJA, &messages, &options, false).unwrap();
    assert_eq!(jinja, render(&messages, &options, false));
    assert_eq!(jinja, format!("{BOS}S{USER}Q"));
}

#[test]
fn template_python_methods_and_errors() {
    let messages = [Message::system("  padded  "), Message::user("Hello world")];
    let template = "{{ bos_token }}{% for m in messages %}[{{ m.content.strip() }}|{{ m.content.startswith('Hello') }}\
                    |{{ m.get('reasoning_content', 'none') }}|{{ m.content.split() | length }}]{% endfor %}\
                    {% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}{{ '{\"x\": [1, 2]}' | from_json | tojson }}";
    let out = render_with_template(template, &messages, &thinking()).unwrap();
    // minijinja prints booleans and JSON as Python's Jinja does.
    assert_eq!(
        out,
        format!("{BOS}[padded|False|none|1][Hello world|True|none|2]a=1{{\"x\": [1, 2]}}")
    );

    let raised = render_with_template(
        "{{ raise_exception('no tools here') }}",
        &messages,
        &thinking(),
    );
    match raised {
        Err(ChatError::Template { detail }) => {
            assert!(detail.contains("no tools here"), "{detail}")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    assert!(matches!(
        render_with_template("{% if %}", &messages, &thinking()),
        Err(ChatError::Template { .. })
    ));
}

// ---------------------------------------------------------------------------------------------------------------
// Incremental chat
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn common_prefix_stays_on_char_boundaries() {
    assert_eq!(common_prefix_len("abc", "abd"), 2);
    assert_eq!(common_prefix_len("abc", "abc"), 3);
    assert_eq!(common_prefix_len("abc", "ab"), 2);
    assert_eq!(common_prefix_len("", "x"), 0);
    // "é" and "è" share their first UTF-8 byte; the prefix must not split the character.
    assert_eq!(common_prefix_len("é", "è"), 0);
    assert_eq!(
        common_prefix_len("<｜User｜>", "<｜Assistant｜>"),
        "<｜".len()
    );
}

#[test]
fn next_turn_reuses_up_to_the_last_answers_assistant_marker_when_reasoning_is_dropped() {
    let options = thinking();
    let first = render(&[Message::user("u1")], &options, true);
    // What the session's cache holds after generating the answer.
    let cached = format!("{first}r1</think>a1{EOS}");
    let history = [
        Message::user("u1"),
        Message::assistant_with_reasoning("r1", "a1"),
        Message::user("u2"),
    ];
    let next = render_incremental(&cached, &history, &options, true);
    assert_eq!(next.reuse_bytes, format!("{BOS}{USER}u1{ASSISTANT}").len());
    assert_eq!(
        next.suffix(),
        format!("</think>a1{EOS}{USER}u2{ASSISTANT}<think>")
    );
}

#[test]
fn keeping_reasoning_makes_the_rendering_append_only() {
    let options = ChatOptions {
        drop_thinking: false,
        ..thinking()
    };
    let first = render(&[Message::user("u1")], &options, true);
    let cached = format!("{first}r1</think>a1{EOS}");
    let history = [
        Message::user("u1"),
        Message::assistant_with_reasoning("r1", "a1"),
        Message::user("u2"),
    ];
    let next = render_incremental(&cached, &history, &options, true);
    assert_eq!(next.reuse_bytes, cached.len());
    assert_eq!(next.suffix(), format!("{USER}u2{ASSISTANT}<think>"));
}

#[test]
fn reuse_backs_off_to_a_special_token_boundary() {
    let previous = format!("{BOS}{USER}Hello wor");
    let current = format!("{BOS}{USER}Hello world{ASSISTANT}</think>");
    assert_eq!(
        reusable_prefix_len(&previous, &current),
        format!("{BOS}{USER}").len()
    );
    assert_eq!(reusable_prefix_len("", &current), 0);
    assert_eq!(reusable_prefix_len("different", &current), 0);
}

#[test]
fn prompt_format_accepts_llama_cpp_templates_and_sets_aside_others() {
    for template in [
        LLAMA_CPP_DEEPSEEK_V4_JINJA.to_string(),
        llama_cpp_deepseek_v4_0731_jinja(),
    ] {
        let format = PromptFormat::new(Some(&template));
        assert_eq!(format.template_check(), &TemplateCheck::Agrees);
        assert_eq!(format.note(), None);
    }
    assert_eq!(
        PromptFormat::new(None).template_check(),
        &TemplateCheck::Absent
    );
    let other = PromptFormat::new(Some("{% for m in messages %}{{ m.content }}{% endfor %}"));
    assert!(matches!(
        other.template_check(),
        TemplateCheck::Differs { .. }
    ));
    assert!(other.note().unwrap().contains("using DeepSeek V4's format"));
    let broken = PromptFormat::new(Some("{% for %}"));
    assert!(matches!(broken.template_check(), TemplateCheck::Fails(_)));
    // Whatever the template, the prompt is the built-in renderer's.
    let messages = [Message::user("Hi")];
    assert_eq!(
        other.render(&messages, &thinking(), true),
        render(&messages, &thinking(), true)
    );
}

/// A hostile chat template (issue 15): nested loops that would take 10^15 steps end at the step limit with a clear
/// error, quickly, instead of hanging before generation starts; a real template stays far below the limit.
#[test]
fn a_template_that_runs_away_stops_at_the_step_limit() {
    let messages = [Message::user("hi")];
    let runaway =
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
                   {{ '' }}{% endfor %}{% endfor %}{% endfor %}";
    let start = std::time::Instant::now();
    let err = render_with_template(runaway, &messages, &thinking()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ChatError::Template { .. }) && text.contains("steps without finishing"),
        "{text}"
    );
    assert!(
        text.contains(&ferrite::chat::TEMPLATE_FUEL.to_string()),
        "{text}"
    );
    eprintln!("stopped after {:?}", start.elapsed());
    // llama.cpp's DeepSeek V4 template on a long conversation renders well within the limit.
    let long: Vec<Message> = (0..200)
        .flat_map(|i| {
            [
                Message::user(format!("question {i}")),
                Message::assistant(format!("answer {i}")),
            ]
        })
        .collect();
    render_with_template(LLAMA_CPP_DEEPSEEK_V4_JINJA, &long, &thinking()).unwrap();
}
