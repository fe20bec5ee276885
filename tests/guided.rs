//! Guided decoding through the engine (`framework::guide`, llguidance): 200
//! seeded sampled requests over five JSON schemas, every output parsed and
//! validated by Python's `jsonschema` (installed by
//! `tests/support/python-env.sh`, checked by `tests/support/check_guided.py`);
//! regular expressions and choices likewise; the same greedy output whether
//! guided requests share their steps with unguided ones or not; and the
//! requests that cannot be guided, refused with the field named.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use framework::chat::ChatMessage;
use framework::guide::Guide;
use framework::{FinishReason, SamplingParams};
use parallm::{BeamParams, Engine, Event, EventStream, Prompt, Request};
use serde_json::{json, Value};

fn engine() -> Engine {
    Engine::builder()
        .model_path(common::model_path())
        .build()
        .expect("engine starts")
}

fn chat(text: &str) -> Prompt {
    Prompt::Chat(vec![ChatMessage::new("user", text)])
}

fn guided(prompt: Prompt, guide: Guide, seed: u64, temperature: f32) -> Request {
    Request {
        prompt,
        params: SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::greedy(200)
        },
        guide: Some(guide),
        ..Request::greedy("", 200)
    }
}

/// A request's text and why it ended.
fn collect(mut stream: EventStream) -> (String, FinishReason) {
    let mut text = String::new();
    loop {
        match stream.next_blocking() {
            Some(Event::Token { text: t, .. }) => text.push_str(&t),
            Some(Event::Finished { reason, .. }) => return (text, reason),
            Some(Event::Failed { error }) => panic!("a guided request failed: {error}"),
            other => panic!("unexpected end: {other:?}"),
        }
    }
}

/// Runs the checks of `tests/support/check_guided.py` on `entries`.
fn python_check(entries: &[Value]) {
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/python-env.sh");
    let out = Command::new("bash")
        .arg(env)
        .stderr(Stdio::inherit())
        .output()
        .expect("python-env.sh runs");
    assert!(out.status.success(), "python-env.sh failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let python = stdout.lines().last().expect("the venv's python").trim();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/check_guided.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("check_guided.py starts");
    let input = serde_json::to_vec(entries).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    let v: Value = serde_json::from_str(report.trim()).expect("one JSON line");
    assert_eq!(v["checked"].as_u64(), Some(entries.len() as u64));
    assert!(
        out.status.success(),
        "outputs that do not validate: {report}"
    );
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe a user and their address as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "user": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 16},
                            "address": {
                                "type": "object",
                                "properties": {
                                    "city": {"type": "string", "maxLength": 16},
                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                                },
                                "required": ["city", "zip"],
                                "additionalProperties": false
                            }
                        },
                        "required": ["name", "address"],
                        "additionalProperties": false
                    }
                },
                "required": ["user"],
                "additionalProperties": false
            }),
        ),
        (
            "List a few fruits as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": 12},
                        "minItems": 1,
                        "maxItems": 4
                    }
                },
                "required": ["items"],
                "additionalProperties": false
            }),
        ),
        (
            "Pick a shirt as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "color": {"enum": ["red", "green", "blue"]},
                    "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                    "count": {"enum": [1, 2, 3]}
                },
                "required": ["color", "size", "count"],
                "additionalProperties": false
            }),
        ),
        (
            "Give an age and a score as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                    "rank": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10}
                },
                "required": ["age", "score", "rank"],
                "additionalProperties": false
            }),
        ),
        (
            "Describe a book as JSON.",
            json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 20},
                    "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "maxLength": 8},
                        "maxItems": 3
                    },
                    "draft": {"type": "boolean"}
                },
                "required": ["title"],
                "additionalProperties": false
            }),
        ),
    ]
}

#[test]
fn two_hundred_sampled_outputs_validate_against_their_schemas() {
    let e = engine();
    let schemas = schemas();
    let streams: Vec<(usize, EventStream)> = (0..200u64)
        .map(|i| {
            let k = i as usize % schemas.len();
            let (ask, schema) = &schemas[k];
            let req = guided(chat(ask), Guide::JsonSchema(schema.clone()), i, 1.0);
            (k, e.generate(req).expect("accepted"))
        })
        .collect();
    let mut entries = Vec::new();
    let mut lengths = 0;
    for (k, s) in streams {
        let (text, reason) = collect(s);
        lengths += (reason == FinishReason::Length) as usize;
        entries.push(json!({"kind": "json_schema", "schema": schemas[k].1, "text": text}));
    }
    e.shutdown();
    println!(
        "first outputs: {}",
        entries
            .iter()
            .take(5)
            .map(|e| e["text"].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert_eq!(lengths, 0, "outputs cut by max_tokens");
    python_check(&entries);
}

#[test]
fn regexes_and_choices_hold_and_unguided_neighbours_are_unchanged() {
    let e = engine();
    let plain = |e: &Engine| {
        let s = e
            .generate(Request::greedy("The capital of France is", 12))
            .expect("accepted");
        collect(s).0
    };
    // Greedy unguided output alone, then beside guided requests.
    let alone = plain(&e);
    let mut streams = Vec::new();
    let mut entries = Vec::new();
    for i in 0..12u64 {
        let (guide, expect) = match i % 3 {
            0 => (
                Guide::Regex(r"[0-9]{3}-[0-9]{4}".into()),
                json!({"kind": "regex", "pattern": "[0-9]{3}-[0-9]{4}"}),
            ),
            1 => (
                Guide::Choice(vec!["red".into(), "green".into(), "light blue".into()]),
                json!({"kind": "choice", "choices": ["red", "green", "light blue"]}),
            ),
            _ => (
                Guide::Lark(
                    r#"start: "yes" | "no" | "maybe, " NUMBER
NUMBER: /[1-9][0-9]?/"#
                        .into(),
                ),
                json!({"kind": "regex", "pattern": "yes|no|maybe, [1-9][0-9]?"}),
            ),
        };
        let req = guided(chat("Answer briefly."), guide, i, 1.0);
        streams.push((expect, e.generate(req).expect("accepted")));
    }
    let beside = plain(&e);
    for (mut expect, s) in streams {
        let (text, reason) = collect(s);
        assert_eq!(reason, FinishReason::Stop, "{text}");
        expect["text"] = Value::from(text);
        entries.push(expect);
    }
    e.shutdown();
    assert_eq!(
        alone, beside,
        "a guided neighbour changed an unguided output"
    );
    python_check(&entries);
}

#[test]
fn requests_that_cannot_be_guided_are_refused_by_field() {
    let e = engine();
    let refused = |req: Request, field: &str| {
        let err = e.generate(req).expect_err("refused").to_string();
        assert!(err.contains(field), "{err}");
    };
    let bad_schema = Guide::JsonSchema(json!({"$ref": "#/nowhere"}));
    refused(guided(chat("x"), bad_schema, 0, 1.0), "response_format");
    refused(
        guided(chat("x"), Guide::Regex("(unclosed".into()), 0, 1.0),
        "guided_regex",
    );
    refused(
        guided(chat("x"), Guide::Choice(vec![]), 0, 1.0),
        "guided_choice",
    );
    refused(
        guided(
            chat("x"),
            Guide::Lark("start: undefined_rule".into()),
            0,
            1.0,
        ),
        "guided_grammar",
    );
    let beam = Request {
        beam: Some(BeamParams {
            width: 2,
            length_penalty: 1.0,
        }),
        ..guided(chat("x"), Guide::JsonObject, 0, 1.0)
    };
    refused(beam, "beam");
    let speculating = Request {
        speculative: Some(framework::speculative::Speculation {
            method: framework::speculative::SpecMethod::Ngram,
            ..Default::default()
        }),
        ..guided(chat("x"), Guide::JsonObject, 0, 1.0)
    };
    refused(speculating, "speculative");
    // The engine still serves; a JSON object cut by max_tokens ends with
    // `length`, a finished choice with `stop`.
    let cut = Request {
        params: SamplingParams {
            max_tokens: 6,
            ..SamplingParams::greedy(6)
        },
        ..guided(chat("A JSON object:"), Guide::JsonObject, 1, 0.0)
    };
    let (text, reason) = collect(e.generate(cut).expect("accepted"));
    assert_eq!(reason, FinishReason::Length, "{text}");
    assert!(text.starts_with('{'), "{text}");
    let choice = Guide::Choice(vec!["yes".into(), "no".into()]);
    let (text, reason) = collect(
        e.generate(guided(chat("Yes or no?"), choice, 1, 0.0))
            .expect("accepted"),
    );
    assert_eq!(reason, FinishReason::Stop, "{text}");
    assert!(text == "yes" || text == "no", "{text}");
    e.shutdown();
}

#[test]
fn choices_beyond_ascii_come_out_whole() {
    // The grammar forces the rest of a character once the model has drawn
    // its first byte: the forced bytes must become byte tokens, not U+FFFD
    // (which the grammar would then refuse, ending the text mid-character).
    let e = engine();
    let choices = [
        vec!["🙂 yes".to_string(), "🙃 no".to_string()],
        vec!["日本語".to_string(), "中文".to_string()],
    ];
    for (i, options) in choices.iter().enumerate() {
        for seed in 0..3 {
            let req = guided(chat("Pick one."), Guide::Choice(options.clone()), seed, 1.0);
            let (text, reason) = collect(e.generate(req).expect("accepted"));
            assert_eq!(
                reason,
                FinishReason::Stop,
                "choices {i}, seed {seed}: {text:?}"
            );
            assert!(
                options.contains(&text),
                "choices {i}, seed {seed}: {text:?}"
            );
        }
    }
    e.shutdown();
}

#[test]
fn a_grammar_past_the_decoders_limits_is_refused_naming_its_field() {
    // llguidance gives up on these only while generating (too many
    // alternatives in one parser row; a lexer too large to build): the
    // request ends refused, never as a finished text the grammar did not
    // produce.
    let e = engine();
    let many = Guide::Choice((0..5000).map(|i| format!("c{i}")).collect());
    let huge = Guide::Regex("(x{1000}){1000}".into());
    for (guide, field) in [(many, "guided_choice"), (huge, "guided_regex")] {
        let mut s = e
            .generate(guided(chat("x"), guide, 0, 0.0))
            .expect("accepted: the grammar compiles");
        let end = loop {
            match s.next_blocking() {
                Some(Event::Token { .. }) => {}
                other => break other,
            }
        };
        match end {
            Some(Event::Refused { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(reason.contains("gave up"), "{reason}");
            }
            other => panic!("{field}: expected a refusal, got {other:?}"),
        }
    }
    // The engine still serves.
    let ok = Guide::Choice(vec!["yes".into(), "no".into()]);
    let (text, _) = collect(e.generate(guided(chat("Yes?"), ok, 0, 0.0)).unwrap());
    assert!(text == "yes" || text == "no", "{text}");
    e.shutdown();
}
