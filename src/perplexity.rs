//! `parallm perplexity`: a text's perplexity under the model, by
//! llama.cpp's method, and the KL divergence of the model's distributions
//! from a base run's.
//!
//! The text is tokenized whole (with BOS where the model adds one) and cut
//! into windows of `ctx` tokens; a window's first token is replaced by BOS
//! where the model uses one. Each window is one engine request that scores
//! its prompt from token `ctx / 2 + 1` on and generates nothing, so the
//! windows are batched through every node and replica like any prefill.
//! The negative log-likelihood of the scored tokens gives
//! `PPL = exp(mean)`, and its error `PPL · sqrt(var / (n - 1))`.
//!
//! With `--kl-divergence-base FILE` alone, each scored position's whole
//! distribution is saved (16 bits a token, [`LogprobRow`]); with
//! `--kl-divergence` too, they are read back and compared with this run's:
//! mean KL divergence, the PPL ratio, top-1 agreement and the percentiles
//! of Δp (the change in the right token's probability). Files are written
//! to a temporary name and renamed when complete, so a failed run leaves
//! none behind.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use framework::scoring::{divergence, LogprobRow, PromptScore, PromptScoring};
use indicatif::{ProgressBar, ProgressStyle};
use parallm::{Engine, Event, EventStream, Prompt, Request};
use serde::Serialize;

use crate::files::AtomicFile;
use crate::CliResult;

/// What `parallm perplexity` was asked for.
pub struct PerplexityPlan {
    /// Tokens per window.
    pub ctx: usize,
    /// Windows at most (`None`: as many as the text holds).
    pub chunks: Option<usize>,
    /// Saving or comparing base distributions.
    pub kld: KldMode,
    /// Where the figures go as JSON (`-`: standard output).
    pub json: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

/// What happens with the base distributions.
pub enum KldMode {
    /// Nothing.
    Off,
    /// This run's are saved to the file.
    Save(PathBuf),
    /// This run's are compared with the file's.
    Compare(PathBuf),
}

/// Every figure of a run.
#[derive(Debug, Serialize)]
pub struct PerplexityReport {
    /// Tokens per window.
    pub ctx: usize,
    /// Windows scored.
    pub chunks: usize,
    /// Tokens in the text.
    pub text_tokens: usize,
    /// Tokens scored.
    pub scored_tokens: usize,
    /// The perplexity.
    pub ppl: f64,
    /// Its standard error.
    pub ppl_error: f64,
    /// The estimate after each window.
    pub running: Vec<f64>,
    /// Wall time of the scoring (tokenizing excluded), in seconds.
    pub seconds: f64,
    /// Window tokens computed per second.
    pub tokens_per_second: f64,
    /// The comparison with a base, with `--kl-divergence`.
    pub kld: Option<KldReport>,
}

/// How the model compares with the base.
#[derive(Debug, Serialize)]
pub struct KldReport {
    /// The base's perplexity on the same tokens.
    pub base_ppl: f64,
    /// This run's over the base's.
    pub ppl_ratio: f64,
    /// Mean KL(base ‖ model) per token, in nats.
    pub mean_kld: f64,
    /// Its standard error.
    pub mean_kld_error: f64,
    /// Percentiles of the KL divergence: `[percent, value]`.
    pub kld_percentiles: Vec<(f64, f64)>,
    /// Share of positions where both put the same token first.
    pub same_top: f64,
    /// Mean change in the right token's probability (model − base).
    pub mean_delta_p: f64,
    /// Root mean square of that change.
    pub rms_delta_p: f64,
    /// Percentiles of the change: `[percent, value]`.
    pub delta_p_percentiles: Vec<(f64, f64)>,
}

const MAGIC: &[u8; 8] = b"PLMKLD\0\0";
const VERSION: u32 = 1;
/// Percentiles reported (llama.cpp's list).
const PERCENTS: [f64; 11] = [
    100.0, 99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1, 0.0,
];

/// Scores `text` with `engine` as `plan` says, printing the running
/// estimate and the summary.
pub fn perplexity(
    engine: &Engine,
    text: &str,
    plan: &PerplexityPlan,
) -> CliResult<PerplexityReport> {
    let ctx = plan.ctx;
    let context = engine.model_config().context;
    if ctx < 4 || ctx > context {
        return Err(
            format!("--ctx is {ctx}, must be in [4, {context}] (the model's context)").into(),
        );
    }
    if plan.chunks == Some(0) {
        return Err("--chunks must be at least 1".into());
    }
    let tok = engine
        .tokenizer()
        .ok_or("perplexity needs a model with a tokenizer")?;
    let mut tokens = engine.tokenize(&Prompt::Text(text.to_string()))?;
    if tok.adds_eos() && tokens.last() == Some(&tok.eos()) {
        tokens.pop();
    }
    if tokens.len() < 2 * ctx {
        return Err(format!(
            "the text is {} tokens; windows of --ctx {ctx} need at least {} (two windows)",
            tokens.len(),
            2 * ctx
        )
        .into());
    }
    let chunks = (tokens.len() / ctx).min(plan.chunks.unwrap_or(usize::MAX));
    let bos = tok.bos().filter(|_| tok.adds_bos());
    let windows: Vec<Vec<u32>> = (0..chunks)
        .map(|i| {
            let mut w = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect();
    let first = ctx / 2 + 1;
    let per_window = ctx - first;
    let vocab = engine.model_config().vocab;
    let run = Windows {
        ctx,
        vocab,
        first,
        windows: &windows,
    };
    let mut base = match &plan.kld {
        KldMode::Compare(path) => Some(BaseReader::open(path, &run)?),
        _ => None,
    };
    let mut save = match &plan.kld {
        KldMode::Save(path) => Some(BaseWriter::create(path, &run)?),
        _ => None,
    };
    let rows = !matches!(plan.kld, KldMode::Off);
    let scoring = PromptScoring {
        first,
        top: 0,
        rows,
    };
    let bar = progress_bar(chunks as u64, !plan.progress);
    // Windows in flight: enough to keep every replica's steps full, few
    // enough that kept rows do not pile up.
    let cfg = engine.config();
    let inflight = if rows { 4 } else { 16 } * cfg.dp.max(1) * cfg.lanes().max(1);
    let t0 = Instant::now();
    let mut pending: VecDeque<EventStream> = VecDeque::new();
    let mut next = 0;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::with_capacity(chunks);
    let mut cmp = Compare::default();
    // With `--json -`, standard output holds the JSON alone: the running
    // figures and the summary go to standard error.
    let json_out = plan.json.as_ref().is_some_and(|p| p.as_os_str() == "-");
    // Unlocked: the engine's threads log to standard error meanwhile, and
    // a lock held across the run would block them, and so the run.
    let mut stdout: Box<dyn Write> = match json_out {
        true => Box::new(std::io::stderr()),
        false => Box::new(std::io::stdout()),
    };
    for i in 0..chunks {
        while next < chunks && pending.len() < inflight {
            let req = Request::score_tokens(windows[next].clone(), scoring);
            pending.push_back(engine.generate(req)?);
            next += 1;
        }
        let stream = pending.pop_front().ok_or("no window in flight")?;
        let scores = window_scores(stream, first, ctx)?;
        if scores.len() != per_window {
            return Err(format!(
                "window {} returned {} scores, expected {per_window}",
                i + 1,
                scores.len()
            )
            .into());
        }
        for s in &scores {
            let nl = -(s.logprob as f64);
            nll += nl;
            nll2 += nl * nl;
        }
        count += scores.len();
        if let Some(w) = &mut save {
            w.write_window(&scores)?;
        }
        if let Some(b) = &mut base {
            cmp.add(&b.read_window(per_window, vocab)?, &scores)?;
        }
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        let _ = write!(stdout, "[{}]{ppl:.4},", i + 1);
        let _ = stdout.flush();
        bar.inc(1);
    }
    let _ = writeln!(stdout);
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let ppl_error = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    if let Some(w) = save {
        w.finish()?;
    }
    let _ = writeln!(stdout, "Final estimate: PPL = {ppl:.4} +/- {ppl_error:.5}");
    let kld = base.map(|_| cmp.report(ppl));
    if let Some(k) = &kld {
        print_kld(&mut stdout, ppl, k);
    }
    let report = PerplexityReport {
        ctx,
        chunks,
        text_tokens: tokens.len(),
        scored_tokens: count,
        ppl,
        ppl_error,
        running,
        seconds,
        tokens_per_second: (chunks * ctx) as f64 / seconds.max(1e-9),
        kld,
    };
    if let Some(path) = &plan.json {
        let json = serde_json::to_string_pretty(&report)?;
        if path.as_os_str() == "-" {
            let _ = writeln!(std::io::stdout().lock(), "{json}");
        } else {
            let mut f = AtomicFile::create(path)?;
            f.file().write_all(json.as_bytes())?;
            f.commit()?;
        }
    }
    Ok(report)
}

/// A window's scores, in order, from its events.
fn window_scores(mut stream: EventStream, first: usize, ctx: usize) -> CliResult<Vec<PromptScore>> {
    let mut scores = Vec::with_capacity(ctx - first);
    loop {
        match stream.next_blocking() {
            Some(Event::PromptScores(s)) => scores.extend(s),
            Some(Event::Finished { .. }) => break,
            Some(Event::Token { .. }) => {}
            Some(Event::Failed { error }) => return Err(error.into()),
            Some(Event::Refused { field, reason }) => {
                return Err(format!("`{field}` {reason}").into())
            }
            Some(Event::Cancelled) => return Err("a window was cancelled".into()),
            None => return Err("the engine stopped without an answer".into()),
        }
    }
    let in_order = scores
        .iter()
        .enumerate()
        .all(|(k, s)| s.position == first + k);
    if !in_order {
        return Err("a window's scores came out of order".into());
    }
    Ok(scores)
}

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} windows, {elapsed} (eta {eta})")
    {
        bar.set_style(style);
    }
    bar
}

/// The running comparison with a base.
#[derive(Default)]
struct Compare {
    kld: Vec<f64>,
    delta_p: Vec<f64>,
    same_top: usize,
    base_nll: f64,
}

/// One base position: the right token's log-probability and the row.
struct BasePosition {
    logprob: f32,
    row: LogprobRow,
}

impl Compare {
    fn add(&mut self, base: &[BasePosition], scores: &[PromptScore]) -> CliResult {
        for (b, s) in base.iter().zip(scores) {
            let row = s
                .row
                .as_ref()
                .ok_or("the engine returned no distribution")?;
            let d = divergence(&b.row, row);
            self.kld.push(d.kld);
            self.same_top += d.same_top as usize;
            self.delta_p
                .push((s.logprob as f64).exp() - (b.logprob as f64).exp());
            self.base_nll -= b.logprob as f64;
        }
        Ok(())
    }

    fn report(mut self, ppl: f64) -> KldReport {
        let n = self.kld.len().max(1) as f64;
        let (mean_kld, mean_kld_error) = mean_and_error(&self.kld);
        let (mean_delta_p, _) = mean_and_error(&self.delta_p);
        let rms_delta_p = (self.delta_p.iter().map(|d| d * d).sum::<f64>() / n).sqrt();
        let base_ppl = (self.base_nll / n).exp();
        KldReport {
            base_ppl,
            ppl_ratio: ppl / base_ppl,
            mean_kld,
            mean_kld_error,
            kld_percentiles: percentiles(&mut self.kld),
            same_top: self.same_top as f64 / n,
            mean_delta_p,
            rms_delta_p,
            delta_p_percentiles: percentiles(&mut self.delta_p),
        }
    }
}

fn mean_and_error(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let err = if xs.len() > 1 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, err)
}

/// `[percent, value]` for each of [`PERCENTS`] (nearest rank).
fn percentiles(xs: &mut [f64]) -> Vec<(f64, f64)> {
    xs.sort_by(f64::total_cmp);
    PERCENTS
        .iter()
        .map(|&p| {
            let at = ((p / 100.0) * (xs.len().saturating_sub(1)) as f64).round() as usize;
            (p, xs.get(at).copied().unwrap_or(0.0))
        })
        .collect()
}

fn print_kld(out: &mut impl Write, ppl: f64, k: &KldReport) {
    let _ = writeln!(out, "====== Perplexity statistics ======");
    let _ = writeln!(out, "PPL(model)           : {ppl:.4}");
    let _ = writeln!(out, "PPL(base)            : {:.4}", k.base_ppl);
    let _ = writeln!(out, "PPL(model)/PPL(base) : {:.6}", k.ppl_ratio);
    let _ = writeln!(out, "====== KL divergence statistics ======");
    let _ = writeln!(
        out,
        "Mean KLD   : {:.6} ± {:.6}",
        k.mean_kld, k.mean_kld_error
    );
    for (p, v) in &k.kld_percentiles {
        let _ = writeln!(out, "{:>5.1}% KLD : {v:.6}", p);
    }
    let _ = writeln!(out, "====== Token probability statistics ======");
    let _ = writeln!(out, "Mean Δp    : {:.4}%", 100.0 * k.mean_delta_p);
    let _ = writeln!(out, "RMS Δp     : {:.4}%", 100.0 * k.rms_delta_p);
    for (p, v) in &k.delta_p_percentiles {
        let _ = writeln!(out, "{:>5.1}% Δp  : {:.4}%", p, 100.0 * v);
    }
    let _ = writeln!(out, "Same top p : {:.4}%", 100.0 * k.same_top);
}

/// What a base file must match: the window size, the vocabulary, the first
/// scored token and every window's tokens.
struct Windows<'a> {
    ctx: usize,
    vocab: usize,
    first: usize,
    windows: &'a [Vec<u32>],
}

impl Windows<'_> {
    /// The header both sides of a base file agree on.
    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(28 + self.windows.len() * self.ctx * 4);
        h.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            self.ctx as u32,
            self.vocab as u32,
            self.windows.len() as u32,
            self.first as u32,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        for t in self.windows.iter().flatten() {
            h.extend_from_slice(&t.to_le_bytes());
        }
        h
    }
}

/// Writes a base file: the header, then for each scored position its
/// log-probability, best token, and quantized row.
struct BaseWriter(AtomicFile);

impl BaseWriter {
    fn create(path: &Path, run: &Windows<'_>) -> CliResult<Self> {
        let mut f = AtomicFile::create(path)?;
        f.file().write_all(&run.header())?;
        Ok(Self(f))
    }

    fn write_window(&mut self, scores: &[PromptScore]) -> CliResult {
        let f = self.0.file();
        for s in scores {
            let row = s
                .row
                .as_ref()
                .ok_or("the engine returned no distribution")?;
            f.write_all(&s.logprob.to_le_bytes())?;
            f.write_all(&row.best.to_le_bytes())?;
            f.write_all(&row.lo.to_le_bytes())?;
            f.write_all(&row.scale.to_le_bytes())?;
            let mut bytes = Vec::with_capacity(row.q.len() * 2);
            for q in &row.q {
                bytes.extend_from_slice(&q.to_le_bytes());
            }
            f.write_all(&bytes)?;
        }
        Ok(())
    }

    fn finish(self) -> CliResult {
        self.0.commit()
    }
}

/// Reads a base file made by the same text, window size and vocabulary.
struct BaseReader {
    path: PathBuf,
    file: BufReader<File>,
}

impl BaseReader {
    fn open(path: &Path, run: &Windows<'_>) -> CliResult<Self> {
        let (ctx, vocab, windows) = (run.ctx, run.vocab, run.windows);
        let file = File::open(path)
            .map_err(|e| format!("cannot open the base file {}: {e}", path.display()))?;
        let mut file = BufReader::new(file);
        let want = run.header();
        let mut got = vec![0u8; 28];
        let bad = |what: String| format!("{} {what}", path.display());
        file.read_exact(&mut got)
            .map_err(|_| bad("is not a base file of `parallm perplexity` (too short)".into()))?;
        if &got[..8] != MAGIC {
            return Err(bad(
                "is not a base file of `parallm perplexity --kl-divergence-base`".into(),
            )
            .into());
        }
        let field = |i: usize| {
            u32::from_le_bytes([
                got[8 + 4 * i],
                got[9 + 4 * i],
                got[10 + 4 * i],
                got[11 + 4 * i],
            ])
        };
        if field(0) != VERSION {
            return Err(bad(format!(
                "has version {}, this build reads {VERSION}",
                field(0)
            ))
            .into());
        }
        if field(1) as usize != ctx {
            return Err(bad(format!(
                "was made with --ctx {}, this run uses {ctx}",
                field(1)
            ))
            .into());
        }
        if field(2) as usize != vocab {
            return Err(bad(format!(
                "holds a vocabulary of {} tokens, this model has {vocab}",
                field(2)
            ))
            .into());
        }
        if (field(3) as usize) < windows.len() {
            return Err(bad(format!(
                "holds {} windows, this run scores {}",
                field(3),
                windows.len()
            ))
            .into());
        }
        let mut toks = vec![0u8; field(3) as usize * ctx * 4];
        file.read_exact(&mut toks)
            .map_err(|_| bad("ends inside its tokens".into()))?;
        if toks[..want.len() - 28] != want[28..] {
            return Err(
                bad("was made from another text or tokenizer (its tokens differ)".into()).into(),
            );
        }
        if field(3) as usize != windows.len() {
            return Err(bad(format!(
                "holds {} windows, this run scores {}",
                field(3),
                windows.len()
            ))
            .into());
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn read_window(&mut self, n: usize, vocab: usize) -> CliResult<Vec<BasePosition>> {
        let mut out = Vec::with_capacity(n);
        let mut head = [0u8; 16];
        let mut q = vec![0u8; vocab * 2];
        for _ in 0..n {
            self.file
                .read_exact(&mut head)
                .and_then(|_| self.file.read_exact(&mut q))
                .map_err(|_| format!("{} ends early", self.path.display()))?;
            let f = |i: usize| [head[i], head[i + 1], head[i + 2], head[i + 3]];
            out.push(BasePosition {
                logprob: f32::from_le_bytes(f(0)),
                row: LogprobRow {
                    best: u32::from_le_bytes(f(4)),
                    lo: f32::from_le_bytes(f(8)),
                    scale: f32::from_le_bytes(f(12)),
                    q: q.chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect(),
                },
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let mut xs: Vec<f64> = (0..101).map(f64::from).collect();
        let p = percentiles(&mut xs);
        assert_eq!(p[0], (100.0, 100.0));
        assert_eq!(p[5], (50.0, 50.0));
        assert_eq!(p[10], (0.0, 0.0));
    }
}
