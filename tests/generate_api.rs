//! The library's generation API (`ferrite::generate`) on the demo model, without the CLI: stop conditions, streamed
//! text against the returned tokens, the session left holding prompt + answer, and the planned session sizes.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;

use ferrite::engine::{Engine, EngineOptions, PagingOptions};
use ferrite::generate::{generate, GenerateOptions, StopReason};
use ferrite::model::tiny::{write_tiny_model, TinyConfig};
use ferrite::sampler::{Sampler, SamplerConfig};

fn demo_engine(dir: &std::path::Path) -> Engine {
    let path = dir.join("demo.gguf");
    write_tiny_model(&path, &TinyConfig::demo(), 1).unwrap();
    let opts = EngineOptions {
        n_threads: 1,
        paging: PagingOptions {
            ctx_size: Some(64),
            n_ubatch: Some(8),
            ..PagingOptions::default()
        },
        ..EngineOptions::default()
    };
    Engine::open(&path, opts).unwrap()
}

fn greedy() -> Sampler {
    Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..SamplerConfig::default()
    })
}

#[test]
fn generate_streams_its_tokens_and_stops_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let engine = demo_engine(dir.path());
    assert_eq!((engine.n_ctx(), engine.n_ubatch()), (64, 8));
    let tokenizer = engine.tokenizer().unwrap();
    let prompt = tokenizer.encode("hello there, a prompt longer than one micro-batch", true);
    assert!(prompt.len() > 8);

    let mut session = engine.session().unwrap();
    assert_eq!((session.n_ctx(), session.n_ubatch()), (64, 8));
    let opts = GenerateOptions {
        max_tokens: Some(5),
        ..GenerateOptions::default()
    };
    let mut text = String::new();
    let r = generate(&mut session, &mut greedy(), &prompt, &opts, |piece| {
        text.push_str(piece);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(matches!(
        r.stop_reason,
        StopReason::TokenLimit | StopReason::EndOfGeneration(_)
    ));
    assert!(r.tokens.len() <= 5);
    assert_eq!(text, tokenizer.decode(&r.tokens));
    assert_eq!(r.timings.n_prompt, prompt.len());
    let mut held = prompt.clone();
    held.extend(&r.tokens);
    assert_eq!(session.tokens(), held.as_slice());

    // The same prompt in a fresh session with a set interrupt flag: nothing is processed.
    let flag = AtomicBool::new(true);
    let mut fresh = engine.session().unwrap();
    let opts = GenerateOptions {
        max_tokens: None,
        interrupt: Some(&flag),
        ..GenerateOptions::default()
    };
    let r = generate(&mut fresh, &mut greedy(), &prompt, &opts, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(r.stop_reason, StopReason::Interrupted);
    assert!(r.tokens.is_empty() && fresh.n_past() == 0);

    // A callback that breaks stops after its first piece; the session still holds that token.
    let mut fresh = engine.session().unwrap();
    let mut pieces = 0;
    let r = generate(
        &mut fresh,
        &mut greedy(),
        &prompt,
        &GenerateOptions::default(),
        |_| {
            pieces += 1;
            ControlFlow::Break(())
        },
    )
    .unwrap();
    if r.stop_reason == StopReason::Cancelled {
        assert_eq!(pieces, 1);
        assert_eq!(fresh.n_past(), prompt.len() + r.tokens.len());
    }

    // A small context fills up.
    let mut small = engine.session_sized(prompt.len() + 2, 4).unwrap();
    let r = generate(
        &mut small,
        &mut greedy(),
        &prompt,
        &GenerateOptions::default(),
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert!(matches!(
        r.stop_reason,
        StopReason::ContextFull | StopReason::EndOfGeneration(_)
    ));
}
