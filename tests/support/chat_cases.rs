//! Conversations the chat-format tests share.

use ferrite::chat::Message;

/// Conversations on which llama.cpp's template and DeepSeek's encoder agree. Left out where they differ: the
/// template joins system messages with "\n\n" and hoists them all to the top (the encoder writes each raw, in place),
/// and it writes `<｜Assistant｜>` before an assistant turn that no user turn precedes (the encoder does not).
pub fn agreed_conversations() -> Vec<Vec<Message>> {
    vec![
        vec![Message::user("Hi")],
        vec![Message::system("You are helpful."), Message::user("Hi")],
        vec![
            Message::system("SYS"),
            Message::user("q1"),
            Message::assistant_with_reasoning("r1", "a1"),
            Message::user("q2"),
            Message::assistant("a2"),
            Message::user("q3"),
        ],
        vec![
            Message::user("q1"),
            Message::assistant_with_reasoning("r1", "a1"),
        ],
        vec![
            Message::user("first"),
            Message::user("second"),
            Message::assistant_with_reasoning("", "a"),
        ],
        vec![
            Message::user("unicode: ｜DSML｜ 你好 — ok"),
            Message::assistant("{% raw %} stays text"),
        ],
    ]
}
