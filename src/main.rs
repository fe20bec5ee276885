//! The `parallm` command line: `generate` (through the engine), `serve` (the
//! HTTP server), `perplexity` (a text's perplexity and the KL divergence
//! from a base run), `quantize` (a GGUF file's weights in another type),
//! `prune` (zeroed weights or dropped blocks), `imatrix` (activation
//! statistics of a calibration text, for `quantize --imatrix` and Wanda),
//! `config show|check`, `cuda` (what this machine offers
//! the CUDA backend), and the benchmarks `bench latency`, `bench
//! throughput`, `bench serve` and `bench quality`.
//!
//! The benchmarks are modules of this binary, not of the `parallm` library, so
//! their dependencies (plotters, a font, PNG, an HTTP client) stay out of a
//! library user's build.

mod bench;
mod bench_embed;
mod bench_quality;
mod bench_serve;
mod calibrate;
mod cuda_decode;
mod files;
mod job;
mod launcher;
mod perplexity;
mod plot;
mod prune;
mod quantize;
mod throughput;
mod weighted;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use framework::chat::ChatMessage;
use framework::speculative::{SpecMethod, Speculation};
use framework::{LlamaShard, ModelConfig, SamplingParams, ShardSpec, WeightFormat};
use parallm::actors::llm::ModelSource;
use parallm::load::resolve_model_path;
use parallm::{BeamParams, Engine, EngineBuilder, Event, Prompt, Request};

use crate::bench::{latency, LatencyPlan};
use crate::throughput::{throughput, Dataset, ThroughputPlan};

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
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// A text's perplexity under the model (llama.cpp's method: windows of
    /// --ctx tokens, the second half of each scored), and the KL divergence
    /// of its distributions from a base run's.
    Perplexity(PerplexityArgs),
    /// Writes a GGUF file's weights in another type (q8_0, q4_0, q4_k_m,
    /// f16, …) as a GGUF file llama.cpp loads, choosing per tensor as
    /// llama-quantize does.
    Quantize(QuantizeArgs),
    /// Zeroes each block matrix's least important weights per row
    /// (--method magnitude: |w|; --method wanda: |w|·‖x‖ over --calib TEXT;
    /// --sparsity or an N:M --pattern), or drops the blocks that change the
    /// hidden state least on a calibration text (--method layers --drop K
    /// --calib TEXT), writing a GGUF file.
    Prune(PruneArgs),
    /// Runs a calibration text through the engine and writes the importance
    /// matrix (Σx² per input column of every block matrix) as llama.cpp's
    /// GGUF imatrix file, for `quantize --imatrix` and `prune --method
    /// wanda --imatrix`.
    Imatrix(ImatrixArgs),
    /// Show or check the configuration `serve` would run with.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// What this machine offers the CUDA backend: CUDA's libraries, the GPUs,
    /// and whether the kernels compile.
    Cuda(CudaArgs),
    /// Starts the job's ranks with mpirun as the config's [cluster] places
    /// them (writing the hostfile), or with --dry-run prints the command.
    Launch(LaunchArgs),
}

#[derive(Args)]
struct LaunchArgs {
    #[command(flatten)]
    layers: LayerArgs,
    /// Print the hostfile and the mpirun command; start nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where to write the hostfile (default: the config file's path with
    /// the extension `.hosts`).
    #[arg(long, value_name = "FILE")]
    hostfile: Option<PathBuf>,
    /// What each rank runs, after `--` (default: `serve --config FILE` and
    /// the overrides given here, such as `--dp 2` or `--set k=v`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct CudaArgs {
    /// Compile every kernel with NVRTC for this architecture (compute_90,
    /// sm_90, …) and list them; needs only NVRTC, no GPU.
    #[arg(long, value_name = "ARCH")]
    compile: Option<String>,
    /// Time batch-1 decode of one shard of this synthetic shape (tiny32,
    /// 135m, 1b, 8b) on the GPU, engine left out: the copy bandwidth and
    /// the limit it sets, the bare decode rate, and where a step goes.
    #[arg(long, value_name = "SHAPE")]
    decode: Option<String>,
    /// With --decode: the GPU ordinal.
    #[arg(long, default_value_t = 0, requires = "decode")]
    gpu: usize,
    /// With --decode: run on the host emulation of a GPU instead (slow;
    /// checks the command on a machine without one).
    #[arg(long, requires = "decode")]
    emulated: bool,
    /// With --decode: weights and activations, f16 or bf16.
    #[arg(long, default_value = "f16", requires = "decode")]
    dtype: String,
    /// With --decode: prompt tokens before the decode steps.
    #[arg(long, default_value_t = 128, requires = "decode")]
    depth: usize,
    /// With --decode: decode steps timed, and as many profiled.
    #[arg(long, default_value_t = 64, requires = "decode")]
    steps: usize,
    /// With --decode: sequences decoded together.
    #[arg(long, default_value_t = 1, requires = "decode")]
    batch: usize,
    /// With --decode: run one more decode step between cuProfilerStart and
    /// cuProfilerStop, for `ncu --profile-from-start off`.
    #[arg(long, requires = "decode")]
    kernel_trace: bool,
    /// With --decode: also write the report as JSON here.
    #[arg(long, value_name = "PATH", requires = "decode")]
    json: Option<PathBuf>,
}

/// The layers above the defaults: a file, then the environment
/// (`PARALLM__SECTION__KEY`), then these flags.
#[derive(Args, Clone, Default)]
struct LayerArgs {
    /// A TOML or YAML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to bind (server.host).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind, 0 for any free one (server.port).
    #[arg(long)]
    port: Option<u16>,
    /// A GGUF model file, or a Hugging Face model directory (model.path).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The model id clients use (model.name).
    #[arg(long)]
    model_name: Option<String>,
    /// Numeric format of the weights (model.weights).
    #[arg(long)]
    weights: Option<String>,
    /// Tensor-parallel ranks (parallel.tp).
    #[arg(long)]
    tp: Option<usize>,
    /// Pipeline stages (parallel.pp).
    #[arg(long)]
    pp: Option<usize>,
    /// Data-parallel replicas (parallel.dp).
    #[arg(long)]
    dp: Option<usize>,
    /// A draft model for speculative decoding, with the model's vocabulary
    /// (speculative.draft_model).
    #[arg(long, value_name = "PATH")]
    draft_model: Option<PathBuf>,
    /// How nodes are spread over MPI ranks: by-host or spread
    /// (cluster.placement).
    #[arg(long)]
    placement: Option<String>,
    /// An accepted API key, repeatable (server.api_keys).
    #[arg(long = "api-key", value_name = "KEY")]
    api_keys: Vec<String>,
    /// Any key: `section.key=value`, repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// Configuration keys whose values are paths.
const PATH_KEYS: [&str; 2] = ["model.path", "speculative.draft_model"];

impl LayerArgs {
    /// These overrides (all but `--config`) as flags for another `parallm`
    /// process, paths made absolute: what `launch` passes to its ranks.
    fn forwarded(&self) -> CliResult<Vec<String>> {
        let mut out = Vec::new();
        let mut flag = |name: &str, value: String| out.extend([format!("--{name}"), value]);
        let path = |p: &PathBuf| std::path::absolute(p).map(|p| p.display().to_string());
        if let Some(v) = &self.host {
            flag("host", v.clone());
        }
        if let Some(v) = self.port {
            flag("port", v.to_string());
        }
        if let Some(v) = &self.model {
            flag("model", path(v)?);
        }
        if let Some(v) = &self.model_name {
            flag("model-name", v.clone());
        }
        if let Some(v) = &self.weights {
            flag("weights", v.clone());
        }
        for (name, v) in [("tp", self.tp), ("pp", self.pp), ("dp", self.dp)] {
            if let Some(v) = v {
                flag(name, v.to_string());
            }
        }
        if let Some(v) = &self.draft_model {
            flag("draft-model", path(v)?);
        }
        if let Some(v) = &self.placement {
            flag("placement", v.clone());
        }
        for key in &self.api_keys {
            flag("api-key", key.clone());
        }
        for kv in &self.set {
            // A path given by --set is made absolute too.
            let kv = match kv.split_once('=') {
                Some((k, v)) if PATH_KEYS.contains(&k.trim()) && !v.trim().is_empty() => {
                    format!("{}={}", k.trim(), path(&PathBuf::from(v.trim()))?)
                }
                _ => kv.clone(),
            };
            flag("set", kv);
        }
        Ok(out)
    }

    fn sources(&self) -> CliResult<parallm::config::Sources> {
        use config::Value;
        let mut o: Vec<(String, Value)> = Vec::new();
        let mut put = |k: &str, v: Value| o.push((k.to_string(), v));
        if let Some(v) = &self.host {
            put("server.host", v.clone().into());
        }
        if let Some(v) = self.port {
            put("server.port", Value::from(v as u64));
        }
        if let Some(v) = &self.model {
            put("model.path", v.display().to_string().into());
        }
        if let Some(v) = &self.model_name {
            put("model.name", v.clone().into());
        }
        if let Some(v) = &self.weights {
            put("model.weights", v.clone().into());
        }
        if let Some(v) = &self.draft_model {
            put("speculative.draft_model", v.display().to_string().into());
        }
        if let Some(v) = &self.placement {
            put("cluster.placement", v.clone().into());
        }
        for (k, v) in [
            ("parallel.tp", self.tp),
            ("parallel.pp", self.pp),
            ("parallel.dp", self.dp),
        ] {
            if let Some(v) = v {
                put(k, Value::from(v as u64));
            }
        }
        if !self.api_keys.is_empty() {
            put("server.api_keys", self.api_keys.clone().into());
        }
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set takes KEY=VALUE, got '{kv}'"))?;
            put(k.trim(), v.trim().to_string().into());
        }
        Ok(parallm::config::Sources::from_process(
            self.config.clone(),
            o,
        ))
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    layers: LayerArgs,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration and where each value came from.
    Show(LayerArgs),
    /// Validate a config file with the environment and flags on top (without
    /// a file: the defaults, the environment and the flags, as a server
    /// configured by environment variables starts).
    Check {
        /// The TOML or YAML file (or give it with --config).
        file: Option<PathBuf>,
        #[command(flatten)]
        layers: LayerArgs,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// A GGUF model file, or a Hugging Face model directory (config.json,
    /// safetensors, tokenizer.json). Without it, the reference model
    /// (SmolLM2-135M-Instruct Q4_1) is fetched into $PARALLM_HOME (default
    /// ~/.cache/parallm) on first use.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Numeric format of the weights: auto, native, q8_0, f32, f16 or bf16
    /// (default: auto, which computes f32 matrices in Q8_0; perplexity,
    /// imatrix and prune measure the model as stored: native).
    #[arg(long, value_parser = parse_format)]
    weights: Option<WeightFormat>,
    /// Run with at most this many positions, capping a longer trained
    /// context (default: the model's own).
    #[arg(long, value_name = "N")]
    max_model_len: Option<usize>,
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
    /// More chat template variables, a JSON object (with --chat): '{"enable_thinking": false}'.
    #[arg(long, requires = "chat", value_name = "JSON")]
    chat_template_kwargs: Option<String>,
    /// A Jinja chat template file used in place of the model's (with --chat).
    #[arg(long, requires = "chat", value_name = "FILE")]
    chat_template_file: Option<PathBuf>,
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
    /// Presence penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Frequency penalty, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Random seed (reproducible sampling).
    #[arg(long)]
    seed: Option<u64>,
    /// Beam search with this many beams.
    #[arg(long, value_name = "N")]
    beam: Option<usize>,
    /// Beam search length penalty exponent (with --beam; default 1).
    #[arg(long, requires = "beam", allow_negative_numbers = true)]
    length_penalty: Option<f32>,
    /// Tokens to generate at most (default: 128, or what the context
    /// leaves after the prompt if that is less).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

#[derive(Args)]
struct QuantizeArgs {
    /// The source: a GGUF file (f32, f16 or bf16; or quantized, see
    /// --allow-requantize), or a Hugging Face directory (config.json,
    /// safetensors, tokenizer.json), written as llama.cpp's converter would.
    input: PathBuf,
    /// The GGUF file to write (written whole or not at all).
    output: PathBuf,
    /// The type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q6_k,
    /// q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m (or q3_k), q3_k_s,
    /// q2_k (the K mixes as llama-quantize makes them).
    #[arg(long = "type", value_name = "T")]
    target: quantize::Target,
    /// Keep tensors at another type: TYPE:NAME[,NAME…], names as prefixes
    /// (token_embd, output, blk.0, blk.N-1 for the last block); repeatable.
    #[arg(long, value_name = "TYPE:NAMES")]
    keep: Vec<quantize::Keep>,
    /// Requantize weights that are already quantized to a type of fewer
    /// bits (which loses more than quantizing the original would).
    #[arg(long)]
    allow_requantize: bool,
    /// An importance matrix (`parallm imatrix`, or llama-imatrix's GGUF
    /// file) weighting each column's quantization error, as llama-quantize
    /// does.
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Threads quantizing tensors in parallel (default: every CPU).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct PruneArgs {
    /// The source: a GGUF file, or a Hugging Face directory.
    input: PathBuf,
    /// The GGUF file to write (written whole or not at all).
    output: PathBuf,
    /// magnitude or wanda: zero weights; layers: drop blocks.
    #[arg(long, value_enum)]
    method: prune::Method,
    /// Share of each row zeroed, in (0, 1) (magnitude).
    #[arg(long)]
    sparsity: Option<f64>,
    /// unstructured, or N:M to keep N of every M weights of a row (2:4, 4:8).
    #[arg(long, default_value = "unstructured")]
    pattern: prune::Pattern,
    /// Blocks to drop (layers).
    #[arg(long, value_name = "K")]
    drop: Option<usize>,
    /// Calibration text (wanda, layers).
    #[arg(long, value_name = "TEXT")]
    calib: Option<PathBuf>,
    /// An importance matrix (`parallm imatrix`) holding the input norms
    /// (wanda, in place of --calib).
    #[arg(long, value_name = "FILE")]
    imatrix: Option<PathBuf>,
    /// Tokens per calibration window (wanda, layers).
    #[arg(long, default_value_t = 256)]
    ctx: usize,
    /// Calibration windows at most (wanda, layers).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Store the result in this type (as quantize chooses per tensor;
    /// default: each tensor's own type).
    #[arg(long = "type", value_name = "T")]
    target: Option<quantize::Target>,
    /// With --type, requantize weights to fewer bits than they have.
    #[arg(long)]
    allow_requantize: bool,
    /// Threads converting tensors (default: every CPU).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ImatrixArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The calibration text.
    #[arg(long, short = 'f', value_name = "TEXT")]
    file: PathBuf,
    /// The importance matrix to write (whole or not at all).
    #[arg(long, short = 'o', default_value = "imatrix.gguf")]
    output: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Windows at most (default: as many as the text holds).
    #[arg(long)]
    chunks: Option<usize>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(long, short = 'f', value_name = "TEXT")]
    file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Windows at most (default: as many as the text holds).
    #[arg(long)]
    chunks: Option<usize>,
    /// Save each scored position's distribution to FILE (alone), or read
    /// them from FILE (with --kl-divergence).
    #[arg(long, value_name = "FILE")]
    kl_divergence_base: Option<PathBuf>,
    /// Compare with the distributions in --kl-divergence-base: mean KL
    /// divergence, the PPL ratio, top-1 agreement, Δp percentiles.
    #[arg(long, requires = "kl_divergence_base")]
    kl_divergence: bool,
    /// Write every figure as JSON to FILE (- for standard output).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

#[derive(Args)]
struct ParallelArgs {
    /// Tensor-parallel ranks per pipeline stage (compute nodes splitting each layer).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline stages (compute nodes each running a range of layers).
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Data-parallel replicas of the whole model.
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Tokens per scheduler step (prefill chunks and decodes together).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Requests running at once per replica.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// KV cache blocks per replica (default: as many as 1 GiB holds).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Steps a replica has in flight, each on its own lane of requests
    /// (default: the pipeline depth).
    #[arg(long)]
    steps_in_flight: Option<usize>,
    /// Where the nodes run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU ordinals the CUDA nodes are placed on in turn.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<usize>,
    /// Weights and activations on the GPU: f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
    /// GGUF blocks on the GPU: dense or quantized.
    #[arg(long, default_value = "dense")]
    cuda_weights: String,
    /// The KV cache's element type: auto (f32 on the CPU, --dtype on CUDA),
    /// f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    kv_dtype: String,
    /// Speculative decoding: none, ngram (drafts from the prompt and output
    /// by n-gram lookup) or draft (drafts from --draft-model); verified by
    /// the model, so the output is unchanged.
    #[arg(long, default_value = "none")]
    speculative: String,
    /// A draft model with the model's vocabulary (a quantized or
    /// layer-pruned copy, or a smaller sibling), run by a node of its own
    /// per replica; its weights as --weights auto takes them.
    #[arg(long, value_name = "PATH")]
    draft_model: Option<PathBuf>,
    /// Drafted tokens per step at most, with --speculative.
    #[arg(long, default_value_t = 4)]
    num_speculative_tokens: usize,
    /// Shortest and longest n-gram matched, with --speculative ngram.
    #[arg(long, default_value_t = 2)]
    ngram_min: usize,
    /// See --ngram-min.
    #[arg(long, default_value_t = 4)]
    ngram_max: usize,
    /// Requests running per replica above which none drafts.
    #[arg(long, default_value_t = parallm::actors::llm::DEFAULT_SPECULATE_MAX_RUNNING)]
    speculate_max_running: usize,
    /// Under mpirun: how nodes are spread over the ranks, by-host (each
    /// tensor-parallel group in one rank) or spread (node after node on
    /// rank after rank).
    #[arg(long, default_value = "by-host")]
    placement: String,
    /// Under mpirun: seconds a rank may stay silent before the job counts
    /// it lost and ends (cluster.heartbeat_timeout_secs for serve).
    #[arg(long, value_name = "SECS", default_value_t = cluster::placement::HEARTBEAT_TIMEOUT.as_secs())]
    heartbeat_timeout_secs: u64,
}

impl ParallelArgs {
    fn apply(&self, b: EngineBuilder) -> CliResult<EngineBuilder> {
        let device = parallm::config::parse_device(&self.device)?;
        let compute = parallm::config::compute_from(
            device,
            &self.devices,
            (&self.dtype, &self.kv_dtype),
            &self.cuda_weights,
        )?;
        let speculation = self.speculation()?;
        if self.draft_model.is_some() && speculation.method != SpecMethod::Draft {
            return Err("--draft-model goes with --speculative draft (otherwise it would be loaded, cap the context to its own, and never draft)".into());
        }
        let mut b = self.apply_cpu(b).compute(compute).speculative(speculation);
        let layout = cluster::Layout {
            dp: self.dp,
            tp: self.tp,
            pp: self.pp,
            draft: self.draft_model.is_some(),
        };
        let mode: cluster::Mode = self
            .placement
            .parse()
            .map_err(|e| format!("--placement: {e}"))?;
        let heartbeat_timeout = cluster::placement::heartbeat_timeout(self.heartbeat_timeout_secs)
            .map_err(|e| format!("--heartbeat-timeout-secs: {e}"))?;
        let spec = cluster::ClusterSpec {
            mode,
            heartbeat_timeout,
            ..cluster::ClusterSpec::default()
        };
        if let Some(c) = job::cluster(layout, &spec)? {
            b = b.cluster(c);
        }
        Ok(match &self.draft_model {
            Some(d) => b.draft_path(d),
            None => b,
        })
    }

    /// The speculative decoding the flags ask for.
    fn speculation(&self) -> CliResult<Speculation> {
        let s = Speculation {
            method: self.speculative.parse()?,
            num_speculative_tokens: self.num_speculative_tokens,
            ngram_min: self.ngram_min,
            ngram_max: self.ngram_max,
        };
        if s.enabled() {
            s.validate()?;
        }
        Ok(s)
    }

    fn apply_cpu(&self, b: EngineBuilder) -> EngineBuilder {
        let b = b
            .tp(self.tp)
            .pp(self.pp)
            .dp(self.dp)
            .max_batch_tokens(self.max_batch_tokens)
            .max_running(self.max_running)
            .speculate_max_running(self.speculate_max_running);
        let b = match self.kv_blocks {
            Some(n) => b.kv_blocks(n),
            None => b,
        };
        match self.steps_in_flight {
            Some(n) => b.steps_in_flight(n),
            None => b,
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of one model shard.
    Latency(LatencyArgs),
    /// Output tokens per second of many concurrent requests through the engine.
    Throughput(Box<ThroughputArgs>),
    /// Load-test any OpenAI-compatible server (after vLLM's serving benchmark).
    Serve(bench_serve::ServeBenchArgs),
    /// Quality (PPL, KL divergence from a base) against speed (prefill,
    /// batch-1 decode) of variants of a model, as a table and a plot.
    Quality(bench_quality::QualityArgs),
    /// Sequences per second of an embedding model through its pipeline.
    Embeddings(bench_embed::EmbedBenchArgs),
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use a synthetic model of this shape (tiny, tiny32, 135m, 1b, 8b) instead of a file.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
    #[command(flatten)]
    parallel: ParallelArgs,
    /// Concurrent requests, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Prompt length, N or MIN-MAX (lengths spread evenly over the range).
    #[arg(long, default_value = "32-512")]
    prompt_tokens: String,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// Timed steps of the bare batched forward.
    #[arg(long, default_value_t = 8)]
    bare_steps: usize,
    /// Skip the bare forward comparison.
    #[arg(long)]
    no_bare: bool,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass of every request (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k cut of every request (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// The prompts: random (seeded random tokens of --prompt-tokens, exactly
    /// --output-tokens each) or copy (chat requests to repeat or correct a
    /// passage, up to --output-tokens each; the measurements take the
    /// passages in turn).
    #[arg(long, value_enum, default_value = "random")]
    dataset: Dataset,
    /// Of each measurement's requests, this many are guided by a JSON schema
    /// (a list of at least 64 records, so no guided request ends before
    /// --output-tokens): the cost of computing grammar masks beside the
    /// forward.
    #[arg(long, default_value_t = 0)]
    guided: usize,
    /// Also write the rows as JSON here.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use a synthetic model of this shape (tiny, tiny32, 135m, 1b, 8b) instead of a file.
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
    /// Also print where a batch-1 decode step's time goes: each kind of op
    /// summed over layers, over `--decode-tokens` steps after a
    /// `--profile-depth`-token prompt.
    #[arg(long)]
    profile: bool,
    /// Prompt length before the profiled decode steps.
    #[arg(long, default_value_t = 16)]
    profile_depth: usize,
    /// Tokens each profiled step feeds, all of them wanting logits (a
    /// speculative decoding step verifying `R - 1` drafted tokens).
    #[arg(long, default_value_t = 1, value_name = "R")]
    profile_rows: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PARALLM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = kernels::cpu::check_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let job = match job::Job::start() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        command if job::serves_nodes() => run_node_rank(command),
        Command::Generate(args) => run_generate(args),
        Command::Serve(args) => run_serve(args),
        Command::Perplexity(args) => run_perplexity(args),
        Command::Quantize(args) => run_quantize(args),
        Command::Prune(args) => run_prune(args),
        Command::Imatrix(args) => run_imatrix(args),
        Command::Config(ConfigCommand::Show(layers)) => run_config_show(layers),
        Command::Launch(args) => run_launch(args),
        Command::Config(ConfigCommand::Check { file, layers }) => run_config_check(file, layers),
        Command::Bench(BenchCommand::Latency(args)) => run_latency(args),
        Command::Bench(BenchCommand::Throughput(args)) => run_throughput(*args),
        Command::Bench(BenchCommand::Quality(args)) => run_quality(args),
        Command::Bench(BenchCommand::Embeddings(args)) => bench_embed::run(&args),
        Command::Bench(BenchCommand::Serve(args)) => {
            bench_serve::run(&args).map(|_| ()).map_err(Into::into)
        }
        Command::Cuda(args) => run_cuda(args),
    };
    match result {
        Ok(()) => {
            // Every rank reaches here; MPI finalizes once all have.
            job.finish();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            // The other ranks of a job would wait for this one: end them all.
            job.fail();
            ExitCode::FAILURE
        }
    }
}

/// The settings `serve` runs with: the configuration, and inside an MPI
/// job, the cluster its `[cluster]` section places the nodes on.
fn serve_settings(args: &ServeArgs) -> CliResult<parallm::config::Settings> {
    let loaded = parallm::config::load(&args.layers.sources()?)?;
    let mut settings = loaded.settings;
    let e = &settings.engine;
    let layout = cluster::Layout {
        dp: e.dp,
        tp: e.tp,
        pp: e.pp,
        draft: e.draft.is_some(),
    };
    settings.engine.cluster = job::cluster(layout, &settings.cluster)
        .map_err(|e| format!("invalid config value: {e}"))?;
    Ok(settings)
}

fn run_serve(args: ServeArgs) -> CliResult {
    let settings = serve_settings(&args)?;
    let path = settings.model_path.clone();
    let progress = std::io::stderr().is_terminal();
    parallm::serve::run(settings, move || {
        resolve_model_path(path.as_deref(), progress).map_err(|e| e.to_string())
    })?;
    Ok(())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run_prune(args: PruneArgs) -> CliResult {
    let mut inputs = vec![args.input.as_path()];
    inputs.extend(args.calib.as_deref());
    inputs.extend(args.imatrix.as_deref());
    files::check_output(&args.output, "the output", &inputs)?;
    let plan = prune::PrunePlan {
        method: args.method,
        sparsity: args.sparsity,
        pattern: args.pattern,
        drop: args.drop,
        calib: args.calib,
        imatrix: args.imatrix,
        ctx: args.ctx,
        windows: args.windows,
        target: args.target,
        allow_requantize: args.allow_requantize,
        progress: std::io::stderr().is_terminal(),
        threads: args.threads.unwrap_or_else(cpus),
    };
    let t0 = Instant::now();
    let line = prune::prune(&args.input, &args.output, &plan)?;
    eprintln!("{line}, {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_quantize(args: QuantizeArgs) -> CliResult {
    let mut inputs = vec![args.input.as_path()];
    inputs.extend(args.imatrix.as_deref());
    files::check_output(&args.output, "the output", &inputs)?;
    let plan = quantize::QuantizePlan {
        target: args.target,
        keep: args.keep,
        allow_requantize: args.allow_requantize,
        imatrix: args.imatrix,
        progress: std::io::stderr().is_terminal(),
        threads: args.threads.unwrap_or_else(cpus),
    };
    let t0 = Instant::now();
    let r = quantize::quantize(&args.input, &args.output, &plan)?;
    let types: Vec<String> = r
        .types
        .iter()
        .map(|(t, n, w)| format!("{t}: {n} tensors, {w} weights"))
        .collect();
    eprintln!(
        "{}: {} tensors, {} bytes, {:.1} s ({})",
        args.output.display(),
        r.tensors,
        r.bytes,
        t0.elapsed().as_secs_f64(),
        types.join("; ")
    );
    Ok(())
}

/// The engine `generate` and `perplexity` run: the model (fetched if it
/// is the reference one) with the parallel flags.
fn build_engine(model: &ModelArgs, parallel: &ParallelArgs) -> CliResult<Engine> {
    Ok(engine_builder(model, parallel)?.build()?)
}

fn engine_builder(model: &ModelArgs, parallel: &ParallelArgs) -> CliResult<EngineBuilder> {
    let path = resolve_model_path(model.model.as_deref(), std::io::stderr().is_terminal())?;
    parallel.apply(
        Engine::builder()
            .model_path(&path)
            .weights(model.weights.unwrap_or(WeightFormat::Auto))
            .max_model_len(model.max_model_len),
    )
}

/// A rank other than 0 of an MPI job: builds the engine's configuration
/// exactly as rank 0 does from the same command line, and serves the nodes
/// the placement gives this rank until rank 0 is done.
fn run_node_rank(command: Command) -> CliResult {
    match command {
        Command::Generate(args) => Ok(engine_builder(&args.model, &args.parallel)?.serve_nodes()?),
        Command::Serve(args) => {
            let settings = serve_settings(&args)?;
            let path = resolve_model_path(settings.model_path.as_deref(), false)?;
            let mut cfg = settings.engine;
            cfg.model = ModelSource::Gguf(path);
            Ok(EngineBuilder::config(cfg).serve_nodes()?)
        }
        Command::Bench(BenchCommand::Throughput(args)) => {
            Ok(throughput_builder(&args)?.0.serve_nodes()?)
        }
        _ => Err(format!(
            "rank {}: under mpirun, `generate`, `serve` and `bench throughput` run their nodes on several ranks; this command runs in one process (`bench latency` measures one shard, `bench serve` is a client of a server)",
            job::rank()
        )
        .into()),
    }
}

fn run_imatrix(args: ImatrixArgs) -> CliResult {
    let mut inputs = vec![args.file.as_path()];
    inputs.extend(args.model.model.as_deref());
    files::check_output(&args.output, "the output", &inputs)?;
    let text = calibrate::read_text(&args.file)?;
    let path = resolve_model_path(args.model.model.as_deref(), std::io::stderr().is_terminal())?;
    let engine = args
        .parallel
        .apply(
            Engine::builder()
                .model_path(&path)
                .weights(args.model.weights.unwrap_or(WeightFormat::Native))
                .max_model_len(args.model.max_model_len),
        )?
        .prefix_caching(false)
        .collect_activations(true)
        .build()?;
    let t0 = Instant::now();
    let cal = calibrate::collect(
        &engine,
        &text,
        (args.ctx, args.chunks),
        std::io::stderr().is_terminal(),
    );
    engine.shutdown();
    let cal = cal?;
    let file = framework::GgufFile::open(&path)?;
    let m = calibrate::Imatrix::from_calibration(&file, &cal)?;
    m.write(&args.output, &args.file.display().to_string(), args.ctx)?;
    eprintln!(
        "{}: {} matrices, {} window{} of {} tokens, {:.1} s",
        args.output.display(),
        m.len(),
        cal.chunks,
        if cal.chunks == 1 { "" } else { "s" },
        cal.ctx,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_quality(args: bench_quality::QualityArgs) -> CliResult {
    let report = bench_quality::run(&args)?;
    println!("{}", bench_quality::table(&report));
    eprintln!(
        "wrote quality.json, quality.md and quality.png in {}",
        args.out.display()
    );
    Ok(())
}

fn run_perplexity(args: PerplexityArgs) -> CliResult {
    let mut inputs = vec![args.file.as_path()];
    inputs.extend(args.model.model.as_deref());
    if let Some(base) = &args.kl_divergence_base {
        if !args.kl_divergence {
            files::check_output(base, "--kl-divergence-base", &inputs)?;
        }
        inputs.push(base);
    }
    if let Some(json) = &args.json {
        files::check_output(json, "--json", &inputs)?;
    }
    let text = std::fs::read(&args.file)
        .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?;
    let text = String::from_utf8(text)
        .map_err(|_| format!("{} is not UTF-8 text", args.file.display()))?;
    let kld = match (args.kl_divergence_base, args.kl_divergence) {
        (None, _) => perplexity::KldMode::Off,
        (Some(f), false) => perplexity::KldMode::Save(f),
        (Some(f), true) => perplexity::KldMode::Compare(f),
    };
    let plan = perplexity::PerplexityPlan {
        ctx: args.ctx,
        chunks: args.chunks,
        kld,
        json: args.json,
        progress: std::io::stderr().is_terminal(),
    };
    // A measurement of the model as stored, unless --weights says otherwise.
    let mut model = args.model;
    model.weights.get_or_insert(WeightFormat::Native);
    let engine = build_engine(&model, &args.parallel)?;
    let result = perplexity::perplexity(&engine, &text, &plan);
    engine.shutdown();
    let r = result?;
    eprintln!(
        "{} window{} of {} tokens, {} tokens scored, {:.2} s, {:.1} tok/s",
        r.chunks,
        if r.chunks == 1 { "" } else { "s" },
        r.ctx,
        r.scored_tokens,
        r.seconds,
        r.tokens_per_second
    );
    Ok(())
}

fn run_config_show(layers: LayerArgs) -> CliResult {
    let loaded = parallm::config::load(&layers.sources()?)?;
    print!("{}", parallm::config::show(&loaded));
    Ok(())
}

fn run_launch(args: LaunchArgs) -> CliResult {
    let loaded = parallm::config::load(&args.layers.sources()?)?;
    let raw = &loaded.raw.cluster;
    let spec = &loaded.settings.cluster;
    cluster::launch::check_hosts(spec).map_err(|e| format!("config: {e}"))?;
    let config = args
        .layers
        .config
        .as_ref()
        .map(std::path::absolute)
        .transpose()?;
    let hostfile = match (&args.hostfile, &config) {
        (Some(h), _) => h.clone(),
        (None, Some(c)) => c.with_extension("hosts"),
        (None, None) => PathBuf::from("parallm.hosts"),
    };
    let command = if args.command.is_empty() {
        let mut c = vec!["serve".to_string()];
        if let Some(config) = &config {
            c.extend(["--config".into(), config.display().to_string()]);
        }
        // The ranks run with the layout, model and port placed above.
        c.extend(args.layers.forwarded()?);
        c
    } else {
        args.command.clone()
    };
    let program = std::env::current_exe()?;
    let plan = cluster::LaunchPlan::new(
        spec,
        loaded.settings.placement.ranks(),
        &raw.mpirun,
        &raw.mpirun_args,
        &hostfile,
        &program,
        &command,
    );
    print!("{}", loaded.settings.placement);
    if let Some((path, body)) = &plan.hostfile {
        println!("hostfile {}:", path.display());
        print!("{body}");
        if !args.dry_run {
            std::fs::write(path, body)
                .map_err(|e| format!("cannot write the hostfile {}: {e}", path.display()))?;
        }
    }
    // API keys are not printed, however they are given.
    let mut shown = plan.clone();
    for i in 0..shown.argv.len() {
        let word = &shown.argv[i];
        let masked = if i > 0 && shown.argv[i - 1] == "--api-key" {
            Some("****".to_string())
        } else if word.starts_with("--api-key=") {
            Some("--api-key=****".to_string())
        } else if word.trim_start().starts_with("server.api_keys")
            && i > 0
            && shown.argv[i - 1] == "--set"
        {
            Some("server.api_keys=****".to_string())
        } else {
            None
        };
        if let Some(m) = masked {
            shown.argv[i] = m;
        }
    }
    println!("{}", shown.command_line());
    if args.dry_run {
        return Ok(());
    }
    let status = launcher::run(std::process::Command::new(&plan.argv[0]).args(&plan.argv[1..]))
        .map_err(|e| format!("cannot run {}: {e}", plan.argv[0]))?;
    if !status.success() {
        return Err(format!("{} exited with {status}", plan.argv[0]).into());
    }
    Ok(())
}

fn run_config_check(file: Option<PathBuf>, mut layers: LayerArgs) -> CliResult {
    let file = match (file, layers.config.take()) {
        (Some(file), Some(other)) => {
            return Err(format!(
                "config check takes one file: {} as its argument and {} with --config",
                file.display(),
                other.display()
            )
            .into())
        }
        (Some(file), None) | (None, Some(file)) => Some(file),
        (None, None) => None,
    };
    let what = file.as_ref().map_or_else(
        || "the configuration (defaults, environment and flags)".to_string(),
        |f| f.display().to_string(),
    );
    layers.config = file;
    let loaded = parallm::config::load(&layers.sources()?)?;
    match parallm::config::memory_plan(&loaded.settings)? {
        Some(m) => println!(
            "{what}: valid; with {} the engine would allocate {}{}",
            m.model.display(),
            m.plan,
            match m.embed_bytes {
                0 => String::new(),
                n => format!(
                    ", and the embedding models' weights about {} more",
                    framework::human_bytes(n)
                ),
            }
        ),
        None => println!(
            "{what}: valid (the reference model is not fetched yet, so the allocation is not sized)"
        ),
    }
    Ok(())
}

/// Tokens `generate` draws unless told (fewer where the context leaves
/// fewer after the prompt).
const DEFAULT_GENERATE_TOKENS: usize = 128;

fn run_generate(args: GenerateArgs) -> CliResult {
    let prompt = match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read the prompt from standard input: {e}"))?;
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
    let mut params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens.unwrap_or(DEFAULT_GENERATE_TOKENS),
        stop: args.stop,
        ignore_eos: false,
        logprobs: None,
        logit_bias: Vec::new(),
    };
    params.validate()?;
    if args.beam.is_some() && args.parallel.speculation()?.enabled() {
        return Err("--speculative does not combine with --beam (beam search)".into());
    }
    let kwargs = parallm::config::template_kwargs(
        args.chat_template_kwargs.as_deref().unwrap_or_default(),
        "--chat-template-kwargs",
    )?;
    let template = match &args.chat_template_file {
        Some(path) => parallm::config::chat_template_file(
            path.to_str()
                .ok_or("--chat-template-file: the path is not UTF-8")?,
            "--chat-template-file",
        )?,
        None => None,
    };
    let engine = engine_builder(&args.model, &args.parallel)?
        .chat_template_kwargs(kwargs)
        .chat_template(template)
        .build()?;
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(prompt)
    };
    if args.max_tokens.is_none() {
        // Unasked, the default shrinks to what the context leaves (as the
        // server's does), rather than refusing a long prompt for it.
        let context = engine.model_config().context;
        let prompt_tokens = engine.tokenize(&prompt)?.len();
        params.max_tokens = params
            .max_tokens
            .min(context.saturating_sub(prompt_tokens))
            .max(1);
    }
    let beam = args.beam.map(|width| BeamParams {
        width,
        length_penalty: args.length_penalty.unwrap_or(1.0),
    });
    let t0 = Instant::now();
    let mut stream = engine.generate(Request {
        beam,
        ..Request::new(prompt, params)
    })?;
    let mut stdout = std::io::stdout().lock();
    let mut first: Option<Instant> = None;
    let result = loop {
        match stream.next_blocking() {
            Some(Event::Token { text, .. }) => {
                first.get_or_insert_with(Instant::now);
                // A closed stdout (a pipe into `head`) is not worth a panic.
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Some(Event::Finished {
                reason,
                usage,
                tail,
                beams,
                ..
            }) => {
                let _ = writeln!(stdout, "{tail}");
                let _ = stdout.flush();
                for (i, b) in beams.iter().enumerate().filter(|_| beams.len() > 1) {
                    eprintln!(
                        "beam {} score {:.4} ({} tokens): {:?}",
                        i + 1,
                        b.score,
                        b.tokens.len(),
                        b.text
                    );
                }
                break Ok((reason, usage));
            }
            Some(Event::PromptScores(_)) => {}
            Some(Event::Failed { error }) => break Err(error),
            Some(Event::Refused { field, reason }) => break Err(format!("`{field}` {reason}")),
            Some(Event::Cancelled) => break Err("the request was cancelled".into()),
            None => break Err("the engine stopped without an answer".into()),
        }
    };
    let end = Instant::now();
    let cfg = engine.config().clone();
    engine.shutdown();
    let (reason, usage) = result?;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    // A beam search streams nothing until it ends, so its prefill and
    // decode cannot be timed apart: its whole time is given instead.
    let speed = match (first, args.beam) {
        (None, Some(_)) => format!(
            "beam search: {:.2} s in all",
            end.duration_since(t0).as_secs_f64()
        ),
        _ => {
            let prefill = first.unwrap_or(end).duration_since(t0).as_secs_f64();
            let decode = first.map_or(0.0, |f| end.duration_since(f).as_secs_f64());
            format!(
                "prefill: {:.1} tok/s, decode: {:.1} tok/s",
                rate(usage.prompt_tokens, prefill),
                rate(usage.completion_tokens.saturating_sub(1), decode)
            )
        }
    };
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, {speed}, finish: {}, weights: {}, tp={} pp={} dp={}",
        usage.prompt_tokens,
        usage.completion_tokens,
        reason.as_str(),
        cfg.weights,
        cfg.tp,
        cfg.pp,
        cfg.dp,
    );
    Ok(())
}

fn run_cuda(args: CudaArgs) -> CliResult {
    use kernels::cuda::{gpu, nvrtc, probe};
    if let Some(path) = &args.json {
        files::check_output(path, "--json", &[])?;
    }
    println!("libraries: {}", probe::summary());
    match gpu::device_count() {
        Ok(n) => println!("GPUs: {n}"),
        Err(e) => println!("GPUs: none usable ({e})"),
    }
    if let Some(arch) = args.compile {
        let ptx = nvrtc::compile(&arch)?;
        let names = nvrtc::kernel_names();
        for name in &names {
            if !ptx.contains(&format!(".entry {name}(")) {
                return Err(format!("kernel {name} is missing from the PTX").into());
            }
        }
        println!(
            "compiled {} kernels for {arch} with NVRTC {:?}: {} bytes of PTX",
            names.len(),
            nvrtc::version()?,
            ptx.len()
        );
        println!("kernels: {}", names.join(" "));
    }
    if let Some(shape) = args.decode {
        let dtype = match args.dtype.as_str() {
            "f16" => framework::cuda::Dtype::F16,
            "bf16" => framework::cuda::Dtype::Bf16,
            other => return Err(format!("--dtype is '{other}', must be f16 or bf16").into()),
        };
        let plan = cuda_decode::DecodePlan {
            shape,
            device: (!args.emulated).then_some(args.gpu),
            dtype,
            depth: args.depth,
            steps: args.steps,
            batch: args.batch,
            kernel_trace: args.kernel_trace,
        };
        let (report, profile) = cuda_decode::run(&plan, |l| eprintln!("  {l} ..."))?;
        println!("{}", cuda_decode::table(&report, &profile));
        if let Some(path) = args.json {
            files::write_text(&path, "--json", &serde_json::to_string_pretty(&report)?)?;
        }
    }
    Ok(())
}

/// The engine `bench throughput` measures, and what it runs (the model's
/// path or the synthetic model's name).
fn throughput_builder(args: &ThroughputArgs) -> CliResult<(EngineBuilder, String)> {
    let (builder, what) = match &args.synthetic {
        Some(name) => (
            Engine::builder().synthetic(name.clone(), 0),
            format!("synthetic {name}"),
        ),
        None => {
            let path =
                resolve_model_path(args.model.model.as_deref(), std::io::stderr().is_terminal())?;
            let what = path.display().to_string();
            (Engine::builder().model_path(path), what)
        }
    };
    Ok((
        args.parallel
            .apply(builder.weights(args.model.weights.unwrap_or(WeightFormat::Auto)))?,
        what,
    ))
}

fn run_throughput(args: ThroughputArgs) -> CliResult {
    if let Some(path) = &args.json {
        files::check_output(path, "--json", &[])?;
    }
    let (builder, what) = throughput_builder(&args)?;
    let engine = builder.build()?;
    let cfg = engine.config().clone();
    // The bare forward runs one whole-model CPU shard: only comparable at
    // tp = pp = 1 on the CPU.
    let on_cpu = matches!(cfg.compute, parallm::actors::llm::Compute::Cpu { .. });
    let bare = if cfg.tp == 1 && cfg.pp == 1 && !args.no_bare && on_cpu {
        Some(match &cfg.model {
            ModelSource::Gguf(p) => LlamaShard::load(
                &framework::GgufFile::open(p)?,
                ShardSpec::SINGLE,
                cfg.weights,
            )?,
            ModelSource::Synthetic { name, seed } => LlamaShard::synthetic(
                ModelConfig::synthetic(name)?,
                *seed,
                ShardSpec::SINGLE,
                cfg.weights,
            )?,
        })
    } else {
        None
    };
    let (min_prompt, max_prompt) = parse_range(&args.prompt_tokens)?;
    let plan = ThroughputPlan {
        concurrency: args.concurrency,
        min_prompt,
        max_prompt,
        output_tokens: args.output_tokens,
        bare_steps: args.bare_steps,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        dataset: args.dataset,
        guided: args.guided,
    };
    eprintln!(
        "model: {what}, weights: {}, tp={} pp={} dp={}, max_batch_tokens {}, threads: {}",
        cfg.weights,
        cfg.tp,
        cfg.pp,
        cfg.dp,
        cfg.max_batch_tokens,
        framework::compute_threads()
    );
    println!("{}\n", kernels::cpu::features::report());
    let rows = throughput(&engine, bare.as_ref(), &plan, |l| {
        eprintln!("  measuring {l} ...")
    })?;
    engine.shutdown();
    println!("| requests | output tok/s | decode tok/s | TTFT median ms | TPOT median ms | step ms | node compute ms | engine overhead | decode step ms | bare step ms | decode vs bare | drafts accepted |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let opt = |x: Option<f64>, unit: &str| x.map_or("-".into(), |v| format!("{v:.1}{unit}"));
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1}% | {:.2} | {} | {} | {} |",
            r.concurrency,
            r.output_tok_s,
            r.decode_tok_s,
            r.ttft_median_ms,
            r.tpot_median_ms,
            r.step_ms,
            r.node_compute_ms,
            r.engine_overhead_pct,
            r.decode_step_ms,
            opt(r.bare_step_ms, ""),
            opt(r.decode_vs_bare_pct, "%"),
            match r.drafted {
                0 => "-".to_string(),
                d => format!("{:.0}% of {d}", r.accepted as f64 * 100.0 / d as f64),
            },
        );
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({
            "model": what,
            "weights": cfg.weights,
            "tp": cfg.tp, "pp": cfg.pp, "dp": cfg.dp,
            "plan": plan,
            "rows": rows,
        });
        files::write_text(&path, "--json", &serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn parse_range(s: &str) -> CliResult<(usize, usize)> {
    let bad = || format!("--prompt-tokens: expected N or MIN-MAX, got {s:?}");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let a: usize = a.trim().parse().map_err(|_| bad())?;
    let b: usize = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad().into());
    }
    Ok((a, b))
}

fn run_latency(args: LatencyArgs) -> CliResult {
    if let Some(path) = &args.json {
        files::check_output(path, "--json", &[])?;
    }
    for (flag, v) in [
        ("--runs", args.runs),
        ("--decode-tokens", args.decode_tokens),
        ("--batch-steps", args.batch_steps),
        ("--prompt-tokens", args.prompt_tokens),
        ("--batch-prompt-tokens", args.batch_prompt_tokens),
    ] {
        if v == 0 {
            return Err(format!("{flag} is 0, must be at least 1").into());
        }
    }
    if args.batches.contains(&0) {
        return Err("--batches holds 0; every batch size must be at least 1".into());
    }
    let (model, what) = match &args.synthetic {
        Some(name) => {
            let config = ModelConfig::synthetic(name)?;
            let weights = args.model.weights.unwrap_or(WeightFormat::Auto);
            let model = LlamaShard::synthetic(config, 0, ShardSpec::SINGLE, weights)?;
            (model, format!("synthetic {name}"))
        }
        None => {
            let path =
                resolve_model_path(args.model.model.as_deref(), std::io::stderr().is_terminal())?;
            let file = framework::GgufFile::open(&path)?;
            let weights = args.model.weights.unwrap_or(WeightFormat::Auto);
            let model = LlamaShard::load(&file, ShardSpec::SINGLE, weights)?;
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
    if let Some(have) = framework::machine_memory_bytes() {
        match plan.peak_bytes(model.config()) {
            Some(need) if need <= have => {}
            need => {
                return Err(format!(
                    "--batches up to {} of {}-token prompts would hold about {} (KV caches and the prefill's activations), more than this machine's {} of memory; lower --batches or --batch-prompt-tokens",
                    plan.batches.iter().max().unwrap_or(&1),
                    plan.batch_prompt_tokens,
                    need.map_or("more than 2^64 bytes".into(), framework::human_bytes),
                    framework::human_bytes(have)
                )
                .into())
            }
        }
    }
    eprintln!(
        "model: {what}, weights: {}, threads: {}",
        model.format(),
        framework::compute_threads()
    );
    println!("{}\n", kernels::cpu::features::report());
    // Like a compute node: this thread runs the forward as its pool's caller.
    let pool = framework::threads::node_pool("bench", framework::compute_threads(), 0, 1)?;
    let report = framework::threads::run_in(&pool, || {
        latency(&model, &plan, |line| eprintln!("  measuring {line} ..."))
    })?;
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
    if args.profile {
        let depth = args.profile_depth;
        let rows = args.profile_rows.max(1);
        if depth + plan.decode_tokens * rows + 1 > context {
            return Err(format!(
                "--profile-depth {depth} plus {} decode steps of {rows} tokens exceed the model's context of {context}",
                plan.decode_tokens
            )
            .into());
        }
        eprintln!(
            "  profiling {} decode steps after a {depth}-token prompt ...",
            plan.decode_tokens
        );
        let p = framework::threads::run_in(&pool, || {
            bench::profile_decode(&model, depth, plan.decode_tokens, rows)
        })?;
        print!(
            "{}",
            bench::profile_table(&p, depth, plan.decode_tokens, rows)
        );
    }
    if let Some(path) = args.json {
        let json = serde_json::json!({ "model": what, "weights": model.format(), "plan": plan, "report": report });
        files::write_text(&path, "--json", &serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
