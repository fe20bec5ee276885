//! The launcher's configuration: layered sources, provenance and validation.
//!
//! Four layers, later ones winning key by key: built-in defaults
//! ([`RawConfig::default`]), a TOML or YAML file, environment variables
//! `PARALLM__SECTION__KEY`, then command-line overrides. [`load`] merges them
//! with the `config` crate, refuses keys it does not know (naming the key and
//! the layer it came from), deserializes the raw structs and checks them into
//! [`Settings`] — the only form that starts actors. Every error names the
//! field and what is allowed. [`Loaded::provenance`] says which layer gave
//! each key its value, for `parallm config show`.
//!
//! `docs/configuration.md` documents every key with its default; a test keeps
//! the two equal.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use serde::{Deserialize, Serialize};

use actors::llm::EngineConfig;
use framework::WeightFormat;

/// The most seconds a duration setting may hold (a year).
const MAX_SECS: u64 = 365 * 24 * 3600;

/// The most HTTP worker threads (actix-web's limit).
const MAX_WORKERS: usize = 512;

/// The prefix of environment variables (`PARALLM__SERVER__PORT`).
pub const ENV_PREFIX: &str = "PARALLM";
/// The separator between prefix, section and key in environment variables.
pub const ENV_SEPARATOR: &str = "__";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read or parsed.
    #[error("cannot read config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A key that no section has.
    #[error("unknown config key '{key}' (from {origin}); known keys: {known}")]
    UnknownKey {
        /// The key, `section.name`.
        key: String,
        /// The layer that set it.
        origin: String,
        /// The keys of its section, or the sections.
        known: String,
    },
    /// A value of the wrong type, or out of range.
    #[error("invalid config value for '{field}': {reason}")]
    Invalid {
        /// The key, `section.name`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `[model]`: which model to serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file; empty: the reference model, fetched on first use.
    pub path: String,
    /// The model id clients name; empty: the file name without `.gguf`.
    pub name: String,
    /// Numeric format of the weights: auto, native, q8_0, f32, f16 or bf16.
    pub weights: String,
    /// Positions the model runs with at most; a file that trained a longer
    /// context is capped to it (0: the file's own context).
    pub max_model_len: usize,
    /// The tool-call format: `hermes`, `llama3_json` or `mistral`; empty:
    /// the one the chat template implies.
    pub tool_format: String,
    /// Whether chat answers are read for a `<think>` thought (answered as
    /// `reasoning_content`): `think` (or vLLM's `qwen3`, `deepseek_r1`) or
    /// `none`; empty: as the chat template implies (`think` where it writes
    /// `</think>`).
    pub reasoning_format: String,
    /// A Jinja chat template file used in place of the model's own (for a
    /// file that ships none or a wrong one); empty: the model's.
    pub chat_template_file: String,
    /// Template variables every chat is rendered with, as a JSON object
    /// (`{"enable_thinking": false}`); a request's `chat_template_kwargs`
    /// override them by name. Empty: none.
    pub chat_template_kwargs: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            name: String::new(),
            weights: "auto".into(),
            max_model_len: 0,
            tool_format: String::new(),
            reasoning_format: String::new(),
            chat_template_file: String::new(),
            chat_template_kwargs: String::new(),
        }
    }
}

/// `[parallel]`: how the model is cut into compute nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSection {
    /// Tensor-parallel ranks per pipeline stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Micro-batches per step (0: the pipeline depth divided by the steps in
    /// flight, at least 1).
    pub micro_batches: usize,
    /// Steps a replica has in flight on disjoint requests (0: one per
    /// pipeline stage).
    pub steps_in_flight: usize,
    /// Where the compute nodes run: `cpu`, or `cuda` / `cuda:N` (GPUs from ordinal N).
    pub device: String,
    /// Compute threads of each node (0: the machine's threads shared evenly).
    pub threads_per_node: usize,
    /// GPU ordinals the CUDA nodes are placed on, in turn (empty: the one
    /// `device` names).
    pub devices: Vec<usize>,
    /// Type of weights and activations on the GPU: `f16` or `bf16`.
    pub dtype: String,
    /// GGUF Q4_0/Q4_1/Q8_0 weights on the GPU: `dense` (dequantized at load)
    /// or `quantized` (kept as blocks).
    pub cuda_weights: String,
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            tp: 1,
            pp: 1,
            dp: 1,
            micro_batches: 0,
            steps_in_flight: 0,
            device: "cpu".into(),
            threads_per_node: 0,
            devices: Vec::new(),
            dtype: "f16".into(),
            cuda_weights: "dense".into(),
        }
    }
}

/// `[scheduler]`: queueing, batching and the KV cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    /// Requests that may wait in the queue; beyond it, 429.
    pub queue_capacity: usize,
    /// Tokens per step (prefill chunks and decodes together).
    pub max_batch_tokens: usize,
    /// Requests running at once per replica.
    pub max_running: usize,
    /// Positions per KV cache block.
    pub block_size: usize,
    /// Whether full KV blocks are cached and reused by later requests that
    /// start with the same tokens (automatic prefix caching).
    pub prefix_caching: bool,
    /// A new request goes to the replica holding its longest cached prefix
    /// unless that one holds more than this many requests above the least
    /// loaded one.
    pub prefix_route_margin: usize,
    /// Whether a new request goes to the replica (and lane) holding its
    /// longest cached prefix; `false`: always to the least loaded.
    pub cache_aware_routing: bool,
    /// KV cache memory per replica, in MiB (used when `kv_blocks` is 0).
    pub kv_memory_mib: usize,
    /// KV cache blocks per replica (0: from `kv_memory_mib`).
    pub kv_blocks: usize,
    /// The KV cache's element type: auto (f32 on the CPU, `parallel.dtype`
    /// on CUDA), f32, f16 or bf16 (the CPU's; CUDA's is `parallel.dtype`).
    pub kv_dtype: String,
    /// Times a request is retried after a failed step.
    pub max_retries: u32,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        let e = EngineConfig::default();
        Self {
            queue_capacity: e.queue_capacity,
            max_batch_tokens: e.max_batch_tokens,
            max_running: e.max_running,
            block_size: e.block_size,
            prefix_caching: e.prefix_caching,
            prefix_route_margin: e.prefix_route_margin,
            cache_aware_routing: e.cache_aware_routing,
            kv_memory_mib: e.kv_memory_bytes >> 20,
            kv_blocks: 0,
            kv_dtype: "auto".into(),
            max_retries: e.max_retries,
        }
    }
}

/// `[server]`: the HTTP front.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0: any free port, printed at start).
    pub port: u16,
    /// Accepted API keys (Bearer tokens); empty: no authentication.
    pub api_keys: Vec<String>,
    /// A file of further accepted API keys, one per line (blank lines and
    /// lines starting with `#` skipped), so that keys stay out of `ps`.
    pub api_keys_file: String,
    /// Largest request body, in bytes; beyond it, 413.
    pub max_body_bytes: usize,
    /// Seconds a client may take to send a request's body; beyond it, 408
    /// and the connection is closed.
    pub body_timeout_secs: u64,
    /// Connections held open at once, over all HTTP workers; beyond it, new
    /// connections wait in the listen backlog.
    pub max_connections: usize,
    /// Threads that tokenize prompts and render chat templates, off the HTTP
    /// workers (0: the machine's cores less one, at least 1).
    pub tokenizer_threads: usize,
    /// Seconds in-flight requests get to finish once the drain begins
    /// (SIGTERM, SIGUSR1 or Ctrl-C; under `mpirun`, SIGUSR1).
    pub shutdown_timeout_secs: u64,
    /// Seconds between the health probes (one-token requests through the engine).
    pub health_probe_interval_secs: u64,
    /// `GET /health` says 200 only if a probe succeeded within this many seconds.
    pub health_max_age_secs: u64,
    /// The `Retry-After` seconds of a 429.
    pub retry_after_secs: u64,
    /// HTTP worker threads (0: the machine's cores, at most 4).
    pub workers: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            api_keys: Vec::new(),
            api_keys_file: String::new(),
            max_body_bytes: 1 << 20,
            body_timeout_secs: 30,
            max_connections: 1024,
            tokenizer_threads: 0,
            shutdown_timeout_secs: 30,
            health_probe_interval_secs: 5,
            health_max_age_secs: 30,
            retry_after_secs: 1,
            workers: 0,
        }
    }
}

/// `[limits]`: caps on what one request may ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Most choices (`n`) per request.
    pub max_n: usize,
    /// Most stop sequences per request.
    pub max_stop: usize,
    /// Most alternatives per token (`logprobs` / `top_logprobs`).
    pub max_logprobs: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// `max_tokens` of a request that gives none.
    pub default_max_tokens: usize,
    /// Widest beam search (`beam_width`).
    pub max_beam_width: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_n: 8,
            max_stop: 4,
            max_logprobs: 5,
            max_tokens: 4096,
            default_max_tokens: 256,
            max_beam_width: 8,
        }
    }
}

/// `[faults]`: make a compute node fail on purpose, to rehearse recovery
/// (supervision, retries, error responses), or the engine's merge panic,
/// to rehearse a halt of the whole engine. Off unless `node` or
/// `merge_step` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsSection {
    /// Index of the failing node within its replica (-1: no fault).
    pub node: i64,
    /// Its replica.
    pub replica: usize,
    /// The replica's first step at which it fails.
    pub step: u64,
    /// How many times it fails (0: every step from then on).
    pub times: u32,
    /// Panic instead of returning an error.
    pub panic: bool,
    /// The first step on whose output the merge panics, which stops the
    /// whole engine (-1: no such fault).
    pub merge_step: i64,
}

impl Default for FaultsSection {
    fn default() -> Self {
        Self {
            node: -1,
            replica: 0,
            step: 0,
            times: 1,
            panic: false,
            merge_step: -1,
        }
    }
}

/// `[speculative]`: speculative decoding of requests that do not choose
/// for themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpeculativeSection {
    /// `none` or `ngram` (prompt lookup).
    pub method: String,
    /// Drafted tokens per step, at most.
    pub num_speculative_tokens: usize,
    /// Shortest n-gram matched.
    pub ngram_min: usize,
    /// Longest n-gram matched.
    pub ngram_max: usize,
    /// Requests running in a replica (lane) above which none drafts.
    pub max_running: usize,
    /// A draft model (GGUF file or Hugging Face directory) with the
    /// model's vocabulary, for `method = "draft"`; empty: none.
    pub draft_model: String,
}

impl Default for SpeculativeSection {
    fn default() -> Self {
        let s = framework::speculative::Speculation::default();
        Self {
            method: s.method.as_str().into(),
            num_speculative_tokens: s.num_speculative_tokens,
            ngram_min: s.ngram_min,
            ngram_max: s.ngram_max,
            max_running: actors::llm::DEFAULT_SPECULATE_MAX_RUNNING,
            draft_model: String::new(),
        }
    }
}

impl SpeculativeSection {
    /// The checked settings; errors name the key.
    pub fn speculation(&self) -> Result<framework::speculative::Speculation, ConfigError> {
        let setting = |e: framework::Error| match e {
            framework::Error::InvalidRequest { field, reason } => invalid(field, reason),
            other => invalid("speculative", other.to_string()),
        };
        let s = framework::speculative::Speculation {
            method: self.method.parse().map_err(setting)?,
            num_speculative_tokens: self.num_speculative_tokens,
            ngram_min: self.ngram_min,
            ngram_max: self.ngram_max,
        };
        s.validate().map_err(setting)?;
        Ok(s)
    }
}

/// `[cluster]`: compute nodes in other processes and on other hosts (MPI
/// ranks). The defaults are one process holding every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Host names in order; rank `r` runs on `hosts[r / ranks_per_host]`.
    /// Empty: the hosts MPI reports.
    pub hosts: Vec<String>,
    /// Ranks (processes) per host.
    pub ranks_per_host: usize,
    /// Ranks in all (0: hosts × ranks_per_host, or as many as were launched).
    pub ranks: usize,
    /// `by-host` (tensor-parallel groups within a rank, stages and replicas
    /// spread over ranks) or `spread` (node after node on rank after rank).
    pub placement: String,
    /// Whether a tensor-parallel group may span hosts.
    pub allow_cross_host_tp: bool,
    /// The MPI launcher `parallm launch` runs.
    pub mpirun: String,
    /// Further options for it (`--mca btl_tcp_if_include eth0`, …).
    pub mpirun_args: Vec<String>,
    /// Seconds a rank may stay silent before the job counts it lost: rank
    /// 0 then ends every request with an error and exits non-zero.
    pub heartbeat_timeout_secs: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        let spec = cluster::ClusterSpec::default();
        Self {
            hosts: spec.hosts,
            ranks_per_host: spec.ranks_per_host,
            ranks: spec.ranks,
            placement: spec.mode.as_str().into(),
            allow_cross_host_tp: spec.allow_cross_host_tp,
            mpirun: "mpirun".into(),
            mpirun_args: Vec::new(),
            heartbeat_timeout_secs: spec.heartbeat_timeout.as_secs(),
        }
    }
}

impl ClusterSection {
    /// The checked cluster; errors name the key.
    pub fn spec(&self) -> Result<cluster::ClusterSpec, ConfigError> {
        let mode = self.placement.parse().map_err(placement_error)?;
        if self.mpirun.trim().is_empty() {
            return Err(invalid("cluster.mpirun", "must name the MPI launcher"));
        }
        let heartbeat_timeout = cluster::placement::heartbeat_timeout(self.heartbeat_timeout_secs)
            .map_err(|e| invalid("cluster.heartbeat_timeout_secs", e))?;
        Ok(cluster::ClusterSpec {
            hosts: self.hosts.clone(),
            ranks_per_host: self.ranks_per_host,
            ranks: self.ranks,
            mode,
            allow_cross_host_tp: self.allow_cross_host_tp,
            heartbeat_timeout,
        })
    }
}

fn placement_error(e: cluster::PlacementError) -> ConfigError {
    invalid(e.field, e.reason)
}

/// How many processes the launcher started (MPI's or Slurm's environment),
/// 1 outside a launcher. Slurm's count is the job step's
/// (`SLURM_STEP_NUM_TASKS`, which `srun` sets), not the allocation's
/// `SLURM_NTASKS`: a batch script runs as one process in an allocation of
/// many tasks.
pub fn launched_ranks() -> usize {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "SLURM_STEP_NUM_TASKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
    .unwrap_or(1)
}

/// One `[[models]]` entry: a further model served next to `[model]`, with
/// its own pipeline, chosen by the request's `model`. Only embedding models
/// (`task = "embed"`: BERT-family encoders, or generation models pooled)
/// are served this way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEntry {
    /// The id clients name in `model` (required, unique).
    pub name: String,
    /// A BERT encoder (a GGUF file with `general.architecture = bert`, or a
    /// Hugging Face `BertModel` directory), or a generation model whose
    /// hidden rows are pooled (required).
    pub path: String,
    /// What it serves: `embed` (`POST /v1/embeddings`).
    pub task: String,
    /// Numeric format of the weights: native (default: as stored), auto,
    /// q8_0, f32, f16 or bf16.
    pub weights: String,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Tokens per batch.
    pub max_batch_tokens: usize,
    /// Compute threads of each node (0: the machine's threads shared evenly).
    pub threads_per_node: usize,
    /// Requests that may wait in its queue; beyond it, 429.
    pub queue_capacity: usize,
    /// `mean`, `cls` or `last`; empty: the model's own.
    pub pooling: String,
    /// `true` or `false`; empty: the model's own choice.
    pub normalize: String,
    /// Whether a request may ask for fewer `dimensions` (the first ones,
    /// renormalized): only for models trained for it (Matryoshka).
    pub matryoshka: bool,
}

impl Default for ModelEntry {
    fn default() -> Self {
        let e = actors::embed::EmbedConfig::default();
        Self {
            name: String::new(),
            path: String::new(),
            task: "embed".into(),
            weights: "native".into(),
            tp: e.tp,
            dp: e.dp,
            max_batch_tokens: e.max_batch_tokens,
            threads_per_node: e.threads_per_node,
            queue_capacity: e.queue_capacity,
            pooling: String::new(),
            normalize: String::new(),
            matryoshka: false,
        }
    }
}

/// A checked `[[models]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedModel {
    /// The id clients name.
    pub name: String,
    /// Its engine's configuration.
    pub config: actors::embed::EmbedConfig,
    /// Whether requests may ask for fewer dimensions.
    pub matryoshka: bool,
}

/// Checks `[[models]]` against each other and the generation model's name.
fn check_models(entries: &[ModelEntry], generation: &str) -> Result<Vec<EmbedModel>, ConfigError> {
    let mut out: Vec<EmbedModel> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let field = |k: &str| format!("models[{i}].{k}");
        if e.name.is_empty() {
            return Err(invalid(&field("name"), "is required"));
        }
        if e.name == generation || out.iter().any(|m| m.name == e.name) {
            return Err(invalid(
                &field("name"),
                format!("'{}' names another served model; names must differ", e.name),
            ));
        }
        if e.task != "embed" {
            return Err(invalid(
                &field("task"),
                format!(
                    "is '{}'; [[models]] serves embedding models (task = \"embed\"), the generation model is [model]",
                    e.task
                ),
            ));
        }
        let path = PathBuf::from(&e.path);
        if e.path.is_empty() || (!path.is_file() && !path.is_dir()) {
            return Err(invalid(
                &field("path"),
                format!(
                    "'{}' is not a file (a .gguf model) or a directory (a Hugging Face model)",
                    e.path
                ),
            ));
        }
        let weights: WeightFormat = e.weights.parse().map_err(|_| {
            invalid(
                &field("weights"),
                format!("is '{}', must be one of {}", e.weights, WeightFormat::NAMES),
            )
        })?;
        for (k, v) in [
            ("tp", e.tp),
            ("dp", e.dp),
            ("max_batch_tokens", e.max_batch_tokens),
            ("queue_capacity", e.queue_capacity),
        ] {
            if v == 0 {
                return Err(invalid(&field(k), "must be at least 1"));
            }
        }
        let pooling = match e.pooling.as_str() {
            "" => None,
            p => Some(p.parse().map_err(|_| {
                invalid(
                    &field("pooling"),
                    format!("is '{p}', must be mean, cls or last"),
                )
            })?),
        };
        let normalize = match e.normalize.as_str() {
            "" => None,
            "true" => Some(true),
            "false" => Some(false),
            other => {
                return Err(invalid(
                    &field("normalize"),
                    format!("is '{other}', must be true or false (or empty: the model's choice)"),
                ))
            }
        };
        out.push(EmbedModel {
            name: e.name.clone(),
            config: actors::embed::EmbedConfig {
                model: path,
                weights,
                tp: e.tp,
                dp: e.dp,
                queue_capacity: e.queue_capacity,
                max_batch_tokens: e.max_batch_tokens,
                threads_per_node: e.threads_per_node,
                pooling,
                normalize,
                name: e.name.clone(),
                ..actors::embed::EmbedConfig::default()
            },
            matryoshka: e.matryoshka,
        });
    }
    Ok(out)
}

/// The whole configuration as written: sections of plain values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// `[model]`.
    pub model: ModelSection,
    /// `[parallel]`.
    pub parallel: ParallelSection,
    /// `[scheduler]`.
    pub scheduler: SchedulerSection,
    /// `[server]`.
    pub server: ServerSection,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// `[speculative]`.
    pub speculative: SpeculativeSection,
    /// `[faults]`.
    pub faults: FaultsSection,
    /// `[cluster]`.
    pub cluster: ClusterSection,
    /// `[[models]]`: embedding models served next to `[model]`.
    pub models: Vec<ModelEntry>,
}

/// Where compute nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend.
    Cpu,
    /// CUDA GPUs, nodes placed from this ordinal on.
    Cuda(usize),
}

/// Parses `parallel.device`: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, ConfigError> {
    let bad = || {
        invalid(
            "parallel.device",
            format!("is '{s}', must be cpu, cuda or cuda:N (N a GPU ordinal)"),
        )
    };
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(bad),
    }
}

/// Where an engine's nodes run, from the `[parallel]` device keys.
pub fn compute_from(
    device: Device,
    devices: &[usize],
    (dtype, kv_dtype): (&str, &str),
    cuda_weights: &str,
) -> Result<actors::llm::Compute, ConfigError> {
    use actors::llm::Compute;
    use framework::cuda::{CudaOptions, Dtype};
    use framework::kv::KvDtype;
    let dtype: Dtype = dtype
        .parse()
        .map_err(|e: String| invalid("parallel.dtype", e))?;
    let kv: Option<KvDtype> = match kv_dtype {
        "auto" => None,
        other => Some(other.parse().map_err(|_| {
            invalid(
                "scheduler.kv_dtype",
                format!("is '{other}', must be auto, f32, f16 or bf16"),
            )
        })?),
    };
    let quantized = match cuda_weights {
        "dense" => false,
        "quantized" => true,
        other => {
            return Err(invalid(
                "parallel.cuda_weights",
                format!("is '{other}', must be dense or quantized"),
            ))
        }
    };
    if let (Device::Cuda(_), Some(kv)) = (device, kv) {
        if kv.name() != dtype.suffix() {
            return Err(invalid(
                "scheduler.kv_dtype",
                format!(
                    "is {}, but the CUDA backend stores its KV cache in parallel.dtype ({}); use auto",
                    kv.name(),
                    dtype.suffix()
                ),
            ));
        }
    }
    Ok(match device {
        Device::Cpu => Compute::Cpu {
            kv_dtype: kv.unwrap_or_default(),
        },
        Device::Cuda(n) => Compute::Cuda {
            devices: if devices.is_empty() {
                vec![n]
            } else {
                devices.to_vec()
            },
            options: CudaOptions { dtype, quantized },
        },
    })
}

/// The checked configuration that starts the server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the compute nodes run.
    pub device: Device,
    /// The model file; `None`: the reference model.
    pub model_path: Option<PathBuf>,
    /// The served model id; `None`: the file name.
    pub model_name: Option<String>,
    /// The engine's configuration, minus the model source (set once the path
    /// is resolved).
    pub engine: EngineConfig,
    /// Where to listen.
    pub addr: SocketAddr,
    /// Accepted API keys, from `server.api_keys` and `server.api_keys_file`
    /// (empty: none needed).
    pub api_keys: Vec<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Time a client may take to send a body.
    pub body_timeout: Duration,
    /// Connections open at once, over all workers.
    pub max_connections: usize,
    /// Threads that tokenize and render templates.
    pub tokenizer_threads: usize,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_timeout: Duration,
    /// Time between health probes.
    pub health_probe_interval: Duration,
    /// Age beyond which a probe's success no longer counts.
    pub health_max_age: Duration,
    /// `Retry-After` of a 429, in seconds.
    pub retry_after_secs: u64,
    /// HTTP worker threads.
    pub workers: usize,
    /// Request caps.
    pub limits: LimitsSection,
    /// The embedding models of `[[models]]`.
    pub embed_models: Vec<EmbedModel>,
    /// The `[cluster]` settings.
    pub cluster: cluster::ClusterSpec,
    /// Which rank runs each node, for the ranks launched (one without a
    /// launcher); hosts as configured until MPI reports them.
    pub placement: cluster::Placement,
}

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "env {v}"),
            Origin::Flag => write!(f, "command line"),
        }
    }
}

/// A merged, checked configuration and where each value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The merged values.
    pub raw: RawConfig,
    /// The checked form.
    pub settings: Settings,
    /// Every key (`section.name`) and the layer its value came from.
    pub provenance: BTreeMap<String, Origin>,
}

/// The layers to merge above the defaults.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// A TOML or YAML file (by extension: `.toml`, `.yaml`, `.yml`).
    pub file: Option<PathBuf>,
    /// Environment variables to read (normally `std::env::vars()`); only
    /// those starting with `PARALLM__` count.
    pub env: Vec<(String, String)>,
    /// Command-line overrides, `section.key` → value.
    pub overrides: Vec<(String, Value)>,
}

impl Sources {
    /// A file, the process environment and `overrides`.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<(String, Value)>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

/// Every key of the configuration with its default, `section.name` → value.
pub fn default_keys() -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(RawConfig::default()) {
        for (section, body) in sections {
            match body {
                serde_json::Value::Object(keys) => {
                    for (k, v) in keys {
                        out.insert(format!("{section}.{k}"), v);
                    }
                }
                // `[[models]]`: a list of tables, one key (its entries'
                // keys are checked when the list is read).
                other => {
                    out.insert(section, other);
                }
            }
        }
    }
    out
}

/// The environment variable for `section.key`.
pub fn env_var(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.replace('.', ENV_SEPARATOR).to_ascii_uppercase()
    )
}

fn file_format(path: &Path) -> Result<FileFormat, ConfigError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => Ok(FileFormat::Toml),
        Some("yaml" | "yml") => Ok(FileFormat::Yaml),
        _ => Err(ConfigError::File {
            path: path.to_path_buf(),
            message: "the name must end in .toml, .yaml or .yml".into(),
        }),
    }
}

/// The flattened keys one layer sets.
fn layer_keys(cfg: &Config) -> Vec<String> {
    layer_entries(cfg).into_iter().map(|(k, _)| k).collect()
}

/// A layer's keys (`section.key`) with their values.
fn layer_entries(cfg: &Config) -> Vec<(String, Value)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match &v.kind {
            ValueKind::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => out.push((prefix.to_string(), v.clone())),
        }
    }
    let mut out = Vec::new();
    if let Ok(map) = cfg
        .clone()
        .try_deserialize::<std::collections::HashMap<String, Value>>()
    {
        for (k, v) in map {
            walk(&k, &v, &mut out);
        }
    }
    out
}

/// Whole-number keys whose range is not that of `usize`: (key, least,
/// greatest). Every other whole-number key takes 0 to `u64::MAX`.
const NARROW_KEYS: [(&str, i128, i128); 5] = [
    ("server.port", 0, u16::MAX as i128),
    ("scheduler.max_retries", 0, u32::MAX as i128),
    ("faults.times", 0, u32::MAX as i128),
    ("faults.node", i64::MIN as i128, i64::MAX as i128),
    ("faults.merge_step", i64::MIN as i128, i64::MAX as i128),
];

/// Refuses a value of a layer whose type is not its key's, naming the
/// value, the layer and what the key takes: a fraction for a whole-number
/// key (the `config` crate would round it: `tp = 1.5` is an error, not 2),
/// a whole number out of its key's range (`port = 70000`), text that is
/// no number or no boolean. Text is read as the key's type (the command
/// line and the environment give text).
fn check_types(cfg: &Config, origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let known = default_keys();
    for (key, value) in layer_entries(cfg) {
        let Some(default) = known.get(&key) else {
            continue;
        };
        let shown = match &value.kind {
            ValueKind::String(t) => format!("'{t}'"),
            _ => value.to_string(),
        };
        let bad = |what: &str| {
            invalid(
                &key,
                format!("is {shown} ({}), must be {what}", origin(&key)),
            )
        };
        if default.is_u64() || default.is_i64() {
            let (least, most) = NARROW_KEYS
                .iter()
                .find(|(k, ..)| *k == key)
                .map_or((0, u64::MAX as i128), |&(_, a, b)| (a, b));
            let range = match (least, most) {
                (0, m) if m == u64::MAX as i128 => "a whole number, 0 or more".to_string(),
                (0, m) => format!("a whole number from 0 to {m}"),
                _ => "a whole number".to_string(),
            };
            let n: Option<i128> = match &value.kind {
                ValueKind::I64(n) => Some(i128::from(*n)),
                ValueKind::U64(n) => Some(i128::from(*n)),
                ValueKind::I128(n) => Some(*n),
                ValueKind::U128(n) => i128::try_from(*n).ok(),
                ValueKind::Float(f) if f.fract() == 0.0 && f.abs() < 1e30 => Some(*f as i128),
                ValueKind::String(t) => t.trim().parse::<i128>().ok(),
                _ => None,
            };
            match n {
                Some(n) if (least..=most).contains(&n) => {}
                _ => return Err(bad(&range)),
            }
        } else if default.is_f64() {
            let number = match &value.kind {
                ValueKind::Float(_) | ValueKind::I64(_) | ValueKind::U64(_) => true,
                ValueKind::I128(_) | ValueKind::U128(_) => true,
                ValueKind::String(t) => t.trim().parse::<f64>().is_ok(),
                _ => false,
            };
            if !number {
                return Err(bad("a number"));
            }
        } else if default.is_boolean() {
            // What the `config` crate reads as a boolean.
            let boolean = match &value.kind {
                // Numbers too (0 is false), as the crate reads them.
                ValueKind::Boolean(_) | ValueKind::I64(_) | ValueKind::U64(_) => true,
                ValueKind::I128(_) | ValueKind::U128(_) | ValueKind::Float(_) => true,
                ValueKind::String(t) => matches!(
                    t.trim().to_lowercase().as_str(),
                    "true" | "false" | "1" | "0" | "on" | "off" | "yes" | "no"
                ),
                _ => false,
            };
            if !boolean {
                return Err(bad("true or false"));
            }
        }
    }
    Ok(())
}

/// The keys whose values are lists: on the command line (`--set`) and in
/// the environment, a comma-separated list. (`cluster.mpirun_args` is not
/// one: mpirun's arguments hold commas; it is set in a file.)
const LIST_KEYS: [&str; 3] = ["server.api_keys", "parallel.devices", "cluster.hosts"];

fn check_known(keys: &[String], origin: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let known = default_keys();
    for key in keys {
        if known.contains_key(key) {
            continue;
        }
        // A TOML table (or `a.b` key) where a JSON object in a string goes.
        if key.starts_with("model.chat_template_kwargs.") {
            return Err(invalid(
                "model.chat_template_kwargs",
                format!(
                    "is a table (from {}); give the variables as a JSON object in a string: \
                     chat_template_kwargs = '{{\"enable_thinking\": false}}'",
                    origin(key)
                ),
            ));
        }
        let section = key.split('.').next().unwrap_or_default();
        let siblings: Vec<&str> = known
            .keys()
            .filter(|k| k.split('.').next() == Some(section))
            .map(String::as_str)
            .collect();
        let known = if siblings.is_empty() {
            // Every section, from the defaults, so that none is left out.
            let mut sections: Vec<&str> = known
                .keys()
                .filter_map(|k| k.split_once('.').map(|(s, _)| s))
                .collect();
            sections.dedup();
            format!("sections {}, and [[models]]", sections.join(", "))
        } else {
            siblings.join(", ")
        };
        return Err(ConfigError::UnknownKey {
            key: key.clone(),
            origin: origin(key),
            known,
        });
    }
    Ok(())
}

/// Turns a `config` crate error into one that names the field.
fn deserialize_error(e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    // The crate reports "invalid type: …  for key `server.port`" and similar.
    let field = text
        .split("key `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or("config")
        .to_string();
    ConfigError::Invalid {
        field,
        reason: text,
    }
}

/// Merges the layers, refuses unknown keys and checks the result.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let defaults = Config::try_from(&RawConfig::default()).map_err(deserialize_error)?;
    let mut builder = Config::builder().add_source(defaults);

    let file_cfg = match &sources.file {
        Some(path) => {
            if !path.is_file() {
                return Err(ConfigError::File {
                    path: path.clone(),
                    message: if path.is_dir() {
                        "is a directory, not a config file".into()
                    } else {
                        "no such file".into()
                    },
                });
            }
            let src = File::from(path.as_path()).format(file_format(path)?);
            let cfg = Config::builder()
                .add_source(src.clone())
                .build()
                .map_err(|e| ConfigError::File {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            let origin = path.display().to_string();
            check_known(&layer_keys(&cfg), &|_| format!("file {origin}"))?;
            check_types(&cfg, &|_| format!("file {origin}"))?;
            builder = builder.add_source(src);
            Some(cfg)
        }
        None => None,
    };

    let env_map: std::collections::HashMap<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
        .cloned()
        .collect();
    let env_source = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator(ENV_SEPARATOR)
        .separator(ENV_SEPARATOR)
        .list_separator(",")
        .try_parsing(true)
        .source(Some(env_map));
    let env_source = LIST_KEYS
        .iter()
        .fold(env_source, |e, k| e.with_list_parse_key(k));
    let env_cfg = Config::builder()
        .add_source(env_source.clone())
        .build()
        .map_err(deserialize_error)?;
    let env_keys = layer_keys(&env_cfg);
    check_known(&env_keys, &|k| format!("env {}", env_var(k)))?;
    check_types(&env_cfg, &|k| format!("env {}", env_var(k)))?;
    builder = builder.add_source(env_source);

    let mut flag_keys = Vec::new();
    for (key, value) in &sources.overrides {
        flag_keys.push(key.clone());
        // A list key's text is a comma-separated list.
        let value = match &value.kind {
            ValueKind::String(text) if LIST_KEYS.contains(&key.as_str()) => Value::from(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>(),
            ),
            _ => value.clone(),
        };
        builder = builder
            .set_override(key.as_str(), value)
            .map_err(deserialize_error)?;
    }
    check_known(&flag_keys, &|_| "command line".to_string())?;
    let flags = flag_keys
        .iter()
        .zip(&sources.overrides)
        .try_fold(Config::builder(), |b, (k, (_, v))| {
            b.set_override(k.as_str(), v.clone())
        })
        .and_then(|b| b.build())
        .map_err(deserialize_error)?;
    check_types(&flags, &|_| "command line".to_string())?;

    let merged = builder.build().map_err(deserialize_error)?;
    let raw: RawConfig = merged.try_deserialize().map_err(deserialize_error)?;

    let file_keys = file_cfg.as_ref().map(layer_keys).unwrap_or_default();
    let provenance = default_keys()
        .into_keys()
        .map(|k| {
            let origin = if flag_keys.contains(&k) {
                Origin::Flag
            } else if env_keys.contains(&k) {
                Origin::Env(env_var(&k))
            } else if file_keys.contains(&k) {
                Origin::File(sources.file.clone().unwrap_or_default())
            } else {
                Origin::Default
            };
            (k, origin)
        })
        .collect();
    let settings = check(&raw)?;
    Ok(Loaded {
        raw,
        settings,
        provenance,
    })
}

/// `speculative.draft_model`, checked to exist (its vocabulary is checked
/// against the model's when the engine starts); its weights in the model's
/// format.
fn draft_model(
    s: &SpeculativeSection,
    weights: WeightFormat,
) -> Result<Option<actors::llm::DraftModel>, ConfigError> {
    if s.draft_model.is_empty() {
        if s.method == "draft" {
            return Err(invalid(
                "speculative.method",
                "is \"draft\", but speculative.draft_model is empty (give a draft model with the model's vocabulary)",
            ));
        }
        return Ok(None);
    }
    let path = PathBuf::from(&s.draft_model);
    if !path.is_file() && !path.is_dir() {
        return Err(invalid(
            "speculative.draft_model",
            format!(
                "'{}' is not a file (a .gguf model) or a directory (a Hugging Face model)",
                path.display()
            ),
        ));
    }
    Ok(Some(actors::llm::DraftModel {
        model: actors::llm::ModelSource::Gguf(path),
        weights,
    }))
}

/// Checks a merged configuration into [`Settings`], with cross-field checks.
pub fn check(raw: &RawConfig) -> Result<Settings, ConfigError> {
    let m = &raw.model;
    let weights: WeightFormat = m.weights.parse().map_err(|_| {
        invalid(
            "model.weights",
            format!("is '{}', must be one of {}", m.weights, WeightFormat::NAMES),
        )
    })?;
    let model_path = (!m.path.is_empty()).then(|| PathBuf::from(&m.path));
    if let Some(p) = &model_path {
        if !p.is_file() && !p.is_dir() {
            return Err(invalid(
                "model.path",
                format!(
                    "'{}' is not a file (a .gguf model) or a directory (a Hugging Face model)",
                    p.display()
                ),
            ));
        }
    }
    let at_least_one = |field: &str, v: usize| {
        if v == 0 {
            Err(invalid(field, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    let p = &raw.parallel;
    at_least_one("parallel.tp", p.tp)?;
    at_least_one("parallel.pp", p.pp)?;
    at_least_one("parallel.dp", p.dp)?;
    if p.micro_batches > 0 && p.pp == 1 && p.micro_batches > 1 {
        return Err(invalid(
            "parallel.micro_batches",
            "more than one micro-batch needs parallel.pp > 1",
        ));
    }
    let device = parse_device(&p.device)?;
    let s = &raw.scheduler;
    at_least_one("scheduler.queue_capacity", s.queue_capacity)?;
    at_least_one("scheduler.max_batch_tokens", s.max_batch_tokens)?;
    at_least_one("scheduler.max_running", s.max_running)?;
    at_least_one("scheduler.block_size", s.block_size)?;
    if s.kv_blocks == 0 && s.kv_memory_mib == 0 {
        return Err(invalid(
            "scheduler.kv_memory_mib",
            "must be at least 1 when scheduler.kv_blocks is 0",
        ));
    }
    let kv_memory_bytes = s.kv_memory_mib.checked_mul(1 << 20).ok_or_else(|| {
        invalid(
            "scheduler.kv_memory_mib",
            format!("is {} MiB, beyond what 64 bits count", s.kv_memory_mib),
        )
    })?;
    if s.kv_blocks == 0 && device == Device::Cpu {
        let all = (kv_memory_bytes as u64).saturating_mul(p.dp as u64);
        if let Some(have) = framework::machine_memory_bytes().filter(|&have| all > have) {
            return Err(invalid(
                "scheduler.kv_memory_mib",
                format!(
                    "is {} MiB per replica: {} of KV cache for {} replica(s), more than this machine's {} of memory",
                    s.kv_memory_mib,
                    framework::human_bytes(all),
                    p.dp,
                    framework::human_bytes(have)
                ),
            ));
        }
    }
    if m.max_model_len > framework::config::MAX_CONTEXT {
        return Err(invalid(
            "model.max_model_len",
            format!(
                "is {}, must be at most {} (0: the model's own context)",
                m.max_model_len,
                framework::config::MAX_CONTEXT
            ),
        ));
    }
    let v = &raw.server;
    let ip: IpAddr = if v.host == "localhost" {
        IpAddr::from([127, 0, 0, 1])
    } else {
        v.host.parse().map_err(|_| {
            invalid(
                "server.host",
                format!(
                    "'{}' is not an IP address (use 127.0.0.1, 0.0.0.0, ::1 or localhost)",
                    v.host
                ),
            )
        })?
    };
    if v.api_keys.iter().any(|k| k.trim().is_empty()) {
        return Err(invalid("server.api_keys", "keys must not be empty"));
    }
    let mut api_keys = v.api_keys.clone();
    if !v.api_keys_file.is_empty() {
        let text = std::fs::read_to_string(&v.api_keys_file).map_err(|e| {
            invalid(
                "server.api_keys_file",
                format!("cannot read '{}': {e}", v.api_keys_file),
            )
        })?;
        let keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if keys.is_empty() {
            return Err(invalid(
                "server.api_keys_file",
                format!("'{}' holds no key", v.api_keys_file),
            ));
        }
        api_keys.extend(keys);
    }
    // Durations are added to the clock: a year bounds them well inside
    // what an instant holds.
    for (field, secs) in [
        ("server.body_timeout_secs", v.body_timeout_secs),
        ("server.shutdown_timeout_secs", v.shutdown_timeout_secs),
        (
            "server.health_probe_interval_secs",
            v.health_probe_interval_secs,
        ),
        ("server.health_max_age_secs", v.health_max_age_secs),
        ("server.retry_after_secs", v.retry_after_secs),
        (
            "cluster.heartbeat_timeout_secs",
            raw.cluster.heartbeat_timeout_secs,
        ),
    ] {
        if secs > MAX_SECS {
            return Err(invalid(
                field,
                format!("is {secs}, must be at most {MAX_SECS} (a year)"),
            ));
        }
    }
    at_least_one("server.body_timeout_secs", v.body_timeout_secs as usize)?;
    at_least_one("server.max_connections", v.max_connections)?;
    if v.max_body_bytes < 1024 {
        return Err(invalid(
            "server.max_body_bytes",
            format!("is {}, must be at least 1024", v.max_body_bytes),
        ));
    }
    at_least_one(
        "server.health_probe_interval_secs",
        v.health_probe_interval_secs as usize,
    )?;
    if v.health_max_age_secs < v.health_probe_interval_secs {
        return Err(invalid(
            "server.health_max_age_secs",
            format!(
                "is {}, must be at least server.health_probe_interval_secs ({})",
                v.health_max_age_secs, v.health_probe_interval_secs
            ),
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match v.workers {
        0 => cores.min(4),
        n if n > MAX_WORKERS => {
            return Err(invalid(
                "server.workers",
                format!(
                    "is {n}, must be at most {MAX_WORKERS} (0: the machine's cores, at most 4)"
                ),
            ))
        }
        n => n,
    };
    let tokenizer_threads = match v.tokenizer_threads {
        0 => cores.saturating_sub(1).max(1),
        n => n,
    };
    let l = &raw.limits;
    at_least_one("limits.max_n", l.max_n)?;
    at_least_one("limits.max_tokens", l.max_tokens)?;
    at_least_one("limits.max_beam_width", l.max_beam_width)?;
    if l.max_logprobs > framework::sampling::MAX_LOGPROBS {
        return Err(invalid(
            "limits.max_logprobs",
            format!(
                "is {}, must be in [0, {}]",
                l.max_logprobs,
                framework::sampling::MAX_LOGPROBS
            ),
        ));
    }
    if l.default_max_tokens == 0 || l.default_max_tokens > l.max_tokens {
        return Err(invalid(
            "limits.default_max_tokens",
            format!(
                "is {}, must be in [1, limits.max_tokens = {}]",
                l.default_max_tokens, l.max_tokens
            ),
        ));
    }
    let f = &raw.faults;
    let fault = if f.node == -1 {
        None
    } else if f.node < 0 {
        return Err(invalid(
            "faults.node",
            format!("is {}, must be -1 (off) or a node index", f.node),
        ));
    } else {
        let nodes = p.tp * p.pp;
        if f.node as usize >= nodes {
            return Err(invalid(
                "faults.node",
                format!("is {}, must be -1 (off) or in [0, {})", f.node, nodes),
            ));
        }
        if f.replica >= p.dp {
            return Err(invalid(
                "faults.replica",
                format!("is {}, must be in [0, parallel.dp = {})", f.replica, p.dp),
            ));
        }
        Some(actors::llm::FaultInjection {
            replica: f.replica,
            node: f.node as usize,
            step: f.step,
            times: if f.times == 0 { u32::MAX } else { f.times },
            panic: f.panic,
        })
    };
    let merge_fault = match f.merge_step {
        -1 => None,
        s if s < 0 => {
            return Err(invalid(
                "faults.merge_step",
                format!("is {s}, must be -1 (off) or a step number"),
            ))
        }
        s => Some(s as u64),
    };
    let engine = EngineConfig {
        weights,
        tp: p.tp,
        pp: p.pp,
        dp: p.dp,
        micro_batches: (p.micro_batches > 0).then_some(p.micro_batches),
        steps_in_flight: (p.steps_in_flight > 0).then_some(p.steps_in_flight),
        queue_capacity: s.queue_capacity,
        max_batch_tokens: s.max_batch_tokens,
        max_running: s.max_running,
        block_size: s.block_size,
        prefix_caching: s.prefix_caching,
        prefix_route_margin: s.prefix_route_margin,
        cache_aware_routing: s.cache_aware_routing,
        kv_blocks: (s.kv_blocks > 0).then_some(s.kv_blocks),
        kv_memory_bytes,
        max_retries: s.max_retries,
        fault,
        merge_fault,
        threads_per_node: p.threads_per_node,
        compute: compute_from(device, &p.devices, (&p.dtype, &s.kv_dtype), &p.cuda_weights)?,
        max_model_len: (m.max_model_len > 0).then_some(m.max_model_len),
        tool_format: match m.tool_format.as_str() {
            "" => None,
            name => Some(framework::tools::ToolFormat::from_name(name).map_err(|_| {
                invalid(
                    "model.tool_format",
                    format!("is '{name}', must be hermes, llama3_json or mistral (or empty: the chat template's)"),
                )
            })?),
        },
        reasoning_format: match m.reasoning_format.as_str() {
            "" => None,
            name => Some(framework::reasoning::ReasoningFormat::from_name(name).map_err(|_| {
                invalid(
                    "model.reasoning_format",
                    format!("is '{name}', must be think (or qwen3, deepseek_r1) or none, or empty: as the chat template implies"),
                )
            })?),
        },
        chat_template_kwargs: template_kwargs(&m.chat_template_kwargs, "model.chat_template_kwargs")?,
        chat_template: chat_template_file(&m.chat_template_file, "model.chat_template_file")?,
        speculative: raw.speculative.speculation()?,
        speculate_max_running: raw.speculative.max_running,
        draft: draft_model(&raw.speculative, weights)?,
        ..EngineConfig::default()
    };
    let cluster_spec = raw.cluster.spec()?;
    let placement = cluster::Placement::plan(
        &cluster_spec,
        cluster::Layout {
            dp: raw.parallel.dp,
            tp: raw.parallel.tp,
            pp: raw.parallel.pp,
            draft: engine.draft.is_some(),
        },
        launched_ranks(),
    )
    .map_err(placement_error)?;
    Ok(Settings {
        device,
        model_path,
        model_name: (!m.name.is_empty()).then(|| m.name.clone()),
        engine,
        addr: SocketAddr::new(ip, v.port),
        api_keys,
        max_body_bytes: v.max_body_bytes,
        body_timeout: Duration::from_secs(v.body_timeout_secs),
        max_connections: v.max_connections,
        tokenizer_threads,
        shutdown_timeout: Duration::from_secs(v.shutdown_timeout_secs),
        health_probe_interval: Duration::from_secs(v.health_probe_interval_secs),
        health_max_age: Duration::from_secs(v.health_max_age_secs),
        retry_after_secs: v.retry_after_secs,
        workers,
        limits: l.clone(),
        embed_models: check_models(&raw.models, &m.name)?,
        cluster: cluster_spec,
        placement,
    })
}

/// Reads `model.chat_template_file` (or the flag `key`, which gave `path`):
/// the template's source, checked to compile (`None` for an empty path).
pub fn chat_template_file(path: &str, key: &str) -> Result<Option<String>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let source = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read '{path}': {e}")))?;
    framework::chat::ChatTemplate::new(&source, "", "")
        .map_err(|e| invalid(key, format!("'{path}': {e}")))?;
    Ok(Some(source))
}

/// Reads `model.chat_template_kwargs` (or the flag `key`, which gave
/// `text`): a JSON object of template variables (empty text: none), none
/// of them one the renderer sets itself.
pub fn template_kwargs(
    text: &str,
    key: &str,
) -> Result<framework::chat::TemplateKwargs, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Default::default());
    }
    let kwargs = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => {
            return Err(invalid(
                key,
                format!(
                    "is '{text}', must be a JSON object such as {{\"enable_thinking\": false}}"
                ),
            ))
        }
        Err(e) => return Err(invalid(key, format!("is not JSON ({e}): '{text}'"))),
    };
    let render = framework::chat::RenderOptions {
        kwargs,
        ..Default::default()
    };
    match render.check() {
        Ok(()) => Ok(render.kwargs),
        Err(framework::Error::InvalidRequest { reason, .. }) => Err(invalid(key, reason)),
        Err(e) => Err(invalid(key, e.to_string())),
    }
}

/// The effective configuration as TOML, each value followed by its origin.
pub fn show(loaded: &Loaded) -> String {
    let mut out = String::new();
    let mut section = "";
    let values = serde_json::to_value(&loaded.raw).unwrap_or_default();
    for (key, origin) in &loaded.provenance {
        let Some((sec, name)) = key.split_once('.') else {
            continue;
        };
        if sec != section {
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{sec}]\n"));
            section = sec;
        }
        let value = values
            .get(sec)
            .and_then(|s| s.get(name))
            .map(|v| match key.as_str() {
                // Secrets are counted, never printed.
                "server.api_keys" => toml_value(&masked(v)),
                _ => toml_value(v),
            })
            .unwrap_or_default();
        let line = format!("{name} = {value}");
        out.push_str(&format!("{line:<40} # {origin}\n"));
    }
    let origin = loaded
        .provenance
        .get("models")
        .map(ToString::to_string)
        .unwrap_or_default();
    if let Some(serde_json::Value::Array(models)) = values.get("models") {
        for entry in models {
            out.push_str(&format!("\n[[models]]{:<31} # {origin}\n", ""));
            if let serde_json::Value::Object(keys) = entry {
                for (k, v) in keys {
                    out.push_str(&format!("{k} = {}\n", toml_value(v)));
                }
            }
        }
    }
    // Where each node runs, as comments (the file stays valid TOML).
    out.push('\n');
    for line in loaded.settings.placement.to_string().lines() {
        out.push_str(&format!("# {line}\n"));
    }
    out
}

/// Each string of an array replaced by `***`.
fn masked(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(|_| serde_json::json!("***")).collect())
        }
        _ => "***".into(),
    }
}

/// What `settings` would allocate, for `config check`.
#[derive(Debug, Clone)]
pub struct MemoryCheck {
    /// The model file sized (the configured one, or the cached reference model).
    pub model: PathBuf,
    /// The generation engine's plan, its draft model's node included.
    pub plan: actors::llm::MemoryPlan,
    /// The weights of `[[models]]`' embedding models, every replica, about.
    pub embed_bytes: u64,
}

/// What the engine `settings` start would allocate, for `config check`:
/// the generation engine's plan (the configured model, or the reference
/// model if it is cached; its draft model's node beside each replica) and
/// the embedding models' weights, refused when this machine cannot hold
/// them. `None` when no model file is at hand to size it.
pub fn memory_plan(settings: &Settings) -> Result<Option<MemoryCheck>, ConfigError> {
    let Some(path) = settings
        .model_path
        .clone()
        .or_else(crate::fetch::cached_reference_model)
    else {
        return Ok(None);
    };
    let model_err = |e: framework::Error| invalid("model.path", e.to_string());
    let file = framework::GgufFile::open(&path).map_err(model_err)?;
    let mut model = framework::ModelConfig::from_gguf_capped(&file, settings.engine.max_model_len)
        .map_err(model_err)?;
    // The draft model, sized as the engine sizes it (its context caps the
    // target's).
    let draft = match settings.engine.draft.as_ref().map(|d| &d.model) {
        Some(actors::llm::ModelSource::Gguf(draft_path)) => {
            let draft_err = |e: framework::Error| invalid("speculative.draft_model", e.to_string());
            let draft_file = framework::GgufFile::open(draft_path).map_err(draft_err)?;
            let draft = framework::ModelConfig::from_gguf_capped(
                &draft_file,
                settings.engine.max_model_len,
            )
            .map_err(draft_err)?;
            model.context = model.context.min(draft.context);
            Some((draft, draft_file.file_size()))
        }
        _ => None,
    };
    // An engine setting's error names its key in the file.
    let engine_err = |e: framework::Error| match &e {
        framework::Error::Setting { field, reason } => {
            let key = match *field {
                "tp" | "pp" | "dp" | "micro_batches" | "steps_in_flight" => {
                    format!("parallel.{field}")
                }
                "max_model_len" => "model.max_model_len".into(),
                "kv_memory_bytes" => "scheduler.kv_memory_mib".into(),
                other => format!("scheduler.{other}"),
            };
            invalid(&key, reason.clone())
        }
        _ => invalid("scheduler", e.to_string()),
    };
    // What the engine would refuse at start, check refuses too.
    settings.engine.validate(&model).map_err(engine_err)?;
    let plan = settings
        .engine
        .memory_plan_with_draft(&model, file.file_size(), draft.as_ref())
        .map_err(engine_err)?;
    let machine = framework::machine_memory_bytes();
    plan.check(machine).map_err(engine_err)?;
    let embed_bytes = settings
        .embed_models
        .iter()
        .map(|m| weights_bytes(&m.config.model).saturating_mul(m.config.dp as u64))
        .fold(0u64, u64::saturating_add);
    match machine {
        Some(have) if plan.host_bytes().saturating_add(embed_bytes) > have => Err(invalid(
            "models",
            format!(
                "the engine would allocate {plan}, and the embedding models' weights about {} more, \
                 more than this machine's {} of memory (lower their dp, or serve fewer)",
                framework::human_bytes(embed_bytes),
                framework::human_bytes(have)
            ),
        )),
        _ => Ok(Some(MemoryCheck {
            model: path,
            plan,
            embed_bytes,
        })),
    }
}

/// The weights' bytes of the model at `path`, a GGUF file or a Hugging
/// Face directory, as the engine sizes them; 0 for what cannot be read
/// (its loading names the error).
fn weights_bytes(path: &Path) -> u64 {
    framework::GgufFile::open(path).map_or(0, |f| f.file_size())
}

/// A JSON value written as TOML.
fn toml_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(toml_value).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use framework::speculative::Speculation;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write config");
        p
    }

    #[test]
    fn steps_in_flight_reach_the_engine_and_zero_means_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = |text: &str| {
            let file = write(&dir, "c.toml", text);
            let sources = Sources {
                file: Some(file),
                ..Sources::default()
            };
            load(&sources).expect("valid").settings.engine
        };
        let e = engine("[parallel]\npp = 2\nsteps_in_flight = 1\n");
        assert_eq!(e.steps_in_flight, Some(1));
        assert_eq!(e.lanes(), 1);
        let e = engine("[parallel]\npp = 2\n");
        assert_eq!(e.steps_in_flight, None);
        assert_eq!(e.lanes(), 2);
    }

    #[test]
    fn layers_override_in_order_and_provenance_says_which() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(
            &dir,
            "c.toml",
            "[server]\nport = 9000\nhost = \"0.0.0.0\"\n[parallel]\ntp = 3\n",
        );
        let sources = Sources {
            file: Some(file.clone()),
            env: env(&[
                ("PARALLM__SERVER__PORT", "9100"),
                ("PARALLM__SERVER__API_KEYS", "a,b"),
                ("PARALLM_HOME", "/elsewhere"),
            ]),
            overrides: vec![("parallel.tp".into(), Value::from(1))],
        };
        let loaded = load(&sources).expect("valid");
        assert_eq!(loaded.raw.server.port, 9100);
        assert_eq!(loaded.raw.server.host, "0.0.0.0");
        assert_eq!(loaded.raw.server.api_keys, vec!["a", "b"]);
        assert_eq!(loaded.raw.parallel.tp, 1);
        assert_eq!(loaded.settings.engine.tp, 1);
        let p = &loaded.provenance;
        assert_eq!(
            p["server.port"],
            Origin::Env("PARALLM__SERVER__PORT".into())
        );
        assert_eq!(p["server.host"], Origin::File(file));
        assert_eq!(p["parallel.tp"], Origin::Flag);
        assert_eq!(p["parallel.pp"], Origin::Default);
        let text = show(&loaded);
        assert!(text.contains("port = 9100"), "{text}");
        assert!(text.contains("# env PARALLM__SERVER__PORT"), "{text}");
    }

    #[test]
    fn yaml_files_load_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(
            &dir,
            "c.yaml",
            "scheduler:\n  max_running: 7\n  prefix_caching: false\n",
        );
        let loaded = load(&Sources {
            file: Some(file),
            ..Sources::default()
        })
        .expect("valid");
        assert_eq!(loaded.settings.engine.max_running, 7);
        assert!(!loaded.settings.engine.prefix_caching);
        let file = write(
            &dir,
            "s.yaml",
            "speculative:\n  method: ngram\n  num_speculative_tokens: 6\n  max_running: 2\n",
        );
        let engine = load(&Sources {
            file: Some(file),
            ..Sources::default()
        })
        .expect("valid")
        .settings
        .engine;
        assert_eq!(engine.speculative, Speculation::ngram(6));
        assert_eq!(engine.speculate_max_running, 2);
        assert!(
            load(&Sources::default())
                .expect("defaults")
                .settings
                .engine
                .prefix_caching
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_origin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = write(&dir, "c.toml", "[server]\nprot = 1\n");
        let err = load(&Sources {
            file: Some(file),
            ..Sources::default()
        })
        .expect_err("unknown key");
        let text = err.to_string();
        assert!(
            text.contains("server.prot") && text.contains("server.port"),
            "{text}"
        );

        let err = load(&Sources {
            env: env(&[("PARALLM__SERVR__PORT", "1")]),
            ..Sources::default()
        })
        .expect_err("unknown section");
        assert!(err.to_string().contains("PARALLM__SERVR__PORT"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field_and_the_allowed_values() {
        let cases: &[(&str, &str, &str)] = &[
            ("[server]\nport = \"x\"\n", "server.port", ""),
            ("[server]\nport = 70000\n", "server.port", ""),
            (
                "[model]\nweights = \"q3\"\n",
                "model.weights",
                "auto, native",
            ),
            ("[parallel]\ntp = 0\n", "parallel.tp", "at least 1"),
            (
                "[parallel]\ndevice = \"gpu\"\n",
                "parallel.device",
                "cuda:N",
            ),
            (
                "[server]\nhost = \"example\"\n",
                "server.host",
                "IP address",
            ),
            (
                "[limits]\nmax_logprobs = 50\n",
                "limits.max_logprobs",
                "[0, 20]",
            ),
            (
                "[limits]\nmax_tokens = 10\ndefault_max_tokens = 20\n",
                "limits.default_max_tokens",
                "limits.max_tokens",
            ),
            (
                "[model]\npath = \"/nonexistent.gguf\"\n",
                "model.path",
                "not a file",
            ),
            (
                "[scheduler]\nkv_dtype = \"f8\"\n",
                "scheduler.kv_dtype",
                "auto, f32, f16 or bf16",
            ),
            (
                "[scheduler]\nkv_dtype = \"f32\"\n[parallel]\ndevice = \"cuda:0\"\n",
                "scheduler.kv_dtype",
                "parallel.dtype (f16)",
            ),
            (
                "[speculative]\nmethod = \"draft\"\n",
                "speculative.method",
                "draft_model is empty",
            ),
            (
                "[speculative]\nmethod = \"draft\"\ndraft_model = \"/nonexistent/draft.gguf\"\n",
                "speculative.draft_model",
                "is not a file",
            ),
            (
                "[speculative]\nmethod = \"ngram\"\nnum_speculative_tokens = 0\n",
                "speculative.num_speculative_tokens",
                "[1, 16]",
            ),
            ("[parallel]\ntp = 1.5\n", "parallel.tp", "whole number"),
            (
                "[parallel]\ntp = \"two\"\n",
                "parallel.tp",
                "is 'two' (file",
            ),
            ("[server]\nport = 70000\n", "server.port", "from 0 to 65535"),
            (
                "[scheduler]\nprefix_caching = \"maybe\"\n",
                "scheduler.prefix_caching",
                "true or false",
            ),
            ("[server]\nworkers = 513\n", "server.workers", "at most 512"),
            (
                "[server]\nshutdown_timeout_secs = 100000000\n",
                "server.shutdown_timeout_secs",
                "a year",
            ),
            ("[faults]\nnode = -5\n", "faults.node", "-1 (off)"),
            (
                "[faults]\nmerge_step = -2\n",
                "faults.merge_step",
                "-1 (off)",
            ),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, (text, field, allowed)) in cases.iter().enumerate() {
            let file = write(&dir, &format!("c{i}.toml"), text);
            let err = load(&Sources {
                file: Some(file),
                ..Sources::default()
            })
            .expect_err(text);
            let msg = err.to_string();
            assert!(msg.contains(field), "{text}: {msg}");
            assert!(msg.contains(allowed), "{text}: {msg}");
        }
    }

    #[test]
    fn list_keys_are_comma_separated_in_the_environment_and_on_the_command_line() {
        let loaded = load(&Sources {
            env: env(&[("PARALLM__PARALLEL__DEVICES", "0,1")]),
            overrides: vec![("server.api_keys".into(), "one, two".into())],
            ..Sources::default()
        })
        .expect("lists load");
        assert_eq!(loaded.raw.parallel.devices, vec![0, 1]);
        assert_eq!(loaded.raw.server.api_keys, vec!["one", "two"]);
        // A whole number written as a float is that number.
        let loaded = load(&Sources {
            overrides: vec![("parallel.tp".into(), 1.0.into())],
            ..Sources::default()
        })
        .expect("1.0 is 1");
        assert_eq!(loaded.raw.parallel.tp, 1);
        let err = load(&Sources {
            env: env(&[("PARALLM__SERVER__PORT", "8000.5")]),
            ..Sources::default()
        })
        .expect_err("a fraction");
        assert!(err.to_string().contains("PARALLM__SERVER__PORT"), "{err}");
        // The command line gives text, read as the key's type; what does
        // not read is named with its layer as a file's value is.
        for (key, value, says) in [
            (
                "parallel.tp",
                "1.5",
                "is '1.5' (command line), must be a whole number",
            ),
            (
                "server.port",
                "70000",
                "(command line), must be a whole number from 0 to 65535",
            ),
            (
                "scheduler.prefix_caching",
                "maybe",
                "(command line), must be true or false",
            ),
            ("scheduler.kv_memory_mib", "-3", "a whole number, 0 or more"),
        ] {
            let err = load(&Sources {
                overrides: vec![(key.into(), value.into())],
                ..Sources::default()
            })
            .expect_err(value)
            .to_string();
            assert!(err.contains(key) && err.contains(says), "{err}");
        }
        let loaded = load(&Sources {
            env: env(&[("PARALLM__SCHEDULER__CACHE_AWARE_ROUTING", "0")]),
            overrides: vec![
                ("scheduler.prefix_caching".into(), "off".into()),
                ("faults.node".into(), "-1".into()),
                ("server.port".into(), "9000".into()),
            ],
            ..Sources::default()
        })
        .expect("typed text loads");
        assert!(!loaded.raw.scheduler.prefix_caching);
        assert!(!loaded.raw.scheduler.cache_aware_routing);
        assert_eq!(loaded.raw.server.port, 9000);
    }

    #[test]
    fn models_entries_are_checked_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = write(&dir, "enc.gguf", "not read here");
        let path = model.display().to_string();
        let load_file = |text: &str| {
            let file = write(&dir, "m.toml", text);
            load(&Sources {
                file: Some(file),
                ..Sources::default()
            })
        };
        let ok = load_file(&format!(
            "[[models]]\nname = \"e\"\npath = \"{path}\"\ntp = 2\npooling = \"cls\"\n"
        ))
        .expect("valid");
        let m = &ok.settings.embed_models[0];
        assert_eq!((m.name.as_str(), m.config.tp), ("e", 2));
        assert_eq!(m.config.pooling, Some(framework::encoder::Pooling::Cls));
        assert!(show(&ok).contains("[[models]]"));
        let tools = load_file("[model]\ntool_format = \"mistral\"\n").expect("valid");
        assert_eq!(
            tools.settings.engine.tool_format,
            Some(framework::tools::ToolFormat::Mistral)
        );
        let think = load_file("[model]\nreasoning_format = \"none\"\n").expect("valid");
        assert_eq!(
            think.settings.engine.reasoning_format,
            Some(framework::reasoning::ReasoningFormat::None)
        );
        let err = load_file("[model]\nreasoning_format = \"r1\"\n")
            .expect_err("unknown format")
            .to_string();
        assert!(
            err.contains("model.reasoning_format") && err.contains("'r1'"),
            "{err}"
        );
        let err = load_file("[model]\ntool_format = \"xml\"\n")
            .expect_err("bad format")
            .to_string();
        assert!(err.contains("model.tool_format"), "{err}");
        let kwargs = load_file("[model]\nchat_template_kwargs = '{\"enable_thinking\": false}'\n")
            .expect("valid");
        assert_eq!(
            serde_json::Value::Object(kwargs.settings.engine.chat_template_kwargs),
            serde_json::json!({"enable_thinking": false})
        );
        let template = write(
            &dir,
            "t.jinja",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        );
        let own = load_file(&format!(
            "[model]\nchat_template_file = \"{}\"\n",
            template.display()
        ))
        .expect("valid");
        assert_eq!(
            own.settings.engine.chat_template.as_deref(),
            Some("{% for m in messages %}{{ m.content }}{% endfor %}")
        );
        let broken = write(&dir, "b.jinja", "{% for m in messages %}");
        for path in [broken.display().to_string(), "/nope.jinja".into()] {
            let err = load_file(&format!("[model]\nchat_template_file = \"{path}\"\n"))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("model.chat_template_file") && err.contains(&path),
                "{err}"
            );
        }
        let err = load_file("[model.chat_template_kwargs]\nenable_thinking = false\n")
            .expect_err("a table")
            .to_string();
        assert!(
            err.contains("model.chat_template_kwargs") && err.contains("JSON object in a string"),
            "{err}"
        );
        for (text, why) in [
            ("[1]", "must be a JSON object"),
            ("{enable_thinking: false}", "is not JSON"),
            ("{\"messages\": []}", "may not hold `messages`"),
        ] {
            let err = load_file(&format!("[model]\nchat_template_kwargs = '{text}'\n"))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("model.chat_template_kwargs") && err.contains(why),
                "{err}"
            );
        }
        for (text, field) in [
            (format!("[[models]]\npath = \"{path}\"\n"), "models[0].name"),
            ("[[models]]\nname = \"e\"\npath = \"/nope\"\n".to_string(), "models[0].path"),
            (format!("[[models]]\nname = \"e\"\npath = \"{path}\"\ntask = \"generate\"\n"), "models[0].task"),
            (format!("[[models]]\nname = \"e\"\npath = \"{path}\"\npooling = \"max\"\n"), "models[0].pooling"),
            (format!("[[models]]\nname = \"e\"\npath = \"{path}\"\n\n[[models]]\nname = \"e\"\npath = \"{path}\"\n"), "models[1].name"),
        ] {
            let err = load_file(&text).expect_err(&text).to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
        let err = load_file(&format!(
            "[[models]]\nname = \"e\"\npath = \"{path}\"\npoolling = \"cls\"\n"
        ))
        .expect_err("unknown entry key")
        .to_string();
        assert!(err.contains("poolling"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_bind_to_loopback() {
        let loaded = load(&Sources::default()).expect("defaults");
        assert!(loaded.settings.addr.ip().is_loopback());
        assert!(loaded.provenance.values().all(|o| *o == Origin::Default));
    }
    #[test]
    fn docs_list_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let text = std::fs::read_to_string(&path).expect("docs/configuration.md");
        let mut documented = BTreeMap::new();
        for line in text.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 4 || !cells[1].starts_with('`') {
                continue;
            }
            let key = cells[1].trim_matches('`').to_string();
            let default = cells[2].trim_matches('`').to_string();
            assert!(
                documented.insert(key.clone(), default).is_none(),
                "{key} twice"
            );
        }
        let code: BTreeMap<String, String> = default_keys()
            .into_iter()
            .map(|(k, v)| (k, toml_value(&v)))
            .collect();
        assert_eq!(
            documented, code,
            "docs/configuration.md and RawConfig disagree"
        );
    }

    #[test]
    fn the_example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/configs") {
            let path = entry.expect("entry").path();
            let loaded = load(&Sources {
                file: Some(path.clone()),
                ..Sources::default()
            });
            assert!(loaded.is_ok(), "{}: {:?}", path.display(), loaded.err());
            n += 1;
        }
        assert!(n >= 5, "expected the five example configs, found {n}");
    }
}
