//! Generation on one model shard in the calling thread: the reference loop.
//!
//! This is the simplest complete use of the pieces — validate, prefill, then
//! sample, detokenize, check stops, decode — with no actors. The engine's
//! merger does the same per sequence; this loop is what it is tested against.

use std::time::Instant;

use crate::beam::{Beam, BeamSearch};
use crate::collective::SingleCollective;
use crate::error::{Error, Result};
use crate::model::{BatchItem, LlamaShard, LogitsWanted, SeqKvCache};
use crate::sampling::{
    first_stop, log_softmax, FinishReason, Sampler, SamplingParams, StopMatcher,
};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Checks a tokenized request against the model before any work is done.
pub fn validate_prompt(prompt: &[u32], max_tokens: usize, context: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::invalid("prompt", "must not be empty"));
    }
    if prompt.len().saturating_add(max_tokens) > context {
        return Err(Error::ContextOverflow {
            prompt_tokens: prompt.len(),
            max_tokens,
            context,
        });
    }
    Ok(())
}

/// What a finished generation returns.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Generated text (cut before a stop string).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt's forward.
    pub prefill_seconds: f64,
    /// Seconds spent on the decode steps.
    pub decode_seconds: f64,
}

/// Runs one forward of `tokens` on `cache` and returns the last row's logits.
fn step(model: &LlamaShard, tokens: &[u32], cache: &mut SeqKvCache) -> Result<Vec<f32>> {
    let logits = model.forward(
        &mut [BatchItem {
            tokens,
            cache,
            logits: LogitsWanted::Last,
        }],
        &SingleCollective,
    )?;
    Ok(logits.last(0).map(<[f32]>::to_vec).unwrap_or_default())
}

/// Generates from `prompt`, calling `on_text` with each piece of text as soon
/// as it is safe to show (whole characters, never part of a stop string).
pub fn generate(
    model: &LlamaShard,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    params.validate()?;
    let context = model.config().context;
    validate_prompt(prompt, params.max_tokens, context)?;
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    let mut logits = step(model, prompt, &mut cache)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut sampler = Sampler::new(params.clone(), prompt);
    let mut decoder = StreamDecoder::new();
    let mut stops = StopMatcher::new(params.stop.clone());
    let mut tokens = Vec::new();
    let mut text = String::new();
    let finish_reason = loop {
        let token = sampler.sample(&mut logits);
        if !params.ignore_eos && tokenizer.stop_tokens().contains(&token) {
            break FinishReason::Stop;
        }
        sampler.accept(token);
        tokens.push(token);
        let shown = stops.push(&decoder.push(tokenizer.token_bytes(token)));
        on_text(&shown);
        text.push_str(&shown);
        if stops.hit() {
            break FinishReason::Stop;
        }
        if tokens.len() >= params.max_tokens || cache.len() >= context {
            break FinishReason::Length;
        }
        logits = step(model, &[token], &mut cache)?;
    };
    if !stops.hit() {
        let rest = stops.push(&decoder.finish()) + &stops.flush();
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(Generation {
        tokens,
        text,
        finish_reason,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// One beam-search result.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamResult {
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Their text (cut before a stop string).
    pub text: String,
    /// Length-normalised score (higher is better).
    pub score: f32,
    /// Sum of log-probabilities.
    pub logprob: f32,
    /// Why it ended: `Stop` at EOS or a stop string, `Length` otherwise.
    pub finish_reason: FinishReason,
}

/// Beam search of `width` beams from `prompt`; results best first.
///
/// All live beams advance in one batched forward per step. When beams fork,
/// the KV caches are reordered to follow them: a parent's cache moves to its
/// last child and is copied for the others.
pub fn beam_search(
    model: &LlamaShard,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    width: usize,
    length_penalty: f32,
    max_tokens: usize,
) -> Result<Vec<BeamResult>> {
    if width == 0 {
        return Err(Error::invalid("beam_width", "must be at least 1"));
    }
    if max_tokens == 0 {
        return Err(Error::invalid("max_tokens", "must be at least 1"));
    }
    validate_prompt(prompt, max_tokens, model.config().context)?;
    let mut search = BeamSearch::new(
        width,
        length_penalty,
        max_tokens,
        tokenizer.stop_tokens().to_vec(),
    );
    let mut first = model.new_cache();
    let logits = step(model, prompt, &mut first)?;
    let mut caches = vec![Some(first)];
    let mut logprobs = vec![log_softmax(&logits)];
    loop {
        let forks = search.step(&logprobs);
        if forks.is_empty() || search.is_done() {
            break;
        }
        let mut children_left = vec![0usize; caches.len()];
        for f in &forks {
            children_left[f.parent] += 1;
        }
        let mut next: Vec<SeqKvCache> = Vec::with_capacity(forks.len());
        for f in &forks {
            children_left[f.parent] -= 1;
            let cache = if children_left[f.parent] == 0 {
                caches[f.parent].take()
            } else {
                caches[f.parent].clone()
            };
            next.push(cache.ok_or_else(|| Error::Shard("beam cache reused after move".into()))?);
        }
        let tokens: Vec<[u32; 1]> = forks.iter().map(|f| [f.token]).collect();
        let mut items: Vec<BatchItem<'_>> = next
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, t)| BatchItem {
                tokens: t,
                cache,
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = model.forward(&mut items, &SingleCollective)?;
        logprobs = (0..forks.len())
            .map(|i| log_softmax(out.last(i).unwrap_or_default()))
            .collect();
        caches = next.into_iter().map(Some).collect();
    }
    Ok(search
        .into_results()
        .into_iter()
        .map(|b| BeamResult::from_beam(b, tokenizer.stop_tokens(), &[], |t| tokenizer.decode(t)))
        .collect())
}

impl BeamResult {
    /// A finished beam with its stop tokens dropped and its text decoded,
    /// cut before the first of `stops` in it.
    pub fn from_beam(
        beam: Beam,
        stop_tokens: &[u32],
        stops: &[String],
        decode: impl Fn(&[u32]) -> String,
    ) -> Self {
        let finish_reason = if beam.ended() {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        let tokens: Vec<u32> = beam
            .tokens
            .into_iter()
            .filter(|t| !stop_tokens.contains(t))
            .collect();
        let mut text = decode(&tokens);
        if let Some(at) = first_stop(&text, stops) {
            text.truncate(at);
        }
        Self {
            text,
            tokens,
            score: beam.score,
            logprob: beam.logprob,
            finish_reason,
        }
    }
}
