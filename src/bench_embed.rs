//! `parallm bench embeddings`: sequences per second of an embedding model
//! through its pipeline (queue, scheduler, nodes, merger), every input of a
//! file submitted at once as its own request, as a server's many clients
//! would; the median of several rounds after a warm-up round.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use parallm::actors::embed::{EmbedConfig, Embedder};
use parallm::framework::WeightFormat;

use crate::CliResult;

/// `parallm bench embeddings`.
#[derive(Args)]
pub struct EmbedBenchArgs {
    /// The encoder: a GGUF file (`bert`) or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A text file, one input per line.
    #[arg(long)]
    pub file: PathBuf,
    /// Tensor-parallel ranks.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Compute threads in all (shared by the ranks).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Tokens per batch.
    #[arg(long, default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Timed rounds (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Weight format (as `[[models]]`' `weights`: the file's own by default).
    #[arg(long, default_value = "native")]
    pub weights: WeightFormat,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the benchmark and prints its figures.
pub fn run(args: &EmbedBenchArgs) -> CliResult {
    if args.tp == 0 || args.threads < args.tp || args.rounds == 0 {
        return Err("--tp and --rounds must be at least 1, and --threads at least --tp".into());
    }
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(format!("{} has no non-empty line", args.file.display()).into());
    }
    let e = Embedder::start(EmbedConfig {
        model: args.model.clone(),
        weights: args.weights,
        tp: args.tp,
        threads_per_node: args.threads / args.tp,
        max_batch_tokens: args.max_batch_tokens,
        queue_capacity: lines.len().max(1),
        ..EmbedConfig::default()
    })?;
    let inputs = lines
        .iter()
        .map(|l| e.tokenize(l))
        .collect::<Result<Vec<_>, _>>()?;
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let round = || -> CliResult<f64> {
        let t = Instant::now();
        let pending = inputs
            .iter()
            .map(|i| e.embed(vec![i.clone()]))
            .collect::<Result<Vec<_>, _>>()?;
        for p in pending {
            p.wait_blocking()
                .map_err(|end| format!("a request ended: {end:?}"))?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    round()?;
    let times = (0..args.rounds)
        .map(|_| round())
        .collect::<CliResult<Vec<f64>>>()?;
    let secs = crate::bench::median(times.clone());
    let (seqs, n) = (lines.len() as f64 / secs, lines.len());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "sequences": n, "tokens": tokens, "tp": args.tp, "threads": args.threads,
                "seconds_median": secs, "rounds": times,
                "seq_per_s": seqs, "tokens_per_s": tokens as f64 / secs,
            })
        );
    } else {
        println!(
            "{n} sequences, {tokens} tokens ({:.1} per sequence), tp {} on {} threads",
            tokens as f64 / n as f64,
            args.tp,
            args.threads
        );
        println!(
            "median of {} rounds: {secs:.3} s, {seqs:.1} sequences/s, {:.0} tokens/s",
            args.rounds,
            tokens as f64 / secs
        );
    }
    e.shutdown_timeout(std::time::Duration::from_secs(10));
    Ok(())
}
