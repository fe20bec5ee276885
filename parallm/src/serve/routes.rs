//! The HTTP handlers: OpenAI's completions, chat completions and models, the
//! tokenizer endpoints, health and metrics.
//!
//! A generation handler reads the body (at most `server.max_body_bytes`),
//! validates it into engine requests, submits them all (or none: a refusal
//! cancels those already submitted), and answers as JSON or as server-sent
//! events. Every submitted request is held by a [`Tracked`] stream whose
//! destructor cancels it unless it ended, so a client that goes away —
//! whether it was waiting for JSON or reading a stream — cancels its work and
//! frees its KV blocks at the next scheduler step.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::header::{CacheControl, CacheDirective};
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::stream::{select_all, BoxStream};
use futures::StreamExt;
use serde_json::{json, Value};

use actors::llm::{BeamOutput, Engine, Event, EventStream, Request};
use framework::reasoning::{ReasoningOut, ReasoningStream};
use framework::sampling::TokenLogprob;
use framework::scoring::PromptScore;
use framework::tools::{StreamOut, Tool, ToolCall, ToolStream};
use framework::FinishReason;

use crate::serve::api::{
    api_error, chat_prompt, parse_body, ChatLogprobs, ChatRequest, ChatTokenLogprob,
    ChatTopLogprob, CompletionLogprobs, CompletionRequest, DetokenizeRequest, EmbedItem,
    EmbeddingRequest, ParamNames, TokenizeRequest, ToolUse, UsageOut, ValidGeneration,
};
use crate::serve::error::ApiError;
use crate::serve::{AppState, InFlight};

/// The socket of a request's connection, recorded when the connection opens
/// (see [`on_connect`]) so that a handler can notice the client leaving.
///
/// The descriptor stays valid for as long as a handler of that connection
/// runs: the handler's future is owned by the connection, which owns the socket.
#[derive(Debug, Clone, Copy)]
pub struct ConnFd(#[cfg(unix)] std::os::fd::RawFd);

/// Records [`ConnFd`] for each new connection.
pub fn on_connect(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    #[cfg(unix)]
    if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsRawFd;
        ext.insert(ConnFd(tcp.as_raw_fd()));
    }
}

/// How often a waiting handler looks for a departed client.
const DISCONNECT_POLL: Duration = Duration::from_millis(20);

/// Whether the peer of `fd` has closed or reset the connection.
#[cfg(unix)]
fn peer_gone(fd: ConnFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.0,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is a valid, exclusively borrowed pollfd for the duration of
    // the call, the count is 1 and the timeout 0 (no blocking); poll only
    // reads the descriptor's state and consumes no data from it.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

#[cfg(not(unix))]
fn peer_gone(_: ConnFd) -> bool {
    false
}

/// Resolves once the client of `fd` has gone (never, without a descriptor).
pub async fn client_gone(fd: Option<ConnFd>) {
    let Some(fd) = fd else {
        return futures::future::pending().await;
    };
    loop {
        if peer_gone(fd) {
            return;
        }
        actix_web::rt::time::sleep(DISCONNECT_POLL).await;
    }
}

/// Reads a body of at most `server.max_body_bytes`, which must arrive
/// within `server.body_timeout_secs` (else 408, and the connection closes).
pub async fn read_body(state: &AppState, mut payload: web::Payload) -> Result<Bytes, ApiError> {
    let limit = state.settings.max_body_bytes;
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk
                .map_err(|e| ApiError::MalformedJson(format!("the body could not be read: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    let timeout = state.settings.body_timeout;
    actix_web::rt::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ApiError::RequestTimeout {
            secs: timeout.as_secs(),
        }))
}

/// Runs `f` on the tokenizer pool (`server.tokenizer_threads`), so that
/// tokenizing and rendering templates never hold an HTTP worker.
pub async fn on_pool<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    state.tokenizer_pool.spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.map_err(|_| {
        ApiError::Engine("tokenizing the prompt failed (the tokenizer panicked)".into())
    })
}

/// Bodies larger than this are parsed on the tokenizer pool.
const PARSE_ON_POOL_BYTES: usize = 64 << 10;

/// Parses a JSON body: a large one on the tokenizer pool, so that a worker
/// never spends long on one request.
async fn parse<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &AppState,
    body: Bytes,
) -> Result<T, ApiError> {
    if body.len() > PARSE_ON_POOL_BYTES {
        on_pool(state, move || parse_body(&body)).await?
    } else {
        parse_body(&body)
    }
}

/// The requests with every prompt turned into token ids on the tokenizer
/// pool; a prompt repeated for several choices is tokenized once. A
/// refusal names the request's own field.
async fn tokenized(
    state: &AppState,
    engine: &Arc<Engine>,
    mut requests: Vec<Request>,
    names: ParamNames,
) -> Result<Vec<Request>, ApiError> {
    let engine = engine.clone();
    let retry = state.settings.retry_after_secs;
    on_pool(state, move || {
        let mut last: Option<(actors::llm::Prompt, Vec<u32>)> = None;
        for (i, r) in requests.iter_mut().enumerate() {
            let tokens = match &last {
                Some((p, t)) if *p == r.prompt => t.clone(),
                _ => {
                    let t = engine
                        .prompt_tokens(&r.prompt)
                        .map_err(|e| names.rename(ApiError::from_engine(e.into(), retry), i))?;
                    last = Some((r.prompt.clone(), t.clone()));
                    t
                }
            };
            r.prompt = actors::llm::Prompt::Tokens(tokens);
        }
        Ok(requests)
    })
    .await?
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An engine request's events; cancels the request when dropped before its
/// terminal event.
pub struct Tracked {
    engine: Arc<Engine>,
    stream: EventStream,
    ended: bool,
}

impl Tracked {
    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let ev = self.stream.next().await;
        match &ev {
            Some(e) if !e.is_terminal() => {}
            _ => self.ended = true,
        }
        ev
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.ended {
            self.engine.cancel(self.stream.id());
        }
    }
}

/// Submits every request, or none; a refusal names the request's own
/// field.
async fn submit_all(
    state: &AppState,
    engine: &Arc<Engine>,
    requests: Vec<Request>,
    names: ParamNames,
) -> Result<Vec<Tracked>, ApiError> {
    // More sequences than the queue holds would be refused as overloaded
    // however long the client waited.
    let capacity = engine.config().queue_capacity;
    if requests.len() > capacity {
        return Err(ApiError::param(
            "n",
            format!(
                "the request asks for {} sequences (prompts × n), more than the queue holds ({capacity}, scheduler.queue_capacity)",
                requests.len()
            ),
        )
        .counted());
    }
    let mut out = Vec::with_capacity(requests.len());
    // Each request's choices, to tell a refusal of a further one.
    let groups: Vec<_> = requests.iter().map(|r| r.choices.clone()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        // On error, `out` drops here and cancels what was submitted.
        let further = r.traffic == actors::llm::Traffic::FurtherChoice;
        let stream = engine.generate_async(r).await.map_err(|e| {
            if let (true, Some(c)) = (further, &groups[i]) {
                // This choice and its request's later ones never run: the
                // request counts as refused, not as cancelled.
                let left = groups[i..]
                    .iter()
                    .filter(|g| g.as_ref().is_some_and(|g| Arc::ptr_eq(g, c)))
                    .count();
                c.refused(actors::llm::refusal_reason(&e), left);
            }
            names.rename(ApiError::from_engine(e, state.settings.retry_after_secs), i)
        })?;
        out.push(Tracked {
            engine: engine.clone(),
            stream,
            ended: false,
        });
    }
    Ok(out)
}

/// What one choice produced.
#[derive(Default)]
struct ChoiceResult {
    text: String,
    reason: Option<FinishReason>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    logprobs: Vec<(u32, TokenLogprob)>,
    beams: Vec<BeamOutput>,
    /// The prompt's scores (an echo with log-probabilities).
    prompt_scores: Vec<PromptScore>,
}

async fn collect(mut t: Tracked) -> Result<ChoiceResult, ApiError> {
    let mut out = ChoiceResult::default();
    while let Some(ev) = t.next().await {
        match ev {
            Event::Token { token, logprob, .. } => {
                if let Some(lp) = logprob {
                    out.logprobs.push((token, lp));
                }
            }
            Event::Finished {
                reason,
                usage,
                text,
                beams,
                ..
            } => {
                out.text = text;
                out.reason = Some(reason);
                out.prompt_tokens = usage.prompt_tokens;
                out.cached_tokens = usage.cached_tokens;
                out.completion_tokens = usage.completion_tokens;
                out.beams = beams;
                return Ok(out);
            }
            Event::PromptScores(s) => out.prompt_scores.extend(s),
            Event::Failed { error } => return Err(ApiError::Engine(error)),
            Event::Refused { field, reason } => {
                return Err(api_error(framework::Error::InvalidRequest {
                    field,
                    reason,
                }))
            }
            Event::Cancelled => return Err(ApiError::Engine("the request was cancelled".into())),
        }
    }
    Err(ApiError::Engine(
        "the request ended without a result".into(),
    ))
}

fn token_string(engine: &Engine, token: u32) -> String {
    String::from_utf8_lossy(&token_bytes(engine, token)).into_owned()
}

/// A token's own bytes (part of a character, for some): OpenAI's `bytes`,
/// from which a client rebuilds characters split across tokens.
fn token_bytes(engine: &Engine, token: u32) -> Vec<u8> {
    engine
        .tokenizer()
        .map(|t| t.token_bytes(token).to_vec())
        .unwrap_or_default()
}

/// A choice's legacy log-probabilities: the echoed prompt's tokens first
/// (`echo`: its tokens and their scores; the first has none), then the
/// generated ones. `text_offset` counts characters (as Python's `len`
/// does) from `start`; the offset after the last token comes back too.
fn completion_logprobs(
    engine: &Engine,
    echo: Option<(&[u32], &[PromptScore])>,
    items: &[(u32, TokenLogprob)],
    start: usize,
) -> (CompletionLogprobs, usize) {
    let mut out = CompletionLogprobs::default();
    let mut pos = start;
    let mut push = |token: u32, lp: Option<(f32, &[(u32, f32)])>| {
        let text = token_string(engine, token);
        out.text_offset.push(pos);
        pos += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(lp.map(|(l, _)| l));
        out.top_logprobs.push(lp.map(|(_, top)| {
            top.iter()
                .map(|(t, l)| (token_string(engine, *t), json!(l)))
                .collect()
        }));
    };
    if let Some((prompt, scores)) = echo {
        // The scores come in prompt order, from position 1.
        let mut scores = scores.iter().peekable();
        for (i, &t) in prompt.iter().enumerate() {
            let score = scores.next_if(|s| s.position == i);
            push(t, score.map(|s| (s.logprob, s.top.as_slice())));
        }
    }
    for (token, lp) in items {
        push(*token, Some((lp.logprob, lp.top.as_slice())));
    }
    (out, pos)
}

fn chat_logprobs(engine: &Engine, items: &[(u32, TokenLogprob)]) -> ChatLogprobs {
    ChatLogprobs {
        content: items
            .iter()
            .map(|(token, lp)| ChatTokenLogprob {
                bytes: token_bytes(engine, *token),
                token: token_string(engine, *token),
                logprob: lp.logprob,
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|(t, l)| ChatTopLogprob {
                        bytes: token_bytes(engine, *t),
                        token: token_string(engine, *t),
                        logprob: *l,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Which API a generation answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

impl Api {
    fn id_prefix(self) -> &'static str {
        match self {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        }
    }
}

fn request_id(api: Api) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}-{:x}{:06x}",
        api.id_prefix(),
        now_secs(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a validated generation and answers it.
async fn generate(
    state: web::Data<AppState>,
    req: &HttpRequest,
    api: Api,
    v: ValidGeneration,
) -> Result<HttpResponse, ApiError> {
    let fd = req.conn_data::<ConnFd>().copied();
    let engine = state.engine()?;
    let inflight = InFlight::new(state.clone().into_inner());
    let requests = tokenized(&state, &engine, v.requests.clone(), v.names)
        .await
        .map_err(ApiError::counted)?;
    // An echo answers with each prompt as given, and its tokens.
    let echoed: Vec<(String, Vec<u32>)> = if v.echo {
        v.requests
            .iter()
            .zip(&requests)
            .map(|(given, r)| {
                let tokens = match &r.prompt {
                    actors::llm::Prompt::Tokens(t) => t.clone(),
                    _ => Vec::new(),
                };
                let text = match &given.prompt {
                    actors::llm::Prompt::Text(s) => s.clone(),
                    _ => engine
                        .tokenizer()
                        .map(|t| t.decode(&tokens))
                        .unwrap_or_default(),
                };
                (text, tokens)
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut requests = requests;
    let thoughts = thoughts(api, &engine, (&v.requests, &mut requests));
    let tracked = submit_all(&state, &engine, requests, v.names).await?;
    let id = request_id(api);
    if v.stream {
        let head = ChunkHead {
            id,
            model: state.model_id.clone(),
            created: now_secs(),
        };
        let body = sse(engine, api, head, (v, thoughts), tracked, (inflight, fd));
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header(CacheControl(vec![CacheDirective::NoCache]))
            .streaming(body));
    }
    let results = tokio::select! {
        r = futures::future::try_join_all(tracked.into_iter().map(collect)) => r?,
        // Dropping the collecting futures cancels every request.
        _ = client_gone(fd) => {
            return Err(ApiError::ClientClosed);
        }
    };
    drop(inflight);
    let mut usage = UsageOut::default();
    let mut choices = Vec::new();
    for (i, r) in results.iter().enumerate() {
        // Choices of one prompt share it: count its tokens once.
        let first_of_prompt = v.beam || i % v.n == 0;
        // A beam search's choices are its best `n` beams, each with its
        // own tokens and reason.
        let beams = &r.beams[..r.beams.len().min(v.n)];
        usage.add(
            if first_of_prompt {
                (r.prompt_tokens, r.cached_tokens)
            } else {
                (0, 0)
            },
            if v.beam {
                beams.iter().map(|b| b.tokens.len()).sum()
            } else {
                r.completion_tokens
            },
        );
        let echo = echoed.get(i);
        let texts: Vec<(String, Option<FinishReason>)> = if v.beam {
            beams
                .iter()
                .map(|b| (b.text.clone(), Some(b.finish_reason)))
                .collect()
        } else if let Some((prompt, _)) = echo {
            vec![(format!("{prompt}{}", r.text), r.reason)]
        } else {
            vec![(r.text.clone(), r.reason)]
        };
        for (text, reason) in texts {
            let index = choices.len();
            let reason = reason.map(FinishReason::as_str);
            let prompt = echo.map(|(_, t)| (t.as_slice(), r.prompt_scores.as_slice()));
            choices.push(match api {
                Api::Completions => json!({
                    "index": index,
                    "text": text,
                    "logprobs": v.logprobs.map(|_| completion_logprobs(&engine, prompt, &r.logprobs, 0).0),
                    "finish_reason": reason,
                }),
                Api::Chat => {
                    let thought = thoughts.get(i).copied().flatten();
                    let (message, reason) = chat_message(
                        &text,
                        reason,
                        v.tools.as_ref(),
                        thought.map(|opened| (opened, v.include_reasoning)),
                    );
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": v.logprobs.map(|_| chat_logprobs(&engine, &r.logprobs)),
                        "finish_reason": reason,
                    })
                }
            });
        }
    }
    let object = match api {
        Api::Completions => "text_completion",
        Api::Chat => "chat.completion",
    };
    Ok(HttpResponse::Ok().json(json!({
        "id": id,
        "object": object,
        "created": now_secs(),
        "model": state.model_id,
        "choices": choices,
        "usage": usage,
    })))
}

/// Per engine request (as `given`, and tokenized), whether its answer is
/// read for a thought ([`framework::reasoning`]), and if so whether its
/// prompt opened one: a chat's, where the model's answers are. Such a
/// request's guide is made to hold only the answer after the thought
/// ([`framework::guide::Guide::after_thought`]), so the model thinks
/// freely first.
fn thoughts(
    api: Api,
    engine: &Engine,
    (given, requests): (&[Request], &mut [Request]),
) -> Vec<Option<bool>> {
    let format = engine.reasoning_format();
    let reads = api == Api::Chat && format != framework::reasoning::ReasoningFormat::None;
    requests
        .iter_mut()
        .zip(given)
        .map(|(r, given)| {
            reads.then(|| {
                // A final message continued with its thought open opens it
                // too (the prompt's end may be far from its `<think>`).
                let continued = match &given.prompt {
                    actors::llm::Prompt::ChatTools {
                        messages, render, ..
                    } if render.continue_final_message => messages
                        .last()
                        .is_some_and(|m| format.leaves_open(&m.content)),
                    _ => false,
                };
                let opened = continued
                    || match &r.prompt {
                        actors::llm::Prompt::Tokens(t) => engine.prompt_opens_thought(t),
                        _ => false,
                    };
                r.guide = r.guide.take().map(|g| g.after_thought(opened));
                opened
            })
        })
        .collect()
}

/// A chat answer's `message` and finish reason. With `thought` (whether
/// the prompt opened one, and whether to answer it), a thought at the
/// answer's start goes to `reasoning_content` and the rest is read as
/// below; after a thought, content that is only whitespace is none.
fn chat_message(
    text: &str,
    reason: Option<&'static str>,
    tools: Option<&ToolUse>,
    thought: Option<(bool, bool)>,
) -> (Value, Option<&'static str>) {
    let Some((opened, include)) = thought else {
        return answer_message(text, reason, tools);
    };
    let split = framework::reasoning::split(text, opened);
    let (mut message, reason) = answer_message(&split.content, reason, tools);
    if let Some(reasoning) = split.reasoning {
        if message["content"]
            .as_str()
            .is_some_and(|c| c.trim().is_empty())
        {
            message["content"] = Value::Null;
        }
        if include && !reasoning.is_empty() {
            message["reasoning_content"] = json!(reasoning);
        }
    }
    (message, reason)
}

/// A chat answer's `message` and finish reason, without a thought: with
/// tools, the calls found in `text` go to `tool_calls` (the finish reason
/// then `tool_calls`) and the rest, unless only whitespace, to `content`;
/// text whose calls do not parse is all content.
fn answer_message(
    text: &str,
    reason: Option<&'static str>,
    tools: Option<&ToolUse>,
) -> (Value, Option<&'static str>) {
    let Some(t) = tools else {
        return (json!({"role": "assistant", "content": text}), reason);
    };
    // A call the length limit cut is a call (its arguments cut too), not
    // markup in the content.
    let parsed = match reason {
        Some("length") => framework::tools::parse_cut(t.format, text, &t.tools),
        _ => framework::tools::parse(t.format, text, &t.tools),
    };
    if parsed.calls.is_empty() {
        // The whole text, but for a block a cut left without a name.
        return (
            json!({"role": "assistant", "content": parsed.content}),
            reason,
        );
    }
    let calls: Vec<Value> = parsed
        .calls
        .iter()
        .map(|(name, arguments)| {
            ToolCall {
                id: framework::tools::random_call_id(),
                name: name.clone(),
                arguments: arguments.clone(),
            }
            .to_openai()
        })
        .collect();
    let content = (!parsed.content.trim().is_empty()).then_some(parsed.content);
    (
        json!({"role": "assistant", "content": content, "tool_calls": calls}),
        reason.map(|r| if r == "stop" { "tool_calls" } else { r }),
    )
}

/// Whether a tool-call parser's pieces begin a call.
fn calls_begin(outs: &[StreamOut]) -> bool {
    outs.iter()
        .any(|o| matches!(o, StreamOut::CallStart { .. }))
}

/// A reader's pieces as `(thought, content)` text.
fn parts(outs: Vec<ReasoningOut>) -> (String, String) {
    let (mut thought, mut content) = (String::new(), String::new());
    for o in outs {
        match o {
            ReasoningOut::Reasoning(r) => thought.push_str(&r),
            ReasoningOut::Content(c) => content.push_str(&c),
        }
    }
    (thought, content)
}

/// The fields every chunk of one streamed answer repeats.
struct ChunkHead {
    id: String,
    model: String,
    created: u64,
}

/// The state of one streamed answer.
struct SseState {
    engine: Arc<Engine>,
    api: Api,
    head: ChunkHead,
    n: usize,
    want_logprobs: bool,
    include_usage: bool,
    events: futures::stream::SelectAll<BoxStream<'static, (usize, Event)>>,
    pending: std::collections::VecDeque<Bytes>,
    usage: UsageOut,
    done: bool,
    fd: Option<ConnFd>,
    /// Per choice, the parser of its tool calls (chat with tools), and
    /// whether it has sent a call.
    tool_streams: Vec<Option<(ToolStream, bool)>>,
    /// Per choice, the reader of its thought (a chat answer read for one).
    thoughts: Vec<Option<ReasoningStream>>,
    /// Whether thoughts are answered (`include_reasoning`).
    include_reasoning: bool,
    /// Per choice, the legacy `text_offset` of its next token: the
    /// characters of the tokens sent before it.
    text_offsets: Vec<usize>,
    _inflight: InFlight,
}

impl SseState {
    fn chunk(&self, choices: Value, usage: Option<UsageOut>) -> Bytes {
        let object = match self.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        let mut c = json!({
            "id": self.head.id, "object": object, "created": self.head.created,
            "model": self.head.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            c["usage"] = json!(u);
        }
        Bytes::from(format!("data: {c}\n\n"))
    }

    fn error(&mut self, e: ApiError) {
        let body = serde_json::to_string(&e.body()).unwrap_or_default();
        self.pending
            .push_back(Bytes::from(format!("data: {body}\n\n")));
        self.done = true;
    }

    /// Chunks for choice `i`'s parsed pieces: content as `delta.content`,
    /// a call's start as a `delta.tool_calls` entry with its id, type and
    /// name (arguments empty), its arguments as fragments of that entry.
    fn tool_chunks(&mut self, i: usize, outs: Vec<StreamOut>) {
        for out in outs {
            let delta = match out {
                StreamOut::Content(text) if text.is_empty() => continue,
                StreamOut::Content(text) => json!({ "content": text }),
                StreamOut::CallStart { index, name } => json!({"tool_calls": [{
                    "index": index,
                    "id": framework::tools::random_call_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]}),
                StreamOut::Arguments { index, fragment } => json!({"tool_calls": [{
                    "index": index,
                    "function": {"arguments": fragment},
                }]}),
            };
            self.push_delta(i, delta, Value::Null);
        }
    }

    /// Queues a chunk of choice `i`'s `delta`, with `logprobs`.
    fn push_delta(&mut self, i: usize, delta: Value, logprobs: Value) {
        let c = self.chunk(
            json!([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": null}]),
            None,
        );
        self.pending.push_back(c);
    }

    /// Feeds `text` to choice `i`'s tool-call parser and queues what it
    /// gives; false where the choice has none.
    fn through_tools(&mut self, i: usize, text: &str) -> bool {
        let Some(Some((ts, called))) = self.tool_streams.get_mut(i) else {
            return false;
        };
        let outs = ts.push(text);
        *called |= calls_begin(&outs);
        self.tool_chunks(i, outs);
        true
    }

    /// Chunks for choice `i`'s next pieces of thought and content (the
    /// content through its tool-call parser, where it has one), with the
    /// log-probability of the token they came from.
    fn thought_chunks(
        &mut self,
        i: usize,
        thought: String,
        content: String,
        logprob: Option<(u32, TokenLogprob)>,
    ) {
        let thought = match self.include_reasoning {
            true => thought,
            false => String::new(),
        };
        let mut delta = serde_json::Map::new();
        if !thought.is_empty() {
            delta.insert("reasoning_content".into(), json!(thought));
        }
        if matches!(self.tool_streams.get(i), Some(Some(_))) {
            if !delta.is_empty() {
                self.push_delta(i, delta.into(), Value::Null);
            }
            self.through_tools(i, &content);
            return;
        }
        if !content.is_empty() {
            delta.insert("content".into(), json!(content));
        }
        let lp: Vec<(u32, TokenLogprob)> = logprob.into_iter().collect();
        if delta.is_empty() && lp.is_empty() {
            return;
        }
        let logprobs = self.want_logprobs.then(|| chat_logprobs(&self.engine, &lp));
        self.push_delta(i, delta.into(), json!(logprobs));
    }

    /// The next piece of the body; `None` at its end.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Some(b);
            }
            if self.done {
                return None;
            }
            let next = tokio::select! {
                n = self.events.next() => n,
                _ = client_gone(self.fd) => {
                    // Dropping the streams cancels what is still running.
                    self.events = select_all(Vec::new());
                    self.done = true;
                    return None;
                }
            };
            match next {
                None => {
                    if self.include_usage {
                        let c = self.chunk(json!([]), Some(self.usage));
                        self.pending.push_back(c);
                    }
                    self.pending
                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.done = true;
                }
                Some((
                    i,
                    Event::Token {
                        token,
                        text,
                        logprob,
                    },
                )) => {
                    if let Some(Some(rs)) = self.thoughts.get_mut(i) {
                        let (thought, content) = parts(rs.push(&text));
                        self.thought_chunks(i, thought, content, logprob.map(|l| (token, l)));
                    } else if !self.through_tools(i, &text)
                        && (!text.is_empty() || logprob.is_some())
                    {
                        let lp = logprob.map(|l| vec![(token, l)]).unwrap_or_default();
                        let offset = self.text_offsets.get_mut(i);
                        let choice = stream_choice(
                            self.api,
                            &self.engine,
                            (i, &text, None),
                            self.want_logprobs,
                            &lp,
                            offset,
                        );
                        let c = self.chunk(choice, None);
                        self.pending.push_back(c);
                    }
                }
                Some((
                    i,
                    Event::Finished {
                        reason,
                        usage,
                        tail,
                        ..
                    },
                )) => {
                    let prompt = if i % self.n == 0 {
                        (usage.prompt_tokens, usage.cached_tokens)
                    } else {
                        (0, 0)
                    };
                    self.usage.add(prompt, usage.completion_tokens);
                    let mut reason = reason.as_str();
                    let mut tail = tail;
                    if let Some(mut rs) = self.thoughts.get_mut(i).and_then(Option::take) {
                        let mut outs = rs.push(&tail);
                        outs.extend(rs.finish());
                        let (thought, content) = parts(outs);
                        // The content rest goes on as the tail below.
                        self.thought_chunks(i, thought, String::new(), None);
                        tail = content;
                    }
                    if let Some((mut ts, mut called)) =
                        self.tool_streams.get_mut(i).and_then(Option::take)
                    {
                        let mut outs = ts.push(&tail);
                        outs.extend(match reason {
                            "length" => ts.finish_cut(),
                            _ => ts.finish(),
                        });
                        called |= calls_begin(&outs);
                        self.tool_chunks(i, outs);
                        tail.clear();
                        if called && reason == "stop" {
                            reason = "tool_calls";
                        }
                    }
                    let choice = stream_choice(
                        self.api,
                        &self.engine,
                        (i, &tail, Some(reason)),
                        false,
                        &[],
                        None,
                    );
                    let c = self.chunk(choice, None);
                    self.pending.push_back(c);
                }
                Some((_, Event::PromptScores(_))) => {}
                Some((_, Event::Failed { error })) => self.error(ApiError::Engine(error)),
                Some((_, Event::Refused { field, reason })) => {
                    self.error(api_error(framework::Error::InvalidRequest {
                        field,
                        reason,
                    }))
                }
                Some((_, Event::Cancelled)) => {
                    self.error(ApiError::Engine("the request was cancelled".into()))
                }
            }
        }
    }
}

/// The server-sent events of a streamed generation: for chat an opening
/// chunk per choice with the role, then a chunk per piece of text, a chunk
/// with each choice's finish reason, the usage chunk when asked, and
/// `data: [DONE]`. A failure ends the stream with an error event instead.
fn sse(
    engine: Arc<Engine>,
    api: Api,
    head: ChunkHead,
    (v, thoughts): (ValidGeneration, Vec<Option<bool>>),
    tracked: Vec<Tracked>,
    (inflight, fd): (InFlight, Option<ConnFd>),
) -> BoxStream<'static, Result<Bytes, actix_web::Error>> {
    let streams: Vec<BoxStream<'static, (usize, Event)>> = tracked
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            futures::stream::unfold(t, |mut t| async move { t.next().await.map(|e| (e, t)) })
                .map(move |e| (i, e))
                .boxed()
        })
        .collect();
    let count = streams.len();
    let tool_streams = (0..count)
        .map(|_| {
            v.tools
                .as_ref()
                .filter(|_| api == Api::Chat)
                .map(|t| (ToolStream::new(t.format, &t.tools), false))
        })
        .collect();
    let mut state = SseState {
        engine,
        api,
        head,
        n: v.n,
        want_logprobs: v.logprobs.is_some(),
        include_usage: v.include_usage,
        events: select_all(streams),
        pending: Default::default(),
        usage: UsageOut::default(),
        done: false,
        fd,
        tool_streams,
        thoughts: thoughts
            .into_iter()
            .map(|t| t.map(ReasoningStream::new))
            .collect(),
        include_reasoning: v.include_reasoning,
        text_offsets: vec![0; count],
        _inflight: inflight,
    };
    if api == Api::Chat {
        for i in 0..count {
            let c = state.chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                None,
            );
            state.pending.push_back(c);
        }
    }
    futures::stream::unfold(state, |mut s| async move {
        s.next_chunk().await.map(|b| (Ok(b), s))
    })
    .boxed()
}

/// One choice's chunk: its `(index, text, finish reason)`, and with
/// `want_logprobs` those of `logprobs`, whose legacy `text_offset`s start
/// at `offset` (advanced past them).
fn stream_choice(
    api: Api,
    engine: &Engine,
    (index, text, reason): (usize, &str, Option<&'static str>),
    want_logprobs: bool,
    logprobs: &[(u32, TokenLogprob)],
    offset: Option<&mut usize>,
) -> Value {
    match api {
        Api::Completions => {
            let lp = want_logprobs.then(|| {
                let start = offset.as_deref().copied().unwrap_or(0);
                let (lp, end) = completion_logprobs(engine, None, logprobs, start);
                if let Some(o) = offset {
                    *o = end;
                }
                lp
            });
            json!([{
                "index": index,
                "text": text,
                "logprobs": lp,
                "finish_reason": reason,
            }])
        }
        Api::Chat => {
            let delta = if reason.is_some() && text.is_empty() {
                json!({})
            } else {
                json!({ "content": text })
            };
            json!([{
                "index": index,
                "delta": delta,
                "logprobs": want_logprobs.then(|| chat_logprobs(engine, logprobs)),
                "finish_reason": reason,
            }])
        }
    }
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if state.settings.embed_models.iter().any(|e| e.name == m) => Err(ApiError::param(
            "model",
            format!("`model` '{m}' is an embedding model; it serves POST /v1/embeddings"),
        )),
        Some(m) if m != state.model_id => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

/// `POST /v1/embeddings`: the inputs tokenized on the tokenizer pool, one
/// request through the embedding model's pipeline, the vectors (truncated to
/// `dimensions` and renormalized where asked) as floats or base64.
pub async fn embeddings(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let fd = req.conn_data::<ConnFd>().copied();
    let (name, embedder, v) = async {
        let body = read_body(&state, payload).await?;
        let r: EmbeddingRequest = parse(&state, body).await?;
        let served = state.embedder(r.model.as_deref())?;
        let v = r.validate(served.embedder.dimensions(), served.matryoshka)?;
        Ok::<_, ApiError>((served.name.clone(), served.embedder.clone(), v))
    }
    .await
    .map_err(ApiError::counted)?;
    let inflight = InFlight::new(state.clone().into_inner());
    let retry = state.settings.retry_after_secs;
    let (tokenizing, items) = (embedder.clone(), v.items);
    let inputs = on_pool(&state, move || {
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                EmbedItem::Text(t) => tokenizing
                    .tokenize(&t)
                    .map_err(|e| ApiError::param("input", format!("`input` item {i}: {e}"))),
                EmbedItem::Tokens(t) => Ok(t),
            })
            .collect::<Result<Vec<Vec<u32>>, ApiError>>()
    })
    .await?
    .map_err(ApiError::counted)?;
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let pending = embedder
        .embed(inputs)
        .map_err(|e| ApiError::from_engine(e, retry).counted())?;
    let answer = tokio::select! {
        r = pending.wait() => r,
        // Dropping the wait cancels the request.
        _ = client_gone(fd) => return Err(ApiError::ClientClosed),
    };
    drop(inflight);
    let vectors = answer.map_err(|end| {
        metrics::counter!(framework::metrics::REQUEST_FAILURE, "reason" => "failed").increment(1);
        match end {
            actors::End::Cancelled => ApiError::Engine("the request was cancelled".into()),
            actors::End::Failed(e) => ApiError::Engine(e),
        }
    })?;
    let normalized = embedder.shape().normalize;
    let (base64, dimensions) = (v.base64, v.dimensions);
    let body = on_pool(&state, move || {
        let data: Vec<serde_json::Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                if let Some(d) = dimensions {
                    e.truncate(d);
                    if normalized {
                        framework::encoder::l2_normalize(&mut e);
                    }
                }
                let embedding = match base64 {
                    true => {
                        use base64::Engine as _;
                        let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                    false => json!(e),
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        serde_json::to_vec(&json!({
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .map_err(|e| ApiError::Engine(format!("cannot write the answer: {e}")))
    })
    .await??;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// `POST /v1/completions`.
pub async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // Refusals here never reach the engine, so they are counted here.
    let v = async {
        let body = read_body(&state, payload).await?;
        let r: CompletionRequest = parse(&state, body).await?;
        check_model(&state, r.common.model.as_deref())?;
        r.validate(&state.settings.limits, &state.settings.engine.speculative)
    }
    .await
    .map_err(ApiError::counted)?;
    generate(state, &req, Api::Completions, v).await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let v = async {
        let body = read_body(&state, payload).await?;
        let r: ChatRequest = parse(&state, body).await?;
        check_model(&state, r.common.model.as_deref())?;
        let format = state.engine()?.tool_format();
        r.validate(
            &state.settings.limits,
            &state.settings.engine.speculative,
            format,
        )
    }
    .await
    .map_err(ApiError::counted)?;
    generate(state, &req, Api::Chat, v).await
}

/// `GET /v1/models`: the generation model, then the embedding models.
pub async fn models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"object": "list", "data": model_cards(&state)}))
}

/// `GET /v1/models/{id}`: one served model's card, as in the list.
pub async fn model(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    model_cards(&state)
        .into_iter()
        .find(|c| c["id"] == id.as_str())
        .map(|c| HttpResponse::Ok().json(c))
        .ok_or(ApiError::ModelNotFound(id))
}

/// The served models as OpenAI's model objects: the generating model,
/// then the embedding models.
fn model_cards(state: &AppState) -> Vec<Value> {
    let context = state.engine.get().map(|e| e.model_config().context);
    let mut data = vec![json!({
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "parallm",
        "max_model_len": context,
        "task": "generate",
    })];
    let loaded = state.embedders.get();
    for m in &state.settings.embed_models {
        let served = loaded.and_then(|l| l.iter().find(|s| s.name == m.name));
        data.push(json!({
            "id": m.name,
            "object": "model",
            "created": state.started,
            "owned_by": "parallm",
            "max_model_len": served.map(|s| s.embedder.max_tokens()),
            "dimensions": served.map(|s| s.embedder.dimensions()),
            "task": "embed",
        }));
    }
    data
}

/// `POST /tokenize`.
pub async fn tokenize(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, payload).await?;
    let req: TokenizeRequest = parse(&state, body).await?;
    check_model(&state, req.model.as_deref())?;
    let engine = state.engine()?;
    let tools = match req.tools.as_ref().filter(|v| !v.is_null()) {
        Some(_) if req.messages.is_none() => {
            return Err(ApiError::param("tools", "`tools` go with `messages`"))
        }
        Some(v) => Tool::list_from_openai(v).map_err(api_error)?,
        None => Vec::new(),
    };
    // Counted as the chat endpoint renders it: `none` shows no tools.
    let choice = framework::tools::ToolChoice::from_openai(
        req.tool_choice.as_ref().filter(|v| !v.is_null()),
        &tools,
    )
    .map_err(api_error)?;
    let tools = match choice {
        framework::tools::ToolChoice::None => Vec::new(),
        _ => tools,
    };
    if let (Some(_), Some(name)) = (&req.prompt, req.template.first_given()) {
        return Err(ApiError::param(
            name,
            format!("`{name}` goes with `messages`, not `prompt`"),
        ));
    }
    let prompt = match (req.prompt, req.messages) {
        (Some(p), None) => actors::llm::Prompt::Text(p),
        (None, Some(m)) => chat_prompt(&m, &tools, req.template.render()?)?,
        _ => {
            return Err(ApiError::param(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    let retry = state.settings.retry_after_secs;
    let add_special = req.add_special_tokens.unwrap_or(true);
    // Tokenized and written out on the pool: a long prompt's answer is
    // large too.
    let body = on_pool(&state, move || {
        let tokens = engine
            .tokenize_with(&prompt, add_special)
            .map_err(|e| ApiError::from_engine(e.into(), retry))?;
        serde_json::to_vec(&json!({
            "count": tokens.len(),
            "max_model_len": engine.model_config().context,
            "tokens": tokens,
        }))
        .map_err(|e| ApiError::Engine(format!("cannot write the answer: {e}")))
    })
    .await??;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// `GET /tokenizer_info`: the special tokens' texts, the chat template and
/// the context, in the shape evaluation harnesses read (lm-evaluation-
/// harness's remote tokenizer, as vLLM serves it).
pub async fn tokenizer_info(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let engine = state.engine()?;
    let tok = engine
        .tokenizer()
        .ok_or_else(|| ApiError::param("model", "a synthetic model has no tokenizer"))?;
    let text = |t: u32| tok.token_text(t);
    Ok(HttpResponse::Ok().json(json!({
        "tokenizer_class": "parallm",
        "eos_token": text(tok.eos()),
        "bos_token": tok.bos().and_then(text),
        "pad_token": Value::Null,
        "add_bos_token": tok.adds_bos(),
        "add_eos_token": tok.adds_eos(),
        "chat_template": tok.chat_template(),
        "model_max_length": engine.model_config().context,
        "vocab_size": engine.model_config().vocab,
    })))
}

/// `POST /detokenize`.
pub async fn detokenize(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, payload).await?;
    let req: DetokenizeRequest = parse_body(&body)?;
    check_model(&state, req.model.as_deref())?;
    let engine = state.engine()?;
    let vocab = engine.model_config().vocab;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::param(
            "tokens",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let text = engine
        .tokenizer()
        .map(|t| t.decode(&req.tokens))
        .unwrap_or_default();
    Ok(HttpResponse::Ok().json(json!({ "prompt": text })))
}

/// `GET /health`: 200 only while a recent probe through the engine succeeded.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let (ok, why) = state.health();
    let status = if ok { "ok" } else { "unavailable" };
    let body = json!({ "status": status, "detail": why });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.publish_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.prometheus.render())
}

/// Any other path.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    // A known path asked with another method is a 405 naming the right one.
    let allow = match req.path() {
        "/v1/completions"
        | "/v1/chat/completions"
        | "/v1/embeddings"
        | "/tokenize"
        | "/detokenize" => Some("POST"),
        "/v1/models" | "/tokenizer_info" | "/health" | "/metrics" => Some("GET"),
        p if p.starts_with("/v1/models/") => Some("GET"),
        _ => None,
    };
    Err(match allow.filter(|a| req.method().as_str() != *a) {
        Some(allow) => ApiError::MethodNotAllowed {
            method: req.method().to_string(),
            path: req.path().to_string(),
            allow,
        },
        None => ApiError::RouteNotFound(format!("{} {}", req.method(), req.path())),
    })
}

/// How long a probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
