//! The [`Engine`]: the LLM pipeline behind one handle.
//!
//! [`Engine::builder`] collects an [`EngineConfig`]; `build` validates it
//! against the model (every error names its field), loads one shard per node
//! on the node's own thread, and starts the actors. [`Engine::generate`]
//! validates and tokenizes a [`Request`] before it reaches the queue — only
//! valid requests are ever admitted — and returns its [`EventStream`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use framework::activations::{ActivationStats, InputSums, MatInput};
use framework::batching::BatchConfig;
use framework::chat::ChatTemplate;
use framework::generate::validate_prompt;
use framework::guide::GuideEnv;
use framework::sampling::Sampler;
use framework::speculative::{SpecMethod, Speculation};
use framework::{
    BackendKind, Error, GgufFile, ModelConfig, SamplingParams, ShardSource, ShardSpec, StageGroup,
    Tokenizer, WeightFormat,
};

use kit::{
    KitMetrics, NodeCounters, NodeId, Pipeline, PipelineConfig, SubmitError, Supervision, TaskId,
};

use crate::llm::merge::{Decoding, LlmMerger, Registration};
use crate::llm::policy::{LlmPolicy, ReplicaShape};
use crate::llm::step::SharedSampler;
use crate::llm::task::{EventStream, LlmTask, Prompt, Request, Responder, Traffic};
use crate::llm::worker::{FaultInjection, FaultState, LlmWorker, Shard};
use crate::SchedulerStats;

/// Where the engine's model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file or a Hugging Face model directory.
    Gguf(PathBuf),
    /// A synthetic model (random weights; no tokenizer, so prompts are token ids).
    Synthetic {
        /// Preset name: tiny, tiny32, 135m, 1b or 8b.
        name: String,
        /// Weight seed.
        seed: u64,
    },
}

/// Where the compute nodes run: the CPU, CUDA on listed GPUs, or the CUDA
/// backend on the host emulation (the choice is framework's; the engine only
/// carries it).
pub type Compute = BackendKind;

/// Everything the engine is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The model.
    pub model: ModelSource,
    /// Weight format of the matmuls.
    pub weights: WeightFormat,
    /// Tensor-parallel ranks per pipeline stage.
    pub tp: usize,
    /// Pipeline stages per replica.
    pub pp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Requests the queue holds before answering `Overloaded`.
    pub queue_capacity: usize,
    /// Tokens per step (prefill chunks and decodes together), per replica.
    pub max_batch_tokens: usize,
    /// Requests running at once, per replica.
    pub max_running: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Whether full KV blocks are cached and reused by later requests that
    /// start with the same tokens (automatic prefix caching).
    pub prefix_caching: bool,
    /// A new request goes to the replica (and lane) holding its longest
    /// cached prefix unless that one holds more than this many requests above
    /// the least loaded one.
    pub prefix_route_margin: usize,
    /// Whether new requests are routed to where their prefix is cached
    /// (else always to the least loaded replica and lane).
    pub cache_aware_routing: bool,
    /// KV blocks per replica; `None`: as many as `kv_memory_bytes` holds.
    pub kv_blocks: Option<usize>,
    /// KV memory per replica (all its nodes together) when `kv_blocks` is unset.
    pub kv_memory_bytes: usize,
    /// Failed steps a request survives before it ends with an error.
    pub max_retries: u32,
    /// Micro-batches per step (default: the pipeline depth divided by the
    /// steps in flight, at least 1).
    pub micro_batches: Option<usize>,
    /// Steps a replica may have in flight, each on its own lane of requests
    /// and KV blocks (default: the pipeline depth, so that every stage can
    /// work on a step of its own).
    pub steps_in_flight: Option<usize>,
    /// Compute threads of each node's own pool (0: the machine's compute
    /// threads divided among all nodes, at least 1 each).
    pub threads_per_node: usize,
    /// Make a node fail on purpose (tests).
    pub fault: Option<FaultInjection>,
    /// Make the merge panic on the output of the first step numbered this
    /// or later (tests and rehearsals of a halt: the whole engine stops,
    /// every request it holds ends with an error, and [`Engine::stopped`]
    /// says why).
    pub merge_fault: Option<u64>,
    /// Where the compute nodes run.
    pub compute: Compute,
    /// How requests that do not say otherwise speculate
    /// ([`Request::speculative`]).
    pub speculative: Speculation,
    /// Requests draft tokens only while at most this many run in their
    /// replica's lane (under load, batching uses the compute better).
    pub speculate_max_running: usize,
    /// Positions the model runs with at most; a file that trained a longer
    /// context is capped to it (`None`: the file's context, which must be
    /// within [`framework::config::MAX_CONTEXT`]).
    pub max_model_len: Option<usize>,
    /// Whether every node records the inputs of its blocks' matrices
    /// ([`Engine::activation_stats`]; calibration of `quantize --imatrix`
    /// and Wanda pruning). Needs `prefix_caching` off, since a cached
    /// prefix is not computed again.
    pub collect_activations: bool,
    /// The job's other processes, where the placement puts nodes there
    /// (`None`: every node in this one).
    pub cluster: Option<crate::llm::policy::Cluster>,
    /// The format tool calls are written and read in; `None`: the one the
    /// chat template implies ([`framework::tools::ToolFormat::detect`]).
    pub tool_format: Option<framework::tools::ToolFormat>,
    /// Whether chat answers are read for a `<think>` thought; `None`: as
    /// the chat template implies
    /// ([`framework::reasoning::ReasoningFormat::detect`]).
    pub reasoning_format: Option<framework::reasoning::ReasoningFormat>,
    /// Template variables every chat is rendered with (`enable_thinking`,
    /// …): a request's own of the same name win. None may be one the
    /// renderer sets itself ([`framework::chat::RenderOptions::RESERVED`]).
    pub chat_template_kwargs: framework::chat::TemplateKwargs,
    /// A chat template's source that replaces the model's (`None`: the
    /// model's own).
    pub chat_template: Option<String>,
    /// The draft model of speculative decoding ([`SpecMethod::Draft`]),
    /// run whole by a node of its own in each replica.
    pub draft: Option<DraftModel>,
}

/// A draft model: any model with the target's vocabulary, smaller so that
/// drafting is cheap (a quantized or layer-pruned copy, or a smaller sibling).
#[derive(Debug, Clone, PartialEq)]
pub struct DraftModel {
    /// Its weights.
    pub model: ModelSource,
    /// Weight format of its matmuls.
    pub weights: WeightFormat,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: ModelSource::Synthetic {
                name: "tiny".into(),
                seed: 0,
            },
            weights: WeightFormat::Auto,
            tp: 1,
            pp: 1,
            dp: 1,
            queue_capacity: 1024,
            max_batch_tokens: 512,
            max_running: 64,
            block_size: 16,
            prefix_caching: true,
            prefix_route_margin: crate::llm::policy::DEFAULT_ROUTE_MARGIN,
            cache_aware_routing: true,
            kv_blocks: None,
            kv_memory_bytes: 1 << 30,
            max_retries: 3,
            micro_batches: None,
            steps_in_flight: None,
            threads_per_node: 0,
            fault: None,
            merge_fault: None,
            compute: Compute::default(),
            speculative: Speculation::default(),
            speculate_max_running: DEFAULT_SPECULATE_MAX_RUNNING,
            max_model_len: None,
            collect_activations: false,
            cluster: None,
            tool_format: None,
            reasoning_format: None,
            chat_template_kwargs: framework::chat::TemplateKwargs::new(),
            chat_template: None,
            draft: None,
        }
    }
}

/// Requests running in a lane above which none drafts tokens, unless the
/// configuration says otherwise.
pub const DEFAULT_SPECULATE_MAX_RUNNING: usize = 32;

/// What an engine allocates in host memory, computed in checked arithmetic
/// from the configuration and the model's shape before anything is
/// allocated. The weights and workspaces are estimates (the weights from the
/// file's size or the format's bytes per parameter); the KV cache is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// KV cache of every replica.
    pub kv_bytes: u64,
    /// Weights of every replica, about.
    pub weight_bytes: u64,
    /// Activation workspaces and rotary tables of every node, about.
    pub workspace_bytes: u64,
    /// Data-parallel replicas (each holds its own weights and KV).
    pub replicas: usize,
    /// Whether the KV cache and weights live on GPUs rather than here.
    pub on_gpu: bool,
}

impl MemoryPlan {
    /// This plan and `other` (a draft model's) together.
    pub fn plus(&self, other: &MemoryPlan) -> MemoryPlan {
        MemoryPlan {
            kv_bytes: self.kv_bytes.saturating_add(other.kv_bytes),
            weight_bytes: self.weight_bytes.saturating_add(other.weight_bytes),
            workspace_bytes: self.workspace_bytes.saturating_add(other.workspace_bytes),
            ..*self
        }
    }

    /// Everything together.
    pub fn total(&self) -> u64 {
        self.kv_bytes
            .saturating_add(self.weight_bytes)
            .saturating_add(self.workspace_bytes)
    }

    /// What the host must hold: everything when the nodes run on the CPU;
    /// nothing is counted when they run on GPUs, whose memory this plan
    /// does not check.
    pub fn host_bytes(&self) -> u64 {
        if self.on_gpu {
            0
        } else {
            self.total()
        }
    }

    /// Refuses a plan the host cannot hold, naming both figures.
    pub fn check(&self, machine: Option<u64>) -> Result<(), Error> {
        match machine {
            Some(have) if self.host_bytes() > have => {
                // Name the setting behind the largest part.
                let (field, lower) = if self.workspace_bytes >= self.kv_bytes.max(self.weight_bytes)
                {
                    (
                        "max_batch_tokens",
                        "scheduler.max_batch_tokens, tp·pp or dp",
                    )
                } else {
                    (
                        "kv_memory_bytes",
                        "scheduler.kv_memory_mib / kv_blocks or dp",
                    )
                };
                Err(bad_config(
                    field,
                    format!(
                        "the engine would allocate {self}, more than this machine's {} of memory (lower {lower})",
                        framework::human_bytes(have)
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use framework::human_bytes as h;
        write!(
            f,
            "{} in all: KV cache {} ({} replica(s)), weights about {}, workspaces about {}{}",
            h(self.total()),
            h(self.kv_bytes),
            self.replicas,
            h(self.weight_bytes),
            h(self.workspace_bytes),
            if self.on_gpu { ", on the GPUs" } else { "" }
        )
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidRequest {
        field,
        reason: reason.into(),
    }
}

fn bad_config(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Setting {
        field,
        reason: reason.into(),
    }
}

impl EngineConfig {
    /// Checks the configuration against the model's shape; errors name the field.
    pub fn validate(&self, model: &ModelConfig) -> Result<(), Error> {
        for (field, v) in [
            ("tp", self.tp),
            ("pp", self.pp),
            ("dp", self.dp),
            ("queue_capacity", self.queue_capacity),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_running", self.max_running),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(bad_config(field, "must be at least 1"));
            }
        }
        if self.tp > model.n_kv_heads {
            return Err(bad_config(
                "tp",
                format!(
                    "{} exceeds the model's {} KV heads (each rank needs a whole KV group)",
                    self.tp, model.n_kv_heads
                ),
            ));
        }
        if self.pp > model.n_layers {
            return Err(bad_config(
                "pp",
                format!("{} exceeds the model's {} layers", self.pp, model.n_layers),
            ));
        }
        if self.micro_batches == Some(0) {
            return Err(bad_config("micro_batches", "must be at least 1"));
        }
        if self.steps_in_flight == Some(0) {
            return Err(bad_config("steps_in_flight", "must be at least 1"));
        }
        self.check_max_model_len()?;
        if self.kv_blocks.is_none() && self.kv_blocks(model) == 0 {
            // The memory holds not one block of this size.
            let elem = self.compute.kv_elem_bytes();
            let block =
                model.n_layers * 2 * model.n_kv_heads * model.head_dim * elem * self.block_size;
            const MIB: f64 = 1024.0 * 1024.0;
            return Err(bad_config(
                "kv_memory_bytes",
                format!(
                    "holds no KV block: one of {} positions (block_size) takes {:.1} MiB for this model, more than the {:.1} MiB given; raise it or lower block_size",
                    self.block_size,
                    block as f64 / MIB,
                    self.kv_memory_bytes as f64 / MIB
                ),
            ));
        }
        if self.kv_blocks(model) < self.lanes() {
            return Err(bad_config(
                "kv_blocks",
                format!(
                    "{} KV blocks cannot be shared by {} steps in flight",
                    self.kv_blocks(model),
                    self.lanes()
                ),
            ));
        }
        if self.kv_blocks(model) == 0 {
            return Err(bad_config(
                "kv_blocks",
                "the KV cache holds no block (raise kv_blocks or kv_memory_bytes)",
            ));
        }
        self.compute.validate()?;
        if self.collect_activations && self.prefix_caching {
            return Err(bad_config(
                "prefix_caching",
                "must be off while activations are collected (a cached prefix is not computed again, so its rows would be missed)",
            ));
        }
        if self.speculative.enabled() {
            self.speculative.validate().map_err(|e| match e {
                Error::InvalidRequest { field, reason } => bad_config(field, reason),
                other => other,
            })?;
        }
        if self.speculative.method == SpecMethod::Draft && self.draft.is_none() {
            return Err(bad_config(
                "speculative.method",
                "is \"draft\", but no draft model is given (--draft-model or speculative.draft_model)",
            ));
        }
        let nodes = self.shape().nodes();
        if let Some(f) = &self.fault {
            if f.replica >= self.dp || f.node >= nodes {
                return Err(bad_config(
                    "fault",
                    format!(
                        "replica {} node {} does not exist ({} replicas of {nodes} nodes)",
                        f.replica, f.node, self.dp,
                    ),
                ));
            }
        }
        Ok(())
    }

    fn check_max_model_len(&self) -> Result<(), Error> {
        match self.max_model_len {
            Some(n) if n == 0 || n > framework::config::MAX_CONTEXT => Err(bad_config(
                "max_model_len",
                format!("is {n}, must be in [1, {}]", framework::config::MAX_CONTEXT),
            )),
            _ => Ok(()),
        }
    }

    /// How a chat is rendered unless its request says otherwise: the
    /// assistant's turn opened, with [`EngineConfig::chat_template_kwargs`].
    pub fn chat_render(&self) -> framework::chat::RenderOptions {
        framework::chat::RenderOptions {
            kwargs: self.chat_template_kwargs.clone(),
            ..Default::default()
        }
    }

    /// Refuses [`EngineConfig::chat_template_kwargs`] naming a variable
    /// the renderer sets itself.
    fn check_chat_template_kwargs(&self) -> Result<(), Error> {
        self.chat_render().check().map_err(|e| match e {
            framework::Error::InvalidRequest { reason, .. } => {
                bad_config("chat_template_kwargs", reason)
            }
            other => other,
        })
    }

    /// [`EngineConfig::memory_plan`] with, when the configuration has a
    /// [`EngineConfig::draft`], the draft model's node beside each replica:
    /// `draft` is its shape and its file's size.
    pub fn memory_plan_with_draft(
        &self,
        model: &ModelConfig,
        file_bytes: u64,
        draft: Option<&(ModelConfig, u64)>,
    ) -> Result<MemoryPlan, Error> {
        let plan = self.memory_plan(model, file_bytes)?;
        match (draft, &self.draft) {
            (Some((draft, bytes)), Some(d)) => {
                let draft_cfg = EngineConfig {
                    weights: d.weights,
                    tp: 1,
                    pp: 1,
                    kv_blocks: Some(self.kv_blocks(model)),
                    ..self.clone()
                };
                Ok(plan.plus(&draft_cfg.memory_plan(draft, *bytes)?))
            }
            _ => Ok(plan),
        }
    }

    /// What the engine would allocate for `model`, whose file holds
    /// `file_bytes` (0 for synthetic weights). Errors when a figure does not
    /// fit in 64 bits.
    pub fn memory_plan(&self, model: &ModelConfig, file_bytes: u64) -> Result<MemoryPlan, Error> {
        let overflow = |what: &str| {
            bad_config(
                "kv_memory_bytes",
                format!("the {what} this configuration asks for does not fit in 64 bits"),
            )
        };
        let mul = |a: u64, b: u64, what: &str| a.checked_mul(b).ok_or_else(|| overflow(what));
        let u = |v: usize| v as u64;
        let elem = u(self.compute.kv_elem_bytes());
        let per_position = [
            u(model.n_layers),
            2,
            u(model.n_kv_heads),
            u(model.head_dim),
            elem,
        ]
        .into_iter()
        .try_fold(1u64, |a, b| mul(a, b, "KV cache"))?;
        let per_replica = match self.kv_blocks {
            Some(blocks) => mul(
                mul(u(blocks), u(self.block_size), "KV cache")?,
                per_position,
                "KV cache",
            )?,
            None => {
                let blocks = u(self.kv_memory_bytes)
                    / mul(per_position, u(self.block_size), "KV cache")?.max(1);
                blocks * u(self.block_size) * per_position
            }
        };
        let replicas = u(self.dp);
        let kv_bytes = mul(per_replica, replicas, "KV cache")?;
        let params = u(model.parameter_count());
        let weights = match (self.weights, file_bytes) {
            (WeightFormat::F32, _) => mul(params, 4, "weights")?,
            (WeightFormat::F16 | WeightFormat::Bf16, _) => mul(params, 2, "weights")?,
            (WeightFormat::Q8_0, _) => mul(params, 34, "weights")? / 32,
            (_, 0) => mul(params, 34, "weights")? / 32,
            (_, bytes) => bytes,
        };
        let weight_bytes = mul(weights, replicas, "weights")?;
        let tp = u(self.tp);
        let h = u(model.hidden);
        let row = 4 * h
            + (u(model.n_heads) + 2 * u(model.n_kv_heads)) * u(model.head_dim) / tp
            + 2 * u(model.ffn) / tp
            + u(model.vocab) / tp;
        let nodes = u(self.tp * self.pp * self.dp);
        let per_node = mul(u(self.max_batch_tokens), row, "workspace")?
            .checked_mul(4)
            .and_then(|b| b.checked_add(u(model.context) * u(model.head_dim) * 4))
            .ok_or_else(|| overflow("workspace"))?;
        let workspace_bytes = mul(per_node, nodes, "workspace")?;
        Ok(MemoryPlan {
            kv_bytes,
            weight_bytes,
            workspace_bytes,
            replicas: self.dp,
            on_gpu: !matches!(self.compute, Compute::Cpu { .. }),
        })
    }

    /// A replica's nodes: `tp · pp` of the model, and the draft model's.
    pub fn shape(&self) -> ReplicaShape {
        ReplicaShape {
            draft: self.draft.is_some(),
            ..ReplicaShape::new(self.tp, self.pp)
        }
    }

    /// Steps a replica has in flight: `steps_in_flight`, or the pipeline depth.
    pub fn lanes(&self) -> usize {
        self.steps_in_flight.unwrap_or(self.pp).max(1)
    }

    /// Compute threads per node: `threads_per_node`, or an even share of the
    /// machine's compute threads.
    pub fn node_threads(&self) -> usize {
        match self.threads_per_node {
            0 => (framework::compute_threads() / (self.tp * self.pp * self.dp).max(1)).max(1),
            n => n,
        }
    }

    /// KV blocks per replica: `kv_blocks`, or as many as `kv_memory_bytes`
    /// holds at the backend's element size (the CPU's `kv_dtype`, 16 bits on
    /// CUDA).
    pub fn kv_blocks(&self, model: &ModelConfig) -> usize {
        let elem = self.compute.kv_elem_bytes();
        self.kv_blocks.unwrap_or_else(|| {
            let per_position = model.n_layers * 2 * model.n_kv_heads * model.head_dim * elem;
            self.kv_memory_bytes / per_position.saturating_mul(self.block_size).max(1)
        })
    }
}

/// The tensor-parallel groups of the engine's stages, one per replica and
/// stage (in that order).
fn stage_groups(
    compute: &Compute,
    shape: ReplicaShape,
    dp: usize,
) -> Result<Vec<StageGroup>, Error> {
    let mut groups = Vec::with_capacity(dp * shape.pp);
    for replica in 0..dp {
        for stage in 0..shape.pp {
            let nodes: Vec<usize> = (0..shape.tp)
                .map(|rank| replica * shape.nodes() + stage * shape.tp + rank)
                .collect();
            groups.push(compute.stage_group(&nodes)?);
        }
    }
    Ok(groups)
}

/// A model's shape, tokenizer (absent for synthetic weights) and file size
/// (0 for synthetic weights), its context capped to `cap`.
fn load_model(
    source: &ModelSource,
    cap: Option<usize>,
) -> Result<(ModelConfig, Option<Arc<Tokenizer>>, u64), Error> {
    match source {
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let model = ModelConfig::from_gguf_capped(&file, cap)?;
            let tokenizer = Tokenizer::from_gguf(&file)?;
            Ok((model, Some(Arc::new(tokenizer)), file.file_size()))
        }
        ModelSource::Synthetic { name, .. } => {
            let mut model = ModelConfig::synthetic(name)?;
            if let Some(cap) = cap {
                model.context = model.context.min(cap);
            }
            Ok((model, None, 0))
        }
    }
}

/// What tells model `source`'s contents from another's
/// ([`GgufFile::fingerprint`]; a synthetic model's name and seed).
fn fingerprint(source: &ModelSource) -> Result<String, Error> {
    match source {
        ModelSource::Gguf(path) => Ok(GgufFile::open(path)?.fingerprint()?),
        ModelSource::Synthetic { name, seed } => Ok(format!("synthetic {name}, seed {seed}")),
    }
}

/// The settings every rank of `cluster`'s job must agree on, by name: what
/// a node computes with (the model's contents and weight format, the draft
/// model's), the layout and where its nodes run, and what sizes a node's
/// buffers (KV blocks, batch tokens, context). Rank 0 compares every
/// rank's with its own before any node is built.
fn job_settings(
    cfg: &EngineConfig,
    model: &ModelConfig,
    cluster: &crate::llm::policy::Cluster,
) -> Result<crate::llm::remote::Settings, Error> {
    let shape = cfg.shape();
    let placement: Vec<String> = (0..cfg.dp)
        .map(|replica| {
            let ranks: Vec<String> = (0..shape.nodes())
                .map(|index| cluster.rank_of(replica, index).to_string())
                .collect();
            format!("replica {replica} on ranks {}", ranks.join(" "))
        })
        .collect();
    let draft = match &cfg.draft {
        Some(d) => format!("{} as {:?}", fingerprint(&d.model)?, d.weights),
        None => "none".into(),
    };
    Ok(vec![
        ("model".into(), fingerprint(&cfg.model)?),
        ("weight format".into(), format!("{:?}", cfg.weights)),
        ("draft model".into(), draft),
        (
            "layout".into(),
            format!("tp={} pp={} dp={}", cfg.tp, cfg.pp, cfg.dp),
        ),
        ("placement".into(), placement.join(", ")),
        ("block size".into(), cfg.block_size.to_string()),
        ("KV blocks".into(), cfg.kv_blocks(model).to_string()),
        ("batch tokens".into(), cfg.max_batch_tokens.to_string()),
        ("context".into(), model.context.to_string()),
    ])
}

/// A node's view of its model's weights: the open file, or the seed of
/// synthetic ones.
fn open_weights(source: &ModelSource) -> Result<(Option<GgufFile>, u64), String> {
    match source {
        ModelSource::Gguf(path) => Ok((Some(GgufFile::open(path).map_err(|e| e.to_string())?), 0)),
        ModelSource::Synthetic { seed, .. } => Ok((None, *seed)),
    }
}

/// Refuses a draft model whose tokens are not the target's: every id must
/// mean the same token (the drafts are verified as the target's ids).
fn check_draft(
    target: &ModelConfig,
    target_tokens: Option<&Tokenizer>,
    draft: &ModelConfig,
    draft_tokens: Option<&Tokenizer>,
) -> Result<(), Error> {
    let differs = |why: String| {
        bad_config(
            "draft_model",
            format!("its vocabulary differs from the target model's: {why}"),
        )
    };
    if draft.vocab != target.vocab {
        return Err(differs(format!(
            "{} logits per position against {}",
            draft.vocab, target.vocab
        )));
    }
    match (target_tokens, draft_tokens) {
        (Some(t), Some(d)) => match t.vocabulary_difference(d) {
            Some(why) => Err(differs(why)),
            None => Ok(()),
        },
        (None, None) => Ok(()),
        _ => Err(differs(
            "one model has a tokenizer and the other synthetic token ids".into(),
        )),
    }
}

/// Builds an [`Engine`].
#[derive(Debug, Clone, Default)]
pub struct EngineBuilder {
    cfg: EngineConfig,
}

macro_rules! setter {
    ($(#[$doc:meta] $name:ident: $ty:ty),* $(,)?) => {
        $(#[$doc] pub fn $name(mut self, v: $ty) -> Self { self.cfg.$name = v; self })*
    };
}

impl EngineBuilder {
    /// Starts from a whole configuration.
    pub fn config(cfg: EngineConfig) -> Self {
        Self { cfg }
    }

    /// A GGUF model file or a Hugging Face model directory.
    pub fn model_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.model = ModelSource::Gguf(path.into());
        self
    }

    /// A synthetic model.
    pub fn synthetic(mut self, name: impl Into<String>, seed: u64) -> Self {
        self.cfg.model = ModelSource::Synthetic {
            name: name.into(),
            seed,
        };
        self
    }

    /// KV blocks per replica.
    pub fn kv_blocks(mut self, blocks: usize) -> Self {
        self.cfg.kv_blocks = Some(blocks);
        self
    }

    /// A node that fails on purpose.
    pub fn fault(mut self, fault: FaultInjection) -> Self {
        self.cfg.fault = Some(fault);
        self
    }

    /// A merge that panics on the output of step `step` or a later one
    /// ([`EngineConfig::merge_fault`]).
    pub fn merge_fault(mut self, step: u64) -> Self {
        self.cfg.merge_fault = Some(step);
        self
    }

    /// Micro-batches per step.
    pub fn micro_batches(mut self, n: usize) -> Self {
        self.cfg.micro_batches = Some(n);
        self
    }

    /// Positions the model runs with at most (`None`: its own context).
    pub fn max_model_len(mut self, n: Option<usize>) -> Self {
        self.cfg.max_model_len = n;
        self
    }

    /// A chat template's source that replaces the model's
    /// ([`EngineConfig::chat_template`]).
    pub fn chat_template(mut self, source: Option<String>) -> Self {
        self.cfg.chat_template = source;
        self
    }

    /// Whether chat answers are read for a thought
    /// ([`EngineConfig::reasoning_format`]; `None`: as the template implies).
    pub fn reasoning_format(
        mut self,
        format: Option<framework::reasoning::ReasoningFormat>,
    ) -> Self {
        self.cfg.reasoning_format = format;
        self
    }

    /// Template variables every chat is rendered with
    /// ([`EngineConfig::chat_template_kwargs`]).
    pub fn chat_template_kwargs(mut self, kwargs: framework::chat::TemplateKwargs) -> Self {
        self.cfg.chat_template_kwargs = kwargs;
        self
    }

    /// A draft model for speculative decoding ([`SpecMethod::Draft`]), its
    /// weights in `weights`.
    pub fn draft_model(mut self, model: ModelSource, weights: WeightFormat) -> Self {
        self.cfg.draft = Some(DraftModel { model, weights });
        self
    }

    /// A draft model from a GGUF file or Hugging Face directory, in the
    /// weight format [`WeightFormat::Auto`] picks.
    pub fn draft_path(self, path: impl Into<PathBuf>) -> Self {
        self.draft_model(ModelSource::Gguf(path.into()), WeightFormat::Auto)
    }

    /// Nodes in other processes: the transport and the placement of an MPI
    /// job. Rank 0 builds the engine ([`EngineBuilder::build`]); every
    /// other rank serves its nodes ([`EngineBuilder::serve_nodes`]).
    pub fn cluster(mut self, cluster: crate::llm::policy::Cluster) -> Self {
        self.cfg.cluster = Some(cluster);
        self
    }

    /// Steps in flight per replica.
    pub fn steps_in_flight(mut self, n: usize) -> Self {
        self.cfg.steps_in_flight = Some(n);
        self
    }

    setter! {
        /// Weight format.
        weights: WeightFormat,
        /// Tensor-parallel degree.
        tp: usize,
        /// Pipeline-parallel degree.
        pp: usize,
        /// Data-parallel degree.
        dp: usize,
        /// Queue capacity.
        queue_capacity: usize,
        /// Tokens per step.
        max_batch_tokens: usize,
        /// Running requests per replica.
        max_running: usize,
        /// Positions per KV block.
        block_size: usize,
        /// Automatic prefix caching (on by default).
        prefix_caching: bool,
        /// Load margin of cache-aware routing.
        prefix_route_margin: usize,
        /// Cache-aware routing (on by default).
        cache_aware_routing: bool,
        /// KV memory per replica.
        kv_memory_bytes: usize,
        /// Retries per request.
        max_retries: u32,
        /// Where the compute nodes run.
        compute: Compute,
        /// Default speculative decoding of requests.
        speculative: Speculation,
        /// Running requests above which none speculates.
        speculate_max_running: usize,
        /// Record the inputs of every block's matrices.
        collect_activations: bool,
    }

    /// Validates the configuration, loads the model on every node and starts
    /// the pipeline.
    pub fn build(self) -> Result<Engine, EngineError> {
        Engine::start(self.cfg)
    }

    /// On a rank other than 0 of a job with a [`cluster`](Self::cluster):
    /// loads the nodes the placement gives this rank and runs the steps rank
    /// 0 sends them, until rank 0 ends the job.
    pub fn serve_nodes(self) -> Result<(), EngineError> {
        let cluster = self
            .cfg
            .cluster
            .clone()
            .ok_or_else(|| EngineError::Start("serve_nodes needs a cluster".into()))?;
        if cluster.rank() == 0 {
            return Err(EngineError::Start(
                "rank 0 runs the engine (build), not serve_nodes".into(),
            ));
        }
        let prepared = Engine::prepare_nodes(self.cfg);
        let settings = prepared
            .as_ref()
            .map(|p| p.settings.clone())
            .map_err(|e| e.to_string());
        // Rank 0 hears why this rank cannot serve, if it cannot; this
        // rank's own error is the clearer one to return then.
        let agreed = crate::llm::remote::hello(&cluster, settings);
        let parts = prepared?;
        agreed.map_err(EngineError::Start)?;
        crate::llm::remote::serve_nodes(parts.local, parts.cfg.shape(), cluster)
            .map_err(EngineError::Start)
    }
}

/// Counts a refused request of `traffic` in the failure metric (only a
/// request of its own: a further choice's refusal fails its request, whose
/// first choice is counted, and a probe is no user's).
fn count_refusal(traffic: Traffic, e: &EngineError) {
    if traffic != Traffic::Request {
        return;
    }
    metrics::counter!(framework::metrics::REQUEST_FAILURE, "reason" => refusal_reason(e))
        .increment(1);
}

/// The `reason` label of `parallm_request_failure_total` for a request
/// refused with `e` (for [`crate::llm::Choices::refused`]).
pub fn refusal_reason(e: &EngineError) -> &'static str {
    match e {
        EngineError::Submit(SubmitError::Overloaded { .. }) => "overloaded",
        EngineError::Submit(_) => "shutting_down",
        EngineError::Invalid(_) | EngineError::Start(_) => "invalid",
    }
}

/// Why the engine could not start or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration, the model file or the request is invalid.
    #[error(transparent)]
    Invalid(#[from] Error),
    /// The queue refused the request.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// A node could not load its shard, or the actors could not start.
    #[error("the engine could not start: {0}")]
    Start(String),
}

/// The engine's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineStats {
    /// The scheduler's figures (requests, KV blocks, steps, times).
    pub scheduler: SchedulerStats,
    /// Every node's counters.
    pub nodes: Vec<(NodeId, NodeCounters)>,
}

/// What every rank builds alike before rank 0 starts the pipeline.
struct Prepared {
    local: LocalFactory,
    policy: LlmPolicy,
    merger: LlmMerger,
    tokenizer: Option<Arc<Tokenizer>>,
    chat: Option<ChatTemplate>,
    model: ModelConfig,
    batch: BatchConfig,
    lanes: usize,
    cfg: EngineConfig,
    activations: Option<Arc<ActivationStats>>,
    /// What every rank of the job must agree on (empty outside a job).
    settings: crate::llm::remote::Settings,
}

/// Builds this process's worker of a node.
type LocalFactory = Box<dyn Fn(NodeId) -> Result<LlmWorker, String> + Send + Sync>;

/// A running inference engine.
pub struct Engine {
    pipeline: Pipeline<LlmPolicy, Registration>,
    tokenizer: Option<Arc<Tokenizer>>,
    chat: Option<ChatTemplate>,
    model: ModelConfig,
    cfg: EngineConfig,
    kv_positions: usize,
    next_id: AtomicU64,
    activations: Option<Arc<ActivationStats>>,
    /// llguidance's view of the vocabulary, built by the first guided request.
    guides: std::sync::OnceLock<Result<GuideEnv, String>>,
    /// Why the engine stopped for good (a rank of its job was lost, its
    /// pipeline halted, or `stop_now`), once it did.
    stopped: Arc<std::sync::OnceLock<String>>,
    /// Other ranks' nodes, ended after the pipeline.
    _remote: Option<RemoteNodes>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("config", &self.cfg).finish()
    }
}

impl Engine {
    /// A builder with the default configuration, whose model is the tiny
    /// synthetic one (random weights, no tokenizer: token-id prompts only):
    /// name a model file or directory with [`EngineBuilder::model_path`].
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Everything but the pipeline: the model checked, the policy, the
    /// merger, and the factory of this process's workers.
    fn prepare_nodes(cfg: EngineConfig) -> Result<Prepared, EngineError> {
        cfg.check_max_model_len()?;
        cfg.check_chat_template_kwargs()?;
        let (mut model, mut tokenizer, file_bytes) = load_model(&cfg.model, cfg.max_model_len)?;
        if let Some(source) = &cfg.chat_template {
            match tokenizer.as_mut().and_then(Arc::get_mut) {
                Some(t) => t.set_chat_template(source.clone()),
                None => {
                    return Err(bad_config(
                        "chat_template",
                        "is set, but a synthetic model has no tokenizer to render chats with",
                    )
                    .into())
                }
            }
        }
        let draft = match &cfg.draft {
            Some(d) => {
                let (draft, draft_tokenizer, draft_bytes) =
                    load_model(&d.model, cfg.max_model_len)?;
                check_draft(
                    &model,
                    tokenizer.as_deref(),
                    &draft,
                    draft_tokenizer.as_deref(),
                )?;
                // The draft node holds every sequence's keys and values, so
                // no sequence may outgrow the draft's context.
                if draft.context < model.context {
                    tracing::warn!(
                        "the draft model's context of {} tokens caps the target's {}",
                        draft.context,
                        model.context
                    );
                    model.context = draft.context;
                }
                Some((draft, draft_bytes))
            }
            None => None,
        };
        cfg.validate(&model)?;
        // Nothing sized by the configuration is allocated before this.
        let plan = cfg.memory_plan_with_draft(&model, file_bytes, draft.as_ref())?;
        plan.check(framework::machine_memory_bytes())?;
        let chat = match tokenizer.as_deref() {
            Some(t) => match t.chat_template() {
                Some(src) => {
                    let bos = t.bos().and_then(|b| t.token_text(b)).unwrap_or_default();
                    let eos = t.token_text(t.eos()).unwrap_or_default();
                    // The configured template's errors name its setting.
                    Some(ChatTemplate::new(src, &bos, &eos).map_err(|e| {
                        match cfg.chat_template.is_some() {
                            true => bad_config("chat_template", e.to_string()),
                            false => e,
                        }
                    })?)
                }
                None => None,
            },
            None => None,
        };
        let shape = cfg.shape();
        let kv_blocks = cfg.kv_blocks(&model);
        let batch = BatchConfig {
            max_batch_tokens: cfg.max_batch_tokens,
            max_running: cfg.max_running,
            block_size: cfg.block_size,
            kv_blocks,
            micro_batches: cfg.micro_batches.unwrap_or(cfg.pp.div_ceil(cfg.lanes())),
            prefix_caching: cfg.prefix_caching,
            speculate_max_running: cfg.speculate_max_running,
        };
        let lanes = cfg.lanes();
        let policy = LlmPolicy::new(shape, cfg.dp, batch.clone(), lanes)
            .with_route_margin(cfg.prefix_route_margin)
            .with_cache_aware_routing(cfg.cache_aware_routing)
            .with_cluster(cfg.cluster.clone());
        let merger = LlmMerger::new(tokenizer.clone(), model.context).with_fault(cfg.merge_fault);
        let fault = cfg.fault.map(FaultState::new);
        let (source, format) = (cfg.model.clone(), cfg.weights);
        let stages = framework::shard::stage_layers(&model, shape.pp);
        let (block_size, max_batch_tokens) = (cfg.block_size, cfg.max_batch_tokens);
        let threads = cfg.node_threads();
        let slots = cfg.dp * shape.nodes();
        let model_config = model.clone();
        let compute = cfg.compute.clone();
        let groups = stage_groups(&compute, shape, cfg.dp).map_err(EngineError::Invalid)?;
        // The draft node's own group, per replica.
        let draft_groups = match draft {
            Some(_) => (0..cfg.dp)
                .map(|r| compute.stage_group(&[r * shape.nodes() + shape.targets()]))
                .collect::<Result<Vec<_>, _>>()
                .map_err(EngineError::Invalid)?,
            None => Vec::new(),
        };
        let draft_source = cfg.draft.clone().zip(draft.map(|(config, _)| config));
        let activations = cfg
            .collect_activations
            .then(|| Arc::new(ActivationStats::new()));
        let stats = activations.clone();
        let settings = match &cfg.cluster {
            Some(cluster) => job_settings(&cfg, &model, cluster)?,
            None => Vec::new(),
        };
        let local = move |id: NodeId| -> Result<LlmWorker, String> {
            let node = id.replica * shape.nodes() + id.index;
            let pool = || {
                framework::threads::node_pool(
                    &format!("r{}n{}", id.replica, id.index),
                    threads,
                    node,
                    slots,
                )
                .map_err(|e| e.to_string())
            };
            if shape.is_draft(id.index) {
                let (d, config) = draft_source
                    .as_ref()
                    .ok_or("a draft node without a draft model")?;
                let (file, seed) = open_weights(&d.model)?;
                let source = ShardSource {
                    file: file.as_ref(),
                    config: config.clone(),
                    seed,
                    spec: ShardSpec::new(0, 1).map_err(|e| e.to_string())?,
                    layers: 0..config.n_layers,
                    format: d.weights,
                    kv: (block_size, kv_blocks),
                    max_batch_tokens,
                    node,
                };
                let shard = Shard::load(source, &compute, &draft_groups[id.replica])
                    .map_err(|e| format!("the draft model: {e}"))?;
                return Ok(LlmWorker::new(id, shape, shard, pool()?, fault.clone()));
            }
            let (stage, rank) = shape.place(id.index);
            let spec = ShardSpec::new(rank, shape.tp).map_err(|e| e.to_string())?;
            let layers = stages[stage].clone();
            let (file, seed) = open_weights(&source)?;
            let source = ShardSource {
                file: file.as_ref(),
                config: model_config.clone(),
                seed,
                spec,
                layers,
                format,
                kv: (block_size, kv_blocks),
                max_batch_tokens,
                node,
            };
            let group = &groups[id.replica * shape.pp + stage];
            let mut shard = Shard::load(source, &compute, group).map_err(|e| e.to_string())?;
            if let Some(stats) = &stats {
                shard.collect_activations(stats.clone());
            }
            Ok(LlmWorker::new(id, shape, shard, pool()?, fault.clone()))
        };
        Ok(Prepared {
            local: Box::new(local),
            policy,
            merger,
            tokenizer,
            chat,
            model,
            batch,
            lanes,
            cfg,
            activations,
            settings,
        })
    }

    fn start(cfg: EngineConfig) -> Result<Self, EngineError> {
        if cfg.cluster.as_ref().is_some_and(|c| c.rank() != 0) {
            return Err(EngineError::Start(
                "only rank 0 runs the engine; other ranks serve their nodes".into(),
            ));
        }
        let cluster = cfg.cluster.clone();
        let prepared = Self::prepare_nodes(cfg);
        if let Some(cluster) = &cluster {
            // Every rank agrees on the job before any node is built.
            let mine = prepared.as_ref().map(|p| &p.settings);
            let agreed = crate::llm::remote::welcome(cluster, mine.map_err(|e| e.to_string()));
            if prepared.is_ok() {
                agreed.map_err(EngineError::Start)?;
            }
        }
        let Prepared {
            local,
            policy,
            merger,
            tokenizer,
            chat,
            model,
            batch,
            lanes,
            cfg,
            activations,
            settings: _,
        } = prepared?;
        let shape = cfg.shape();
        // Past the greeting, a start that fails ends the other ranks' nodes.
        let end_remote = |e: String| {
            if let Some(cluster) = &cluster {
                crate::llm::remote::shut_down_remote_nodes(cluster, shape, cfg.dp);
            }
            EngineError::Start(e)
        };
        let factory = crate::llm::remote::node_factory(local, shape, cfg.cluster.clone());
        let mut pipeline = Pipeline::start(
            policy,
            merger,
            factory,
            PipelineConfig {
                queue_capacity: cfg.queue_capacity,
                replicas: cfg.dp,
                nodes_per_replica: shape.nodes(),
                // One step per lane; the policy never plans more.
                max_steps_in_flight: lanes,
                supervision: Supervision {
                    max_retries: cfg.max_retries,
                    ..Supervision::default()
                },
                metrics: KitMetrics {
                    queue_waiting: Some(framework::metrics::REQUESTS_WAITING),
                    node_restarts: Some(framework::metrics::NODE_RESTARTS),
                },
            },
        )
        .map_err(end_remote)?;
        pipeline.set_drop_reason("the engine stopped before the request finished (it was dropped)");
        // This rank's nodes are built; requests wait until every other
        // rank's are too (a node that cannot load fails the start, named).
        if let Some(cluster) = &cfg.cluster {
            crate::llm::remote::wait_loaded(cluster, shape, cfg.dp).map_err(end_remote)?;
        }
        let stopped = Arc::new(std::sync::OnceLock::new());
        let remote = match cfg.cluster.clone() {
            Some(cluster) => Some(RemoteNodes::watch(
                cluster,
                shape,
                cfg.dp,
                pipeline.halter(),
                stopped.clone(),
            )?),
            None => None,
        };
        Ok(Self {
            pipeline,
            stopped,
            tokenizer,
            chat,
            model,
            // What one lane holds: a request lives in one lane.
            kv_positions: (batch.kv_blocks / lanes) * batch.block_size,
            cfg,
            next_id: AtomicU64::new(1),
            activations,
            guides: std::sync::OnceLock::new(),
            _remote: remote,
        })
    }

    /// The inputs of every block's matrices recorded so far, by layer and
    /// input, merged over the tensor-parallel ranks and the replicas; `None`
    /// unless the engine was built with `collect_activations`.
    pub fn activation_stats(&self) -> Option<BTreeMap<(usize, MatInput), InputSums>> {
        self.activations.as_ref().map(|a| a.snapshot())
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The model's shape.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model
    }

    /// The tokenizer (absent for synthetic models).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Turns a prompt into token ids.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, Error> {
        self.encode(prompt, None, true)
    }

    /// [`Engine::tokenize`], adding BOS and EOS as the model does only when
    /// `add_special` is set (Hugging Face's `add_special_tokens`).
    pub fn tokenize_with(&self, prompt: &Prompt, add_special: bool) -> Result<Vec<u32>, Error> {
        self.encode(prompt, None, add_special)
    }

    /// Turns a generation's prompt into token ids: like
    /// [`Engine::tokenize`], but a text that cannot fit the context is
    /// refused before it is tokenized in full
    /// ([`Tokenizer::encode_within`]).
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>, Error> {
        self.encode(prompt, Some(self.model.context), true)
    }

    /// A prompt's token ids, the chat rendered with the model's template;
    /// within `limit` tokens when one is given (always with the special
    /// tokens the model adds), else with them only if `add_special`.
    fn encode(
        &self,
        prompt: &Prompt,
        limit: Option<usize>,
        add_special: bool,
    ) -> Result<Vec<u32>, Error> {
        let tok = self
            .tokenizer
            .as_deref()
            .ok_or_else(|| bad("prompt", "a synthetic model takes token ids only"));
        let chat = matches!(prompt, Prompt::Chat(_) | Prompt::ChatTools { .. });
        let text = match prompt {
            Prompt::Tokens(t) => return Ok(t.clone()),
            Prompt::Text(s) => std::borrow::Cow::Borrowed(s.as_str()),
            Prompt::Chat(messages) => {
                let template = self
                    .chat
                    .as_ref()
                    .ok_or_else(|| bad("messages", "the model has no chat template"))?;
                std::borrow::Cow::Owned(template.render_with(messages, &self.cfg.chat_render())?)
            }
            Prompt::ChatTools {
                messages,
                tools,
                render,
            } => {
                let template = self
                    .chat
                    .as_ref()
                    .ok_or_else(|| bad("messages", "the model has no chat template"))?;
                // The configuration's variables, under the request's own.
                let mut render = render.clone();
                for (name, value) in &self.cfg.chat_template_kwargs {
                    render
                        .kwargs
                        .entry(name.clone())
                        .or_insert_with(|| value.clone());
                }
                let render = &render;
                // Mistral's templates take only their own call ids.
                let mistral;
                let messages = match self.tool_format() {
                    framework::tools::ToolFormat::Mistral => {
                        mistral = framework::tools::with_mistral_ids(messages);
                        &mistral
                    }
                    _ => messages,
                };
                let text = if template.mentions_tools() {
                    let offered = (!tools.is_empty()).then_some(tools.as_slice());
                    template.render_turns(messages, offered, render)?
                } else {
                    let folded =
                        framework::tools::fold_into_messages(messages, tools, self.tool_format());
                    match template.render_with(&folded, render) {
                        Ok(text) => text,
                        // A template that takes no system role (Gemma's)
                        // gets the tools in the first user turn.
                        // (Where that fails too, its error is the one
                        // that says what is wrong.)
                        Err(e)
                            if !tools.is_empty()
                                && e.to_string().to_lowercase().contains("system") =>
                        {
                            match framework::tools::system_into_first_user(folded) {
                                Some(m) => template.render_with(&m, render)?,
                                None => return Err(e),
                            }
                        }
                        Err(e) => return Err(e),
                    }
                };
                std::borrow::Cow::Owned(text)
            }
        };
        let tok = tok?;
        let (ids, added) = match limit {
            Some(limit) => (tok.encode_within(&text, limit)?, true),
            None => (tok.encode_with(&text, add_special)?, add_special),
        };
        Ok(match chat {
            true => tok.chat_specials(ids, added),
            false => ids,
        })
    }

    /// The format this model writes tool calls in: the configuration's
    /// ([`EngineConfig::tool_format`]), else read from its chat template
    /// ([`framework::tools::ToolFormat::detect`]; Hermes where the template
    /// says nothing of tools).
    pub fn tool_format(&self) -> framework::tools::ToolFormat {
        self.cfg.tool_format.unwrap_or_else(|| {
            framework::tools::ToolFormat::detect(
                self.tokenizer.as_deref().and_then(|t| t.chat_template()),
            )
        })
    }

    /// Whether this model's chat answers are read for a thought: the
    /// configuration's ([`EngineConfig::reasoning_format`]), else as its
    /// chat template implies
    /// ([`framework::reasoning::ReasoningFormat::detect`]).
    pub fn reasoning_format(&self) -> framework::reasoning::ReasoningFormat {
        self.cfg.reasoning_format.unwrap_or_else(|| {
            framework::reasoning::ReasoningFormat::detect(
                self.tokenizer.as_deref().and_then(|t| t.chat_template()),
            )
        })
    }

    /// Whether prompt `tokens` (a chat's, rendered) leave a thought open
    /// for the model: their last tokens' text ends in `<think>`
    /// ([`framework::reasoning::ReasoningFormat::opened_by`]).
    pub fn prompt_opens_thought(&self, tokens: &[u32]) -> bool {
        let Some(tokenizer) = self.tokenizer.as_deref() else {
            return false;
        };
        let tail = &tokens[tokens.len().saturating_sub(8)..];
        self.reasoning_format().opened_by(&tokenizer.decode(tail))
    }

    /// Validates and submits a request. Returns its events, or at once an
    /// error: invalid request (naming the field), or `Overloaded` when the queue
    /// is full.
    pub fn generate(&self, req: Request) -> Result<EventStream, EngineError> {
        let traffic = req.traffic;
        let count = |e: &EngineError| count_refusal(traffic, e);
        let (task, reg, stream) = self.prepare(req).inspect_err(count)?;
        self.pipeline
            .submit(task, reg)
            .map_err(EngineError::from)
            .inspect_err(count)?;
        Ok(stream)
    }

    /// [`Engine::generate`] for async callers.
    pub async fn generate_async(&self, req: Request) -> Result<EventStream, EngineError> {
        let traffic = req.traffic;
        let count = |e: &EngineError| count_refusal(traffic, e);
        let (task, reg, stream) = self.prepare(req).inspect_err(count)?;
        self.pipeline
            .submit_async(task, reg)
            .await
            .map_err(EngineError::from)
            .inspect_err(count)?;
        Ok(stream)
    }

    /// Validates and tokenizes `req` into its scheduling part, its merger part
    /// and the stream its events will reach.
    fn prepare(
        &self,
        mut req: Request,
    ) -> Result<(LlmTask, Registration, EventStream), EngineError> {
        if let Some(scoring) = req.prompt_logprobs {
            scoring.validate()?;
        }
        if req.prompt_logprobs.is_some() && req.params.max_tokens == 0 {
            // A request that only scores its prompt generates nothing.
            SamplingParams {
                max_tokens: 1,
                ..req.params.clone()
            }
            .validate()?
        } else {
            req.params.validate()?
        }
        if req.prompt_logprobs.is_some() && req.beam.is_some() {
            return Err(bad("prompt_logprobs", "does not combine with beam search").into());
        }
        let vocab = self.model.vocab;
        if let Some((t, _)) = req
            .params
            .logit_bias
            .iter()
            .find(|(t, _)| *t as usize >= vocab)
        {
            return Err(bad(
                "logit_bias",
                format!("token id {t} is outside the vocabulary of {vocab}"),
            )
            .into());
        }
        if req.beam.is_some() && !req.params.logit_bias.is_empty() {
            return Err(bad("logit_bias", "does not apply to beam search").into());
        }
        if req.beam.is_some() && req.params.logprobs.is_some() {
            return Err(bad("logprobs", "does not apply to beam search").into());
        }
        let prompt = self.prompt_tokens(&req.prompt)?;
        let width = match req.beam {
            Some(b) if b.width == 0 => return Err(bad("beam_width", "must be at least 1").into()),
            Some(b) if !b.length_penalty.is_finite() => {
                return Err(bad(
                    "length_penalty",
                    format!("is {}, must be a finite number", b.length_penalty),
                )
                .into())
            }
            Some(b) => b.width,
            None => 1,
        };
        if width > self.cfg.max_batch_tokens {
            // Every beam decodes in the same step.
            return Err(bad(
                "beam_width",
                format!(
                    "is {width}, more than the tokens a step holds (max_batch_tokens = {})",
                    self.cfg.max_batch_tokens
                ),
            )
            .into());
        }
        let block = self.cfg.block_size;
        if req.fit_max_tokens {
            // What the context and a replica's KV cache leave after the
            // prompt, at least 1 (a prompt that leaves nothing is refused
            // below, naming the prompt).
            let kv_room = (self.kv_positions / width / block * block).saturating_sub(prompt.len());
            let room = self.model.context.saturating_sub(prompt.len()).min(kv_room);
            req.params.max_tokens = req.params.max_tokens.min(room).max(1);
        }
        validate_prompt(&prompt, req.params.max_tokens, self.model.context)?;
        if let Some(&bad_id) = prompt.iter().find(|&&t| t as usize >= self.model.vocab) {
            return Err(bad(
                "prompt",
                format!(
                    "token id {bad_id} is outside the vocabulary of {}",
                    self.model.vocab
                ),
            )
            .into());
        }
        let need = (prompt.len() + req.params.max_tokens).div_ceil(block) * block * width;
        if need > self.kv_positions {
            // The prompt alone may be what does not fit, or its beams.
            // (A fitted `max_tokens` of 1 is what the prompt left: the
            // prompt or the beams are at fault, not a field the caller
            // never sent.)
            let one = prompt.len().div_ceil(block) * block;
            let (field, what) = if one > self.kv_positions {
                ("prompt", "is too long")
            } else if width > 1 && (one * width > self.kv_positions || req.fit_max_tokens) {
                ("beam_width", "is too large")
            } else if req.fit_max_tokens {
                ("prompt", "is too long")
            } else {
                ("max_tokens", "is too large")
            };
            let new = match (req.fit_max_tokens, req.params.max_tokens) {
                (true, _) => "at least 1 new token".to_string(),
                (false, 1) => "1 new token".to_string(),
                (false, n) => format!("{n} new tokens"),
            };
            return Err(bad(
                field,
                format!(
                    "{what}: {} prompt token{} plus {new}{} need {need} KV positions; a replica holds {}{}",
                    prompt.len(),
                    if prompt.len() == 1 { "" } else { "s" },
                    if width > 1 { format!(" in each of {width} beams") } else { String::new() },
                    self.kv_positions,
                    match self.cfg.lanes() {
                        1 => String::new(),
                        n => format!(" in each of its {n} lanes (steps_in_flight)"),
                    }
                ),
            )
            .into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let abandoned = Arc::new(AtomicBool::new(false));
        let (responder, stream) = Responder::channel(
            id,
            self.pipeline.canceller(),
            abandoned.clone(),
            self.stopped.clone(),
        );
        let arrived = std::time::Instant::now();
        if let Some(g) = &req.guide {
            if req.beam.is_some() {
                return Err(bad(g.field(), "does not combine with beam search").into());
            }
            if req.speculative.is_some_and(|s| s.enabled()) {
                return Err(bad("speculative", "does not combine with guided decoding").into());
            }
        }
        let speculative = match (req.speculative, req.beam) {
            (Some(s), Some(_)) if s.enabled() => {
                return Err(bad("speculative", "does not combine with beam search").into())
            }
            // The engine's default does not apply to guided requests.
            (None, None) if req.guide.is_some() => Speculation::default(),
            (Some(s), None) => s,
            // The engine's default does not apply to beam searches.
            (_, Some(_)) => Speculation::default(),
            (None, None) => self.cfg.speculative,
        };
        if speculative.enabled() {
            speculative.validate()?;
        }
        if speculative.method == SpecMethod::Draft && self.cfg.draft.is_none() {
            return Err(bad(
                "speculative.method",
                "is \"draft\", but the server runs no draft model (start it with --draft-model or speculative.draft_model)",
            )
            .into());
        }
        let (decoding, sampler) = match req.beam {
            Some(b) => (Decoding::Beam(b), None),
            None => {
                let sampler = Sampler::new(req.params.clone(), &prompt);
                let s = match &req.guide {
                    Some(g) => {
                        let env = self.guide_env()?;
                        let eos = self.tokenizer.as_ref().map_or(0, |t| t.eos());
                        SharedSampler::guided(sampler, env.constraint(g)?, eos)
                    }
                    None => SharedSampler::new(sampler),
                };
                (Decoding::Sample(s.clone()), Some(s))
            }
        };
        let reg = Registration {
            prompt_len: prompt.len(),
            params: req.params,
            decoding,
            responder,
            arrived,
            traffic: req.traffic,
            choices: req.choices,
        };
        let task = LlmTask {
            id,
            priority: req.priority,
            prompt,
            arrived,
            abandoned,
            sampler,
            speculative,
            max_tokens: reg.params.max_tokens,
            scoring: req.prompt_logprobs,
            traffic: req.traffic,
        };
        Ok((task, reg, stream))
    }

    /// llguidance's view of the vocabulary (built once, by the first guided
    /// request).
    fn guide_env(&self) -> Result<&GuideEnv, Error> {
        let env = self.guides.get_or_init(|| match &self.tokenizer {
            Some(t) => GuideEnv::new(t.clone(), self.model.vocab).map_err(|e| e.to_string()),
            None => Err("a synthetic model has no tokenizer to guide".into()),
        });
        env.as_ref().map_err(|e| bad("response_format", e.clone()))
    }

    /// Cancels a request wherever it is; its stream ends with `Cancelled`
    /// (unless it already ended).
    pub fn cancel(&self, id: TaskId) {
        self.pipeline.cancel(id);
    }

    /// Why the engine stopped for good, if it did: a rank of its MPI job
    /// died or stopped answering, its own policy or merge panicked (the
    /// pipeline halted: [`kit::Pipeline::fault`]), or [`Engine::stop_now`]
    /// stopped it. Every request it held then ended with an error naming
    /// this, and it takes no more.
    pub fn stopped(&self) -> Option<&str> {
        if self.stopped.get().is_none() {
            if let Some(fault) = self.pipeline.fault() {
                let _ = self.stopped.set(format!("the engine stopped: {fault}"));
            }
        }
        self.stopped.get().map(String::as_str)
    }

    /// Stops the engine at once: every request it holds ends with
    /// [`Event::Failed`](crate::llm::Event::Failed) carrying `why`, and it takes no more (for a server
    /// whose drain ran out of time, so that each client gets an error rather
    /// than a closed connection). A stop already recorded keeps its reason.
    pub fn stop_now(&self, why: impl Into<String>) {
        let _ = self.stopped.set(why.into());
        // Through the merge, so that the metrics count each as failed.
        if let Some(why) = self.stopped.get() {
            self.pipeline.stop_now(why.clone());
        }
    }

    /// Current figures.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            scheduler: self.pipeline.stats(),
            nodes: self.pipeline.node_stats(),
        }
    }

    /// Stops admitting, lets every admitted request finish (waiting up to
    /// an hour), then stops. Dropping an engine instead stops it at once:
    /// every request it holds ends with [`Event::Failed`](crate::llm::Event::Failed).
    pub fn shutdown(self) {
        self.shutdown_timeout(Duration::from_secs(3600));
    }

    /// Like [`Engine::shutdown`], waiting at most `timeout`; returns whether
    /// every request finished. Requests still held then end with
    /// [`Event::Failed`](crate::llm::Event::Failed), saying the engine shut down before they finished.
    pub fn shutdown_timeout(self, timeout: Duration) -> bool {
        if self.stopped.get().is_some() {
            // Stopped already: nothing is left to finish.
            self.pipeline.shutdown(Duration::ZERO);
            return false;
        }
        let why = format!(
            "the engine shut down before the request finished (its shutdown waited {timeout:?})"
        );
        let _ = self.stopped.set(why.clone());
        self.pipeline.shutdown_or_fail(timeout, why)
    }
}

/// The engine's side of the other ranks: while the engine runs, a thread
/// watches the job's transport, and when it fails (a rank died or stopped
/// answering: nothing more can be computed) records why and halts the
/// pipeline, so every request it holds ends at once with that error. When
/// the engine goes, after its pipeline (a field declared after it), the
/// other ranks' node loops are told to end: the steps rank 0 sent come
/// first on each node's address.
struct RemoteNodes {
    cluster: crate::llm::policy::Cluster,
    shape: ReplicaShape,
    dp: usize,
    done: Arc<AtomicBool>,
}

impl RemoteNodes {
    /// How often the watcher looks whether the engine is gone.
    const POLL: Duration = Duration::from_millis(200);

    fn watch(
        cluster: crate::llm::policy::Cluster,
        shape: ReplicaShape,
        dp: usize,
        halter: kit::Halter,
        stopped: Arc<std::sync::OnceLock<String>>,
    ) -> Result<Self, EngineError> {
        let done = Arc::new(AtomicBool::new(false));
        let (transport, quit) = (cluster.transport.clone(), done.clone());
        std::thread::Builder::new()
            .name("parallm-job-watch".into())
            .spawn(move || {
                while !quit.load(Ordering::Acquire) {
                    if let Some(why) = transport.mailbox().wait_failure(Self::POLL) {
                        let why = format!("the MPI job cannot go on: {why}");
                        tracing::error!("{why}");
                        let _ = stopped.set(why.clone());
                        // Through the merge, so that the metrics count
                        // each request it ends as failed.
                        halter.halt(why);
                        return;
                    }
                }
            })
            .map_err(|e| EngineError::Start(format!("cannot start the job watcher: {e}")))?;
        Ok(Self {
            cluster,
            shape,
            dp,
            done,
        })
    }
}

impl Drop for RemoteNodes {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        crate::llm::remote::shut_down_remote_nodes(&self.cluster, self.shape, self.dp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_memory_holds_twice_the_blocks_at_16_bits() {
        let model = ModelConfig::synthetic("135m").unwrap();
        // 30 layers · K and V · 3 kv heads · 64 · 4 bytes · 16 positions.
        let per_block_f32 = 30 * 2 * 3 * 64 * 4 * 16;
        let cpu = EngineConfig {
            kv_memory_bytes: 100 * per_block_f32,
            ..EngineConfig::default()
        };
        assert_eq!(cpu.kv_blocks(&model), 100);
        let cuda = EngineConfig {
            compute: Compute::CudaEmulated {
                options: Default::default(),
            },
            ..cpu.clone()
        };
        assert_eq!(cuda.kv_blocks(&model), 200);
        let fixed = EngineConfig {
            kv_blocks: Some(7),
            ..cuda
        };
        assert_eq!(fixed.kv_blocks(&model), 7);
    }

    #[test]
    fn a_kv_memory_below_one_block_names_both_sizes() {
        let model = ModelConfig::synthetic("135m").unwrap();
        let cfg = EngineConfig {
            block_size: 100_000,
            ..EngineConfig::default()
        };
        let err = cfg.validate(&model).expect_err("refused").to_string();
        assert!(
            err.contains("kv_memory_bytes")
                && err.contains("holds no KV block")
                && err.contains("1024.0 MiB given"),
            "{err}"
        );
    }

    #[test]
    fn an_engine_the_machine_cannot_hold_is_refused_with_both_figures() {
        let model = ModelConfig::synthetic("135m").unwrap();
        let per_block_f32 = 30 * 2 * 3 * 64 * 4 * 16;
        let cfg = EngineConfig {
            kv_blocks: Some(1 << 30),
            ..EngineConfig::default()
        };
        let plan = cfg.memory_plan(&model, 0).unwrap();
        assert_eq!(plan.kv_bytes, (1u64 << 30) * per_block_f32);
        let err = plan.check(Some(64 << 30)).unwrap_err().to_string();
        assert!(err.contains("KV cache 720.0 TiB"), "{err}");
        assert!(err.contains("more than this machine's 64.0 GiB"), "{err}");
        assert!(plan.check(None).is_ok());
        // Figures beyond 64 bits are an error, not a wrap.
        let huge = EngineConfig {
            kv_blocks: Some(usize::MAX / 2),
            dp: 4,
            ..EngineConfig::default()
        };
        let err = huge.memory_plan(&model, 0).unwrap_err().to_string();
        assert!(err.contains("does not fit in 64 bits"), "{err}");
        // Through the builder: refused before anything is allocated.
        let err = EngineBuilder::default()
            .synthetic("135m", 0)
            .kv_blocks(1 << 40)
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than this machine's"), "{err}");
    }
}
