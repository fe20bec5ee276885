//! What users send to the engine and what they get back.
//!
//! A [`Request`] is validated and tokenized by the engine into an [`LlmTask`];
//! its requester holds the matching [`EventStream`]. Events arrive in order:
//! zero or more [`Event::Token`]s, then exactly one terminal event
//! ([`Event::Finished`], [`Event::Failed`] or [`Event::Cancelled`]).
//!
//! **Invariant:** a [`Responder`] dropped without having sent its terminal
//! event sends [`Event::Failed`] from its destructor, so a requester is never
//! left waiting in silence.

use std::pin::Pin;
use std::task::{Context, Poll};

use framework::chat::ChatMessage;
use framework::sampling::TokenLogprob;
use framework::{FinishReason, SamplingParams};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::kit::{Task, TaskId};

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized as is.
    Text(String),
    /// Token ids (the only kind a model without a tokenizer accepts).
    Tokens(Vec<u32>),
    /// Messages rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// Beam search instead of sampling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamParams {
    /// Beams kept.
    pub width: usize,
    /// Length-normalisation exponent (1.0: average log-probability).
    pub length_penalty: f32,
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What to continue.
    pub prompt: Prompt,
    /// Sampling parameters (including `max_tokens` and stop strings).
    pub params: SamplingParams,
    /// Beam search, if wanted (sampling parameters other than `max_tokens` are
    /// then ignored).
    pub beam: Option<BeamParams>,
    /// Higher runs first.
    pub priority: i32,
}

impl Request {
    /// Greedy decoding of `text` for up to `max_tokens` tokens.
    pub fn greedy(text: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            params: SamplingParams::greedy(max_tokens),
            beam: None,
            priority: 0,
        }
    }

    /// Greedy decoding of token ids.
    pub fn greedy_tokens(tokens: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Tokens(tokens),
            params: SamplingParams::greedy(max_tokens),
            beam: None,
            priority: 0,
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// One beam of a beam search, best first in [`Event::Finished::beams`].
pub use framework::generate::BeamResult as BeamOutput;

/// What a requester receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty while a
    /// multi-byte character or a possible stop string is pending).
    Token {
        /// The token id.
        token: u32,
        /// Text safe to show now.
        text: String,
        /// Its log-probability and the best alternatives, when the request
        /// asked for [`SamplingParams::logprobs`].
        logprob: Option<TokenLogprob>,
    },
    /// The request is done.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Every generated token (for beam search: the best beam's).
        tokens: Vec<u32>,
        /// The whole generated text.
        text: String,
        /// Text not yet sent in a token event (held back until the end).
        tail: String,
        /// Beam search results, best first (empty when sampling).
        beams: Vec<BeamOutput>,
    },
    /// The request failed; nothing more will come.
    Failed {
        /// Why.
        error: String,
    },
    /// The request was cancelled.
    Cancelled,
}

impl Event {
    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Event::Token { .. })
    }
}

/// The sending side of a request's events.
#[derive(Debug)]
pub struct Responder {
    tx: UnboundedSender<Event>,
    ended: bool,
}

impl Responder {
    /// A responder and the stream it feeds.
    pub fn channel(id: TaskId) -> (Self, EventStream) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Self { tx, ended: false }, EventStream { id, rx })
    }

    /// Sends a non-terminal event.
    pub fn send(&self, event: Event) {
        debug_assert!(!event.is_terminal());
        // A requester that went away no longer needs its events.
        let _ = self.tx.send(event);
    }

    /// Sends the terminal event.
    pub fn end(mut self, event: Event) {
        debug_assert!(event.is_terminal());
        let _ = self.tx.send(event);
        self.ended = true;
    }

    /// Whether the requester dropped its stream.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.send(Event::Failed {
                error: "the engine dropped the request without a result".into(),
            });
        }
    }
}

/// A request's events, in order.
#[derive(Debug)]
pub struct EventStream {
    id: TaskId,
    rx: UnboundedReceiver<Event>,
}

impl EventStream {
    /// The request's id (for [`crate::llm::Engine::cancel`]).
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The next event, waiting for it; `None` after the terminal event.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, blocking the calling thread.
    pub fn next_blocking(&mut self) -> Option<Event> {
        futures::executor::block_on(self.rx.recv())
    }

    /// Every event up to and including the terminal one, blocking.
    pub fn collect_blocking(mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.next_blocking() {
            let end = e.is_terminal();
            out.push(e);
            if end {
                break;
            }
        }
        out
    }
}

impl futures::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// A validated, tokenized request on its way through the pipeline.
#[derive(Debug)]
pub struct LlmTask {
    /// Its id.
    pub id: TaskId,
    /// Its priority.
    pub priority: i32,
    /// Prompt tokens (non-empty, fits the context with `max_tokens`).
    pub prompt: Vec<u32>,
    /// Validated sampling parameters.
    pub params: SamplingParams,
    /// Beam search, if wanted.
    pub beam: Option<BeamParams>,
    /// Where its events go.
    pub responder: Responder,
    /// When the engine accepted it (for queue time and latency metrics).
    pub arrived: std::time::Instant,
}

impl Task for LlmTask {
    fn id(&self) -> TaskId {
        self.id
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn cancelled(self) {
        metrics::counter!(framework::metrics::REQUEST_FAILURE, "reason" => "cancelled")
            .increment(1);
        self.responder.end(Event::Cancelled);
    }
    fn failed(self, reason: String) {
        metrics::counter!(framework::metrics::REQUEST_FAILURE, "reason" => "failed").increment(1);
        self.responder.end(Event::Failed { error: reason });
    }
}
