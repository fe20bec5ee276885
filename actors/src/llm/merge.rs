//! The LLM merge: accepting drawn tokens, beam search, stop conditions and
//! incremental detokenization, and the events streamed to requesters.
//!
//! The last stage's rank 0 chose each group's next token where the logits
//! are (see [`crate::llm::step`]): one, or with speculation the drafts it
//! verified and one more. For every group of a merged step, the
//! merger accepts the drawn tokens, in order, into the request's shared sampler (or
//! advances its [`BeamSearch`] with the beams' log-probability rows), checks
//! end-of-sequence, stop strings, `max_tokens` and the context, streams the
//! text that is safe to show, and tells the scheduler whether the group goes
//! on. The merge state of a request lives here from submission to its terminal
//! event; a failed step never reaches the merger and draws change no sampler,
//! so recomputed requests continue exactly where they were.
//!
//! The request-level metrics are recorded here, as requests end: at once
//! for a request of its own, and for the choices of one request through
//! their shared [`Choices`] (behind a mutex, as the server marks choices
//! refused at submission from its handler), once, when the last ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use framework::batching::GroupOutcome;
use framework::beam::BeamSearch;
use framework::kv::SeqKey;
use framework::metrics as m;
use framework::sampling::{first_stop, Draw, StopMatcher};
use framework::tokenizer::StreamDecoder;
use framework::{FinishReason, GroupId, Tokenizer};

use kit::{End, Merge, TaskId};

use crate::llm::step::{LlmStep, Pick, Picks, SharedSampler};
use crate::llm::task::{BeamOutput, BeamParams, Event, Responder, Traffic, Usage};

/// The merger's part of a submitted request: everything about it but its
/// scheduling.
pub struct Registration {
    /// Prompt tokens (for the context limit and the usage).
    pub prompt_len: usize,
    /// Validated sampling parameters.
    pub params: framework::SamplingParams,
    /// How its tokens are chosen.
    pub decoding: Decoding,
    /// Where its events go.
    pub responder: Responder,
    /// When the engine accepted it.
    pub arrived: Instant,
    /// What the request-level metrics make of it.
    pub traffic: Traffic,
    /// The request's choices, counted as one, when it has several.
    pub choices: Option<Arc<Choices>>,
}

/// The choices of one request that asks for several (`n` > 1), shared by
/// their [`Request::choices`](crate::llm::Request::choices): the
/// request-level metrics count the request once, when the last choice
/// ends, as a failure if any choice failed (with the first failure's
/// reason; a choice refused at submission included), else as the first
/// choice's success.
#[derive(Debug)]
pub struct Choices {
    state: Mutex<ChoicesState>,
}

#[derive(Debug)]
struct ChoicesState {
    /// Choices not yet ended.
    left: usize,
    /// When the first of them was accepted.
    arrived: Option<Instant>,
    /// The first failure's reason.
    failure: Option<&'static str>,
    /// The first choice's success, counted once the others ended.
    success: Option<Finish>,
}

/// A finished request's figures for the metrics.
#[derive(Debug, Clone, Copy)]
struct Finish {
    arrived: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    reason: FinishReason,
}

/// How one choice ended, to its [`Choices`].
enum ChoiceEnd {
    /// The first choice finished.
    First(Finish),
    /// A further choice finished.
    Further(Instant),
    /// A choice failed (or was refused or cancelled) for this reason.
    Failed(&'static str, Option<Instant>),
}

/// One request's choices are equal to themselves only.
impl PartialEq for Choices {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Choices {
    /// The shared state of `n` choices.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ChoicesState {
                left: n,
                arrived: None,
                failure: None,
                success: None,
            }),
        })
    }

    /// `count` of the choices end without running: one was refused at
    /// submission for `reason` (the label of
    /// [`refusal_reason`](crate::llm::refusal_reason)), the rest
    /// were never submitted. The choices already submitted are then
    /// cancelled, and the request counts as refused for `reason`.
    pub fn refused(&self, reason: &'static str, count: usize) {
        for _ in 0..count {
            self.end(ChoiceEnd::Failed(reason, None));
        }
    }

    fn end(&self, how: ChoiceEnd) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if st.left == 0 {
            // Counted already (an end beyond the choices it was made for).
            return;
        }
        let arrived = match &how {
            ChoiceEnd::First(f) => Some(f.arrived),
            ChoiceEnd::Further(a) => Some(*a),
            ChoiceEnd::Failed(_, a) => *a,
        };
        if let Some(a) = arrived {
            st.arrived = Some(st.arrived.map_or(a, |b| b.min(a)));
        }
        match how {
            ChoiceEnd::First(f) => st.success = Some(f),
            ChoiceEnd::Further(_) => {}
            ChoiceEnd::Failed(reason, _) => {
                st.failure.get_or_insert(reason);
            }
        }
        st.left -= 1;
        if st.left > 0 {
            return;
        }
        match (st.failure, st.success) {
            (None, Some(f)) => observe_success(f),
            (failure, _) => observe_failure(failure.unwrap_or("failed"), st.arrived),
        }
    }
}

/// How a request's tokens are chosen.
pub enum Decoding {
    /// Drawn by its sampler (shared with its task).
    Sample(SharedSampler),
    /// By a beam search.
    Beam(BeamParams),
}

enum Mode {
    Sample {
        sampler: SharedSampler,
        stops: StopMatcher,
        decoder: StreamDecoder,
        tokens: Vec<u32>,
        text: String,
    },
    Beam {
        search: BeamSearch,
        /// The request's stop strings: a beam whose text holds one ends.
        stops: Vec<String>,
    },
}

struct ReqState {
    responder: Responder,
    /// When the engine accepted the request.
    arrived: Instant,
    /// When its first token was produced.
    first_token: Option<Instant>,
    prompt_len: usize,
    /// Prompt positions its first step started at: those came from the
    /// prefix cache (`None` until that step).
    cached: Option<usize>,
    max_tokens: usize,
    ignore_eos: bool,
    mode: Mode,
    /// Prompt tokens below this index were scored and sent.
    scored_upto: usize,
    /// What the request-level metrics make of it.
    traffic: Traffic,
    /// The request's choices, when it has several.
    choices: Option<Arc<Choices>>,
}

/// The engine's merge.
pub struct LlmMerger {
    tokenizer: Option<Arc<Tokenizer>>,
    stop_tokens: Vec<u32>,
    context: usize,
    reqs: HashMap<TaskId, ReqState>,
    /// Panic on the output of this step or a later one (an injected fault).
    panic_from: Option<u64>,
}

impl LlmMerger {
    /// A merger for a model of `context` positions; without a tokenizer, token
    /// events carry no text and no token ends a sequence.
    pub fn new(tokenizer: Option<Arc<Tokenizer>>, context: usize) -> Self {
        let stop_tokens = tokenizer
            .as_ref()
            .map(|t| t.stop_tokens().to_vec())
            .unwrap_or_default();
        Self {
            tokenizer,
            stop_tokens,
            context,
            reqs: HashMap::new(),
            panic_from: None,
        }
    }

    /// This merger, panicking on the output of the first step numbered
    /// `step` or later, if given ([`crate::llm::EngineConfig::merge_fault`]).
    pub fn with_fault(mut self, step: Option<u64>) -> Self {
        self.panic_from = step;
        self
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.tokenizer
            .as_ref()
            .map(|t| t.decode(tokens))
            .unwrap_or_default()
    }

    /// Ends request `id` as refused (`error` names the request's field).
    fn refuse(&mut self, id: TaskId, error: framework::Error) {
        match error {
            framework::Error::InvalidRequest { field, reason } => {
                self.end_as(id, "invalid", Event::Refused { field, reason })
            }
            other => self.end(id, End::Failed(other.to_string())),
        }
    }

    /// Ends held request `id` with terminal `event`, counted as a failure
    /// for `reason` (a request of its own only); a no-op once it ended.
    fn end_as(&mut self, id: TaskId, reason: &'static str, event: Event) {
        let Some(st) = self.reqs.remove(&id) else {
            return;
        };
        match (st.traffic, &st.choices) {
            (Traffic::Probe { .. }, _) => {}
            (_, Some(c)) => c.end(ChoiceEnd::Failed(reason, Some(st.arrived))),
            (Traffic::Request, None) => observe_failure(reason, Some(st.arrived)),
            (Traffic::FurtherChoice, None) => {}
        }
        st.responder.end(event);
    }

    /// Takes a sampling request's drawn token; `Some(reason)` when it ends
    /// (the request may have been ended here already, refused or failed:
    /// then ending it again does nothing).
    fn sample(&mut self, id: TaskId, draw: Draw) -> Option<FinishReason> {
        let st = self.reqs.get_mut(&id)?;
        let Mode::Sample {
            sampler,
            stops,
            decoder,
            tokens,
            text,
        } = &mut st.mode
        else {
            return None;
        };
        let Draw { token, logprob } = draw;
        if st.max_tokens == 0 {
            // It only scored its prompt.
            return Some(FinishReason::Length);
        }
        // A grammar the guided decoder gave up on allowed only
        // end-of-sequence: the request ends with that error, not this token.
        if let Some(e) = sampler.constraint().and_then(|c| c.error()) {
            self.refuse(id, e);
            return Some(FinishReason::Stop);
        }
        let stop = !st.ignore_eos && self.stop_tokens.contains(&token);
        // A stop token is drawn (and times the first token) but is not
        // output, so it is not counted, as `usage` does not count it.
        produced(&mut st.first_token, st.arrived, st.traffic, !stop);
        if stop {
            return Some(FinishReason::Stop);
        }
        let guided = sampler.accept(token);
        tokens.push(token);
        let piece = self
            .tokenizer
            .as_ref()
            .map_or(&[][..], |t| t.token_bytes(token));
        let shown = stops.push(&decoder.push(piece));
        text.push_str(&shown);
        st.responder.send(Event::Token {
            token,
            text: shown,
            logprob,
        });
        let n = tokens.len();
        let grammar_done = sampler.constraint().is_some_and(|c| c.is_stopped());
        if let Err(e) = guided {
            match sampler.constraint().and_then(|c| c.error()) {
                // Following the token went past the grammar engine's limits.
                Some(refusal) => self.refuse(id, refusal),
                // The mask allowed the token, so the grammar must: a fault
                // of the decoder, not of the request.
                None => {
                    tracing::warn!("request {id}: {e}");
                    self.end(id, End::Failed(e.to_string()));
                }
            }
            return Some(FinishReason::Stop);
        }
        if stops.hit() || grammar_done {
            Some(FinishReason::Stop)
        } else if n >= st.max_tokens || st.prompt_len + n >= self.context {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    fn finish_sample(&mut self, id: TaskId, reason: FinishReason) {
        let Some(st) = self.reqs.remove(&id) else {
            return;
        };
        let Mode::Sample {
            mut stops,
            mut decoder,
            tokens,
            mut text,
            ..
        } = st.mode
        else {
            return;
        };
        let tail = if stops.hit() {
            String::new()
        } else {
            stops.push(&decoder.finish()) + &stops.flush()
        };
        text.push_str(&tail);
        finished(
            (st.responder, st.choices),
            (
                (st.arrived, st.first_token, st.traffic),
                (st.prompt_len, st.cached.unwrap_or(0)),
            ),
            reason,
            tokens,
            text,
            tail,
            Vec::new(),
        );
    }

    fn finish_beam(&mut self, id: TaskId) {
        let Some(st) = self.reqs.remove(&id) else {
            return;
        };
        let Mode::Beam { search, stops } = st.mode else {
            return;
        };
        let beams: Vec<BeamOutput> = search
            .into_results()
            .into_iter()
            .map(|b| BeamOutput::from_beam(b, &self.stop_tokens, &stops, |t| self.decode(t)))
            .collect();
        let best = beams.first().cloned();
        let (tokens, text, reason) = best
            .map(|b| (b.tokens, b.text, b.finish_reason))
            .unwrap_or((Vec::new(), String::new(), FinishReason::Length));
        let tail = text.clone();
        finished(
            (st.responder, st.choices),
            (
                (st.arrived, st.first_token, st.traffic),
                (st.prompt_len, st.cached.unwrap_or(0)),
            ),
            reason,
            tokens,
            text,
            tail,
            beams,
        );
    }
}

/// What the last stage chose for one group.
enum Chosen {
    /// A sampling request's drawn tokens: one, or the drafts its step
    /// verified and the token drawn after them.
    Draws(Vec<Draw>),
    /// A beam search's log-probability rows, one per beam.
    Beams(Vec<Vec<f32>>),
}

/// The group's picks as its mode expects them (one draw, or a row per each
/// of its `rows` beams); `None` when the step did not return them.
fn chosen(is_beam: bool, mut got: Vec<Pick>, rows: usize) -> Option<Chosen> {
    if got.len() != rows {
        return None;
    }
    if !is_beam {
        return match (rows, got.pop()) {
            (1, Some(Pick::Tokens(d))) if !d.is_empty() => Some(Chosen::Draws(d)),
            _ => None,
        };
    }
    got.into_iter()
        .map(|p| match p {
            Pick::Row(r) => Some(r),
            Pick::Tokens(_) | Pick::Scored(..) | Pick::NonFinite(_) => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(Chosen::Beams)
}

/// Counts a produced token of a request where it is `output`; the first
/// one sets its time to first token.
fn produced(first_token: &mut Option<Instant>, arrived: Instant, traffic: Traffic, output: bool) {
    if output && !matches!(traffic, Traffic::Probe { .. }) {
        metrics::counter!(m::GENERATION_TOKENS).increment(1);
    }
    if first_token.is_none() {
        let now = Instant::now();
        if traffic == Traffic::Request {
            metrics::histogram!(m::TIME_TO_FIRST_TOKEN)
                .record(now.duration_since(arrived).as_secs_f64());
        }
        *first_token = Some(now);
    }
}

/// Records a finished choice's metrics: a request of its own at once, the
/// choices of one through their [`Choices`], a probe never.
fn observe_finished(
    (arrived, first_token, traffic): (Instant, Option<Instant>, Traffic),
    choices: Option<&Choices>,
    prompt_tokens: usize,
    completion_tokens: usize,
    reason: FinishReason,
) {
    let f = Finish {
        arrived,
        first_token,
        prompt_tokens,
        completion_tokens,
        reason,
    };
    match (traffic, choices) {
        (Traffic::Probe { .. }, _) => {}
        (Traffic::Request, Some(c)) => c.end(ChoiceEnd::First(f)),
        (Traffic::FurtherChoice, Some(c)) => c.end(ChoiceEnd::Further(arrived)),
        (Traffic::Request, None) => observe_success(f),
        (Traffic::FurtherChoice, None) => {}
    }
}

/// Records a request's success.
fn observe_success(f: Finish) {
    let now = Instant::now();
    metrics::counter!(m::PROMPT_TOKENS).increment(f.prompt_tokens as u64);
    metrics::counter!(m::REQUEST_SUCCESS, "finish_reason" => f.reason.as_str()).increment(1);
    metrics::histogram!(m::REQUEST_LATENCY).record(now.duration_since(f.arrived).as_secs_f64());
    if let (Some(first), true) = (f.first_token, f.completion_tokens > 1) {
        metrics::histogram!(m::TIME_PER_OUTPUT_TOKEN)
            .record(now.duration_since(first).as_secs_f64() / (f.completion_tokens - 1) as f64);
    }
}

/// Records a request's failure for `reason` (its latency where it ran).
fn observe_failure(reason: &'static str, arrived: Option<Instant>) {
    metrics::counter!(m::REQUEST_FAILURE, "reason" => reason).increment(1);
    if let Some(a) = arrived {
        metrics::histogram!(m::REQUEST_LATENCY).record(a.elapsed().as_secs_f64());
    }
}

/// Sends a request's `Finished` event.
fn finished(
    (responder, choices): (Responder, Option<Arc<Choices>>),
    (times, (prompt_tokens, cached_tokens)): ((Instant, Option<Instant>, Traffic), (usize, usize)),
    reason: FinishReason,
    tokens: Vec<u32>,
    text: String,
    tail: String,
    beams: Vec<BeamOutput>,
) {
    observe_finished(
        times,
        choices.as_deref(),
        prompt_tokens,
        tokens.len(),
        reason,
    );
    responder.end(Event::Finished {
        reason,
        usage: Usage {
            prompt_tokens,
            cached_tokens,
            completion_tokens: tokens.len(),
        },
        tokens,
        text,
        tail,
        beams,
    });
}

impl Merge for LlmMerger {
    type Step = Arc<LlmStep>;
    type Output = Option<Picks>;
    type Registration = Registration;
    type Verdict = Vec<(GroupId, GroupOutcome)>;

    fn register(&mut self, id: TaskId, reg: Registration) {
        let p = reg.params;
        let mode = match reg.decoding {
            Decoding::Beam(b) => Mode::Beam {
                search: BeamSearch::new(
                    b.width,
                    b.length_penalty,
                    p.max_tokens,
                    if p.ignore_eos {
                        Vec::new()
                    } else {
                        self.stop_tokens.clone()
                    },
                ),
                stops: p.stop.clone(),
            },
            Decoding::Sample(sampler) => Mode::Sample {
                sampler,
                stops: StopMatcher::new(p.stop.clone()),
                decoder: StreamDecoder::new(),
                tokens: Vec::new(),
                text: String::new(),
            },
        };
        self.reqs.insert(
            id,
            ReqState {
                responder: reg.responder,
                arrived: reg.arrived,
                first_token: None,
                prompt_len: reg.prompt_len,
                cached: None,
                max_tokens: p.max_tokens,
                ignore_eos: p.ignore_eos,
                mode,
                scored_upto: 0,
                traffic: reg.traffic,
                choices: reg.choices,
            },
        );
    }

    fn merge(
        &mut self,
        step: &Arc<LlmStep>,
        outputs: Vec<(usize, Option<Picks>)>,
    ) -> Self::Verdict {
        if self.panic_from.is_some_and(|s| step.plan.id >= s) {
            panic!("injected fault: the merge panics at step {}", step.plan.id);
        }
        let mut picks = outputs.into_iter().find_map(|(_, p)| p).unwrap_or_default();

        // Rows per group, in plan order (a beam group's rows follow its beams).
        let mut groups: Vec<(GroupId, Vec<(SeqKey, usize)>)> = Vec::new();
        for (i, item) in step.plan.items.iter().enumerate() {
            let Some(st) = self.reqs.get_mut(&item.group) else {
                continue;
            };
            st.cached.get_or_insert(item.start);
            // Scores go out as they come; the draw, if any, stays.
            let Some(slot) = picks.get_mut(i) else {
                continue;
            };
            match slot.take() {
                Some(Pick::Scored(mut scores, draw)) => {
                    *slot = draw.map(|d| *d);
                    scores.retain(|s| s.position >= st.scored_upto);
                    if let Some(last) = scores.last() {
                        st.scored_upto = last.position + 1;
                        st.responder.send(Event::PromptScores(scores));
                    }
                }
                other => *slot = other,
            }
        }
        // A prompt chunk scored without a draw, whose logits were not
        // finite: its scores are lost, so its request fails now (its next
        // drawing step then finds it gone and frees it).
        for (i, item) in step.plan.items.iter().enumerate() {
            if let (false, Some(Some(Pick::NonFinite(why)))) = (item.logits, picks.get(i)) {
                let why = why.clone();
                self.end(item.group, End::Failed(why));
            }
        }
        for (i, item) in step.plan.items.iter().enumerate() {
            if !item.logits {
                continue;
            }
            match groups.last_mut() {
                Some((g, rows)) if *g == item.group => rows.push((item.seq, i)),
                _ => groups.push((item.group, vec![(item.seq, i)])),
            }
        }
        let mut pick = |i: usize| picks.get_mut(i).and_then(Option::take);
        let mut verdict = Vec::with_capacity(groups.len());
        for (g, rows) in groups {
            let is_beam = match self.reqs.get(&g) {
                None => {
                    // Cancelled or failed meanwhile: let the scheduler free it.
                    verdict.push((g, GroupOutcome::Finished));
                    continue;
                }
                Some(st) => matches!(st.mode, Mode::Beam { .. }),
            };
            let got: Vec<Pick> = rows.iter().filter_map(|&(_, i)| pick(i)).collect();
            let non_finite = got.iter().find_map(|p| match p {
                Pick::NonFinite(why) => Some(why.clone()),
                _ => None,
            });
            if let Some(why) = non_finite {
                self.end(g, End::Failed(why));
                verdict.push((g, GroupOutcome::Finished));
                continue;
            }
            let Some(chosen) = chosen(is_beam, got, rows.len()) else {
                self.end(
                    g,
                    End::Failed("the step returned no token for this request".into()),
                );
                verdict.push((g, GroupOutcome::Finished));
                continue;
            };
            match chosen {
                Chosen::Beams(logprobs) => {
                    let Some(st) = self.reqs.get_mut(&g) else {
                        continue;
                    };
                    let Mode::Beam { search, stops } = &mut st.mode else {
                        continue;
                    };
                    let forks = if stops.is_empty() {
                        search.step(&logprobs)
                    } else {
                        let (tokenizer, stop_tokens) = (&self.tokenizer, &self.stop_tokens);
                        // A live parent holds no stop string, so one can only
                        // end in the new token: the tail that could hold it
                        // (a token is at least a byte; one more token, since a
                        // decode may drop its first token's leading space) is
                        // all that is decoded, not the whole beam.
                        let window = stops.iter().map(String::len).max().unwrap_or(0) + 2;
                        search.step_until(&logprobs, |tokens| {
                            let mut kept: Vec<u32> = tokens
                                .iter()
                                .rev()
                                .copied()
                                .filter(|t| !stop_tokens.contains(t))
                                .take(window)
                                .collect();
                            kept.reverse();
                            let text = tokenizer
                                .as_ref()
                                .map(|t| t.decode(&kept))
                                .unwrap_or_default();
                            first_stop(&text, stops).is_some()
                        })
                    };
                    produced(&mut st.first_token, st.arrived, st.traffic, true);
                    if forks.is_empty() || search.is_done() {
                        self.finish_beam(g);
                        verdict.push((g, GroupOutcome::Finished));
                    } else {
                        let next = forks.iter().map(|f| (rows[f.parent].0, f.token)).collect();
                        verdict.push((g, GroupOutcome::Continue(next)));
                    }
                }
                Chosen::Draws(draws) => {
                    let mut tokens = Vec::with_capacity(draws.len());
                    let mut end = None;
                    for draw in draws {
                        tokens.push(draw.token);
                        end = self.sample(g, draw);
                        if end.is_some() {
                            break;
                        }
                    }
                    match end {
                        Some(reason) => {
                            self.finish_sample(g, reason);
                            verdict.push((g, GroupOutcome::Finished));
                        }
                        None => verdict.push((g, GroupOutcome::Accepted(tokens))),
                    }
                }
            }
        }
        verdict
    }

    fn end_all(&mut self, end: End) {
        let held: Vec<TaskId> = self.reqs.keys().copied().collect();
        for task in held {
            self.end(task, end.clone());
        }
    }

    fn end(&mut self, task: TaskId, end: End) {
        match end {
            End::Cancelled => self.end_as(task, "cancelled", Event::Cancelled),
            End::Failed(error) => self.end_as(task, "failed", Event::Failed { error }),
        }
    }
}
