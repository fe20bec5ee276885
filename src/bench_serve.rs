//! `parallm bench serve`: a load generator for any OpenAI-compatible
//! `/v1/completions` endpoint, after vLLM's `benchmark_serving`.
//!
//! This module owns the whole subcommand: its flags ([`ServeBenchArgs`]), the
//! request plan, the HTTP client, the server-sent-events parser, the metrics,
//! the summary table, the JSON report and the PNG plot. It depends on no other
//! part of the binary.
//!
//! What is true of it:
//! - **Prompts** are lists of token ids (the completions API accepts an array
//!   of integers), so every prompt has exactly the length asked for. Ids are
//!   drawn uniformly from `--token-range`; prompt and output lengths are drawn
//!   uniformly from their `N` or `MIN-MAX` specs. All of it comes from a
//!   SplitMix64 generator seeded by `--seed`, and the arrival times from a
//!   second one, so one seed gives the same prompts, lengths and schedule
//!   (and a server with a prefix cache may remember them from the last run:
//!   change the seed between runs to measure cold prefills).
//! - **Arrivals**: with `--request-rate R` the gaps between sends are
//!   exponential with mean `1/R` (a Poisson process); with `inf` every request
//!   is due at once. `--max-concurrency` caps the requests in flight: a due
//!   request waits for a free slot, in order.
//! - **Requests** are `POST {url}/v1/completions` with `stream: true`,
//!   `stream_options.include_usage`, `temperature` (0 unless `--temperature`),
//!   `top_p`, a seed per request, `max_tokens` and, by
//!   default, `ignore_eos: true`, so each request generates exactly its output
//!   length. Bodies are built before the clock starts. Each request opens its
//!   own connection and asks the server to close it (`Connection: close`), so
//!   a server that drops idle keep-alive connections cannot fail a request
//!   that would have reused one; the connect time (small on loopback) is part
//!   of TTFT.
//! - **Timing** is from a monotonic clock, each request measured from just
//!   before it is sent. TTFT: send to the first SSE event whose choice carries
//!   non-empty text. ITL: the gaps between successive such events. E2E: send to
//!   `data: [DONE]`. TPOT: `(e2e - ttft) / (output_tokens - 1)` when more than
//!   one token came back. Events that arrive in one network read share one
//!   timestamp, as in vLLM.
//! - **Output tokens** come from the `usage` of the stream's usage chunk when
//!   the server sends one, else from the number of text-carrying events.
//! - **Failures**: a connection or send error, a status other than 200 (its
//!   status and body are kept), an event with an `error` field, an event that
//!   is not JSON, a stream that ends without `[DONE]`, or `--timeout-secs`
//!   running out. A failed request is kept in the per-request records with its
//!   error text and counted apart; it enters no latency or throughput figure.
//! - **Aggregates**: duration runs from the start of the schedule to the last
//!   completion. Throughputs divide the successful requests' totals (prompt
//!   tokens as sent, output tokens as above) by that duration. Latencies are
//!   reported in milliseconds as mean, median and p99, the percentiles
//!   interpolated linearly between closest ranks (numpy's default).
//! - **Runtime**: [`run`] starts a private actix `System` on the calling thread
//!   and blocks until the benchmark ends, so it must not be called from inside
//!   an async runtime. The HTTP client speaks plain `http://` only.
//! - **Plot**: drawn with plotters on an in-memory bitmap, text rendered from a
//!   font compiled into the binary (Noto Sans), so it needs no system fonts;
//!   encoded as PNG.

use std::cell::Cell;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};

use crate::plot::{self, Canvas, PlotResult, FONT};

/// Arguments of `parallm bench serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8000 (plain http; a trailing /v1 is dropped); requests go to {url}/v1/completions.
    #[arg(long)]
    pub url: String,

    /// Model name to request; if absent, the first id listed by GET {url}/v1/models.
    #[arg(long)]
    pub model: Option<String>,

    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Number of requests to send.
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,

    /// Requests per second, with Poisson arrivals (exponential gaps drawn from --seed); `inf` sends all at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,

    /// Most requests in flight at once; a due request waits for a free slot (default: no cap).
    #[arg(long)]
    pub max_concurrency: Option<usize>,

    /// Prompt length in tokens: N, or MIN-MAX drawn uniformly per request.
    #[arg(long, default_value = "128")]
    pub prompt_tokens: String,

    /// Output length in tokens (the request's max_tokens): N, or MIN-MAX drawn uniformly per request.
    #[arg(long, default_value = "128")]
    pub output_tokens: String,

    /// Shared-prefix dataset: every prompt starts with one of --prefix-groups prefixes of this many random tokens (drawn from --seed), followed by its own --prompt-tokens suffix (0: no shared prefix).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,

    /// Distinct shared prefixes; each request gets one of them at random
    /// (drawn from --seed).
    #[arg(long, default_value_t = 1)]
    pub prefix_groups: usize,

    /// Multi-turn chat dataset: --num-prompts conversations of this many
    /// turns each, a conversation's turns one after another, each turn's
    /// prompt the whole history (earlier user messages and the server's own
    /// answers, as text) plus a new user message of --prompt-tokens random
    /// words; --max-concurrency caps the conversations in flight (0: off).
    #[arg(long, default_value_t = 0, value_name = "TURNS")]
    pub multi_turn: usize,

    /// Inclusive range MIN-MAX of the random prompt token ids; keep it inside the model's vocabulary.
    #[arg(long, default_value = "1000-20000")]
    pub token_range: String,

    /// Seed of the prompts, the lengths and the arrival times (a server's prefix cache may remember the prompts of an earlier run with the same seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Send `"ignore_eos": true` so each request generates exactly its max_tokens (`--ignore-eos=false` to let it stop at EOS).
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub ignore_eos: bool,

    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,

    /// Nucleus sampling mass of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,

    /// Write the report, with every request's record, as JSON to this path.
    #[arg(long, value_name = "PATH")]
    pub result_json: Option<PathBuf>,

    /// Draw TTFT and end-to-end latency per request and output throughput over time to this PNG.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,

    /// Show no progress bar.
    #[arg(long)]
    pub no_progress: bool,

    /// Seconds one request may take, from send to the end of its stream, before it counts as failed.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// Why the benchmark could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum ServeBenchError {
    /// A flag's value is malformed or out of range.
    #[error("invalid {flag} value {value:?}: {reason}")]
    InvalidArg {
        /// The flag, e.g. `--prompt-tokens`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--model` was not given and the server's model list could not be read.
    #[error("cannot find a model at {url}: {reason} (is the server up? pass --model to skip the lookup)")]
    Models {
        /// The model-list URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Every request failed, so there is nothing to measure (the table and
    /// files were still written).
    #[error("all {failed} requests failed; first error: {first_error}")]
    AllFailed {
        /// How many requests were sent.
        failed: usize,
        /// The error of the first request.
        first_error: String,
    },
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Serializing the JSON report failed.
    #[error("cannot serialize the report: {0}")]
    Json(#[from] serde_json::Error),
    /// Drawing or encoding the plot failed.
    #[error("cannot draw the plot {path}: {reason}")]
    Plot {
        /// The PNG path.
        path: PathBuf,
        /// The cause.
        reason: String,
    },
}

/// An inclusive range of token counts or ids, parsed from `N` or `MIN-MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TokenSpan {
    /// Smallest value.
    pub min: u32,
    /// Largest value (equal to `min` for a single number).
    pub max: u32,
}

impl TokenSpan {
    /// Parses `N` or `MIN-MAX` (whitespace allowed around the numbers); both
    /// ends must be at least `least` and `MIN <= MAX`. Errors name `flag`.
    pub fn parse(flag: &'static str, text: &str, least: u32) -> Result<Self, ServeBenchError> {
        let bad = |reason: String| ServeBenchError::InvalidArg {
            flag,
            value: text.to_string(),
            reason,
        };
        let number = |part: &str| -> Result<u32, ServeBenchError> {
            let part = part.trim();
            part.parse::<u32>().map_err(|_| {
                bad(format!(
                    "{part:?} is not a whole number; expected N or MIN-MAX, e.g. 128 or 64-256"
                ))
            })
        };
        let (min, max) = match text.split_once('-') {
            Some((lo, hi)) => (number(lo)?, number(hi)?),
            None => {
                let n = number(text)?;
                (n, n)
            }
        };
        if min > max {
            return Err(bad(format!("MIN {min} is larger than MAX {max}")));
        }
        if min < least {
            return Err(bad(format!("values must be at least {least}")));
        }
        Ok(Self { min, max })
    }

    fn draw(&self, rng: &mut SplitMix64) -> u32 {
        rng.between(self.min, self.max)
    }
}

impl fmt::Display for TokenSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// The settings a benchmark ran with, as resolved from the arguments.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchSettings {
    /// The completions URL requests were posted to.
    pub endpoint: String,
    /// The model name sent.
    pub model: String,
    /// Requests sent.
    pub num_prompts: usize,
    /// Poisson arrival rate in requests per second; `None` means all at once.
    pub request_rate: Option<f64>,
    /// Cap on in-flight requests; `None` means no cap.
    pub max_concurrency: Option<usize>,
    /// Prompt lengths in tokens (after the shared prefix, if any).
    pub prompt_tokens: TokenSpan,
    /// Tokens of the shared prefix every prompt starts with (0: none).
    pub shared_prefix_tokens: usize,
    /// Distinct shared prefixes, one drawn at random per request.
    pub prefix_groups: usize,
    /// Turns per conversation of the multi-turn dataset (0: off).
    pub multi_turn: usize,
    /// Output lengths (`max_tokens`).
    pub output_tokens: TokenSpan,
    /// Range of the prompt token ids.
    pub token_range: TokenSpan,
    /// RNG seed.
    pub seed: u64,
    /// Whether `ignore_eos` was sent.
    pub ignore_eos: bool,
    /// The requests' sampling temperature.
    pub temperature: f32,
    /// The requests' nucleus mass.
    pub top_p: f32,
    /// Per-request time limit in seconds.
    pub timeout_secs: u64,
}

/// Mean, median and 99th percentile of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencyStats {
    /// Number of samples (all zero figures when there are none).
    pub samples: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// 50th percentile.
    pub median: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl LatencyStats {
    /// Summarizes `samples` (any order).
    pub fn from_samples(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        Self {
            samples: n,
            mean: samples.iter().sum::<f64>() / n as f64,
            median: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
        }
    }
}

/// The `p`-th percentile (0..=100) of ascending `sorted`, interpolating
/// linearly between the closest ranks; 0 for no samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let rank = (p.clamp(0.0, 100.0) / 100.0) * last as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// What was measured of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestRecord {
    /// Position in the plan (0-based).
    pub index: usize,
    /// When it was sent, in seconds since the start of the schedule.
    pub send_time_s: f64,
    /// Prompt tokens sent.
    pub prompt_len: u32,
    /// `max_tokens` asked for.
    pub max_tokens: u32,
    /// Whether it completed (see the module doc for what fails).
    pub success: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Time to first token, if text arrived.
    pub ttft_ms: Option<f64>,
    /// Time per output token after the first, if more than one token came.
    pub tpot_ms: Option<f64>,
    /// Gaps between successive text-carrying events.
    pub itl_ms: Vec<f64>,
    /// Send to `[DONE]`, or to the failure.
    pub e2e_ms: f64,
    /// Output tokens: from usage when reported, else the text-carrying events.
    pub output_tokens: u64,
    /// Whether `output_tokens` came from a usage chunk.
    pub output_tokens_from_usage: bool,
    /// Prompt tokens the server reported in usage, if it did.
    pub usage_prompt_tokens: Option<u64>,
    /// Of those, tokens the server reported as cached
    /// (`usage.prompt_tokens_details.cached_tokens`), if it did.
    pub usage_cached_tokens: Option<u64>,
    /// Text-carrying events received.
    pub content_chunks: usize,
}

/// The outcome of a benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeBenchReport {
    /// The settings used.
    pub settings: BenchSettings,
    /// Start of the schedule to the last completion, in seconds.
    pub duration_s: f64,
    /// Successful requests.
    pub completed: usize,
    /// Failed requests.
    pub failed: usize,
    /// Prompt tokens of the successful requests (as sent; for the
    /// multi-turn dataset, as the server counted them).
    pub total_prompt_tokens: u64,
    /// Of those, tokens the server reported as cached (0 where it reports
    /// none).
    pub total_cached_tokens: u64,
    /// Output tokens of the successful requests.
    pub total_output_tokens: u64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens per second.
    pub total_token_throughput: f64,
    /// Time to first token.
    pub ttft_ms: LatencyStats,
    /// Time per output token, first token excluded.
    pub tpot_ms: LatencyStats,
    /// Inter-token latency, over all gaps of all successful requests.
    pub itl_ms: LatencyStats,
    /// End-to-end latency.
    pub e2e_ms: LatencyStats,
    /// Successful requests whose output tokens came from counting events
    /// because the server sent no usage.
    pub usage_missing: usize,
    /// Successful requests whose output length differs from their
    /// `max_tokens` although `ignore_eos` was sent.
    pub output_len_mismatches: usize,
    /// Every request, in plan order.
    pub requests: Vec<RequestRecord>,
}

/// Runs the benchmark, prints a summary table to stdout, writes the JSON/PNG
/// files if asked, returns the report.
///
/// Fails before sending anything on a bad flag or an unreadable model list;
/// after the run, on a file that cannot be written, or with
/// [`ServeBenchError::AllFailed`] when no request succeeded (the table and
/// files are written first).
pub fn run(args: &ServeBenchArgs) -> Result<ServeBenchReport, ServeBenchError> {
    let base = base_url(&args.url)?;
    let prompt_tokens = TokenSpan::parse("--prompt-tokens", &args.prompt_tokens, 1)?;
    let output_tokens = TokenSpan::parse("--output-tokens", &args.output_tokens, 1)?;
    let token_range = TokenSpan::parse("--token-range", &args.token_range, 0)?;
    if args.num_prompts == 0 {
        return Err(invalid("--num-prompts", "0", "must be at least 1"));
    }
    // Output paths are checked before the run, not after it.
    for (flag, path) in [("--result-json", &args.result_json), ("--plot", &args.plot)] {
        if let Some(p) = path {
            crate::files::check_output(p, flag, &[])
                .map_err(|e| invalid(flag, &p.display().to_string(), &e.to_string()))?;
        }
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        return Err(invalid(
            "--request-rate",
            &args.request_rate.to_string(),
            "must be a positive number or inf",
        ));
    }
    if args.max_concurrency == Some(0) {
        return Err(invalid("--max-concurrency", "0", "must be at least 1"));
    }
    if args.prefix_groups == 0 {
        return Err(invalid("--prefix-groups", "0", "must be at least 1"));
    }
    if args.multi_turn > 0 && args.shared_prefix_tokens > 0 {
        return Err(invalid(
            "--multi-turn",
            &args.multi_turn.to_string(),
            "does not combine with --shared-prefix-tokens (a conversation's history is its shared prefix)",
        ));
    }
    if args.timeout_secs == 0 {
        return Err(invalid("--timeout-secs", "0", "must be at least 1"));
    }
    let timeout = Duration::from_secs(args.timeout_secs);

    actix_web::rt::System::new().block_on(async move {
        let client = awc::Client::builder()
            .connector(
                awc::Connector::new()
                    .limit(args.max_concurrency.unwrap_or(0))
                    .timeout(timeout.min(Duration::from_secs(30))),
            )
            .disable_timeout()
            .finish();
        let model = match &args.model {
            Some(model) => model.clone(),
            None => first_model(&client, &base, args.api_key.as_deref(), timeout).await?,
        };
        let settings = BenchSettings {
            endpoint: format!("{base}/v1/completions"),
            model,
            num_prompts: args.num_prompts,
            request_rate: args.request_rate.is_finite().then_some(args.request_rate),
            max_concurrency: args.max_concurrency,
            prompt_tokens,
            shared_prefix_tokens: args.shared_prefix_tokens,
            prefix_groups: args.prefix_groups,
            multi_turn: args.multi_turn,
            output_tokens,
            token_range,
            seed: args.seed,
            ignore_eos: args.ignore_eos,
            temperature: args.temperature,
            top_p: args.top_p,
            timeout_secs: args.timeout_secs,
        };
        let (records, duration) = if settings.multi_turn > 0 {
            let total = (args.num_prompts * settings.multi_turn) as u64;
            let progress = progress_bar(total, args.no_progress);
            let out =
                drive_conversations(&client, &settings, args.api_key.clone(), &progress).await;
            progress.finish_and_clear();
            out
        } else {
            let plan = plan_requests(&settings)?;
            let progress = progress_bar(args.num_prompts as u64, args.no_progress);
            let out = drive(&client, &settings, plan, args.api_key.clone(), &progress).await;
            progress.finish_and_clear();
            out
        };
        let report = summarize(settings, records, duration);
        finish(args, report)
    })
}

/// Prints the table, writes the files, and turns "nothing succeeded" into an error.
fn finish(
    args: &ServeBenchArgs,
    report: ServeBenchReport,
) -> Result<ServeBenchReport, ServeBenchError> {
    {
        let mut stdout = std::io::stdout().lock();
        // A closed stdout is no reason to lose the files.
        let _ = write!(stdout, "{report}");
        let _ = stdout.flush();
    }
    if let Some(path) = &args.result_json {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).map_err(|source| ServeBenchError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if let Some(path) = &args.plot {
        write_plot(&report, path)?;
    }
    if report.completed == 0 {
        let first_error = report
            .requests
            .iter()
            .find_map(|r| r.error.clone())
            .unwrap_or_else(|| "unknown".to_string());
        return Err(ServeBenchError::AllFailed {
            failed: report.failed,
            first_error,
        });
    }
    Ok(report)
}

fn invalid(flag: &'static str, value: &str, reason: &str) -> ServeBenchError {
    ServeBenchError::InvalidArg {
        flag,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Checks the scheme and drops a trailing `/` and `/v1`.
fn base_url(url: &str) -> Result<String, ServeBenchError> {
    let trimmed = url.trim();
    if trimmed.starts_with("https://") {
        return Err(invalid(
            "--url",
            url,
            "https is not supported (this client has no TLS); use http://",
        ));
    }
    let Some(rest) = trimmed.strip_prefix("http://") else {
        return Err(invalid(
            "--url",
            url,
            "expected a base URL like http://127.0.0.1:8000",
        ));
    };
    let rest = rest.trim_end_matches('/');
    let rest = rest
        .strip_suffix("/v1")
        .unwrap_or(rest)
        .trim_end_matches('/');
    if rest.is_empty() {
        return Err(invalid("--url", url, "no host"));
    }
    let base = format!("http://{rest}");
    // Reject what the HTTP layer could not parse before any request is made.
    if base.parse::<awc::http::Uri>().is_err() {
        return Err(invalid("--url", url, "not a valid URL"));
    }
    Ok(base)
}

/// GET `{base}/v1/models` and take the first id.
async fn first_model(
    client: &awc::Client,
    base: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<String, ServeBenchError> {
    let url = format!("{base}/v1/models");
    let fail = |reason: String| ServeBenchError::Models {
        url: url.clone(),
        reason,
    };
    let fetch = async {
        let mut request = client.get(&url).force_close();
        if let Some(key) = api_key {
            request = request.bearer_auth(key);
        }
        let mut response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .body()
            .limit(16 << 20)
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        if status != awc::http::StatusCode::OK {
            return Err(format!("HTTP {status}: {}", body_text(&body)));
        }
        let list: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("the list is not JSON: {e}"))?;
        list.get("data")
            .and_then(|d| d.get(0))
            .and_then(|m| m.get("id"))
            .and_then(|id| id.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("no model id in {}", truncate(&list.to_string(), 300)))
    };
    match actix_web::rt::time::timeout(timeout, fetch).await {
        Ok(result) => result.map_err(fail),
        Err(_) => Err(fail(format!("no answer within {} s", timeout.as_secs()))),
    }
}

/// A request ready to send: its body and when it is due.
struct Planned {
    index: usize,
    prompt_len: u32,
    max_tokens: u32,
    due: Duration,
    body: Bytes,
}

fn plan_requests(settings: &BenchSettings) -> Result<Vec<Planned>, ServeBenchError> {
    let mut rng = SplitMix64::new(settings.seed);
    let mut arrivals = SplitMix64::new(settings.seed ^ 0xA076_1D64_78BD_642F);
    let mut due = 0.0f64;
    let mut plan = Vec::with_capacity(settings.num_prompts);
    // The shared prefixes come from a stream of their own, so that the
    // suffixes and lengths are those of the same seed without them.
    let mut prefix_rng = SplitMix64::new(settings.seed ^ 0x5EED_F1E5_0F5A_FE00);
    let prefixes: Vec<Vec<u32>> = (0..settings.prefix_groups.max(1))
        .map(|_| {
            (0..settings.shared_prefix_tokens)
                .map(|_| settings.token_range.draw(&mut prefix_rng))
                .collect()
        })
        .collect();
    // Which prefix each request gets: a stream of its own too (drawn at
    // random, not in turn, so that routing does not see a pattern that
    // happens to match the replicas').
    let mut group_rng = SplitMix64::new(settings.seed ^ 0x0C0F_FEE0_D15C_0DE5);
    for index in 0..settings.num_prompts {
        let suffix_len = settings.prompt_tokens.draw(&mut rng);
        let max_tokens = settings.output_tokens.draw(&mut rng);
        let group = (group_rng.next_u64() % prefixes.len() as u64) as usize;
        let prefix = &prefixes[group];
        let prompt: Vec<u32> = prefix
            .iter()
            .copied()
            .chain((0..suffix_len).map(|_| settings.token_range.draw(&mut rng)))
            .collect();
        let prompt_len = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        let mut body = serde_json::json!({
            "model": settings.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "seed": index,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if settings.ignore_eos {
            body["ignore_eos"] = serde_json::Value::Bool(true);
        }
        if let Some(rate) = settings.request_rate {
            if index > 0 {
                // Exponential gap: -ln(1 - u) / rate, u in [0, 1).
                due += -(1.0 - arrivals.unit()).ln() / rate;
            }
        }
        plan.push(Planned {
            index,
            prompt_len,
            max_tokens,
            due: Duration::from_secs_f64(due),
            body: Bytes::from(serde_json::to_vec(&body)?),
        });
    }
    Ok(plan)
}

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} requests {msg}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Sends the plan on schedule, under the concurrency cap; returns the
/// records in plan order and the duration of the run.
async fn drive(
    client: &awc::Client,
    settings: &BenchSettings,
    plan: Vec<Planned>,
    api_key: Option<String>,
    progress: &ProgressBar,
) -> (Vec<RequestRecord>, Duration) {
    let job = RequestJob::new(client, settings, api_key, progress);
    let cap = settings.max_concurrency.unwrap_or(usize::MAX);
    let mut records: Vec<RequestRecord> = Vec::with_capacity(plan.len());
    let mut in_flight = FuturesUnordered::new();
    let start = job.start;
    for planned in plan {
        let due = start + planned.due;
        if due > Instant::now() {
            actix_web::rt::time::sleep_until(actix_web::rt::time::Instant::from_std(due)).await;
        }
        while in_flight.len() >= cap {
            if let Some(record) = in_flight.next().await {
                records.push(record);
            }
        }
        let (index, prompt_len, max_tokens) =
            (planned.index, planned.prompt_len, planned.max_tokens);
        let handle = actix_web::rt::spawn(job.clone().run(planned));
        in_flight.push(async move {
            handle
                .await
                .unwrap_or_else(|e| abnormal(index, prompt_len, max_tokens, &e))
        });
    }
    while let Some(record) = in_flight.next().await {
        records.push(record);
    }
    let duration = start.elapsed();
    records.sort_by_key(|r| r.index);
    (records, duration)
}

/// The record of a request whose task ended abnormally (panicked).
fn abnormal(index: usize, prompt_len: u32, max_tokens: u32, e: &dyn fmt::Display) -> RequestRecord {
    RequestRecord {
        index,
        send_time_s: 0.0,
        prompt_len,
        max_tokens,
        success: false,
        error: Some(format!("request task ended abnormally: {e}")),
        ttft_ms: None,
        tpot_ms: None,
        itl_ms: Vec::new(),
        e2e_ms: 0.0,
        output_tokens: 0,
        output_tokens_from_usage: false,
        usage_prompt_tokens: None,
        usage_cached_tokens: None,
        content_chunks: 0,
    }
}

/// What one request task needs (shared by a run's requests: clones share
/// the failure count and the schedule's start).
#[derive(Clone)]
struct RequestJob {
    client: awc::Client,
    endpoint: Rc<str>,
    api_key: Option<Rc<str>>,
    timeout: Duration,
    start: Instant,
    progress: ProgressBar,
    failures: Rc<Cell<usize>>,
}

/// Measurements of one request, filled in as the stream arrives so that a
/// timeout keeps what was seen.
#[derive(Default)]
struct Measure {
    ttft: Option<Duration>,
    last_text: Option<Instant>,
    itl: Vec<Duration>,
    content_chunks: usize,
    usage_completion: Option<u64>,
    usage_prompt: Option<u64>,
    usage_cached: Option<u64>,
    done_at: Option<Instant>,
    /// The generated text, as it arrived.
    text: String,
}

impl RequestJob {
    /// A run's requests' shared part; the schedule starts now.
    fn new(
        client: &awc::Client,
        settings: &BenchSettings,
        api_key: Option<String>,
        progress: &ProgressBar,
    ) -> Self {
        Self {
            client: client.clone(),
            endpoint: Rc::from(settings.endpoint.as_str()),
            api_key: api_key.map(|k| Rc::from(k.as_str())),
            timeout: Duration::from_secs(settings.timeout_secs),
            start: Instant::now(),
            progress: progress.clone(),
            failures: Rc::new(Cell::new(0)),
        }
    }

    async fn run(self, planned: Planned) -> RequestRecord {
        self.run_for_text(planned).await.0
    }

    /// [`RequestJob::run`], also returning the generated text.
    async fn run_for_text(self, planned: Planned) -> (RequestRecord, String) {
        let mut measure = Measure::default();
        let sent = Instant::now();
        let outcome = actix_web::rt::time::timeout(
            self.timeout,
            stream_completion(
                &self.client,
                &self.endpoint,
                self.api_key.as_deref(),
                planned.body,
                sent,
                &mut measure,
            ),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "timed out after {} s (--timeout-secs)",
                self.timeout.as_secs()
            ))
        });
        let ended = measure.done_at.unwrap_or_else(Instant::now);
        let e2e = ended.saturating_duration_since(sent);
        let (output_tokens, from_usage) = match measure.usage_completion {
            Some(n) => (n, true),
            None => (measure.content_chunks as u64, false),
        };
        let ttft_ms = measure.ttft.map(ms);
        let success = outcome.is_ok();
        let tpot_ms = match (success, ttft_ms) {
            (true, Some(ttft)) if output_tokens > 1 => {
                Some((ms(e2e) - ttft) / (output_tokens - 1) as f64)
            }
            _ => None,
        };
        if !success {
            self.failures.set(self.failures.get() + 1);
            self.progress
                .set_message(format!("({} failed)", self.failures.get()));
        }
        self.progress.inc(1);
        let record = RequestRecord {
            index: planned.index,
            send_time_s: sent.saturating_duration_since(self.start).as_secs_f64(),
            prompt_len: planned.prompt_len,
            max_tokens: planned.max_tokens,
            success,
            error: outcome.err(),
            ttft_ms,
            tpot_ms,
            itl_ms: measure.itl.iter().copied().map(ms).collect(),
            e2e_ms: ms(e2e),
            output_tokens,
            output_tokens_from_usage: from_usage,
            usage_prompt_tokens: measure.usage_prompt,
            usage_cached_tokens: measure.usage_cached,
            content_chunks: measure.content_chunks,
        };
        (record, measure.text)
    }
}

/// Words the multi-turn dataset's user messages are drawn from.
const WORDS: [&str; 48] = [
    "the", "river", "city", "report", "budget", "tell", "me", "about", "why", "how", "when",
    "should", "we", "plan", "a", "new", "bridge", "school", "market", "summer", "winter", "data",
    "model", "train", "quickly", "slowly", "explain", "compare", "list", "three", "reasons", "for",
    "and", "against", "with", "without", "cost", "time", "people", "history", "future", "map",
    "road", "park", "library", "music", "garden", "water",
];

/// A user message of `words` words drawn from `rng`.
fn user_message(rng: &mut SplitMix64, words: usize) -> String {
    (0..words)
        .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the multi-turn dataset: `num_prompts` conversations of
/// `multi_turn` turns, started on the arrival schedule with at most
/// `max_concurrency` in flight; each turn waits for the one before and
/// resends the whole history, the server's answers included.
async fn drive_conversations(
    client: &awc::Client,
    settings: &BenchSettings,
    api_key: Option<String>,
    progress: &ProgressBar,
) -> (Vec<RequestRecord>, Duration) {
    let job = RequestJob::new(client, settings, api_key, progress);
    let cap = settings.max_concurrency.unwrap_or(usize::MAX);
    let mut arrivals = SplitMix64::new(settings.seed ^ 0xA076_1D64_78BD_642F);
    let mut records = Vec::with_capacity(settings.num_prompts * settings.multi_turn);
    let mut in_flight = FuturesUnordered::new();
    let start = job.start;
    let mut due = 0.0f64;
    for conv in 0..settings.num_prompts {
        if let (Some(rate), true) = (settings.request_rate, conv > 0) {
            due += -(1.0 - arrivals.unit()).ln() / rate;
            let at = start + Duration::from_secs_f64(due);
            if at > Instant::now() {
                actix_web::rt::time::sleep_until(actix_web::rt::time::Instant::from_std(at)).await;
            }
        }
        while in_flight.len() >= cap {
            if let Some(done) = in_flight.next().await {
                records.extend(done);
            }
        }
        let first = conv * settings.multi_turn;
        let handle = actix_web::rt::spawn(conversation(job.clone(), settings.clone(), conv));
        in_flight.push(async move {
            handle
                .await
                .unwrap_or_else(|e| vec![abnormal(first, 0, 0, &e)])
        });
    }
    while let Some(done) = in_flight.next().await {
        records.extend(done);
    }
    let duration = start.elapsed();
    records.sort_by_key(|r| r.index);
    (records, duration)
}

/// One conversation's turns, in order; it ends at its first failed turn.
async fn conversation(job: RequestJob, s: BenchSettings, conv: usize) -> Vec<RequestRecord> {
    let mut rng = SplitMix64::new(s.seed ^ (conv as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut history = String::new();
    let mut out = Vec::with_capacity(s.multi_turn);
    for turn in 0..s.multi_turn {
        let words = s.prompt_tokens.draw(&mut rng) as usize;
        let max_tokens = s.output_tokens.draw(&mut rng);
        let prompt = format!(
            "{history}User: {}\nAssistant:",
            user_message(&mut rng, words)
        );
        let index = conv * s.multi_turn + turn;
        let mut body = serde_json::json!({
            "model": s.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": index,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if s.ignore_eos {
            body["ignore_eos"] = serde_json::Value::Bool(true);
        }
        let planned = Planned {
            index,
            prompt_len: 0,
            max_tokens,
            due: Duration::ZERO,
            body: Bytes::from(body.to_string()),
        };
        let (mut record, answer) = job.clone().run_for_text(planned).await;
        record.prompt_len = record
            .usage_prompt_tokens
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        let ok = record.success;
        out.push(record);
        if !ok {
            break;
        }
        history = format!("{prompt}{answer}\n");
    }
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Posts one streaming completion and reads its events into `measure`.
async fn stream_completion(
    client: &awc::Client,
    endpoint: &str,
    api_key: Option<&str>,
    body: Bytes,
    sent: Instant,
    measure: &mut Measure,
) -> Result<(), String> {
    let mut request = client
        .post(endpoint)
        .force_close()
        .content_type("application/json")
        .insert_header(("Accept", "text/event-stream"));
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let mut response = request
        .send_body(body)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    if status != awc::http::StatusCode::OK {
        let text = match response.body().limit(1 << 20).await {
            Ok(body) => body_text(&body),
            Err(e) => format!("(body unreadable: {e})"),
        };
        return Err(format!("HTTP {status}: {text}"));
    }
    let mut parser = SseParser::default();
    while let Some(chunk) = response.next().await {
        let bytes = chunk.map_err(|e| format!("reading the stream: {e}"))?;
        let now = Instant::now();
        for event in parser.feed(&bytes) {
            apply_event(&event, now, sent, measure)?;
        }
        if measure.done_at.is_some() {
            break;
        }
    }
    if measure.done_at.is_none() {
        let now = Instant::now();
        for event in parser.finish() {
            apply_event(&event, now, sent, measure)?;
        }
    }
    if measure.done_at.is_none() {
        return Err(format!(
            "stream ended without [DONE] after {} text chunks",
            measure.content_chunks
        ));
    }
    // Read what follows [DONE] (normally just the end of the body) so the
    // connection can go back to the pool; the timing is already taken.
    while let Some(Ok(_)) = response.next().await {}
    Ok(())
}

/// Folds one event's data into `measure`; an error event fails the request.
fn apply_event(
    data: &str,
    now: Instant,
    sent: Instant,
    measure: &mut Measure,
) -> Result<(), String> {
    if measure.done_at.is_some() {
        return Ok(());
    }
    match classify(data) {
        SseData::Done => measure.done_at = Some(now),
        SseData::Error(message) => return Err(format!("error event: {message}")),
        SseData::Invalid(message) => return Err(format!("event is not JSON: {message}")),
        SseData::Chunk { text, usage } => {
            if let Some(usage) = usage {
                measure.usage_completion = usage.completion_tokens.or(measure.usage_completion);
                measure.usage_prompt = usage.prompt_tokens.or(measure.usage_prompt);
                measure.usage_cached = usage.cached_tokens.or(measure.usage_cached);
            }
            if !text.is_empty() {
                measure.text.push_str(&text);
                measure.content_chunks += 1;
                match measure.last_text {
                    None => measure.ttft = Some(now.saturating_duration_since(sent)),
                    Some(previous) => measure.itl.push(now.saturating_duration_since(previous)),
                }
                measure.last_text = Some(now);
            }
        }
    }
    Ok(())
}

/// Token counts from a usage object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    completion_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
}

/// What one event's data means.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SseData {
    /// `[DONE]`: the stream is complete.
    Done,
    /// An object with a non-null `error` field; its message.
    Error(String),
    /// Data that is not JSON.
    Invalid(String),
    /// A completion chunk: its first choice's text (empty if none), and its
    /// usage.
    Chunk { text: String, usage: Option<Usage> },
}

fn classify(data: &str) -> SseData {
    let data = data.trim();
    if data == "[DONE]" {
        return SseData::Done;
    }
    let value: serde_json::Value = match serde_json::from_str(data) {
        Ok(value) => value,
        Err(e) => return SseData::Invalid(format!("{e}: {}", truncate(data, 300))),
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let message = match error.get("message").and_then(|m| m.as_str()) {
            Some(message) => match error.get("code") {
                Some(code) if !code.is_null() => format!("{message} (code {code})"),
                _ => message.to_string(),
            },
            None => match error.as_str() {
                Some(text) => text.to_string(),
                None => error.to_string(),
            },
        };
        return SseData::Error(truncate(&message, 2000));
    }
    let choice = value.get("choices").and_then(|c| c.get(0));
    let text = choice.and_then(|c| {
        c.get("text")
            .or_else(|| c.get("delta").and_then(|d| d.get("content")))
            .and_then(|t| t.as_str())
    });
    let usage = value.get("usage").filter(|u| u.is_object()).map(|u| Usage {
        completion_tokens: u.get("completion_tokens").and_then(|n| n.as_u64()),
        prompt_tokens: u.get("prompt_tokens").and_then(|n| n.as_u64()),
        cached_tokens: u
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(|n| n.as_u64()),
    });
    SseData::Chunk {
        text: text.unwrap_or_default().to_string(),
        usage,
    }
}

/// Incremental server-sent-events parser: bytes in, each event's `data`
/// (multi-line data joined with `\n`) out. Lines end in `\n` or `\r\n`; a
/// blank line ends an event; fields other than `data` and comments are
/// ignored. Bytes are decoded only as whole lines, so a UTF-8 character split
/// across reads survives.
#[derive(Debug, Default)]
struct SseParser {
    pending: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Adds bytes; returns the events they complete.
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut consumed = 0;
        while let Some(offset) = self.pending[consumed..].iter().position(|&b| b == b'\n') {
            let end = consumed + offset;
            let line = &self.pending[consumed..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(event) = take_line(&mut self.data, &mut self.has_data, line) {
                events.push(event);
            }
            consumed = end + 1;
        }
        self.pending.drain(..consumed);
        events
    }

    /// Ends the stream: an unterminated last line and event still count.
    fn finish(&mut self) -> Vec<String> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.pending);
        let rest = rest.strip_suffix(b"\r").unwrap_or(&rest);
        if !rest.is_empty() {
            if let Some(event) = take_line(&mut self.data, &mut self.has_data, rest) {
                events.push(event);
            }
        }
        if let Some(event) = take_line(&mut self.data, &mut self.has_data, b"") {
            events.push(event);
        }
        events
    }
}

/// Applies one line to the event being built; returns the event a blank line completes.
fn take_line(data: &mut String, has_data: &mut bool, line: &[u8]) -> Option<String> {
    if line.is_empty() {
        if *has_data {
            *has_data = false;
            return Some(std::mem::take(data));
        }
        return None;
    }
    if let Some(value) = line.strip_prefix(b"data:") {
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if *has_data {
            data.push('\n');
        }
        data.push_str(&String::from_utf8_lossy(value));
        *has_data = true;
    }
    None
}

fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".to_string()
    } else {
        truncate(text, 2000)
    }
}

/// At most `max` characters of `text`, marked when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn summarize(
    settings: BenchSettings,
    records: Vec<RequestRecord>,
    duration: Duration,
) -> ServeBenchReport {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success).collect();
    let completed = ok.len();
    let total_prompt_tokens: u64 = ok.iter().map(|r| u64::from(r.prompt_len)).sum();
    let total_output_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let seconds = duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let usage_missing = ok.iter().filter(|r| !r.output_tokens_from_usage).count();
    let output_len_mismatches = if settings.ignore_eos {
        ok.iter()
            .filter(|r| r.output_tokens != u64::from(r.max_tokens))
            .count()
    } else {
        0
    };
    ServeBenchReport {
        duration_s: duration.as_secs_f64(),
        completed,
        failed: records.len() - completed,
        total_prompt_tokens,
        total_cached_tokens: ok.iter().filter_map(|r| r.usage_cached_tokens).sum(),
        total_output_tokens,
        request_throughput: completed as f64 / seconds,
        output_throughput: total_output_tokens as f64 / seconds,
        total_token_throughput: (total_prompt_tokens + total_output_tokens) as f64 / seconds,
        ttft_ms: LatencyStats::from_samples(ok.iter().filter_map(|r| r.ttft_ms).collect()),
        tpot_ms: LatencyStats::from_samples(ok.iter().filter_map(|r| r.tpot_ms).collect()),
        itl_ms: LatencyStats::from_samples(
            ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect(),
        ),
        e2e_ms: LatencyStats::from_samples(ok.iter().map(|r| r.e2e_ms).collect()),
        usage_missing,
        output_len_mismatches,
        settings,
        requests: records,
    }
}

impl fmt::Display for ServeBenchReport {
    /// The summary table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const W: usize = 40;
        let s = &self.settings;
        let rule = |f: &mut fmt::Formatter<'_>, title: &str| {
            let pad = 50usize.saturating_sub(title.len());
            let left = pad / 2;
            writeln!(f, "{}{title}{}", "-".repeat(left), "-".repeat(pad - left))
        };
        writeln!(f, "{:=^50}", " Serving Benchmark Result ")?;
        writeln!(f, "{:<W$} {}", "Endpoint:", s.endpoint)?;
        writeln!(f, "{:<W$} {}", "Model:", s.model)?;
        let rate = s
            .request_rate
            .map_or_else(|| "inf".to_string(), |r| format!("{r}"));
        writeln!(f, "{:<W$} {rate}", "Request rate (req/s):")?;
        let cap = s
            .max_concurrency
            .map_or_else(|| "none".to_string(), |c| c.to_string());
        writeln!(f, "{:<W$} {cap}", "Max concurrency:")?;
        writeln!(
            f,
            "{:<W$} {} / {}",
            "Prompt / output tokens per request:", s.prompt_tokens, s.output_tokens
        )?;
        if s.multi_turn > 0 {
            writeln!(
                f,
                "{:<W$} {} × {} turns (prompt: words per message)",
                "Multi-turn conversations:", s.num_prompts, s.multi_turn
            )?;
        }
        if s.shared_prefix_tokens > 0 {
            writeln!(
                f,
                "{:<W$} {} tokens × {}",
                "Shared prefixes before the prompts:", s.shared_prefix_tokens, s.prefix_groups
            )?;
        }
        writeln!(
            f,
            "{:<W$} {} / {}",
            "Seed / ignore_eos:", s.seed, s.ignore_eos
        )?;
        rule(f, "")?;
        writeln!(f, "{:<W$} {}", "Successful requests:", self.completed)?;
        writeln!(f, "{:<W$} {}", "Failed requests:", self.failed)?;
        writeln!(
            f,
            "{:<W$} {:.2}",
            "Benchmark duration (s):", self.duration_s
        )?;
        writeln!(
            f,
            "{:<W$} {}",
            "Total input tokens:", self.total_prompt_tokens
        )?;
        if self.total_cached_tokens > 0 {
            writeln!(
                f,
                "{:<W$} {}",
                "Input tokens cached (server-reported):", self.total_cached_tokens
            )?;
        }
        writeln!(
            f,
            "{:<W$} {}",
            "Total generated tokens:", self.total_output_tokens
        )?;
        writeln!(
            f,
            "{:<W$} {:.2}",
            "Request throughput (req/s):", self.request_throughput
        )?;
        writeln!(
            f,
            "{:<W$} {:.2}",
            "Output token throughput (tok/s):", self.output_throughput
        )?;
        writeln!(
            f,
            "{:<W$} {:.2}",
            "Total token throughput (tok/s):", self.total_token_throughput
        )?;
        let sections = [
            ("Time to First Token", "TTFT", &self.ttft_ms),
            (
                "Time per Output Token (excl. 1st token)",
                "TPOT",
                &self.tpot_ms,
            ),
            ("Inter-token Latency", "ITL", &self.itl_ms),
            ("End-to-end Latency", "E2E", &self.e2e_ms),
        ];
        for (title, short, stats) in sections {
            rule(f, title)?;
            writeln!(f, "{:<W$} {:.2}", format!("Mean {short} (ms):"), stats.mean)?;
            writeln!(
                f,
                "{:<W$} {:.2}",
                format!("Median {short} (ms):"),
                stats.median
            )?;
            writeln!(f, "{:<W$} {:.2}", format!("P99 {short} (ms):"), stats.p99)?;
        }
        writeln!(f, "{}", "=".repeat(50))?;
        if self.usage_missing > 0 {
            writeln!(
                f,
                "note: {} requests had no usage chunk; their output tokens are counted text chunks",
                self.usage_missing
            )?;
        }
        if self.output_len_mismatches > 0 {
            writeln!(
                f,
                "warning: {} requests returned a different number of tokens than max_tokens despite ignore_eos",
                self.output_len_mismatches
            )?;
        }
        let mut shown: Vec<&str> = Vec::new();
        for record in &self.requests {
            if let Some(error) = &record.error {
                if shown.len() == 3 {
                    break;
                }
                if !shown.contains(&error.as_str()) {
                    shown.push(error);
                    writeln!(f, "request {} failed: {error}", record.index)?;
                }
            }
        }
        Ok(())
    }
}

/// SplitMix64: a small seeded generator, plenty for prompts and arrival times.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi` (`lo <= hi`).
    fn between(&mut self, lo: u32, hi: u32) -> u32 {
        let span = u64::from(hi - lo) + 1;
        lo + (self.next_u64() % span) as u32
    }
}

// ---------------------------------------------------------------- plot

fn write_plot(report: &ServeBenchReport, path: &Path) -> Result<(), ServeBenchError> {
    plot::render_png(path, (1200, 1100), |root| draw_plot(report, root)).map_err(|reason| {
        ServeBenchError::Plot {
            path: path.to_path_buf(),
            reason,
        }
    })
}

/// Output throughput over the run in 1 s buckets, as `(start_s, end_s,
/// tokens per second)`: each successful request's tokens are spread evenly
/// over its text-carrying events, placed at their arrival times; the last
/// bucket ends with the run and its rate is over its own length.
fn throughput_buckets(report: &ServeBenchReport) -> Vec<(f64, f64, f64)> {
    let duration = report.duration_s.max(1e-3);
    let buckets = duration.ceil() as usize;
    let mut tokens = vec![0.0f64; buckets];
    for record in report.requests.iter().filter(|r| r.success) {
        let (Some(ttft), chunks) = (record.ttft_ms, record.content_chunks) else {
            continue;
        };
        if chunks == 0 {
            continue;
        }
        let per_chunk = record.output_tokens as f64 / chunks as f64;
        let mut at_ms = record.send_time_s * 1000.0 + ttft;
        for gap in std::iter::once(0.0).chain(record.itl_ms.iter().copied()) {
            at_ms += gap;
            let bucket = ((at_ms / 1000.0).floor().max(0.0) as usize).min(buckets - 1);
            tokens[bucket] += per_chunk;
        }
    }
    tokens
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let start = i as f64;
            let end = (start + 1.0).min(duration);
            (start, end, n / (end - start))
        })
        .collect()
}

fn draw_plot(report: &ServeBenchReport, root: &Canvas<'_>) -> PlotResult {
    use plotters::prelude::*;

    let s = &report.settings;
    let x_max = report
        .requests
        .iter()
        .map(|r| r.send_time_s + r.e2e_ms / 1000.0)
        .fold(report.duration_s, f64::max)
        .max(1.0)
        * 1.02;
    let ok = |value: fn(&RequestRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .requests
            .iter()
            .filter(|r| r.success)
            .filter_map(|r| value(r).map(|v| (r.send_time_s, v)))
            .collect()
    };
    let ttft = ok(|r| r.ttft_ms);
    let e2e = ok(|r| Some(r.e2e_ms));
    let failed: Vec<(f64, f64)> = report
        .requests
        .iter()
        .filter(|r| !r.success)
        .map(|r| (r.send_time_s, r.e2e_ms))
        .collect();

    let rate = s
        .request_rate
        .map_or_else(|| "inf".to_string(), |r| format!("{r}"));
    let cap = s
        .max_concurrency
        .map_or_else(|| "none".to_string(), |c| c.to_string());
    let title = format!(
        "{} requests ({} failed), rate {rate}/s, concurrency cap {cap}, prompt {} / output {} tokens",
        report.completed + report.failed,
        report.failed,
        s.prompt_tokens,
        s.output_tokens
    );
    let root = root.titled(&title, (FONT, 22))?;
    let panels = root.split_evenly((3, 1));

    let teal = RGBColor(0, 128, 128);
    let blue = RGBColor(40, 90, 200);
    scatter_panel(
        &panels[0],
        x_max,
        &format!(
            "Time to first token per request (median {:.1} ms, p99 {:.1} ms)",
            report.ttft_ms.median, report.ttft_ms.p99
        ),
        "TTFT (ms)",
        &ttft,
        teal,
        &[],
    )?;
    scatter_panel(
        &panels[1],
        x_max,
        &format!(
            "End-to-end latency per request (median {:.1} ms, p99 {:.1} ms)",
            report.e2e_ms.median, report.e2e_ms.p99
        ),
        "E2E latency (ms)",
        &e2e,
        blue,
        &failed,
    )?;

    let buckets = throughput_buckets(report);
    let average = report.output_throughput;
    // Headroom above the tallest bar for the legend box.
    let y_max = buckets.iter().map(|b| b.2).fold(average, f64::max).max(1.0) * 1.3;
    let mut chart = ChartBuilder::on(&panels[2])
        .caption(
            format!("Output throughput per 1 s bucket (run average {average:.1} tok/s)"),
            (FONT, 19),
        )
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s since start)")
        .y_desc("output tokens / s")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    let orange = RGBColor(230, 120, 20);
    chart
        .draw_series(buckets.iter().map(|&(start, end, rate)| {
            let gap = 0.05f64.min((end - start) / 4.0);
            Rectangle::new([(start + gap, 0.0), (end - gap, rate)], orange.filled())
        }))?
        .label("output tokens / s in the bucket")
        .legend(move |(x, y)| Rectangle::new([(x + 4, y - 5), (x + 16, y + 5)], orange.filled()));
    chart
        .draw_series(LineSeries::new(
            [(0.0, average), (report.duration_s, average)],
            BLACK.stroke_width(2),
        ))?
        .label("run average")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One scatter panel: a point per request at (send time, value).
fn scatter_panel(
    area: &Canvas<'_>,
    x_max: f64,
    caption: &str,
    y_desc: &str,
    points: &[(f64, f64)],
    color: plotters::style::RGBColor,
    failed: &[(f64, f64)],
) -> PlotResult {
    use plotters::prelude::*;

    // Headroom above the highest point for the legend box.
    let y_max = points
        .iter()
        .chain(failed)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 19))
        .margin(10)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("send time (s since start)")
        .y_desc(y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    chart
        .draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?
        .label("successful request")
        .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
    if !failed.is_empty() {
        chart
            .draw_series(
                failed
                    .iter()
                    .map(|&(x, y)| Cross::new((x, y), 4, RED.stroke_width(2))),
            )?
            .label("failed request (time to failure)")
            .legend(|(x, y)| Cross::new((x + 10, y), 4, RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_split() {
        let stream = "data: {\"choices\":[{\"text\":\"h\u{e9}\"}]}\n\n: comment\r\ndata: {\"choices\":[{\"text\":\"\"}],\"usage\":{\"completion_tokens\":2,\"prompt_tokens\":5}}\r\n\r\ndata: [DONE]\n\n";
        let bytes = stream.as_bytes();
        let whole: Vec<String> = SseParser::default().feed(bytes);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], "{\"choices\":[{\"text\":\"h\u{e9}\"}]}");
        assert_eq!(whole[2], "[DONE]");
        // Every split point, including inside the two-byte 'é' and inside "\r\n".
        for cut in 0..=bytes.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&bytes[..cut]);
            events.extend(parser.feed(&bytes[cut..]));
            events.extend(parser.finish());
            assert_eq!(events, whole, "split at {cut}");
        }
        // One byte at a time.
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for b in bytes {
            events.extend(parser.feed(std::slice::from_ref(b)));
        }
        assert_eq!(events, whole);
    }

    #[test]
    fn sse_multiline_data_and_unterminated_tail() {
        let mut parser = SseParser::default();
        assert!(parser
            .feed(b"event: x\ndata: a\ndata:b\nid: 1\n")
            .is_empty());
        assert_eq!(parser.feed(b"\ndata: [DONE]"), vec!["a\nb".to_string()]);
        assert_eq!(parser.finish(), vec!["[DONE]".to_string()]);
    }

    #[test]
    fn classify_done_text_usage_and_errors() {
        assert_eq!(classify("[DONE]"), SseData::Done);
        assert_eq!(
            classify(r#"{"choices":[{"text":"hi","finish_reason":null}]}"#),
            SseData::Chunk {
                text: "hi".into(),
                usage: None
            }
        );
        assert_eq!(
            classify(
                r#"{"choices":[],"usage":{"completion_tokens":32,"prompt_tokens":64,"prompt_tokens_details":{"cached_tokens":48}}}"#
            ),
            SseData::Chunk {
                text: String::new(),
                usage: Some(Usage {
                    completion_tokens: Some(32),
                    prompt_tokens: Some(64),
                    cached_tokens: Some(48),
                })
            }
        );
        assert_eq!(
            classify(r#"{"error":{"code":500,"message":"out of memory"}}"#),
            SseData::Error("out of memory (code 500)".to_string())
        );
        assert_eq!(
            classify(r#"{"error":"bad"}"#),
            SseData::Error("bad".to_string())
        );
        assert!(matches!(classify("not json"), SseData::Invalid(_)));
    }

    #[test]
    fn error_event_fails_the_request_and_done_completes_it() {
        let sent = Instant::now();
        let mut measure = Measure::default();
        let now = Instant::now();
        let events = SseParser::default().feed(
            b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"error\":{\"message\":\"boom\"}}\n\n",
        );
        assert!(apply_event(&events[0], now, sent, &mut measure).is_ok());
        let err = apply_event(&events[1], now, sent, &mut measure);
        assert_eq!(err, Err("error event: boom".to_string()));
        assert_eq!(measure.content_chunks, 1);
        assert!(measure.ttft.is_some());
        assert!(measure.done_at.is_none());

        let mut measure = Measure::default();
        for data in [
            "{\"choices\":[{\"text\":\"a\"}]}",
            "{\"choices\":[{\"text\":\"b\"}]}",
            "[DONE]",
        ] {
            assert!(apply_event(data, Instant::now(), sent, &mut measure).is_ok());
        }
        assert_eq!(measure.content_chunks, 2);
        assert_eq!(measure.itl.len(), 1);
        assert!(measure.done_at.is_some());
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert!((percentile(&xs, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        let stats = LatencyStats::from_samples(vec![3.0, 1.0, 2.0]);
        assert_eq!(stats.samples, 3);
        assert_eq!(stats.mean, 2.0);
        assert_eq!(stats.median, 2.0);
        assert!((stats.p99 - 2.98).abs() < 1e-12);
        assert_eq!(
            LatencyStats::from_samples(Vec::new()),
            LatencyStats::default()
        );
    }

    #[test]
    fn token_spans_parse_or_name_the_flag() {
        assert_eq!(
            TokenSpan::parse("--prompt-tokens", "128", 1).ok(),
            Some(TokenSpan { min: 128, max: 128 })
        );
        assert_eq!(
            TokenSpan::parse("--prompt-tokens", "64-256", 1).ok(),
            Some(TokenSpan { min: 64, max: 256 })
        );
        assert_eq!(
            TokenSpan::parse("--prompt-tokens", " 64 - 256 ", 1).ok(),
            Some(TokenSpan { min: 64, max: 256 })
        );
        for bad in ["", "abc", "-5", "64-", "256-64", "0", "1.5", "1-2-3"] {
            match TokenSpan::parse("--prompt-tokens", bad, 1) {
                Err(e @ ServeBenchError::InvalidArg { flag, .. }) => {
                    assert_eq!(flag, "--prompt-tokens");
                    assert!(e.to_string().contains("--prompt-tokens"), "{e}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        assert!(TokenSpan::parse("--token-range", "0-10", 0).is_ok());
    }

    #[test]
    fn base_url_normalizes_and_rejects() {
        assert_eq!(
            base_url("http://127.0.0.1:8000/").ok().as_deref(),
            Some("http://127.0.0.1:8000")
        );
        assert_eq!(
            base_url("http://127.0.0.1:8000/v1/").ok().as_deref(),
            Some("http://127.0.0.1:8000")
        );
        assert!(base_url("https://example.invalid").is_err());
        assert!(base_url("127.0.0.1:8000").is_err());
        assert!(base_url("http://").is_err());
    }

    #[test]
    fn plan_is_seeded_and_within_spans() {
        let settings = BenchSettings {
            endpoint: "http://127.0.0.1:1/v1/completions".to_string(),
            model: "m".to_string(),
            num_prompts: 50,
            request_rate: Some(4.0),
            max_concurrency: None,
            prompt_tokens: TokenSpan { min: 8, max: 16 },
            shared_prefix_tokens: 0,
            prefix_groups: 1,
            multi_turn: 0,
            output_tokens: TokenSpan { min: 4, max: 4 },
            token_range: TokenSpan {
                min: 1000,
                max: 1010,
            },
            seed: 7,
            ignore_eos: true,
            temperature: 0.0,
            top_p: 1.0,
            timeout_secs: 1,
        };
        let a = plan_requests(&settings).ok().unwrap_or_default();
        let b = plan_requests(&settings).ok().unwrap_or_default();
        assert_eq!(a.len(), 50);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.body, y.body);
            assert_eq!(x.due, y.due);
            assert!((8..=16).contains(&x.prompt_len));
            let body: serde_json::Value = serde_json::from_slice(&x.body).unwrap_or_default();
            let prompt = body["prompt"].as_array().cloned().unwrap_or_default();
            assert_eq!(prompt.len(), x.prompt_len as usize);
            assert!(prompt
                .iter()
                .all(|t| (1000..=1010).contains(&t.as_u64().unwrap_or(0))));
            assert_eq!(body["ignore_eos"], true);
            assert_eq!(body["max_tokens"], 4);
        }
        assert!(a.windows(2).all(|w| w[0].due <= w[1].due));
        // 49 exponential gaps at 4/s: the mean gap should be near 0.25 s.
        let mean_gap = a[49].due.as_secs_f64() / 49.0;
        assert!((0.1..0.5).contains(&mean_gap), "{mean_gap}");

        // Shared prefixes: two groups of 6 tokens before each prompt, one
        // drawn per request; the suffixes are those of the run without them.
        let shared = BenchSettings {
            shared_prefix_tokens: 6,
            prefix_groups: 2,
            token_range: TokenSpan {
                min: 0,
                max: 1 << 20,
            },
            ..settings
        };
        let prompt = |p: &Planned| -> Vec<u64> {
            let body: serde_json::Value = serde_json::from_slice(&p.body).unwrap_or_default();
            let tokens = body["prompt"].as_array().cloned().unwrap_or_default();
            tokens.iter().filter_map(|t| t.as_u64()).collect()
        };
        let c = plan_requests(&shared).ok().unwrap_or_default();
        let plain = plan_requests(&BenchSettings {
            shared_prefix_tokens: 0,
            ..shared.clone()
        })
        .ok()
        .unwrap_or_default();
        let mut heads: Vec<Vec<u64>> = c.iter().map(|p| prompt(p)[..6].to_vec()).collect();
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), 2, "both prefixes are used: {heads:?}");
        let p0 = prompt(&c[0]);
        assert_eq!(p0[6..], prompt(&plain[0])[..]);
        assert_eq!(c[0].prompt_len as usize, p0.len());
    }
}
