//! The embedding engine: a second instance of the kit, for encoder models
//! (BERT) and, pooled from their last hidden rows, decoder models.
//!
//! A request (one or more inputs, each already token ids) is a task; the
//! queue holds it, [`EmbedPolicy`] cuts it into parts of whole inputs no
//! larger than the step's token budget and packs parts of several requests
//! into one step (batched by tokens, first come first served); every node of
//! the replica — one per tensor-parallel rank of the model — runs the
//! step's batch on its shard ([`EncoderShard`], or a decoder's
//! [`LlamaShard`] whose final-normed hidden rows are pooled, last token by
//! default, as vLLM's pooling runner does) with the step's collective; rank 0's
//! pooled vectors go to [`EmbedMerger`], which fills each request's answer
//! and hands it over when its last part is in. Steps are one-shot: nodes
//! keep no state between them, so a failed step is run again on restarted
//! nodes (up to the retry limit).
//!
//! **Invariant:** every accepted request ends exactly once, through the
//! merger: with all its vectors in input order, or with how it ended
//! (cancelled when its [`EmbedPending`] is dropped, or failed).

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use framework::collective::{Collective, SingleCollective, ThreadCollective};
use framework::encoder::{EncoderConfig, EncoderShard, EncoderTokenizer, Pooling};
use framework::metrics as m;
use framework::{Error, GgufFile, LlamaShard, ModelConfig, ShardSpec, Tokenizer, WeightFormat};
use kit::{
    Canceller, End, Merge, NodeError, NodeId, NodeTask, NodeWorker, Pipeline, PipelineConfig, Plan,
    Policy, StepId, Supervision, Task, TaskId, WorkerFactory,
};

use crate::llm::EngineError;

/// What an embedding engine is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedConfig {
    /// The model: a BERT encoder (a GGUF file with `general.architecture =
    /// bert`, or a Hugging Face `BertModel` directory), or any generation
    /// model the engine runs (its hidden rows pooled).
    pub model: PathBuf,
    /// Weight format of the matmuls.
    pub weights: WeightFormat,
    /// Tensor-parallel ranks (nodes per replica).
    pub tp: usize,
    /// Data-parallel replicas.
    pub dp: usize,
    /// Requests the queue holds before answering `Overloaded`.
    pub queue_capacity: usize,
    /// Tokens per step, per replica (a longer input runs alone).
    pub max_batch_tokens: usize,
    /// Compute threads of each node's pool (0: the machine's compute
    /// threads divided among all nodes, at least 1 each).
    pub threads_per_node: usize,
    /// Failed steps a request survives before it ends with an error.
    pub max_retries: u32,
    /// Pooling instead of the model's own.
    pub pooling: Option<Pooling>,
    /// L2 normalization instead of the model's own choice.
    pub normalize: Option<bool>,
    /// The model's `model` label on the embedding metrics (the id a server
    /// serves it under); empty: the model file's name.
    pub name: String,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            weights: WeightFormat::Native,
            tp: 1,
            dp: 1,
            queue_capacity: 1024,
            max_batch_tokens: 1024,
            threads_per_node: 0,
            max_retries: 3,
            pooling: None,
            normalize: None,
            name: String::new(),
        }
    }
}

impl EmbedConfig {
    /// The `model` label of this model's metrics: its name, or its file's.
    pub fn metrics_label(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        self.model.file_name().map_or_else(
            || self.model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// One request's inputs, shared by the policy, the nodes and the merger.
type Inputs = Arc<Vec<Vec<u32>>>;

/// The scheduling part of a request.
pub struct EmbedTask {
    id: TaskId,
    inputs: Inputs,
    gone: Arc<AtomicBool>,
}

impl Task for EmbedTask {
    fn id(&self) -> TaskId {
        self.id
    }
    fn abandoned(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }
    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.gone.clone())
    }
}

/// Whole inputs `range` of request `task`.
#[derive(Debug, Clone)]
pub struct Part {
    /// The request.
    pub task: TaskId,
    /// Its inputs.
    pub inputs: Inputs,
    /// Which of them.
    pub range: Range<usize>,
}

impl Part {
    fn tokens(&self) -> usize {
        self.inputs[self.range.clone()].iter().map(Vec::len).sum()
    }
}

/// One step: the parts it embeds, in order.
#[derive(Debug)]
pub struct EmbedBatch {
    /// The parts.
    pub parts: Vec<Part>,
}

impl EmbedBatch {
    /// Every sequence of the step, in order.
    pub fn sequences(&self) -> Vec<&[u32]> {
        self.parts
            .iter()
            .flat_map(|p| p.inputs[p.range.clone()].iter().map(Vec::as_slice))
            .collect()
    }
}

/// The policy's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbedStats {
    /// Requests held (waiting or running).
    pub requests: usize,
    /// Parts waiting for a step.
    pub waiting_parts: usize,
    /// Steps run.
    pub steps: u64,
    /// Sequences embedded.
    pub sequences: u64,
}

/// One replica's parts: waiting, and the one step in flight.
#[derive(Default)]
struct Replica {
    waiting: VecDeque<Part>,
    in_flight: Option<(StepId, Arc<EmbedBatch>)>,
}

/// Batching by tokens: a replica's step takes waiting parts, oldest first,
/// while their tokens fit the budget (at least one part).
pub struct EmbedPolicy {
    replicas: Vec<Replica>,
    tp: usize,
    max_batch_tokens: usize,
    max_held: usize,
    stats: EmbedStats,
}

impl EmbedPolicy {
    /// A policy for `dp` replicas of `tp` nodes.
    pub fn new(dp: usize, tp: usize, max_batch_tokens: usize) -> Self {
        Self {
            replicas: (0..dp).map(|_| Replica::default()).collect(),
            tp,
            max_batch_tokens: max_batch_tokens.max(1),
            max_held: 4096,
            stats: EmbedStats::default(),
        }
    }

    fn held(&self) -> std::collections::HashSet<TaskId> {
        self.replicas
            .iter()
            .flat_map(|r| {
                r.waiting
                    .iter()
                    .chain(r.in_flight.iter().flat_map(|(_, b)| b.parts.iter()))
                    .map(|p| p.task)
            })
            .collect()
    }

    /// Cuts a request into parts of whole inputs within the budget.
    fn parts(&self, task: TaskId, inputs: &Inputs) -> Vec<Part> {
        let mut parts = Vec::new();
        let (mut start, mut tokens) = (0, 0);
        for (i, input) in inputs.iter().enumerate() {
            if i > start && tokens + input.len() > self.max_batch_tokens {
                parts.push(Part {
                    task,
                    inputs: inputs.clone(),
                    range: start..i,
                });
                (start, tokens) = (i, 0);
            }
            tokens += input.len();
        }
        if start < inputs.len() {
            parts.push(Part {
                task,
                inputs: inputs.clone(),
                range: start..inputs.len(),
            });
        }
        parts
    }
}

/// One node's link to its peers for a step: its rank's collective.
pub type EmbedLinks = Arc<dyn Collective>;

impl Policy for EmbedPolicy {
    type Task = EmbedTask;
    type Work = Arc<EmbedBatch>;
    type Links = EmbedLinks;
    type Step = Arc<EmbedBatch>;
    type Verdict = ();
    type Stats = EmbedStats;

    fn replicas(&self) -> usize {
        self.replicas.len()
    }
    fn room(&self) -> usize {
        self.max_held.saturating_sub(self.held().len())
    }
    fn load(&self, replica: usize) -> usize {
        let r = &self.replicas[replica];
        r.waiting.iter().map(Part::tokens).sum::<usize>()
            + r.in_flight
                .as_ref()
                .map_or(0, |(_, b)| b.parts.iter().map(Part::tokens).sum())
    }
    fn admit(&mut self, replica: usize, task: EmbedTask) {
        let parts = self.parts(task.id, &task.inputs);
        self.replicas[replica].waiting.extend(parts);
    }
    fn next_step(
        &mut self,
        replica: usize,
        step: StepId,
    ) -> Option<Plan<Arc<EmbedBatch>, Arc<EmbedBatch>, EmbedLinks>> {
        let budget = self.max_batch_tokens;
        let r = &mut self.replicas[replica];
        if r.in_flight.is_some() || r.waiting.is_empty() {
            return None;
        }
        let mut parts = Vec::new();
        let mut tokens = 0;
        while let Some(p) = r.waiting.front() {
            let t = p.tokens();
            if !parts.is_empty() && tokens + t > budget {
                break;
            }
            tokens += t;
            parts.extend(r.waiting.pop_front());
        }
        let batch = Arc::new(EmbedBatch { parts });
        r.in_flight = Some((step, batch.clone()));
        self.stats.steps += 1;
        let links: Vec<EmbedLinks> = match self.tp {
            1 => vec![Arc::new(SingleCollective)],
            tp => ThreadCollective::group(tp)
                .into_iter()
                .map(|c| Arc::new(c) as EmbedLinks)
                .collect(),
        };
        Some(Plan {
            step: batch.clone(),
            nodes: links
                .into_iter()
                .enumerate()
                .map(|(node, links)| NodeTask {
                    node,
                    work: batch.clone(),
                    links,
                })
                .collect(),
        })
    }
    fn completed(&mut self, replica: usize, step: StepId, _verdict: ()) {
        let r = &mut self.replicas[replica];
        if let Some((id, batch)) = &r.in_flight {
            if *id == step {
                self.stats.sequences += batch.sequences().len() as u64;
                r.in_flight = None;
            }
        }
    }
    fn failed(&mut self, replica: usize, steps: &[StepId]) -> Vec<TaskId> {
        let r = &mut self.replicas[replica];
        let mut tasks = Vec::new();
        if let Some((id, batch)) = r.in_flight.take() {
            if steps.contains(&id) {
                // Run again first, in their order.
                for p in batch.parts.iter().rev() {
                    r.waiting.push_front(p.clone());
                    if !tasks.contains(&p.task) {
                        tasks.push(p.task);
                    }
                }
            } else {
                r.in_flight = Some((id, batch));
            }
        }
        tasks
    }
    fn cancel(&mut self, task: TaskId) -> bool {
        let held = self.contains(task);
        for r in &mut self.replicas {
            r.waiting.retain(|p| p.task != task);
        }
        held
    }
    fn contains(&self, task: TaskId) -> bool {
        self.replicas.iter().any(|r| {
            r.waiting.iter().any(|p| p.task == task)
                || r.in_flight
                    .as_ref()
                    .is_some_and(|(_, b)| b.parts.iter().any(|p| p.task == task))
        })
    }
    fn drop_task(&mut self, task: TaskId) {
        self.cancel(task);
    }
    fn is_idle(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| r.waiting.is_empty() && r.in_flight.is_none())
    }
    fn stats(&self) -> EmbedStats {
        EmbedStats {
            requests: self.held().len(),
            waiting_parts: self.replicas.iter().map(|r| r.waiting.len()).sum(),
            ..self.stats.clone()
        }
    }
}

/// A node's model: an encoder's shard, or a decoder's and how it pools.
pub enum EmbedShard {
    /// A BERT encoder (pools and normalizes itself).
    Encoder(Box<EncoderShard>),
    /// A generation model's shard, all its layers.
    Decoder {
        /// The shard.
        shard: Box<LlamaShard>,
        /// How its hidden rows are pooled.
        pooling: Pooling,
        /// Whether pooled vectors are L2-normalized.
        normalize: bool,
    },
}

impl EmbedShard {
    /// One vector per sequence.
    fn forward(
        &self,
        seqs: &[&[u32]],
        collective: &dyn Collective,
    ) -> Result<Vec<Vec<f32>>, Error> {
        match self {
            EmbedShard::Encoder(e) => e.forward(seqs, collective),
            EmbedShard::Decoder {
                shard,
                pooling,
                normalize,
            } => {
                let mut out = shard.embed(seqs, *pooling, collective)?;
                if *normalize {
                    out.iter_mut()
                        .for_each(|v| framework::encoder::l2_normalize(v));
                }
                Ok(out)
            }
        }
    }
}

/// One compute node: a tensor-parallel rank of the model and its pool.
pub struct EmbedWorker {
    id: NodeId,
    shard: EmbedShard,
    threads: Arc<framework::threads::Pool>,
    /// The `model` label of its metrics.
    model: Arc<str>,
}

impl NodeWorker for EmbedWorker {
    type Work = Arc<EmbedBatch>;
    type Links = EmbedLinks;
    /// Rank 0's pooled vectors, one per sequence of the step.
    type Output = Option<Vec<Vec<f32>>>;

    fn run(
        &mut self,
        batch: &Arc<EmbedBatch>,
        links: &EmbedLinks,
    ) -> Result<Self::Output, NodeError> {
        let started = Instant::now();
        let seqs = batch.sequences();
        let out = framework::threads::run_in(&self.threads, || self.shard.forward(&seqs, &**links))
            .map_err(|e| match e {
                Error::Collective(m) | Error::Aborted(m) => NodeError::Aborted(m),
                other => NodeError::Failed(other.to_string()),
            })?;
        metrics::histogram!(
            m::EMBED_STEP_DURATION,
            "model" => self.model.to_string(),
            "node" => m::node_label(self.id.replica, self.id.index)
        )
        .record(started.elapsed().as_secs_f64());
        Ok((links.rank() == 0).then_some(out))
    }

    fn abort(links: &EmbedLinks) {
        links.abort();
    }

    fn stateful() -> bool {
        false
    }
}

/// A request's answer: the vectors in input order, or how it ended.
pub type EmbedResult = Result<Vec<Vec<f32>>, End>;

/// The merger's part of a request: where its answer goes, and the vectors
/// so far.
pub struct EmbedRegistration {
    tx: tokio::sync::oneshot::Sender<EmbedResult>,
    vectors: Vec<Option<Vec<f32>>>,
    filled: usize,
    tokens: usize,
}

/// Fills each request's vectors from its parts and answers it when whole.
pub struct EmbedMerger {
    regs: HashMap<TaskId, EmbedRegistration>,
    /// The `model` label of its metrics.
    model: Arc<str>,
}

impl EmbedMerger {
    /// A merger whose metrics carry `model` as their `model` label.
    pub fn new(model: Arc<str>) -> Self {
        Self {
            regs: HashMap::new(),
            model,
        }
    }
}

impl Merge for EmbedMerger {
    type Step = Arc<EmbedBatch>;
    type Output = Option<Vec<Vec<f32>>>;
    type Registration = EmbedRegistration;
    type Verdict = ();

    fn register(&mut self, task: TaskId, reg: EmbedRegistration) {
        self.regs.insert(task, reg);
    }

    fn merge(&mut self, step: &Arc<EmbedBatch>, outputs: Vec<(usize, Self::Output)>) {
        let Some(vectors) = outputs.into_iter().find_map(|(_, o)| o) else {
            for p in &step.parts {
                self.end(
                    p.task,
                    End::Failed("no node returned the step's vectors".into()),
                );
            }
            return;
        };
        let mut vectors = vectors.into_iter();
        for p in &step.parts {
            let Some(reg) = self.regs.get_mut(&p.task) else {
                // Ended meanwhile (cancelled): its vectors are dropped.
                vectors.by_ref().take(p.range.len()).for_each(drop);
                continue;
            };
            for i in p.range.clone() {
                if let Some(v) = vectors.next() {
                    if reg.vectors[i].replace(v).is_none() {
                        reg.filled += 1;
                    }
                }
            }
            if reg.filled == reg.vectors.len() {
                if let Some(reg) = self.regs.remove(&p.task) {
                    let model = self.model.to_string();
                    metrics::counter!(m::EMBED_SEQUENCES, "model" => model.clone())
                        .increment(reg.vectors.len() as u64);
                    metrics::counter!(m::EMBED_TOKENS, "model" => model)
                        .increment(reg.tokens as u64);
                    let all = reg.vectors.into_iter().flatten().collect();
                    let _ = reg.tx.send(Ok(all));
                }
            }
        }
    }

    fn end(&mut self, task: TaskId, end: End) {
        if let Some(reg) = self.regs.remove(&task) {
            let _ = reg.tx.send(Err(end));
        }
    }

    fn end_all(&mut self, end: End) {
        for (_, reg) in self.regs.drain() {
            let _ = reg.tx.send(Err(end.clone()));
        }
    }
}

/// A submitted request's answer, to wait for. Dropping it unanswered
/// cancels the request.
pub struct EmbedPending {
    id: TaskId,
    rx: Option<tokio::sync::oneshot::Receiver<EmbedResult>>,
    gone: Arc<AtomicBool>,
    canceller: Canceller,
    /// Why the embedder stopped for good, once it did ([`Embedder::stop_now`]).
    stopped: Arc<OnceLock<String>>,
}

impl EmbedPending {
    /// The request's id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// Waits for the answer (async).
    /// Dropping the future before it is ready cancels the request.
    pub async fn wait(mut self) -> EmbedResult {
        let out = match self.rx.as_mut() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(End::Failed(self.why_stopped()))),
            None => Err(End::Failed("already answered".into())),
        };
        self.rx = None;
        out
    }

    /// Waits for the answer on this thread (not inside an async runtime).
    pub fn wait_blocking(mut self) -> EmbedResult {
        let Some(rx) = self.rx.take() else {
            return Err(End::Failed("already answered".into()));
        };
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(End::Failed(self.why_stopped())))
    }

    /// Why the embedder ended the request unanswered.
    fn why_stopped(&self) -> String {
        self.stopped
            .get()
            .cloned()
            .unwrap_or_else(|| "the embedding engine stopped".into())
    }
}

impl Drop for EmbedPending {
    fn drop(&mut self) {
        // Still waiting: the requester left before the answer.
        if self.rx.is_some() {
            self.gone.store(true, Ordering::Release);
            self.canceller.cancel(self.id);
        }
    }
}

/// What an embedding model gives and takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedShape {
    /// The width of the vectors.
    pub dimensions: usize,
    /// The most tokens one input may have.
    pub max_tokens: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// How sequences are pooled (after the configuration's override).
    pub pooling: Pooling,
    /// Whether vectors are L2-normalized (after the override).
    pub normalize: bool,
    /// A decoder (a generation model) rather than an encoder.
    pub decoder: bool,
}

/// How an embedding model's inputs become tokens.
enum EmbedTokenizer {
    /// WordPiece, `[CLS]` and `[SEP]` around each input.
    Encoder(Box<EncoderTokenizer>),
    /// The generation model's own, BOS and EOS as it adds them.
    Decoder(Box<Tokenizer>),
}

/// A running embedding engine.
pub struct Embedder {
    pipeline: Pipeline<EmbedPolicy, EmbedRegistration>,
    tokenizer: EmbedTokenizer,
    shape: EmbedShape,
    cfg: EmbedConfig,
    next_id: AtomicU64,
    /// Why it stopped for good, once it did: the error of every request it
    /// then held.
    stopped: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("cfg", &self.cfg).finish()
    }
}

impl Embedder {
    /// Loads the encoder on every node and starts the pipeline.
    ///
    /// # Errors
    /// If a setting is invalid, the model is not an encoder this build runs,
    /// or a node cannot load its shard.
    pub fn start(cfg: EmbedConfig) -> Result<Self, EngineError> {
        for (field, v) in [
            ("tp", cfg.tp),
            ("dp", cfg.dp),
            ("queue_capacity", cfg.queue_capacity),
            ("max_batch_tokens", cfg.max_batch_tokens),
        ] {
            if v == 0 {
                return Err(EngineError::Invalid(Error::Setting {
                    field,
                    reason: "must be at least 1".into(),
                }));
            }
        }
        let file = GgufFile::open(&cfg.model)?;
        let decoder = file.get_str("general.architecture")? != "bert";
        let (shape, tokenizer) = if decoder {
            let model = ModelConfig::from_gguf(&file)?;
            let shape = EmbedShape {
                dimensions: model.hidden,
                max_tokens: model.context,
                vocab: model.vocab,
                pooling: cfg.pooling.unwrap_or(Pooling::Last),
                normalize: cfg.normalize.unwrap_or(true),
                decoder,
            };
            let tok = Tokenizer::from_gguf(&file)?;
            (shape, EmbedTokenizer::Decoder(Box::new(tok)))
        } else {
            let model = EncoderConfig::from_gguf(&file)?;
            let shape = EmbedShape {
                dimensions: model.hidden,
                max_tokens: model.positions,
                vocab: model.vocab,
                pooling: cfg.pooling.unwrap_or(model.pooling),
                normalize: cfg.normalize.unwrap_or(model.normalize),
                decoder,
            };
            let tok = EncoderTokenizer::from_gguf(&file)?;
            let source = file.hf().map_or_else(
                || file.path().to_path_buf(),
                |hf| hf.dir().join("tokenizer.json"),
            );
            tok.check_fits(model.vocab, &source)?;
            (shape, EmbedTokenizer::Encoder(Box::new(tok)))
        };
        drop(file);
        let (tp, dp) = (cfg.tp, cfg.dp);
        let threads = match cfg.threads_per_node {
            0 => (framework::compute_threads() / (tp * dp)).max(1),
            n => n,
        };
        let (path, format) = (cfg.model.clone(), cfg.weights);
        let label: Arc<str> = cfg.metrics_label().into();
        // Its counters are exported from the start, at 0, as the server's
        // unlabelled ones are.
        for counter in [m::EMBED_SEQUENCES, m::EMBED_TOKENS] {
            metrics::counter!(counter, "model" => label.to_string()).increment(0);
        }
        let worker_label = label.clone();
        let factory: WorkerFactory<EmbedWorker> = Arc::new(move |id: NodeId| {
            let spec = ShardSpec::new(id.index, tp).map_err(|e| e.to_string())?;
            let file = GgufFile::open(&path).map_err(|e| e.to_string())?;
            let (pooling, normalize) = (shape.pooling, shape.normalize);
            let shard = if shape.decoder {
                EmbedShard::Decoder {
                    shard: Box::new(
                        LlamaShard::load(&file, spec, format).map_err(|e| e.to_string())?,
                    ),
                    pooling,
                    normalize,
                }
            } else {
                let mut shard =
                    EncoderShard::load(&file, spec, format).map_err(|e| e.to_string())?;
                shard.set_pooling(pooling, normalize);
                EmbedShard::Encoder(Box::new(shard))
            };
            let threads = framework::threads::node_pool(
                &format!("e{}n{}", id.replica, id.index),
                threads,
                id.replica * tp + id.index,
                tp * dp,
            )
            .map_err(|e| e.to_string())?;
            Ok(EmbedWorker {
                id,
                shard,
                threads,
                model: worker_label.clone(),
            })
        });
        let mut pipeline = Pipeline::start(
            EmbedPolicy::new(dp, tp, cfg.max_batch_tokens),
            EmbedMerger::new(label.clone()),
            factory,
            PipelineConfig {
                queue_capacity: cfg.queue_capacity,
                replicas: dp,
                nodes_per_replica: tp,
                max_steps_in_flight: 1,
                supervision: Supervision {
                    max_retries: cfg.max_retries,
                    ..Supervision::default()
                },
                metrics: kit::KitMetrics::default(),
            },
        )
        .map_err(EngineError::Start)?;
        pipeline.set_drop_reason(
            "the embedding engine stopped before the request finished (it was dropped)",
        );
        Ok(Self {
            pipeline,
            tokenizer,
            shape,
            cfg,
            next_id: AtomicU64::new(1),
            stopped: Arc::new(OnceLock::new()),
        })
    }

    /// What the model gives and takes (pooling and normalization after the
    /// configuration's overrides).
    pub fn shape(&self) -> &EmbedShape {
        &self.shape
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EmbedConfig {
        &self.cfg
    }

    /// The width of the vectors.
    pub fn dimensions(&self) -> usize {
        self.shape.dimensions
    }

    /// The most tokens one input may have (special tokens included).
    pub fn max_tokens(&self) -> usize {
        self.shape.max_tokens
    }

    /// Token ids of `text`, with the special tokens the model adds (an
    /// encoder's `[CLS]` and `[SEP]`; a decoder's BOS and EOS as its
    /// tokenizer says).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, Error> {
        match &self.tokenizer {
            EmbedTokenizer::Encoder(t) => t.encode(text),
            EmbedTokenizer::Decoder(t) => t.encode(text),
        }
    }

    /// Submits one request of `inputs` (token ids each).
    ///
    /// # Errors
    /// [`Error::InvalidRequest`] naming `input` when there is no input, an
    /// input is empty or too long, or holds a token outside the vocabulary;
    /// a submission error when the queue is full or stopping.
    pub fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<EmbedPending, EngineError> {
        let invalid = |reason: String| {
            EngineError::Invalid(Error::InvalidRequest {
                field: "input",
                reason,
            })
        };
        if inputs.is_empty() {
            return Err(invalid("is empty".into()));
        }
        for (i, input) in inputs.iter().enumerate() {
            if input.is_empty() {
                return Err(invalid(format!("item {i} is empty")));
            }
            if input.len() > self.max_tokens() {
                return Err(invalid(format!(
                    "item {i} has {} tokens; this model takes at most {}",
                    input.len(),
                    self.max_tokens()
                )));
            }
            if let Some(&t) = input.iter().find(|&&t| t as usize >= self.shape.vocab) {
                return Err(invalid(format!(
                    "item {i} holds token id {t}, outside the vocabulary of {}",
                    self.shape.vocab
                )));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let gone = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tokens = inputs.iter().map(Vec::len).sum();
        let n = inputs.len();
        self.pipeline.submit(
            EmbedTask {
                id,
                inputs: Arc::new(inputs),
                gone: gone.clone(),
            },
            EmbedRegistration {
                tx,
                vectors: vec![None; n],
                filled: 0,
                tokens,
            },
        )?;
        Ok(EmbedPending {
            id,
            rx: Some(rx),
            gone,
            canceller: self.pipeline.canceller(),
            stopped: self.stopped.clone(),
        })
    }

    /// Stops the embedder at once: every request it holds ends with
    /// [`End::Failed`] carrying `why`, and it takes no more (for a server
    /// whose drain ran out of time, so that each client gets an error rather
    /// than a closed connection). A stop already recorded keeps its reason.
    pub fn stop_now(&self, why: impl Into<String>) {
        let _ = self.stopped.set(why.into());
        if let Some(why) = self.stopped.get() {
            self.pipeline.stop_now(why.clone());
        }
    }

    /// The scheduler's figures.
    pub fn stats(&self) -> kit::SchedulerStats<EmbedStats> {
        self.pipeline.stats()
    }

    /// Stops admitting, lets admitted requests finish (up to `timeout`),
    /// then stops every thread; `true` if everything finished in time.
    pub fn shutdown_timeout(self, timeout: Duration) -> bool {
        let why = format!(
            "the embedding engine shut down before the request finished (its shutdown waited {timeout:?})"
        );
        let _ = self.stopped.set(why.clone());
        self.pipeline.shutdown_or_fail(timeout, why)
    }
}
