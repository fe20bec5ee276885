//! What users send to the engine and what they get back.
//!
//! A [`Request`] is validated and tokenized by the engine into an [`LlmTask`]
//! (what the scheduler needs) and a [`Registration`](crate::llm::merge::Registration)
//! (what the merger needs, with the [`Responder`]); its requester holds the
//! matching [`EventStream`]. Events arrive in order: the prompt's scores
//! ([`Event::PromptScores`], only when asked for, in prompt order), zero or
//! more [`Event::Token`]s, then exactly one terminal event ([`Event::Finished`],
//! [`Event::Failed`], [`Event::Refused`] or [`Event::Cancelled`]).
//!
//! **Invariants:** a [`Responder`] dropped without having sent its terminal
//! event sends [`Event::Failed`] from its destructor, so a requester is never
//! left waiting in silence. An [`EventStream`] dropped before its terminal
//! event cancels its request: the request is marked abandoned (the queue and
//! the scheduler drop it before batching) and a cancellation is sent, so its
//! KV blocks are freed by the next step.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use framework::chat::{ChatMessage, ChatTurn, RenderOptions};
use framework::guide::Guide;
use framework::sampling::TokenLogprob;
use framework::scoring::{PromptScore, PromptScoring};
use framework::speculative::Speculation;
use framework::tools::Tool;
use framework::{FinishReason, SamplingParams};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use kit::{Canceller, Task, TaskId};

use crate::llm::merge::Choices;
use crate::llm::step::SharedSampler;

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized as is.
    Text(String),
    /// Token ids (the only kind a model without a tokenizer accepts).
    Tokens(Vec<u32>),
    /// Messages rendered through the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Messages that may hold tool calls and results, and the tools the
    /// model may call, rendered through the chat template: as its `tools`
    /// variable where the template reads one, else folded into the messages
    /// in the model's call format ([`framework::tools::fold_into_messages`]).
    ChatTools {
        /// The conversation.
        messages: Vec<ChatTurn>,
        /// The tools offered (may be empty: a conversation with earlier
        /// calls and no tools offered now).
        tools: Vec<Tool>,
        /// How the template renders them: its extra variables, and
        /// whether the prompt opens the assistant's turn or continues the
        /// final message ([`RenderOptions::default`]: opens it).
        render: RenderOptions,
    },
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
    /// Beam search, if wanted: of the sampling parameters, `max_tokens`,
    /// `stop` (a beam whose text holds one ends there) and `ignore_eos`
    /// apply, the others are ignored, and `logprobs` and `logit_bias` are
    /// refused.
    pub beam: Option<BeamParams>,
    /// Higher runs first.
    pub priority: i32,
    /// Speculative decoding for this request (`None`: the engine's default,
    /// [`crate::llm::EngineConfig::speculative`]).
    pub speculative: Option<Speculation>,
    /// Score the prompt's tokens ([`Event::PromptScores`]). With it,
    /// `max_tokens` may be 0: the request ends after its prompt.
    pub prompt_logprobs: Option<PromptScoring>,
    /// Hold the output to a JSON schema, regex, choice list or grammar
    /// ([`framework::guide`]). A guided request does not speculate and
    /// cannot be a beam search.
    pub guide: Option<Guide>,
    /// Whether `params.max_tokens` is only a ceiling the caller did not
    /// choose (an API request without `max_tokens`): the engine then lowers
    /// it to what the context, and a replica's KV cache, leave after the
    /// prompt, instead of refusing the request. A prompt that leaves no
    /// room is refused all the same.
    pub fit_max_tokens: bool,
    /// What the request-level metrics make of it.
    pub traffic: Traffic,
    /// The choices of one request that asks for several, shared by each
    /// (the first is [`Traffic::Request`], the others
    /// [`Traffic::FurtherChoice`]), so that the request-level metrics count
    /// the request once, with its outcome as a whole; `None`: a request of
    /// one choice.
    pub choices: Option<Arc<Choices>>,
}

/// What a request is to the request-level metrics (requests, prompt
/// tokens, latencies; the step-level ones count every sequence alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Traffic {
    /// A request of its own: counted in full.
    #[default]
    Request,
    /// A further choice of one request (`n` > 1), whose first choice is
    /// counted: only its generated tokens count.
    FurtherChoice,
    /// Not a user's: the server's health probe of data-parallel replica
    /// `replica`, which it goes to whatever the load (one past the last
    /// replica: routed as any request). No request-level metric counts it,
    /// nor the routing counter.
    Probe {
        /// The replica it probes.
        replica: usize,
    },
}

impl Request {
    /// `prompt` continued as `params` say; every other field as
    /// [`Request::greedy`] has it (no beam search, guide or speculation of
    /// its own; priority 0). Set those fields on the result, or build the
    /// struct with `..Request::new(prompt, params)`, so that fields added
    /// later keep their defaults.
    pub fn new(prompt: Prompt, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            ..Self::greedy(String::new(), 0)
        }
    }

    /// Greedy decoding of `text` for up to `max_tokens` tokens.
    pub fn greedy(text: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            params: SamplingParams::greedy(max_tokens),
            beam: None,
            priority: 0,
            speculative: None,
            prompt_logprobs: None,
            guide: None,
            fit_max_tokens: false,
            traffic: Traffic::Request,
            choices: None,
        }
    }

    /// Greedy decoding of token ids.
    pub fn greedy_tokens(tokens: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Tokens(tokens),
            params: SamplingParams::greedy(max_tokens),
            beam: None,
            priority: 0,
            speculative: None,
            prompt_logprobs: None,
            guide: None,
            fit_max_tokens: false,
            traffic: Traffic::Request,
            choices: None,
        }
    }

    /// Scores the prompt `tokens` from token `first` on, generating nothing.
    pub fn score_tokens(tokens: Vec<u32>, scoring: PromptScoring) -> Self {
        Self {
            prompt_logprobs: Some(scoring),
            guide: None,
            ..Self::greedy_tokens(tokens, 0)
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens whose keys and values came from the prefix cache
    /// (OpenAI's `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// One beam of a beam search, best first in [`Event::Finished::beams`].
pub use framework::generate::BeamResult as BeamOutput;

/// What a requester receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Scores of prompt tokens, in prompt order, as the steps computing them
    /// complete (each token once).
    PromptScores(Vec<PromptScore>),
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
    /// The request turned out invalid while it ran, so it was ended: its
    /// guide's grammar went past what the guided decoder can follow (a
    /// server answers 400). Nothing more will come.
    Refused {
        /// The request field at fault (`response_format`, `guided_regex`,
        /// …).
        field: &'static str,
        /// What is wrong, after the field's name.
        reason: String,
    },
    /// The request was cancelled.
    Cancelled,
}

impl Event {
    /// Whether this event ends the stream.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Event::Token { .. } | Event::PromptScores(_))
    }
}

/// The sending side of a request's events.
#[derive(Debug)]
pub struct Responder {
    tx: UnboundedSender<Event>,
    ended: bool,
    /// Why the engine stopped for good, once it did: the error a request
    /// dropped without a result reports.
    stopped: Arc<OnceLock<String>>,
}

impl Responder {
    /// A responder and the stream it feeds; dropping the stream early sets
    /// `abandoned` and cancels the request through `canceller`.
    /// `stopped` holds why the engine stopped for good, once it did.
    pub fn channel(
        id: TaskId,
        canceller: Canceller,
        abandoned: Arc<AtomicBool>,
        stopped: Arc<OnceLock<String>>,
    ) -> (Self, EventStream) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = EventStream {
            id,
            rx,
            canceller,
            abandoned,
            ended: false,
        };
        (
            Self {
                tx,
                ended: false,
                stopped,
            },
            stream,
        )
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
            let error = match self.stopped.get() {
                Some(why) => why.clone(),
                None => "the engine stopped before the request finished (it was dropped)".into(),
            };
            let _ = self.tx.send(Event::Failed { error });
        }
    }
}

/// A request's events, in order. Dropping it before the terminal event
/// cancels the request.
#[derive(Debug)]
pub struct EventStream {
    id: TaskId,
    rx: UnboundedReceiver<Event>,
    canceller: Canceller,
    abandoned: Arc<AtomicBool>,
    /// The terminal event was received.
    ended: bool,
}

impl EventStream {
    fn seen(&mut self, e: Option<Event>) -> Option<Event> {
        match &e {
            Some(e) if e.is_terminal() => self.ended = true,
            None => self.ended = true,
            Some(_) => {}
        }
        e
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.ended {
            self.abandoned.store(true, Ordering::Release);
            self.canceller.cancel(self.id);
        }
    }
}

impl EventStream {
    /// The request's id (for [`crate::llm::Engine::cancel`]).
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The next event, waiting for it; `None` after the terminal event.
    pub async fn next(&mut self) -> Option<Event> {
        let e = self.rx.recv().await;
        self.seen(e)
    }

    /// The next event, blocking the calling thread.
    pub fn next_blocking(&mut self) -> Option<Event> {
        let e = futures::executor::block_on(self.rx.recv());
        self.seen(e)
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
        match self.rx.poll_recv(cx) {
            Poll::Ready(e) => Poll::Ready(self.seen(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The scheduling part of a validated, tokenized request.
#[derive(Debug)]
pub struct LlmTask {
    /// Its id.
    pub id: TaskId,
    /// Its priority.
    pub priority: i32,
    /// Prompt tokens (non-empty, fits the context with `max_tokens`).
    pub prompt: Vec<u32>,
    /// When the engine accepted it (for the queue-time metric).
    pub arrived: std::time::Instant,
    /// Set when its requester dropped the stream.
    pub abandoned: Arc<AtomicBool>,
    /// Its sampler (shared with the merger), or `None` for a beam search.
    pub sampler: Option<SharedSampler>,
    /// How it speculates (off for a beam search).
    pub speculative: Speculation,
    /// Tokens it generates at most.
    pub max_tokens: usize,
    /// What of its prompt it scores, if anything.
    pub scoring: Option<PromptScoring>,
    /// What the request-level metrics make of it.
    pub traffic: Traffic,
}

impl Task for LlmTask {
    fn id(&self) -> TaskId {
        self.id
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Acquire)
    }
    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.abandoned.clone())
    }
    fn exempt_from_capacity(&self) -> bool {
        // A health probe checks that the engine answers; a full queue must
        // not make a busy, healthy server look dead.
        matches!(self.traffic, Traffic::Probe { .. })
    }
}
