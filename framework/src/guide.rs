//! Guided (constrained) decoding: a request's output held to a JSON schema,
//! a regular expression, a list of choices or a Lark grammar, by the
//! `llguidance` crate (this module writes no grammar engine).
//!
//! [`GuideEnv`] is built once per tokenizer: every token's bytes (control
//! tokens marked as llguidance's special tokens, so no grammar text matches
//! them) in a token trie, and llguidance's parser factory over it.
//! [`GuideEnv::constraint`] compiles a request's [`Guide`]; a grammar the
//! compiler rejects is an [`Error::InvalidRequest`] naming the request's
//! field.
//!
//! A [`Constraint`] follows one sequence. Its token mask for the next
//! position is computed on a mask thread as soon as the previous token is
//! accepted ([`Constraint::accept`], called where the merger accepts the
//! token), so it is ready, or nearly, when the step's forward ends and the
//! draw reads it ([`Constraint::mask`] waits for it). Requests without a
//! guide never touch any of this.
//!
//! **What is true of it:** a draw through [`Constraint::apply`] only ever
//! gives a token the grammar allows there, or the end-of-sequence token once
//! the grammar is complete (or if the grammar allows nothing, which ends the
//! sequence); a mask is always for the state after every accepted token. A
//! mask llguidance gives up on (a grammar past its limits) allows only
//! end-of-sequence and sets [`Constraint::error`], which the merger reports
//! as the request's error instead of a finished text.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use llguidance::api::{GrammarWithLexer, StopReason, TopLevelGrammar};
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The name the grammar of [`Guide::AfterThought`]'s answer goes by.
const ANSWER: &str = "answer";

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Guide {
    /// Any JSON object (OpenAI's `response_format: {"type":"json_object"}`).
    JsonObject,
    /// JSON valid under this schema (`{"type":"json_schema", …}`).
    JsonSchema(Value),
    /// The same, asked for by vLLM's `guided_json` (errors name that field).
    GuidedJson(Value),
    /// Text matching this regular expression (vLLM's `guided_regex`).
    Regex(String),
    /// Exactly one of these strings (`guided_choice`).
    Choice(Vec<String>),
    /// Text of this Lark grammar (`guided_grammar`).
    Lark(String),
    /// Tool calls, by a Lark grammar built from the request's `tools`
    /// ([`crate::tools::guide`]; errors name `tools`).
    ToolCalls(String),
    /// A reasoning model's answer: a `<think>…</think>` thought held to
    /// nothing, then `guide` (its field named in errors). Where the prompt
    /// `opened` the thought, the output starts in it and must close it;
    /// else the thought may come first (after `<think>`) or not at all.
    /// Whitespace may stand between a thought and the guided answer (and
    /// nowhere the guide does not allow it).
    AfterThought {
        /// What the answer after the thought must match.
        guide: Box<Guide>,
        /// Whether the prompt opened the thought
        /// ([`crate::reasoning::ReasoningFormat::opened_by`]).
        opened: bool,
    },
}

impl Guide {
    /// The request field a guide comes from, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            Guide::JsonObject | Guide::JsonSchema(_) => "response_format",
            Guide::GuidedJson(_) => "guided_json",
            Guide::Regex(_) => "guided_regex",
            Guide::Choice(_) => "guided_choice",
            Guide::Lark(_) => "guided_grammar",
            Guide::ToolCalls(_) => "tools",
            Guide::AfterThought { guide, .. } => guide.field(),
        }
    }

    /// This guide held to the answer after a reasoning model's thought
    /// ([`Guide::AfterThought`]); the prompt `opened` it, or not.
    pub fn after_thought(self, opened: bool) -> Guide {
        match self {
            Guide::AfterThought { guide, .. } => Guide::AfterThought { guide, opened },
            guide => Guide::AfterThought {
                guide: Box::new(guide),
                opened,
            },
        }
    }

    fn grammar(&self) -> Result<TopLevelGrammar> {
        let bad = |reason: String| Error::InvalidRequest {
            field: self.field(),
            reason,
        };
        Ok(match self {
            Guide::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Guide::JsonSchema(schema) | Guide::GuidedJson(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(bad("must hold a JSON schema object".into()));
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Guide::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Guide::Choice(choices) => {
                if choices.is_empty() {
                    return Err(bad("must list at least one choice".into()));
                }
                // Lark string literals are JSON strings.
                let alternatives: Vec<String> = choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Guide::Lark(src) | Guide::ToolCalls(src) => TopLevelGrammar::from_lark(src.clone()),
            Guide::AfterThought { guide, opened } => {
                // The answer's grammars follow the thought's, the first one
                // named so the thought's can refer to it.
                let mut answer = guide.grammar()?;
                if let Some(first) = answer.grammars.first_mut() {
                    first.name = Some(ANSWER.into());
                }
                // Whitespace may follow a thought, never stand alone.
                let thought = match opened {
                    true => "thought WS?",
                    false => "(\"<think>\" thought WS?)?",
                };
                let lark = format!(
                    "start: {thought} @{ANSWER}\n\
                     thought[lazy]: /(.|\\n)*<\\/think>/\n\
                     WS: /[ \\t\\r\\n]+/\n"
                );
                let mut grammars = vec![GrammarWithLexer::from_lark(lark)];
                grammars.extend(answer.grammars);
                TopLevelGrammar {
                    grammars,
                    max_tokens: answer.max_tokens,
                }
            }
        })
    }
}

/// `schema` as OpenAI's strict mode reads it: every object schema that
/// does not say what other properties it allows (`additionalProperties`,
/// `patternProperties`, `unevaluatedProperties`) allows none, through
/// properties, items, alternatives and definitions. The branches of an
/// `allOf` are left open, since closing each would refuse the properties
/// the others name.
pub fn closed_objects(mut schema: Value) -> Value {
    close(&mut schema);
    schema
}

fn close(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let is_object = obj.contains_key("properties")
        || match obj.get("type") {
            Some(Value::String(t)) => t == "object",
            Some(Value::Array(ts)) => ts.iter().any(|t| t == "object"),
            _ => false,
        };
    let open_said = [
        "additionalProperties",
        "patternProperties",
        "unevaluatedProperties",
    ]
    .iter()
    .any(|k| obj.contains_key(*k));
    if is_object && !open_said {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions", "patternProperties"] {
        if let Some(Value::Object(m)) = obj.get_mut(key) {
            m.values_mut().for_each(close);
        }
    }
    for key in ["items", "additionalProperties", "contains", "not"] {
        if let Some(v) = obj.get_mut(key) {
            match v {
                Value::Array(a) => a.iter_mut().for_each(close),
                other => close(other),
            }
        }
    }
    for key in ["anyOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(a)) = obj.get_mut(key) {
            a.iter_mut().for_each(close);
        }
    }
}

/// A schema whose JSON has no free whitespace (llguidance's
/// `whitespace_flexible: false`), unless it sets its own options.
fn compact(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// A tokenizer as llguidance sees it: the trie of token bytes, and
/// tokenizing through parallm's own tokenizer.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokens of `s`, which need not be UTF-8: llguidance forces the
    /// bytes a grammar allows, and a character's bytes may be split between
    /// forced and drawn ones. Whole characters go through the tokenizer;
    /// stray bytes become the longest vocabulary entries holding them
    /// (byte tokens, at worst), never U+FFFD.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode_with(text, false).unwrap_or_default()
        })
    }
}

/// llguidance's view of one model's vocabulary; compiles guides.
pub struct GuideEnv {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for GuideEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuideEnv({} tokens)", self.vocab)
    }
}

impl GuideEnv {
    /// The environment of `tokenizer` for a model of `vocab` logits (ids at
    /// or past the tokenizer's vocabulary stand for nothing and are never
    /// allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self> {
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if !bytes.is_empty() {
                    return bytes.to_vec();
                }
                // A control token: llguidance's special-token marker, then
                // its text, so only a grammar naming it can match it.
                match tokenizer.token_text(id) {
                    Some(t) if !t.is_empty() => {
                        let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        w.extend_from_slice(t.as_bytes());
                        w
                    }
                    _ => Vec::new(),
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: vocab as u32,
            tok_eos: tokenizer.eos(),
            tok_bos: tokenizer.bos(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let env: TokEnv = Arc::new(Env {
            trie: TokTrie::from(&info, &words),
            tokenizer,
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Shard(format!("guided decoding cannot start: {e}")))?;
        factory.quiet();
        Ok(Self { factory, vocab })
    }

    /// Compiles `guide` for one sequence.
    pub fn constraint(&self, guide: &Guide) -> Result<Arc<Constraint>> {
        let parser =
            self.factory
                .create_parser(guide.grammar()?)
                .map_err(|e| Error::InvalidRequest {
                    field: guide.field(),
                    reason: format!("is a grammar llguidance does not compile: {e}"),
                })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidRequest {
                field: guide.field(),
                reason: format!("is a grammar llguidance does not compile: {e}"),
            });
        }
        let c = Arc::new(Constraint {
            matcher: Mutex::new(matcher),
            state: Mutex::new(MaskState::Pending),
            ready: Condvar::new(),
            vocab: self.vocab,
            field: guide.field(),
            error: OnceLock::new(),
        });
        c.schedule();
        Ok(c)
    }
}

/// The mask of the next position.
enum MaskState {
    /// Being computed on a mask thread.
    Pending,
    /// Allowed token ids (a bit per id).
    Ready(Arc<Vec<u32>>),
}

/// One sequence's grammar state and the mask of its next token.
pub struct Constraint {
    matcher: Mutex<Matcher>,
    state: Mutex<MaskState>,
    ready: Condvar,
    vocab: usize,
    /// The request field the guide came from.
    field: &'static str,
    /// Why the grammar engine gave up on a mask, once it did.
    error: OnceLock<String>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

/// Sends constraints whose mask is to be computed to the mask threads.
fn mask_threads() -> &'static Mutex<Sender<Arc<Constraint>>> {
    static THREADS: OnceLock<Mutex<Sender<Arc<Constraint>>>> = OnceLock::new();
    THREADS.get_or_init(|| {
        let (tx, rx) = channel::<Arc<Constraint>>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..2 {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("guide-mask-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().map(|r| r.recv());
                    match next {
                        Ok(Ok(c)) => c.compute(),
                        _ => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a guided-decoding mask thread: {e}");
            }
        }
        Mutex::new(tx)
    })
}

impl Constraint {
    /// Queues the mask of the current state on a mask thread (computed
    /// here if the threads are gone).
    fn schedule(self: &Arc<Self>) {
        let sent = mask_threads()
            .lock()
            .map(|tx| tx.send(self.clone()).is_ok())
            .unwrap_or(false);
        if !sent {
            self.compute();
        }
    }

    /// Computes the mask of the current state and wakes its readers.
    fn compute(&self) {
        let words = self.vocab.div_ceil(32);
        let mask = match self.matcher.lock() {
            // A token the grammar refused left the matcher in its error
            // state: `accept` said which kind of failure that was.
            Ok(m) if m.is_error() => Vec::new(),
            Ok(mut m) => match m.compute_mask_or_eos() {
                Ok(v) => {
                    let mut bits = v.as_slice().to_vec();
                    bits.resize(words, 0);
                    bits
                }
                Err(e) => {
                    // Set before the mask is ready, so the draw that reads
                    // this empty mask finds the error too.
                    let _ = self.error.set(headline(&e.to_string()));
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        if let Ok(mut s) = self.state.lock() {
            *s = MaskState::Ready(Arc::new(mask));
        }
        self.ready.notify_all();
    }

    /// The allowed tokens of the next position (a bit per id; empty when
    /// nothing is allowed), waiting for the mask thread if needed.
    pub fn mask(&self) -> Arc<Vec<u32>> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(_) => return Arc::new(Vec::new()),
        };
        loop {
            match &*s {
                MaskState::Ready(m) => return m.clone(),
                MaskState::Pending => match self.ready.wait(s) {
                    Ok(next) => s = next,
                    Err(_) => return Arc::new(Vec::new()),
                },
            }
        }
    }

    /// Sets every logit of `row` the grammar does not allow next to −∞;
    /// where it allows nothing, only `eos` stays.
    pub fn apply(&self, row: &mut [f32], eos: u32) {
        let mask = self.mask();
        let allowed = |i: usize| mask.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1);
        let any = mask.iter().any(|&w| w != 0);
        for (i, x) in row.iter_mut().enumerate() {
            let keep = if any { allowed(i) } else { i == eos as usize };
            if !keep {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// Moves the grammar past `token` and starts computing the next mask;
    /// an error when the grammar does not allow it, or when following it
    /// went past the grammar engine's limits (then [`Constraint::error`]
    /// holds it too).
    pub fn accept(self: &Arc<Self>, token: u32) -> Result<()> {
        if let Ok(mut s) = self.state.lock() {
            *s = MaskState::Pending;
        }
        let consumed = match self.matcher.lock() {
            Ok(mut m) => m.consume_token(token).map_err(|e| {
                let full = e.to_string();
                let e = headline(&full);
                // Moving past a token can outgrow the grammar engine's
                // limits too: the request's fault, as for a mask. The
                // matcher is in its error state by now (its stop reason
                // says only that), but the error's dump of the parser's
                // state names the reason it stopped.
                let too_complex = [StopReason::LexerTooComplex, StopReason::ParserTooComplex]
                    .iter()
                    .any(|r| full.contains(&format!("Stop: {r}")));
                if too_complex {
                    let _ = self.error.set(e.clone());
                }
                e
            }),
            Err(_) => Err("the grammar state was lost".into()),
        };
        self.schedule();
        consumed.map_err(|e| Error::Shard(format!("guided decoding: {e}")))
    }

    /// Why the grammar engine could not compute a mask (a grammar beyond
    /// its limits: too many alternatives at once, a lexer too large), as an
    /// invalid request naming the guide's field; `None` while it can. A
    /// sequence whose constraint has an error must end with it: its last
    /// mask allowed only end-of-sequence, which is no verdict on the text.
    pub fn error(&self) -> Option<Error> {
        self.error.get().map(|e| Error::InvalidRequest {
            field: self.field,
            reason: format!("holds a grammar the guided decoder gave up on while generating: {e}"),
        })
    }

    /// Whether the grammar has ended (nothing but end-of-sequence may
    /// follow).
    pub fn is_stopped(&self) -> bool {
        self.matcher.lock().map(|m| m.is_stopped()).unwrap_or(true)
    }
}

/// An llguidance error's first line (the rest dumps the parser's state).
fn headline(e: &str) -> String {
    e.lines().next().unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guides_name_their_fields() {
        assert_eq!(Guide::JsonObject.field(), "response_format");
        assert_eq!(Guide::Choice(vec![]).field(), "guided_choice");
        assert!(matches!(
            Guide::Choice(vec![]).grammar(),
            Err(Error::InvalidRequest {
                field: "guided_choice",
                ..
            })
        ));
        assert!(matches!(
            Guide::JsonSchema(Value::from(3)).grammar(),
            Err(Error::InvalidRequest {
                field: "response_format",
                ..
            })
        ));
        let c = compact(serde_json::json!({"type": "object"}));
        assert_eq!(c["x-guidance"]["whitespace_flexible"], false);
    }

    /// A guide after a thought: the thought is free text up to
    /// `</think>`, the answer after it held to the guide; where the prompt
    /// opened the thought the output must close it first.
    #[test]
    fn a_guide_after_a_thought_holds_only_the_answer() {
        let w = crate::tools::tests::Walker::new();
        let all = |text: &str| (text.len(), true, true);
        assert_eq!(w.walk(&Guide::JsonObject, "{\"a\":1}"), all("{\"a\":1}"));
        let json = Guide::JsonObject.after_thought(false);
        assert_eq!(json.field(), "response_format");
        for text in [
            "{\"a\":1}",
            "<think>\nFree {text} here.\n</think>\n\n{\"a\":1}",
            "<think></think>{\"a\":1}",
        ] {
            assert_eq!(w.walk(&json, text), all(text), "{text:?}");
        }
        // Not JSON after the thought, and no second thought.
        let bad = "<think>x</think>\n\nNo.";
        assert_eq!(w.walk(&json, bad).0, bad.find("No").unwrap_or(0));
        let twice = "<think>x</think><think>";
        assert_eq!(w.walk(&json, twice).0, twice.len() - "<think>".len());
        // An opened thought must close before the answer.
        let opened = Guide::Regex("[A-Z][a-z]+[.]".into()).after_thought(true);
        let text = "Let me see: <b>.\n</think>\n\nParis.";
        assert_eq!(w.walk(&opened, text), all(text));
        assert_eq!(w.walk(&opened, "Paris."), ("Paris.".len(), false, false));
        // Choices and forced calls too; rewrapping keeps one wrapper.
        let choice = Guide::Choice(vec!["yes".into(), "no".into()])
            .after_thought(false)
            .after_thought(true);
        assert!(
            matches!(&choice, Guide::AfterThought { guide, opened: true } if matches!(**guide, Guide::Choice(_)))
        );
        assert_eq!(w.walk(&choice, "hmm</think> no"), all("hmm</think> no"));
        // Without a thought, no whitespace the guide does not allow.
        let choice = Guide::Choice(vec!["yes".into()]).after_thought(false);
        assert_eq!(w.walk(&choice, "yes"), all("yes"));
        assert_eq!(w.walk(&choice, " yes").0, 0);
        let thought = "<think>a</think>\n yes";
        assert_eq!(w.walk(&choice, thought), all(thought));
    }

    #[test]
    fn strict_schemas_close_their_objects_but_not_all_of_branches() {
        let s = closed_objects(serde_json::json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                "m": {"type": "object", "additionalProperties": {"type": "integer"}},
                "l": {"type": "array", "items": {"properties": {"x": {}}}},
                "u": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                "r": {"$ref": "#/$defs/d"},
                "c": {"allOf": [{"properties": {"p": {}}}, {"properties": {"q": {}}}]}
            },
            "$defs": {"d": {"type": ["object", "null"], "properties": {}}}
        }));
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(
            s["properties"]["m"]["additionalProperties"]["type"],
            "integer"
        );
        assert_eq!(s["properties"]["l"]["items"]["additionalProperties"], false);
        assert_eq!(
            s["properties"]["u"]["anyOf"][0]["additionalProperties"],
            false
        );
        assert_eq!(
            s["properties"]["u"]["anyOf"][1].get("additionalProperties"),
            None
        );
        assert_eq!(s["$defs"]["d"]["additionalProperties"], false);
        assert_eq!(s["properties"]["r"].get("additionalProperties"), None);
        let all_of = &s["properties"]["c"]["allOf"];
        assert_eq!(all_of[0].get("additionalProperties"), None);
    }
}
