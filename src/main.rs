//! The `parallm` command line: `generate` and `bench latency`.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use framework::chat::{ChatMessage, ChatTemplate};
use framework::generate::{beam_search, generate};
use framework::{LlamaConfig, LlamaShard, SamplingParams, ShardSpec, WeightFormat};
use parallm::bench::{latency, LatencyPlan};
use parallm::load::{load_model, resolve_model_path};

type CliResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser)]
#[command(
    name = "parallm",
    version,
    about = "Parallel LLM inference on an actor pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct ModelArgs {
    /// A GGUF model file. Without it, the reference model (SmolLM2-135M-Instruct
    /// Q4_1) is fetched into $PARALLM_HOME (default ~/.cache/parallm) on first use.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Numeric format of the weights: auto, native, q8_0 or f32.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    weights: WeightFormat,
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    s.parse().map_err(|e: framework::Error| e.to_string())
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt; read from standard input when omitted.
    prompt: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Presence penalty.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// Random seed (reproducible sampling).
    #[arg(long)]
    seed: Option<u64>,
    /// Beam search with this many beams.
    #[arg(long, value_name = "N")]
    beam: Option<usize>,
    /// Beam search length penalty exponent.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of one model shard.
    Latency(LatencyArgs),
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use a synthetic model of this shape (tiny, 135m, 1b, 8b) instead of a file.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    /// Prefill prompt length.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded at batch 1.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Batch sizes for batched decode.
    #[arg(long, value_delimiter = ',', default_value = "4,16,64")]
    batches: Vec<usize>,
    /// Prompt length per sequence before batched decode.
    #[arg(long, default_value_t = 128)]
    batch_prompt_tokens: usize,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    batch_steps: usize,
    /// Timed runs per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("PARALLM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Bench(BenchCommand::Latency(args)) => run_latency(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn run_generate(args: GenerateArgs) -> CliResult {
    let prompt = match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        }
    };
    if prompt.is_empty() {
        return Err(framework::Error::InvalidRequest {
            field: "prompt",
            reason: "must not be empty".into(),
        }
        .into());
    }
    let path = resolve_model_path(args.model.model.as_deref(), std::io::stderr().is_terminal())?;
    let loaded = load_model(&path, args.model.weights)?;
    let tok = &loaded.tokenizer;
    let text = if args.chat {
        let source = tok.chat_template().ok_or_else(|| {
            format!(
                "{} has no chat template (tokenizer.chat_template)",
                path.display()
            )
        })?;
        let bos = tok
            .bos()
            .and_then(|b| tok.token_text(b))
            .unwrap_or_default();
        let eos = tok.token_text(tok.eos()).unwrap_or_default();
        let template = ChatTemplate::new(source, &bos, &eos)?;
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        template.render(&messages, true)?
    } else {
        prompt
    };
    let ids = tok.encode(&text)?;

    if let Some(width) = args.beam {
        let beams = beam_search(
            &loaded.model,
            tok,
            &ids,
            width,
            args.length_penalty,
            args.max_tokens,
        )?;
        let best = beams.first().ok_or("beam search returned no hypothesis")?;
        println!("{}", best.text);
        for (i, b) in beams.iter().enumerate() {
            eprintln!(
                "beam {} score {:.4} ({} tokens): {:?}",
                i + 1,
                b.score,
                b.tokens.len(),
                b.text
            );
        }
        return Ok(());
    }

    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop,
        ignore_eos: false,
    };
    let mut stdout = std::io::stdout().lock();
    let gen = generate(&loaded.model, tok, &ids, &params, |piece| {
        // A closed stdout (a pipe into `head`) is not worth a panic.
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let _ = stdout.flush();
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, finish: {}, weights: {}",
        gen.prompt_tokens,
        gen.tokens.len(),
        rate(gen.prompt_tokens, gen.prefill_seconds),
        rate(gen.tokens.len().saturating_sub(1), gen.decode_seconds),
        gen.finish_reason.as_str(),
        loaded.model.format(),
    );
    Ok(())
}

fn run_latency(args: LatencyArgs) -> CliResult {
    let (model, what) = match &args.synthetic {
        Some(name) => {
            let config = LlamaConfig::synthetic(name)?;
            let model = LlamaShard::synthetic(config, 0, ShardSpec::SINGLE, args.model.weights)?;
            (model, format!("synthetic {name}"))
        }
        None => {
            let path =
                resolve_model_path(args.model.model.as_deref(), std::io::stderr().is_terminal())?;
            let file = framework::GgufFile::open(&path)?;
            let model = LlamaShard::load(&file, ShardSpec::SINGLE, args.model.weights)?;
            (model, path.display().to_string())
        }
    };
    let plan = LatencyPlan {
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        batches: args.batches,
        batch_prompt_tokens: args.batch_prompt_tokens,
        batch_steps: args.batch_steps,
        runs: args.runs,
    };
    let context = model.config().context;
    if plan.prompt_tokens + 1 > context
        || plan.batch_prompt_tokens + plan.batch_steps + 1 > context
        || plan.decode_tokens + 1 > context
    {
        return Err(
            format!("benchmark lengths exceed the model's context of {context} tokens").into(),
        );
    }
    eprintln!(
        "model: {what}, weights: {}, threads: {}",
        model.format(),
        framework::compute_threads()
    );
    let report = latency(&model, &plan, |line| eprintln!("  measuring {line} ..."))?;
    println!("| test | tok/s |");
    println!("|---|---:|");
    println!(
        "| prefill {} | {:.1} |",
        plan.prompt_tokens, report.prefill_tok_s
    );
    println!(
        "| decode {} (batch 1) | {:.1} |",
        plan.decode_tokens, report.decode_tok_s
    );
    for (b, r) in &report.batch_decode_tok_s {
        println!("| decode batch {b} | {r:.1} |");
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({ "model": what, "weights": model.format(), "plan": plan, "report": report });
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
