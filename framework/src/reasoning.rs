//! Reasoning models' thoughts, read out of their output: a model such as
//! Qwen3, QwQ or DeepSeek-R1 writes `<think>…</think>` before its answer, and
//! an OpenAI-compatible server answers the thought as `reasoning_content`
//! and the rest as `content`. This module owns the format
//! ([`ReasoningFormat`]), whether a prompt already opened the thought
//! ([`ReasoningFormat::opened_by`], [`ReasoningFormat::leaves_open`]), and the split of a finished output
//! ([`split`]) and of a streamed one ([`ReasoningStream`]).
//!
//! **What is true of it:**
//! - A thought is read only at the start of the output: `<think>` after
//!   nothing but whitespace, or, where the prompt ended in `<think>` (the
//!   templates of DeepSeek-R1 and QwQ open it for the model) or a final
//!   message the model continues left it open, from the first character
//!   (a `<think>` the model writes again there is dropped). It
//!   ends at the first `</think>`, or with the output (a thought the length
//!   limit cut: no content).
//! - An output with no thought is all content, verbatim: the split changes
//!   nothing for a model that does not think, or was told not to.
//! - The thought is given without the whitespace around it, and the content
//!   after `</think>` without its leading whitespace (the `\n\n` models
//!   write there).
//! - A stream agrees with [`split`] of the whole text: its
//!   [`ReasoningOut::Reasoning`] pieces concatenate to [`Split::reasoning`]
//!   and its [`ReasoningOut::Content`] pieces to [`Split::content`],
//!   however the text is cut into pieces. To keep that exact, it holds back
//!   only what may still change meaning: the start of the output while it
//!   may still be whitespace before `<think>`, and in the thought a tail
//!   that may begin `</think>` or is whitespace.
//! - Nothing here fails on model output; a bad format name is an
//!   [`Error::Setting`].

use crate::error::{Error, Result};

/// The tag that opens a thought.
pub const THINK_OPEN: &str = "<think>";
/// The tag that closes a thought.
pub const THINK_CLOSE: &str = "</think>";

/// Whether a model's output is read for a thought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// No: the whole output is content.
    None,
    /// `<think>…</think>` at the start of the output (Qwen3, QwQ,
    /// DeepSeek-R1 and its distillations).
    Think,
}

impl ReasoningFormat {
    /// The format a chat template implies: [`ReasoningFormat::Think`] where
    /// it writes `</think>` (to open a thought for the model, or to drop
    /// earlier turns' thoughts), else [`ReasoningFormat::None`].
    pub fn detect(template_source: Option<&str>) -> ReasoningFormat {
        match template_source {
            Some(src) if src.contains(THINK_CLOSE) => ReasoningFormat::Think,
            _ => ReasoningFormat::None,
        }
    }

    /// A format named in configuration: `none`, or `think` (also by vLLM's
    /// parser names for it, `qwen3` and `deepseek_r1`).
    pub fn from_name(name: &str) -> Result<ReasoningFormat> {
        match name {
            "none" => Ok(ReasoningFormat::None),
            "think" | "qwen3" | "deepseek_r1" => Ok(ReasoningFormat::Think),
            other => Err(Error::Setting {
                field: "reasoning_format",
                reason: format!("is '{other}'; must be think (or qwen3, deepseek_r1) or none"),
            }),
        }
    }

    /// The configuration name ([`ReasoningFormat::from_name`]'s inverse).
    pub fn name(self) -> &'static str {
        match self {
            ReasoningFormat::None => "none",
            ReasoningFormat::Think => "think",
        }
    }

    /// Whether a prompt ending in `prompt_tail` (its last few tokens'
    /// text, or all of it) leaves a thought open for the model: it ends in
    /// `<think>` and maybe whitespace.
    pub fn opened_by(self, prompt_tail: &str) -> bool {
        self == ReasoningFormat::Think && prompt_tail.trim_end().ends_with(THINK_OPEN)
    }

    /// Whether an assistant message's text, continued by the model
    /// (`continue_final_message`), leaves a thought open: its last
    /// `<think>` is not closed after it.
    pub fn leaves_open(self, message: &str) -> bool {
        self == ReasoningFormat::Think
            && message
                .rfind(THINK_OPEN)
                .is_some_and(|at| !message[at..].contains(THINK_CLOSE))
    }
}

/// A finished output split into its thought and its content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    /// The thought, without the whitespace around it; `None` when the
    /// output has none (then [`Split::content`] is the whole output).
    pub reasoning: Option<String>,
    /// The rest: after a thought, without its leading whitespace.
    pub content: String,
}

/// Splits a finished output; `opened` says whether the prompt opened the
/// thought ([`ReasoningFormat::opened_by`]).
pub fn split(text: &str, opened: bool) -> Split {
    let mut s = ReasoningStream::new(opened);
    let mut outs = s.push(text);
    outs.extend(s.finish());
    let mut out = Split {
        reasoning: s.thought().then(String::new),
        content: String::new(),
    };
    for o in outs {
        match o {
            ReasoningOut::Reasoning(r) => {
                if let Some(t) = out.reasoning.as_mut() {
                    t.push_str(&r)
                }
            }
            ReasoningOut::Content(c) => out.content.push_str(&c),
        }
    }
    out
}

/// What a [`ReasoningStream`] gives out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningOut {
    /// More of the thought.
    Reasoning(String),
    /// More of the content.
    Content(String),
}

/// Where a [`ReasoningStream`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the output's start: what came may still be whitespace before
    /// `<think>`.
    Start,
    /// In the thought; `begun` once some of it went out (leading whitespace
    /// is dropped until then).
    Thinking { begun: bool },
    /// After `</think>`: dropping whitespace until the content begins.
    Closed,
    /// Everything is content.
    Content,
}

/// The incremental form of [`split`]: text goes in as it is decoded, pieces
/// of thought and content come out (the module doc says what holds of
/// them).
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    opened: bool,
    state: State,
    /// Text taken in and not yet given out.
    held: String,
    /// Whether a thought was read.
    thought: bool,
}

impl ReasoningStream {
    /// A stream for a prompt that `opened` the thought, or not.
    pub fn new(opened: bool) -> Self {
        Self {
            opened,
            state: State::Start,
            held: String::new(),
            thought: false,
        }
    }

    /// Whether the output began with a thought: known once its start is
    /// past, and always after [`ReasoningStream::finish`].
    pub fn thought(&self) -> bool {
        self.thought
    }

    /// Takes the next piece of output; gives what can no longer change
    /// meaning.
    pub fn push(&mut self, piece: &str) -> Vec<ReasoningOut> {
        self.held.push_str(piece);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let rest = self.held.trim_start();
                    if let Some(after) = rest.strip_prefix(THINK_OPEN) {
                        self.held = after.to_string();
                        self.begin_thought();
                    } else if THINK_OPEN.starts_with(rest) {
                        // Whitespace, or part of `<think>`: wait.
                        return out;
                    } else if self.opened {
                        self.begin_thought();
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Thinking { begun } => {
                    if !begun {
                        let start = self.held.len() - self.held.trim_start().len();
                        self.held.drain(..start);
                    }
                    if let Some(at) = self.held.find(THINK_CLOSE) {
                        let thought = self.held[..at].trim_end().to_string();
                        self.held.drain(..at + THINK_CLOSE.len());
                        push_nonempty(&mut out, ReasoningOut::Reasoning(thought));
                        self.state = State::Closed;
                        continue;
                    }
                    // Hold a tail that may begin `</think>`, and trailing
                    // whitespace (the thought's end drops it).
                    let keep = partial_tag_len(&self.held, THINK_CLOSE);
                    let end = self.held[..self.held.len() - keep].trim_end().len();
                    if end > 0 {
                        let given: String = self.held.drain(..end).collect();
                        out.push(ReasoningOut::Reasoning(given));
                        self.state = State::Thinking { begun: true };
                    }
                    return out;
                }
                State::Closed => {
                    let start = self.held.len() - self.held.trim_start().len();
                    self.held.drain(..start);
                    if self.held.is_empty() {
                        return out;
                    }
                    self.state = State::Content;
                }
                State::Content => {
                    let given = std::mem::take(&mut self.held);
                    push_nonempty(&mut out, ReasoningOut::Content(given));
                    return out;
                }
            }
        }
    }

    /// Ends the output: gives what was held. Nothing more goes in.
    pub fn finish(&mut self) -> Vec<ReasoningOut> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.held);
        match std::mem::replace(&mut self.state, State::Content) {
            // Whitespace or part of `<think>`: the thought itself where the
            // prompt opened one, else content as written.
            State::Start if self.opened => {
                self.thought = true;
                let thought = held.trim().to_string();
                push_nonempty(&mut out, ReasoningOut::Reasoning(thought));
            }
            State::Start | State::Content => {
                push_nonempty(&mut out, ReasoningOut::Content(held));
            }
            // A thought the output ended in: the held tail was no tag.
            State::Thinking { begun } => {
                let thought = match begun {
                    true => held.trim_end(),
                    false => held.trim(),
                };
                push_nonempty(&mut out, ReasoningOut::Reasoning(thought.to_string()));
            }
            State::Closed => {}
        }
        out
    }

    fn begin_thought(&mut self) {
        self.thought = true;
        self.state = State::Thinking { begun: false };
    }
}

fn push_nonempty(out: &mut Vec<ReasoningOut>, o: ReasoningOut) {
    let empty = match &o {
        ReasoningOut::Reasoning(s) | ReasoningOut::Content(s) => s.is_empty(),
    };
    if !empty {
        out.push(o);
    }
}

/// The length of the longest tail of `text` that is a proper beginning of
/// `tag` (ASCII, so every such tail starts on a character boundary).
fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.as_bytes().ends_with(&tag.as_bytes()[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str, opened: bool) -> (Option<String>, String) {
        let s = split(text, opened);
        (s.reasoning, s.content)
    }

    fn thought(reasoning: &str, content: &str) -> (Option<String>, String) {
        (Some(reasoning.to_string()), content.to_string())
    }

    #[test]
    fn a_thought_at_the_start_is_split_from_the_answer() {
        assert_eq!(
            whole("<think>\nLet me see.\n</think>\n\nParis.", false),
            thought("Let me see.", "Paris.")
        );
        // Whitespace before the tag; content's trailing whitespace kept.
        assert_eq!(
            whole("  \n<think>a</think>b \n", false),
            thought("a", "b \n")
        );
        // An empty thought (Qwen3 with thinking off writes none: its
        // template closes it in the prompt).
        assert_eq!(whole("<think>\n\n</think>\n\nHi", false), thought("", "Hi"));
    }

    #[test]
    fn an_output_without_a_thought_is_all_content_verbatim() {
        for text in [
            "",
            " Paris.",
            "The <think> tag",
            "<thin",
            "x</think>y",
            "<tool_call>{}</tool_call>",
        ] {
            assert_eq!(whole(text, false), (None, text.to_string()), "{text:?}");
        }
    }

    #[test]
    fn a_prompt_that_opened_the_thought_makes_the_output_start_in_it() {
        assert_eq!(
            whole("Hmm.\n</think>\n\nParis.", true),
            thought("Hmm.", "Paris.")
        );
        // A repeated opener is dropped.
        assert_eq!(
            whole("\n<think>Hmm.</think>Paris.", true),
            thought("Hmm.", "Paris.")
        );
        // Cut by the length limit inside the thought: no content.
        assert_eq!(whole("Hmm, let me", true), thought("Hmm, let me", ""));
        assert_eq!(whole("Hmm </thi", true), thought("Hmm </thi", ""));
        assert_eq!(whole("", true), thought("", ""));
        assert_eq!(whole(" <thi", true), thought("<thi", ""));
    }

    #[test]
    fn a_thought_the_output_ends_in_has_no_content() {
        assert_eq!(
            whole("<think>\nStep one. Step", false),
            thought("Step one. Step", "")
        );
        assert_eq!(whole("<think>a</think>  ", false), thought("a", ""));
    }

    #[test]
    fn the_format_is_read_from_the_template_and_the_prompt() {
        assert_eq!(ReasoningFormat::detect(None), ReasoningFormat::None);
        assert_eq!(
            ReasoningFormat::detect(Some("{{ content.split('</think>')[-1] }}")),
            ReasoningFormat::Think
        );
        assert_eq!(
            ReasoningFormat::detect(Some("<|im_start|>assistant")),
            ReasoningFormat::None
        );
        let think = ReasoningFormat::Think;
        assert!(think.opened_by("<｜Assistant｜><think>\n"));
        assert!(!think.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
        assert!(!think.opened_by("<|im_start|>assistant\n"));
        assert!(!ReasoningFormat::None.opened_by("<think>\n"));
        assert!(think.leaves_open("<think>\nLet me"));
        assert!(!think.leaves_open("<think>a</think>The answer"));
        assert!(!think.leaves_open("The answer"));
        assert!(!ReasoningFormat::None.leaves_open("<think>"));
        for name in ["think", "none"] {
            let f = ReasoningFormat::from_name(name).expect("known");
            assert_eq!(f.name(), name);
        }
        assert_eq!(
            ReasoningFormat::from_name("deepseek_r1").ok(),
            Some(ReasoningFormat::Think)
        );
        let err = ReasoningFormat::from_name("r1").expect_err("unknown");
        assert!(err.to_string().contains("'r1'"), "{err}");
    }

    /// Every way of cutting each text into two or three pieces streams to
    /// what the whole text splits into.
    #[test]
    fn a_stream_agrees_with_the_whole_split_however_the_text_is_cut() {
        let texts = [
            "<think>\nLet me see.\n</think>\n\nParis.",
            "  <think> a  b </think>  c d ",
            "<think></think>x",
            "<think>a </thinkx </think> b",
            "<think>a</think>",
            "The answer <think>",
            "<thi",
            " ",
            "Hmm.\n</think>\n\nParis.",
            "é<think>ü</think>ö",
            "<think>ü </ </th",
            "\n<think>Hmm.</think>Paris.",
        ];
        for text in texts {
            let chars: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            for opened in [false, true] {
                let expect = split(text, opened);
                for &a in &chars {
                    for &b in chars.iter().filter(|&&b| b >= a) {
                        let pieces = [&text[..a], &text[a..b], &text[b..]];
                        let mut s = ReasoningStream::new(opened);
                        let mut outs: Vec<ReasoningOut> =
                            pieces.iter().flat_map(|p| s.push(p)).collect();
                        outs.extend(s.finish());
                        let (mut r, mut c) = (String::new(), String::new());
                        for o in &outs {
                            match o {
                                ReasoningOut::Reasoning(x) => r.push_str(x),
                                ReasoningOut::Content(x) => c.push_str(x),
                            }
                        }
                        let at = format!("{text:?} opened={opened} cut at {a},{b}");
                        assert_eq!(c, expect.content, "{at}");
                        assert_eq!(s.thought(), expect.reasoning.is_some(), "{at}");
                        assert_eq!(r, expect.reasoning.clone().unwrap_or_default(), "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_stream_gives_the_thought_out_as_it_comes() {
        let mut s = ReasoningStream::new(false);
        assert!(s.push("<th").is_empty());
        assert!(s.push("ink>\n").is_empty());
        assert_eq!(s.push("One "), vec![ReasoningOut::Reasoning("One".into())]);
        assert!(s.thought());
        assert_eq!(
            s.push("two </th"),
            vec![ReasoningOut::Reasoning(" two".into())]
        );
        assert!(s.push("ink>\n\n").is_empty());
        assert_eq!(s.push("Yes"), vec![ReasoningOut::Content("Yes".into())]);
        assert_eq!(s.push("."), vec![ReasoningOut::Content(".".into())]);
        assert!(s.finish().is_empty());
        // Content without a thought goes out as soon as it cannot be one.
        let mut s = ReasoningStream::new(false);
        assert_eq!(s.push(" Hi"), vec![ReasoningOut::Content(" Hi".into())]);
        assert!(!s.thought());
    }
}
