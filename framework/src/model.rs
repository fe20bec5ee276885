//! The forward pass of every supported family ([`crate::family`]), written for
//! one tensor-parallel shard.
//!
//! Follows "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al.
//! 2023): pre-norm blocks of RMSNorm → grouped-query attention with rotary
//! embeddings → residual, RMSNorm → SwiGLU FFN → residual; final RMSNorm and the
//! LM head, with each family's optional parts (q/k/v biases, q/k norms, fused
//! tensors, NeoX rope). Numerics follow llama.cpp's `llm_build_*` (f32
//! softmax; adjacent-pair rope on GGUF's permuted Llama q/k).
//!
//! This module owns what every backend shares before the layers run: where
//! weights come from ([`WeightSource`]), how a shard's matrices are read and
//! cut (`ShardMats`: fused `q|k|v` and `gate|up` column-parallel,
//! row-parallel `o` and `down`, vocab-parallel embedding and LM head), the
//! step's row bookkeeping and checks, and the CPU shard [`LlamaShard`]. The
//! layer loop itself is [`crate::backend::transformer::Transformer`], written
//! once for every backend; a `LlamaShard` is that loop on the CPU backend.
//! With world size 1 the collective is the identity and the shard is the
//! whole model.
//!
//! [`LlamaShard::forward`] runs a *batch*: any number of sequences, each adding
//! any number of tokens (a prefill chunk or one decode token) to its own
//! [`SeqKvCache`]. All rows go through each matmul together; attention is per row
//! over that row's sequence. The caches hold only this shard's KV heads.
//!
//! A shard may also be one pipeline stage: a contiguous layer range, with the
//! embedding only on the first stage and the final norm and LM head only on the
//! last. [`LlamaShard::forward_paged`] runs a stage over a paged [`KvPool`]
//! (block tables from [`crate::kv::KvManager`]), taking token ids or the previous
//! stage's hidden rows and returning hidden rows or logits. Both paths run the
//! same loop on the same backend (two KV stores of it), so paged stages are
//! bit-identical to the contiguous forward.

use std::ops::Range;

use crate::backend::cpu::{CpuBackend, CpuKv, CpuMeta, KvView};
use crate::backend::transformer::{StepItems, Transformer};
use crate::backend::{Backend, PagedKv, Workspace};
use crate::collective::Collective;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::{NormKind, Part, Positions};
use crate::gguf::GgufFile;
use crate::kv::KvPool;
use crate::ops::KvRows;
use crate::sampling::Rng;
use crate::shard::{ShardLayout, ShardSpec};
use crate::weights::{Mat, WeightFormat};

/// Where the weights come from: a GGUF file, or seeded random values.
pub enum WeightSource<'a> {
    /// Tensors read from a GGUF file (llama.cpp tensor names).
    Gguf(&'a GgufFile),
    /// Uniform random values in `±1/√in`, seeded per tensor name.
    Synthetic {
        /// The base seed.
        seed: u64,
    },
}

impl WeightSource<'_> {
    /// Whether the source has tensor `name`. Synthetic weights have every
    /// matrix and norm but the untied head, separate q, k and v, and no biases.
    fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf(f) => f.has_tensor(name),
            WeightSource::Synthetic { .. } => {
                name != "output.weight" && !name.ends_with(".bias") && !name.contains("attn_qkv")
            }
        }
    }

    /// Tensor `name` of `len` values when `part` says the family may have
    /// it and the source does (a required one that is missing is an error
    /// naming it, from the read).
    fn part(&self, part: Part, name: &str, len: usize) -> Result<Option<Vec<f32>>> {
        match part {
            Part::Absent => Ok(None),
            Part::Optional if !self.has(name) => Ok(None),
            Part::Optional | Part::Required => self.vector(name, len).map(Some),
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Mat> {
        match self {
            WeightSource::Gguf(f) => Mat::from_qtensor(&f.tensor(name, &[rows, cols])?),
            WeightSource::Synthetic { seed } => {
                let mut rng = Rng::new(seed ^ fnv1a(name));
                let bound = 1.0 / (cols as f32).sqrt();
                let data = (0..rows * cols)
                    .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                    .collect();
                Ok(Mat::F32 { rows, cols, data })
            }
        }
    }

    /// A norm's weight `{stem}.weight`, and for LayerNorm its bias.
    fn norm(&self, kind: NormKind, stem: &str, len: usize) -> Result<NormMats> {
        let w = self.vector(&format!("{stem}.weight"), len)?;
        Ok(match kind {
            NormKind::Rms => NormMats::Rms(w),
            NormKind::Layer => NormMats::Layer(w, self.vector(&format!("{stem}.bias"), len)?),
        })
    }

    /// An error about the weights read: naming the file where they come from one.
    fn error(&self, reason: String) -> Error {
        match self {
            WeightSource::Gguf(f) => Error::ModelFile {
                path: f.path().to_path_buf(),
                reason,
            },
            WeightSource::Synthetic { .. } => Error::Shard(reason),
        }
    }

    /// The rows of matrix `name` (its first dimension, as GGUF's last).
    fn rows_of(&self, name: &str) -> Result<Option<usize>> {
        match self {
            WeightSource::Gguf(f) if f.has_tensor(name) => {
                Ok(f.tensor_info(name)?.1.first().copied())
            }
            _ => Ok(None),
        }
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        match self {
            WeightSource::Gguf(f) => Ok(f
                .tensor(name, &[len])?
                .dequantize(&candle_core::Device::Cpu)?
                .to_vec1::<f32>()?),
            WeightSource::Synthetic { .. } => Ok(vec![1.0; len]),
        }
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A norm's vectors: RMSNorm's weight, or LayerNorm's weight and bias.
pub(crate) enum NormMats {
    Rms(Vec<f32>),
    Layer(Vec<f32>, Vec<f32>),
}

/// One layer's weights as matrices, cut for one shard (before any backend
/// takes them): fused `q|k|v` and `gate|up` (or `up` alone, ungated),
/// row-parallel `o` and `down`, and the optional parts of the family's block.
pub(crate) struct BlockMats {
    pub(crate) attn_norm: NormMats,
    pub(crate) qkv: Mat,
    /// The `q|k|v` bias of this shard's heads (cut like the rows of `qkv`).
    pub(crate) qkv_bias: Option<Vec<f32>>,
    /// The attention output's bias (whole: added after the all-reduce).
    pub(crate) o_bias: Option<Vec<f32>>,
    /// The bias of this shard's `up` rows (ungated FFN with biases).
    pub(crate) up_bias: Option<Vec<f32>>,
    /// The FFN output's bias (whole).
    pub(crate) down_bias: Option<Vec<f32>>,
    /// The per-head RMSNorm weights of q and k (`head_dim` each, the same
    /// for every head, so not cut).
    pub(crate) qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// The RMSNorm weights of the attention and FFN outputs (Gemma).
    pub(crate) post_norms: Option<(Vec<f32>, Vec<f32>)>,
    pub(crate) o: Mat,
    pub(crate) ffn_norm: NormMats,
    /// `gate|up` rows of this shard (gated FFN) or its `up` rows.
    pub(crate) gate_up: Mat,
    pub(crate) down: Mat,
}

/// A shard's weights as matrices: what both backends build from.
pub(crate) struct ShardMats {
    pub(crate) layout: ShardLayout,
    /// The local vocabulary rows of the embedding (first stage only).
    pub(crate) embed: Option<Mat>,
    /// The learned position embeddings of the context's positions (first
    /// stage of a family that has them), whole on every rank.
    pub(crate) positions: Option<Mat>,
    pub(crate) blocks: Vec<BlockMats>,
    /// Final norm and the local vocabulary rows of the LM head (last stage).
    pub(crate) head: Option<(NormMats, Mat)>,
}

impl ShardMats {
    /// Reads and cuts shard `spec` of the stage running `layers`.
    pub(crate) fn build(
        config: &ModelConfig,
        src: &WeightSource<'_>,
        spec: ShardSpec,
        layers: Range<usize>,
    ) -> Result<Self> {
        if layers.is_empty() || layers.end > config.n_layers {
            return Err(Error::Shard(format!(
                "layer range {layers:?} is empty or outside the model's {} layers",
                config.n_layers
            )));
        }
        let (first, last) = (layers.start == 0, layers.end == config.n_layers);
        let layout = ShardLayout::new(config, spec)?;
        let (h, hd) = (config.hidden, config.head_dim);
        let family = config.family();
        let (q_rows, kv_rows) = (config.q_width(), config.kv_width());
        let q_local = layout.heads.start * hd..layout.heads.end * hd;
        let kv_local = layout.kv_heads.start * hd..layout.kv_heads.end * hd;

        let embed_local = if first || (last && !src.has("output.weight")) {
            let embd = src.matrix("token_embd.weight", config.vocab, h)?;
            Some(embd.select_rows(std::slice::from_ref(&layout.vocab)))
        } else {
            None
        };
        let head = if last {
            let lm_source = match &embed_local {
                Some(e) if !src.has("output.weight") => e.clone(),
                _ => src
                    .matrix("output.weight", config.vocab, h)?
                    .select_rows(std::slice::from_ref(&layout.vocab)),
            };
            let norm = src.norm(family.norm, "output_norm", h)?;
            Some((norm, lm_source))
        } else {
            None
        };
        let embed = if first { embed_local } else { None };
        let positions = match family.positions {
            Positions::Learned if first => {
                let name = "position_embd.weight";
                let trained = src.rows_of(name)?.unwrap_or(config.context);
                if trained < config.context {
                    return Err(src.error(format!(
                        "{name} holds {trained} positions, fewer than the context of {}",
                        config.context
                    )));
                }
                Some(
                    src.matrix(name, trained, h)?
                        .select_rows(std::slice::from_ref(&(0..config.context))),
                )
            }
            _ => None,
        };

        // Layers are read (or drawn) in parallel: each tensor's values depend
        // on its name only, so the order changes nothing. Where several
        // layers fail, the lowest one's error is reported, as in a serial
        // read.
        let block = |i: usize| -> Result<BlockMats> {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let bias = |t: &str| format!("blk.{i}.{t}.bias");
            let shift = |r: &Range<usize>, by: usize| r.start + by..r.end + by;
            let qkv = if src.has(&name("attn_qkv")) {
                // One tensor, q rows then k then v: this shard's rows of each.
                src.matrix(&name("attn_qkv"), q_rows + 2 * kv_rows, h)?
                    .select_rows(&[
                        q_local.clone(),
                        shift(&kv_local, q_rows),
                        shift(&kv_local, q_rows + kv_rows),
                    ])
            } else {
                let q = src.matrix(&name("attn_q"), q_rows, h)?;
                let k = src.matrix(&name("attn_k"), kv_rows, h)?;
                let v = src.matrix(&name("attn_v"), kv_rows, h)?;
                Mat::concat_rows(vec![
                    q.select_rows(std::slice::from_ref(&q_local)),
                    k.select_rows(std::slice::from_ref(&kv_local)),
                    v.select_rows(std::slice::from_ref(&kv_local)),
                ])?
            };
            // A fused q|k|v has its bias fused too (a required one that is
            // missing is named as such by the read).
            let fused_bias = src.has(&bias("attn_qkv"))
                || (src.has(&name("attn_qkv")) && family.qkv_bias == Part::Required);
            let qkv_bias = if fused_bias {
                let b = src.vector(&bias("attn_qkv"), q_rows + 2 * kv_rows)?;
                Some(
                    [
                        &b[q_local.clone()],
                        &b[shift(&kv_local, q_rows)],
                        &b[shift(&kv_local, q_rows + kv_rows)],
                    ]
                    .concat(),
                )
            } else {
                match (
                    src.part(family.qkv_bias, &bias("attn_q"), q_rows)?,
                    src.part(family.qkv_bias, &bias("attn_k"), kv_rows)?,
                    src.part(family.qkv_bias, &bias("attn_v"), kv_rows)?,
                ) {
                    (Some(q), Some(k), Some(v)) => Some(
                        [
                            &q[q_local.clone()],
                            &k[kv_local.clone()],
                            &v[kv_local.clone()],
                        ]
                        .concat(),
                    ),
                    (None, None, None) => None,
                    _ => {
                        return Err(src.error(format!(
                            "layer {i} has a bias on some of q, k and v but not all"
                        )))
                    }
                }
            };
            let dense_bias = |t: &str, len: usize| -> Result<Option<Vec<f32>>> {
                match family.dense_bias {
                    true => src.vector(&bias(t), len).map(Some),
                    false => Ok(None),
                }
            };
            let o_bias = dense_bias("attn_output", h)?;
            let up_bias = dense_bias("ffn_up", config.ffn)?.map(|b| b[layout.ffn.clone()].to_vec());
            let down_bias = dense_bias("ffn_down", h)?;
            let qk_norm = match (
                src.part(family.qk_norm, &name("attn_q_norm"), hd)?,
                src.part(family.qk_norm, &name("attn_k_norm"), hd)?,
            ) {
                (Some(q), Some(k)) => Some((q, k)),
                (None, None) => None,
                _ => {
                    return Err(src.error(format!(
                        "layer {i} has a norm on one of q and k but not both"
                    )))
                }
            };
            let o = src
                .matrix(&name("attn_output"), h, q_rows)?
                .select_cols(q_local.clone())?;
            let post_norms = if family.post_norms {
                Some((
                    src.vector(&name("post_attention_norm"), h)?,
                    src.vector(&name("post_ffw_norm"), h)?,
                ))
            } else {
                None
            };
            let gate_up = if !family.gated_ffn {
                src.matrix(&name("ffn_up"), config.ffn, h)?
                    .select_rows(std::slice::from_ref(&layout.ffn))
            } else if family.fused_gate_up {
                // One tensor, gate rows then up rows.
                src.matrix(&name("ffn_up"), 2 * config.ffn, h)?
                    .select_rows(&[layout.ffn.clone(), shift(&layout.ffn, config.ffn)])
            } else {
                let gate = src.matrix(&name("ffn_gate"), config.ffn, h)?;
                let up = src.matrix(&name("ffn_up"), config.ffn, h)?;
                Mat::concat_rows(vec![
                    gate.select_rows(std::slice::from_ref(&layout.ffn)),
                    up.select_rows(std::slice::from_ref(&layout.ffn)),
                ])?
            };
            let down = src
                .matrix(&name("ffn_down"), h, config.ffn)?
                .select_cols(layout.ffn.clone())?;
            let norm = |t: &str| src.norm(family.norm, &format!("blk.{i}.{t}"), h);
            Ok(BlockMats {
                attn_norm: norm("attn_norm")?,
                qkv,
                qkv_bias,
                o_bias,
                up_bias,
                down_bias,
                qk_norm,
                post_norms,
                o,
                ffn_norm: norm("ffn_norm")?,
                gate_up,
                down,
            })
        };
        let blocks = {
            use rayon::prelude::*;
            let each: Vec<Result<BlockMats>> = layers.into_par_iter().map(block).collect();
            each.into_iter().collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            layout,
            embed,
            positions,
            blocks,
            head,
        })
    }
}

/// One layer's cached keys and values: `len × kv_width` each, row-major.
#[derive(Debug, Clone, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The KV cache of one sequence on one shard (its local KV heads only).
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    layers: Vec<LayerKv>,
    len: usize,
    kv_width: usize,
}

impl SeqKvCache {
    /// Tokens cached so far; the next token's position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position from `len` on (for recomputing a suffix).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for l in &mut self.layers {
                l.k.truncate(len * self.kv_width);
                l.v.truncate(len * self.kv_width);
            }
            self.len = len;
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.len * self.kv_width * std::mem::size_of::<f32>()
    }
}

/// Which rows of logits a batch item wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (an intermediate prefill chunk).
    None,
    /// The last new token's (the usual case).
    Last,
    /// Every new token's (scoring, tests).
    All,
    /// The last `n` new tokens' (verifying `n - 1` drafted tokens).
    Tail(usize),
}

/// One sequence's part of a batched forward.
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// The new tokens: a prompt (chunk) or one decoded token.
    pub tokens: &'a [u32],
    /// The sequence's cache; the tokens are appended at `cache.len()`.
    pub cache: &'a mut SeqKvCache,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Logits returned by a forward: `rows × vocab`, with each item's row range.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Logits {
    /// Vocabulary size (row width).
    pub vocab: usize,
    /// The rows, concatenated.
    pub data: Vec<f32>,
    /// For each batch item, its rows in `data`.
    pub item_rows: Vec<Range<usize>>,
}

impl Logits {
    /// Row `r` of the whole matrix.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// The last row returned for batch item `i`, if it asked for any.
    pub fn last(&self, i: usize) -> Option<&[f32]> {
        let r = self.item_rows.get(i)?;
        (!r.is_empty()).then(|| self.row(r.end - 1))
    }

    /// Item `i`'s rows, in order (none when it wanted none).
    pub fn rows_of(&self, i: usize) -> impl Iterator<Item = &[f32]> {
        self.item_rows
            .get(i)
            .cloned()
            .unwrap_or_default()
            .map(move |r| self.row(r))
    }
}

/// One tensor-parallel shard of a Llama-family model, on the CPU backend.
pub struct LlamaShard {
    model: Transformer<CpuBackend>,
}

impl std::fmt::Debug for LlamaShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaShard")
            .field("config", self.model.config())
            .field("layout", self.model.layout())
            .field("format", &self.format())
            .field("layers", &self.model.layers())
            .finish()
    }
}

impl LlamaShard {
    /// Loads shard `spec` of the model in `file`.
    pub fn load(file: &GgufFile, spec: ShardSpec, format: WeightFormat) -> Result<Self> {
        let n_layers = ModelConfig::from_gguf(file)?.n_layers;
        Self::load_stage(file, spec, 0..n_layers, format)
    }

    /// Loads shard `spec` of the pipeline stage that runs `layers` of the model
    /// in `file`: the first stage also holds the embedding, the last the final
    /// norm and LM head.
    pub fn load_stage(
        file: &GgufFile,
        spec: ShardSpec,
        layers: Range<usize>,
        format: WeightFormat,
    ) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        Self::build(config, &WeightSource::Gguf(file), spec, layers, format)
    }

    /// Shard `spec` of a model of shape `config` with seeded random weights.
    pub fn synthetic(
        config: ModelConfig,
        seed: u64,
        spec: ShardSpec,
        format: WeightFormat,
    ) -> Result<Self> {
        let layers = 0..config.n_layers;
        Self::synthetic_stage(config, seed, spec, layers, format)
    }

    /// Like [`LlamaShard::synthetic`], for the pipeline stage that runs `layers`.
    pub fn synthetic_stage(
        config: ModelConfig,
        seed: u64,
        spec: ShardSpec,
        layers: Range<usize>,
        format: WeightFormat,
    ) -> Result<Self> {
        config.validate()?;
        Self::build(
            config,
            &WeightSource::Synthetic { seed },
            spec,
            layers,
            format,
        )
    }

    pub(crate) fn build(
        config: ModelConfig,
        src: &WeightSource<'_>,
        spec: ShardSpec,
        layers: Range<usize>,
        format: WeightFormat,
    ) -> Result<Self> {
        let mats = ShardMats::build(&config, src, spec, layers.clone())?;
        let backend = CpuBackend::new(&config, &mats.layout, format);
        Ok(Self {
            model: Transformer::new(backend, config, mats, layers)?,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// This shard's ranges.
    pub fn layout(&self) -> &ShardLayout {
        self.model.layout()
    }

    /// The format the matmuls run in.
    pub fn format(&self) -> WeightFormat {
        self.model.backend().format()
    }

    /// The layers this shard runs (all of them unless it is a pipeline stage).
    pub fn layers(&self) -> Range<usize> {
        self.model.layers()
    }

    /// Floats of K (or V) per position in this shard's caches.
    pub fn kv_width(&self) -> usize {
        self.layout().kv_heads.len() * self.config().head_dim
    }

    /// An empty cache for one sequence on this shard.
    pub fn new_cache(&self) -> SeqKvCache {
        SeqKvCache {
            layers: vec![LayerKv::default(); self.model.n_blocks()],
            len: 0,
            kv_width: self.kv_width(),
        }
    }

    /// A paged KV pool for this shard's layers and KV heads.
    pub fn new_pool(&self, block_size: usize, n_blocks: usize) -> KvPool {
        KvPool::new(self.model.n_blocks(), self.kv_width(), block_size, n_blocks)
    }

    /// Turns the timing of every op of the following forwards on or off
    /// ([`crate::profile`]).
    pub fn set_profiling(&self, on: bool) {
        self.model.set_profiling(on);
    }

    /// The op times recorded since the last call (and clears them).
    pub fn take_profile(&self) -> crate::profile::StepProfile {
        self.model.take_profile()
    }

    /// Records the inputs of this shard's matrices in every following
    /// forward into `stats` ([`crate::activations`]).
    pub fn collect_activations(
        &mut self,
        stats: std::sync::Arc<crate::activations::ActivationStats>,
    ) {
        self.model.collect_activations(stats)
    }

    /// Runs one batched step: appends every item's tokens to its cache and
    /// returns the logits the items asked for. Every rank of `collective` must
    /// call this with the same items (tokens and cache lengths) at the same time.
    /// The shard must hold the whole model (no pipeline stage).
    pub fn forward(
        &self,
        items: &mut [BatchItem<'_>],
        collective: &dyn Collective,
    ) -> Result<Logits> {
        self.flat_step(items, false, collective)
    }

    /// [`LlamaShard::forward`], or with `hidden_only` the picked rows after
    /// the final norm instead of their logits (`Logits` as wide as the
    /// hidden state).
    fn flat_step(
        &self,
        items: &mut [BatchItem<'_>],
        hidden_only: bool,
        collective: &dyn Collective,
    ) -> Result<Logits> {
        if !self.model.has_embedding() || !self.model.has_head() {
            return Err(Error::Shard(
                "forward needs the whole model; a pipeline stage runs forward_paged".into(),
            ));
        }
        let kv_w = self.kv_width();
        for item in items.iter() {
            if item.cache.kv_width != kv_w || item.cache.layers.len() != self.model.n_blocks() {
                return Err(Error::Shard(
                    "KV cache belongs to another shard layout".into(),
                ));
            }
        }
        // Room for the step's rows up front: the layers then append to
        // their caches without reallocating (and copying) them mid-step.
        for item in items.iter_mut() {
            let more = item.tokens.len() * kv_w;
            for l in &mut item.cache.layers {
                l.k.reserve(more);
                l.v.reserve(more);
            }
        }
        let shapes: Vec<_> = items
            .iter()
            .map(|i| (i.tokens, i.cache.len, i.logits))
            .collect();
        let mut ws = self.model.workspace(0)?;
        let step = StepItems {
            items: &shapes,
            tables: &[],
            block_size: 0,
            logits_to_root: false,
            hidden_only,
        };
        let mut store = SeqStore(items);
        let out = self
            .model
            .step(&mut ws, step, StageInput::Tokens, &mut store, collective)?;
        for item in store.0.iter_mut() {
            item.cache.len += item.tokens.len();
        }
        match out {
            StageOutput::Logits(l) => Ok(l),
            StageOutput::Hidden(_) | StageOutput::OnRoot => Err(Error::Shard(
                "the whole model returned no logits on this rank".into(),
            )),
        }
    }

    /// Embeddings from a decoder: the whole model over each sequence of
    /// `seqs` (fresh caches, dropped after), its hidden rows after the final
    /// norm pooled by `pooling` (not normalized), as vLLM's pooling runner
    /// does for generation models. Every tensor-parallel peer must call this
    /// with the same sequences; each gets the vectors.
    pub fn embed(
        &self,
        seqs: &[&[u32]],
        pooling: crate::encoder::Pooling,
        collective: &dyn Collective,
    ) -> Result<Vec<Vec<f32>>> {
        use crate::encoder::Pooling;
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(Error::Shard(format!("sequence {i} is empty")));
        }
        let wanted = match pooling {
            Pooling::Last => LogitsWanted::Last,
            Pooling::Mean | Pooling::Cls => LogitsWanted::All,
        };
        let mut caches: Vec<SeqKvCache> = seqs.iter().map(|_| self.new_cache()).collect();
        let mut items: Vec<BatchItem<'_>> = seqs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| BatchItem {
                tokens,
                cache,
                logits: wanted,
            })
            .collect();
        let rows = self.flat_step(&mut items, true, collective)?;
        let h = rows.vocab;
        Ok(rows
            .item_rows
            .iter()
            .map(|r| crate::encoder::pool(&rows.data[r.start * h..r.end * h], h, pooling, false))
            .collect())
    }

    /// Runs this shard's part of one batched step over a paged KV pool: a
    /// pipeline stage's layers on the rows of every item. The first stage reads
    /// the items' tokens (`input` is [`StageInput::Tokens`]); later stages read
    /// the previous stage's hidden rows. The last stage's rank 0 returns the
    /// logits (its other ranks [`StageOutput::OnRoot`]), other stages the
    /// hidden rows for the next stage. Every tensor-parallel peer must call
    /// this with the same items at the same time.
    pub fn forward_paged(
        &self,
        items: &[PagedItem<'_>],
        input: StageInput,
        pool: &mut KvPool,
        collective: &dyn Collective,
    ) -> Result<StageOutput> {
        if pool.n_layers() != self.model.n_blocks() || pool.kv_width() != self.kv_width() {
            return Err(Error::Shard(
                "KV pool belongs to another shard layout".into(),
            ));
        }
        let mut ws = self.model.workspace(0)?;
        paged_step(&self.model, &mut ws, items, input, pool, collective)
    }
}

/// One paged step of `model` over `kv`: checks the block tables, then runs
/// the shared loop.
pub(crate) fn paged_step<B: Backend>(
    model: &Transformer<B>,
    ws: &mut Workspace<B>,
    items: &[PagedItem<'_>],
    input: StageInput,
    kv: &mut B::Kv,
    collective: &dyn Collective,
) -> Result<StageOutput> {
    let shapes: Vec<_> = items
        .iter()
        .map(|i| (i.tokens, i.start, i.logits))
        .collect();
    let tables: Vec<&[u32]> = items.iter().map(|i| i.table).collect();
    check_tables(items, kv.block_size(), kv.n_blocks())?;
    let step = StepItems {
        items: &shapes,
        tables: &tables,
        block_size: kv.block_size(),
        logits_to_root: true,
        hidden_only: false,
    };
    model.step(ws, step, input, kv, collective)
}

/// One sequence's part of a paged, possibly pipelined forward.
#[derive(Debug, Clone, Copy)]
pub struct PagedItem<'a> {
    /// The new tokens (their count and positions matter on every stage; their
    /// ids only on the first).
    pub tokens: &'a [u32],
    /// The position of the first new token: positions `0..start` are cached.
    pub start: usize,
    /// The sequence's block table, covering at least `start + tokens.len()` positions.
    pub table: &'a [u32],
    /// Which logits to return (last stage).
    pub logits: LogitsWanted,
}

/// What a pipeline stage starts from.
#[derive(Debug)]
pub enum StageInput {
    /// Token ids (the first stage embeds them).
    Tokens,
    /// The previous stage's hidden rows, `rows × hidden`.
    Hidden(Vec<f32>),
}

/// What a pipeline stage produces.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden rows for the next stage, `rows × hidden`.
    Hidden(Vec<f32>),
    /// The last stage's logits.
    Logits(Logits),
    /// The last stage's logits went to its tensor-parallel rank 0 (a rank
    /// other than 0 of a paged step).
    OnRoot,
}

/// A step's rows: one per new token, with its item and position.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub(crate) tokens: Vec<u32>,
    pub(crate) item: Vec<usize>,
    pub(crate) pos: Vec<usize>,
}

/// Checks every item against the model (context, vocabulary) and lists the rows.
pub(crate) fn step_rows(c: &ModelConfig, items: &[(&[u32], usize, LogitsWanted)]) -> Result<Rows> {
    let mut rows = Rows::default();
    for (i, &(tokens, start, _)) in items.iter().enumerate() {
        if start + tokens.len() > c.context {
            return Err(Error::invalid(
                "tokens",
                format!(
                    "{} cached plus {} new tokens exceed the model's context of {} tokens",
                    start,
                    tokens.len(),
                    c.context
                ),
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::invalid(
                "tokens",
                format!("token id {bad} is outside the vocabulary of {}", c.vocab),
            ));
        }
        for (k, &t) in tokens.iter().enumerate() {
            rows.tokens.push(t);
            rows.item.push(i);
            rows.pos.push(start + k);
        }
    }
    Ok(rows)
}

/// Checks that every item's block table covers its positions with blocks of a
/// pool of `n_blocks` blocks of `block_size` positions.
pub(crate) fn check_tables(
    items: &[PagedItem<'_>],
    block_size: usize,
    n_blocks: usize,
) -> Result<()> {
    for (i, item) in items.iter().enumerate() {
        let need = (item.start + item.tokens.len()).div_ceil(block_size);
        if item.table.len() < need || item.table.iter().any(|&b| b as usize >= n_blocks) {
            return Err(Error::Shard(format!(
                "item {i}: block table {:?} does not cover {} positions of a {n_blocks}-block pool",
                item.table,
                item.start + item.tokens.len(),
            )));
        }
    }
    Ok(())
}

/// The rows whose logits were asked for, and each item's range among them.
pub(crate) fn picked_rows(
    items: &[(&[u32], usize, LogitsWanted)],
) -> (Vec<usize>, Vec<Range<usize>>) {
    let mut picked = Vec::new();
    let mut item_rows = Vec::with_capacity(items.len());
    let mut row = 0;
    for &(tokens, _, wanted) in items {
        let n = tokens.len();
        let start = picked.len();
        match wanted {
            LogitsWanted::None => {}
            LogitsWanted::Last if n > 0 => picked.push(row + n - 1),
            LogitsWanted::Last => {}
            LogitsWanted::All => picked.extend(row..row + n),
            LogitsWanted::Tail(k) => picked.extend(row + n - k.min(n)..row + n),
        }
        item_rows.push(start..picked.len());
        row += n;
    }
    (picked, item_rows)
}

/// The contiguous caches of a [`LlamaShard::forward`] batch, as the CPU
/// backend's KV store.
struct SeqStore<'s, 'a>(&'s mut [BatchItem<'a>]);

impl CpuKv for SeqStore<'_, '_> {
    fn write(&mut self, meta: &CpuMeta, layer: usize, row: usize, k: &[f32], v: &[f32]) {
        let cache = &mut self.0[meta.item[row]].cache;
        let l = &mut cache.layers[layer];
        debug_assert_eq!(
            l.k.len(),
            meta.pos[row] * cache.kv_width,
            "rows arrive in order"
        );
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
    }

    fn view<'s>(&'s self, meta: &'s CpuMeta, layer: usize, row: usize) -> KvView<'s> {
        let l = &self.0[meta.item[row]].cache.layers[layer];
        KvView::F32(KvRows::Flat(&l.k), KvRows::Flat(&l.v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{SingleCollective, ThreadCollective};

    fn tiny(spec: ShardSpec) -> LlamaShard {
        let c = ModelConfig::synthetic("tiny").unwrap();
        LlamaShard::synthetic(c, 3, spec, WeightFormat::F32).unwrap()
    }

    #[test]
    fn prefill_then_decode_equals_one_prefill() {
        let m = tiny(ShardSpec::SINGLE);
        let toks = [5u32, 9, 100, 7, 42];
        let mut a = m.new_cache();
        let full = m
            .forward(
                &mut [BatchItem {
                    tokens: &toks,
                    cache: &mut a,
                    logits: LogitsWanted::All,
                }],
                &SingleCollective,
            )
            .unwrap();
        let mut b = m.new_cache();
        m.forward(
            &mut [BatchItem {
                tokens: &toks[..3],
                cache: &mut b,
                logits: LogitsWanted::None,
            }],
            &SingleCollective,
        )
        .unwrap();
        let mut last = None;
        for t in &toks[3..] {
            let l = m
                .forward(
                    &mut [BatchItem {
                        tokens: std::slice::from_ref(t),
                        cache: &mut b,
                        logits: LogitsWanted::Last,
                    }],
                    &SingleCollective,
                )
                .unwrap();
            last = Some(l.last(0).unwrap().to_vec());
        }
        let last = last.unwrap();
        let want = full.row(4);
        for (x, y) in last.iter().zip(want) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        assert_eq!(b.len(), 5);
    }

    #[test]
    fn two_thread_shards_equal_one() {
        let single = tiny(ShardSpec::SINGLE);
        let toks = [1u32, 2, 3, 200];
        let mut cache = single.new_cache();
        let want = single
            .forward(
                &mut [BatchItem {
                    tokens: &toks,
                    cache: &mut cache,
                    logits: LogitsWanted::Last,
                }],
                &SingleCollective,
            )
            .unwrap();
        let shards: Vec<_> = ShardSpec::group(2).into_iter().map(tiny).collect();
        let colls = ThreadCollective::group(2);
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let js: Vec<_> = shards
                .iter()
                .zip(&colls)
                .map(|(m, c)| {
                    s.spawn(move || {
                        let mut cache = m.new_cache();
                        let l = m
                            .forward(
                                &mut [BatchItem {
                                    tokens: &toks,
                                    cache: &mut cache,
                                    logits: LogitsWanted::Last,
                                }],
                                c,
                            )
                            .unwrap();
                        l.last(0).unwrap().to_vec()
                    })
                })
                .collect();
            js.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for g in got {
            for (x, y) in g.iter().zip(want.last(0).unwrap()) {
                assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn paged_pipeline_stages_equal_contiguous_forward() {
        let c = ModelConfig::synthetic("tiny").unwrap();
        let whole = tiny(ShardSpec::SINGLE);
        let stages: Vec<_> = [0..1, 1..2]
            .into_iter()
            .map(|l| {
                LlamaShard::synthetic_stage(c.clone(), 3, ShardSpec::SINGLE, l, WeightFormat::F32)
                    .unwrap()
            })
            .collect();
        let mut pools: Vec<_> = stages.iter().map(|s| s.new_pool(2, 8)).collect();
        let prompts: [&[u32]; 2] = [&[5, 9, 100, 7, 42], &[1, 2, 3]];
        let tables: [&[u32]; 2] = [&[6, 1, 3], &[0, 7]];
        let mut caches: Vec<_> = prompts.iter().map(|_| whole.new_cache()).collect();
        let want = {
            let mut items: Vec<_> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| BatchItem {
                    tokens: p,
                    cache: c,
                    logits: LogitsWanted::Last,
                })
                .collect();
            whole.forward(&mut items, &SingleCollective).unwrap()
        };
        let run = |pools: &mut Vec<KvPool>, items: &[PagedItem<'_>]| {
            let StageOutput::Hidden(h) = stages[0]
                .forward_paged(items, StageInput::Tokens, &mut pools[0], &SingleCollective)
                .unwrap()
            else {
                panic!("the first stage returns hidden rows")
            };
            let StageOutput::Logits(l) = stages[1]
                .forward_paged(
                    items,
                    StageInput::Hidden(h),
                    &mut pools[1],
                    &SingleCollective,
                )
                .unwrap()
            else {
                panic!("the last stage returns logits")
            };
            l
        };
        let items: Vec<_> = prompts
            .iter()
            .zip(tables)
            .map(|(p, t)| PagedItem {
                tokens: p,
                start: 0,
                table: t,
                logits: LogitsWanted::Last,
            })
            .collect();
        let got = run(&mut pools, &items);
        assert_eq!(
            got.data, want.data,
            "paged stages are bit-identical to one forward"
        );
        // One decode step each: the paged caches hold the prompts.
        let next = [11u32, 12];
        let items: Vec<_> = prompts
            .iter()
            .zip(tables)
            .zip(&next)
            .map(|((p, t), n)| PagedItem {
                tokens: std::slice::from_ref(n),
                start: p.len(),
                table: t,
                logits: LogitsWanted::Last,
            })
            .collect();
        let got = run(&mut pools, &items);
        let mut items: Vec<_> = caches
            .iter_mut()
            .zip(&next)
            .map(|(c, n)| BatchItem {
                tokens: std::slice::from_ref(n),
                cache: c,
                logits: LogitsWanted::Last,
            })
            .collect();
        let want = whole.forward(&mut items, &SingleCollective).unwrap();
        assert_eq!(got.data, want.data);
    }

    #[test]
    fn out_of_vocab_token_is_an_error() {
        let m = tiny(ShardSpec::SINGLE);
        let mut c = m.new_cache();
        let err = m
            .forward(
                &mut [BatchItem {
                    tokens: &[9999],
                    cache: &mut c,
                    logits: LogitsWanted::Last,
                }],
                &SingleCollective,
            )
            .unwrap_err();
        assert!(err.to_string().contains("9999"));
    }
}
