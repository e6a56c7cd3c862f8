use super::*;

fn matcher(specials: &[(&str, u8)]) -> SpecialMatcher {
    let tokens: Vec<String> = specials.iter().map(|(t, _)| t.to_string()).collect();
    let attrs: Vec<u8> = specials.iter().map(|(_, a)| *a).collect();
    SpecialMatcher::new(&tokens, &attrs)
}

#[test]
fn partition_takes_longest_tokens_first_and_controls_only_when_asked() {
    let m = matcher(&[
        ("<a>", attr::USER_DEFINED),
        ("<a><b>", attr::CONTROL),
        ("x", attr::USER_DEFINED),
        ("plain", attr::NORMAL),
    ]);
    let text = "q<a><b>x<a>plain";
    use Fragment::*;
    assert_eq!(
        m.partition(text, true),
        vec![Text(0..1), Token(1), Token(2), Token(0), Text(11..16)]
    );
    assert_eq!(
        m.partition(text, false),
        vec![
            Text(0..1),
            Token(0),
            Text(4..7),
            Token(2),
            Token(0),
            Text(11..16)
        ]
    );
    assert!(m.partition("", true).is_empty());
}

#[test]
fn plain_chunks_cut_after_newlines_and_inside_huge_whitespace_runs() {
    let line = format!("{}\n", "word ".repeat(1000));
    let text = line.repeat(40);
    let chunks = plain_chunks(&text);
    assert!(chunks.len() > 1);
    assert_eq!(chunks.concat(), text);
    for c in &chunks[1..] {
        assert!(c.starts_with("word"), "{:?}", &c[..10]);
    }
    // No cut before whitespace or punctuation other than ASCII, or inside a run of newlines.
    let text = format!("{}\n\n \u{3000}x", "a".repeat(CHUNK_BYTES));
    assert_eq!(plain_chunks(&text), vec![text.as_str()]);

    let spaces = format!("a{}b", " ".repeat(2 * MAX_WHITESPACE_RUN + 5));
    let chunks = plain_chunks(&spaces);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks.concat(), spaces);
    assert!(chunks.iter().all(|c| c.len() <= MAX_WHITESPACE_RUN + 1));
    assert!(plain_chunks("").is_empty());
}
