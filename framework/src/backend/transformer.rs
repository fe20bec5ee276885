//! The transformer's layer loop, written once over any [`Backend`] and every
//! model family ([`crate::family`]).
//!
//! Follows "LLaMA: Open and Efficient Foundation Language Models" (Touvron et
//! al. 2023): per layer, `x += o(attn(rope(qkv(norm(x)))))` then
//! `x += down(silu(gate(norm(x))) · up(norm(x)))`. A family's optional parts
//! are steps of the same loop: the `q|k|v` bias after the matmul (Qwen2), a
//! per-head RMSNorm of q and k before the rotary embedding (Qwen3, Gemma 3),
//! Gemma's embedding scale, norms of the all-reduced attention and FFN outputs,
//! GELU gating and soft-capped logits; GPT-2's learned position embeddings
//! (in place of the rope), LayerNorm, ungated FFN and biases on every matrix
//! (a row-parallel one's added after its all-reduce); each layer gets its attention's scale,
//! soft-cap and window and its rope table (windowed or global) from the
//! config, and the rotary pairing is the backend's. With fused `q|k|v` and
//! `gate|up` column-parallel, `o` and `down` row-parallel (all-reduced). The
//! residual add of each row-parallel output is fused into the next norm
//! (the CUDA kernel's form; on the CPU the same add in the same order), and
//! the last one is applied after the loop.
//!
//! A [`Transformer`] is one tensor-parallel shard of one pipeline stage: the
//! first stage embeds tokens (vocab-parallel), the last applies the final norm
//! and the vocab-parallel LM head. Per step it performs two all-reduces per
//! layer, one for the embedding on the first stage and one host gather of the
//! logits on the last, in the same order on every rank.
//!
//! With profiling on ([`Transformer::set_profiling`]) each step's ops are
//! timed into a [`StepProfile`] ([`crate::profile`]). With activation
//! statistics on ([`Transformer::collect_activations`]) the input of every
//! block matrix is recorded before its matmul ([`crate::activations`]).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::activations::{ActivationStats, MatInput, Record};

use crate::collective::{Collective, TimedCollective};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::Positions;
use crate::model::{self, Logits, LogitsWanted, NormMats, ShardMats, StageInput, StageOutput};
use crate::profile::{Op, StepProfile, Timer};
use crate::shard::ShardLayout;

use super::layers::{
    ColumnParallelLinear, HeadBuffers, Norm, RowParallelLinear, VocabParallelEmbedding,
    VocabParallelLmHead,
};
use super::{Backend, KvCache, StepRows, Widths, Workspace};

struct Block<B: Backend> {
    attn_norm: Norm<B>,
    qkv: ColumnParallelLinear<B>,
    qk_norm: Option<(B::Vector, B::Vector)>,
    post_norms: Option<(B::Vector, B::Vector)>,
    o: RowParallelLinear<B>,
    ffn_norm: Norm<B>,
    /// `gate|up` (gated FFN) or `up`.
    gate_up: ColumnParallelLinear<B>,
    down: RowParallelLinear<B>,
}

fn norm<B: Backend>(be: &mut B, m: &NormMats) -> Result<Norm<B>> {
    Ok(match m {
        NormMats::Rms(w) => Norm::Rms(be.vector(w)?),
        NormMats::Layer(w, b) => Norm::Layer(be.vector(w)?, be.vector(b)?),
    })
}

fn opt_vector<B: Backend>(be: &mut B, v: &Option<Vec<f32>>) -> Result<Option<B::Vector>> {
    v.as_deref().map(|v| be.vector(v)).transpose()
}

/// One tensor-parallel shard of a pipeline stage of a model, on backend `B`.
pub struct Transformer<B: Backend> {
    config: ModelConfig,
    layout: ShardLayout,
    layers: Range<usize>,
    backend: B,
    embed: Option<VocabParallelEmbedding<B>>,
    /// Learned position embeddings (first stage of a family with them).
    positions: Option<B::Table>,
    blocks: Vec<Block<B>>,
    head: Option<VocabParallelLmHead<B>>,
    profiling: AtomicBool,
    profile: Mutex<StepProfile>,
    /// Where the matrices' inputs are recorded, when collecting.
    activations: Option<Arc<ActivationStats>>,
}

/// One step's items as the loop reads them.
pub(crate) struct StepItems<'a> {
    /// Every item: its new tokens, first position, logits wanted.
    pub(crate) items: &'a [(&'a [u32], usize, LogitsWanted)],
    /// Every item's block table (empty for contiguous caches).
    pub(crate) tables: &'a [&'a [u32]],
    /// Positions per KV block (0 for contiguous caches).
    pub(crate) block_size: usize,
    /// Whether the logits go to the stage's rank 0 only (the engine's steps)
    /// or to every rank.
    pub(crate) logits_to_root: bool,
    /// The last stage returns the picked rows after the final norm instead
    /// of their logits (as [`Logits`] whose width is the hidden width), on
    /// every rank: embeddings.
    pub(crate) hidden_only: bool,
}

impl<B: Backend> Transformer<B> {
    /// Hands the weights of `mats` (the stage `layers`) to `backend`.
    pub(crate) fn new(
        mut backend: B,
        config: ModelConfig,
        mats: ShardMats,
        layers: Range<usize>,
    ) -> Result<Self> {
        let be = &mut backend;
        let embed = match mats.embed {
            Some(m) => Some(VocabParallelEmbedding::new(
                be.table(m, mats.layout.vocab.clone())?,
                config.hidden,
            )),
            None => None,
        };
        let positions = match mats.positions {
            Some(m) => {
                let rows = m.rows();
                Some(be.table(m, 0..rows)?)
            }
            None => None,
        };
        let head = match mats.head {
            Some((n, m)) => Some(VocabParallelLmHead::new(
                norm(be, &n)?,
                be.weight(m)?,
                mats.layout.vocab.clone(),
                config.vocab,
                config.final_softcap,
            )),
            None => None,
        };
        let mut blocks = Vec::with_capacity(mats.blocks.len());
        for b in mats.blocks {
            let qk_norm = match &b.qk_norm {
                Some((q, k)) => Some((be.vector(q)?, be.vector(k)?)),
                None => None,
            };
            let post_norms = match &b.post_norms {
                Some((a, f)) => Some((be.vector(a)?, be.vector(f)?)),
                None => None,
            };
            blocks.push(Block {
                attn_norm: norm(be, &b.attn_norm)?,
                qkv: ColumnParallelLinear::new(be.weight(b.qkv)?, opt_vector(be, &b.qkv_bias)?),
                qk_norm,
                post_norms,
                o: RowParallelLinear::new(be.weight(b.o)?, opt_vector(be, &b.o_bias)?),
                ffn_norm: norm(be, &b.ffn_norm)?,
                gate_up: ColumnParallelLinear::new(
                    be.weight(b.gate_up)?,
                    opt_vector(be, &b.up_bias)?,
                ),
                down: RowParallelLinear::new(be.weight(b.down)?, opt_vector(be, &b.down_bias)?),
            });
        }
        Ok(Self {
            config,
            layout: mats.layout,
            layers,
            backend,
            embed,
            positions,
            blocks,
            head,
            profiling: AtomicBool::new(false),
            profile: Mutex::new(StepProfile::default()),
            activations: None,
        })
    }

    /// Records the inputs of every block's matrices in the following steps
    /// into `stats` ([`crate::activations`]).
    pub fn collect_activations(&mut self, stats: Arc<ActivationStats>) {
        self.activations = Some(stats);
    }

    /// Adds `rows` rows of `buf` (this rank's columns of `input` of the
    /// model's layer `layer`) to the statistics, when collecting.
    fn record(&self, layer: usize, input: MatInput, buf: &B::Buf, rows: usize) -> Result<()> {
        let Some(stats) = &self.activations else {
            return Ok(());
        };
        let (c, l) = (&self.config, &self.layout);
        let rank0 = l.spec.rank == 0;
        let hd = c.head_dim;
        let (width, cols) = match input {
            // Whole on every rank: rank 0 records it.
            MatInput::Attn | MatInput::Ffn if !rank0 => return Ok(()),
            MatInput::Attn | MatInput::Ffn => (c.hidden, 0..c.hidden),
            MatInput::AttnOut => (c.q_width(), l.heads.start * hd..l.heads.end * hd),
            MatInput::FfnOut => (c.ffn, l.ffn.clone()),
        };
        let data = self.backend.download(buf, rows * cols.len())?;
        let rec = Record {
            layer,
            input,
            width,
            cols,
            count_rows: rank0,
        };
        stats.record(&rec, &data);
        Ok(())
    }

    /// Turns the timing of every op of the following steps on or off.
    /// The kernels' busy-time counter is process-wide, so it is turned on
    /// and off with it.
    pub fn set_profiling(&self, on: bool) {
        self.profiling.store(on, Ordering::Relaxed);
        kernels::cpu::busy::set_counting(on);
    }

    /// The times recorded since the last call (and clears them).
    pub fn take_profile(&self) -> StepProfile {
        self.profile
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// This shard's ranges.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The layers this shard runs.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Layers held.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether this is the first stage (it embeds tokens).
    pub fn has_embedding(&self) -> bool {
        self.embed.is_some()
    }

    /// Whether this is the last stage (it returns logits).
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    fn widths(&self) -> Widths {
        Widths {
            hidden: self.config.hidden,
            heads: self.backend.heads(),
            ffn: self.layout.ffn.len(),
            local_vocab: self.head.as_ref().map_or(0, |h| h.local_vocab()),
        }
    }

    /// A workspace for steps of up to `rows` rows (grown when a step needs more).
    pub fn workspace(&self, rows: usize) -> Result<Workspace<B>> {
        Workspace::new(&self.backend, self.widths(), rows, rows)
    }

    /// A paged KV store for this shard's layers.
    pub fn new_kv(&self, block_size: usize, n_blocks: usize) -> Result<B::Kv> {
        self.backend.new_kv(self.blocks.len(), block_size, n_blocks)
    }

    /// One step of this stage: embeds the tokens or takes the previous
    /// stage's hidden rows, runs the layers over `kv`, and returns hidden rows
    /// or (last stage) the logits asked for. Every tensor-parallel peer calls
    /// it with the same items at the same time.
    pub(crate) fn step<K: KvCache<B>>(
        &self,
        ws: &mut Workspace<B>,
        step: StepItems<'_>,
        input: StageInput,
        kv: &mut K,
        host: &dyn Collective,
    ) -> Result<StageOutput> {
        // A fence error shows up again at the step's next device call.
        let fence = || {
            let _ = self.backend.fence();
        };
        let mut timer = Timer::new(self.profiling.load(Ordering::Relaxed)).with_fence(&fence);
        let host = &TimedCollective::new(host);
        let out = self.step_timed(ws, step, input, kv, host, &mut timer);
        if let Some(p) = timer.finish() {
            if let Ok(mut total) = self.profile.lock() {
                total.merge(&p);
            }
        }
        out
    }

    fn step_timed<K: KvCache<B>>(
        &self,
        ws: &mut Workspace<B>,
        step: StepItems<'_>,
        input: StageInput,
        kv: &mut K,
        host: &TimedCollective<'_>,
        timer: &mut Timer<'_>,
    ) -> Result<StageOutput> {
        let c = &self.config;
        let h = c.hidden;
        let spent = || host.spent();
        let be = &self.backend;
        let (n, picked, item_rows) = timer.time(Op::Bookkeeping, spent, || {
            let rows = model::step_rows(c, step.items)?;
            let n = rows.pos.len();
            let (picked, item_rows) = model::picked_rows(step.items);
            ws.ensure(be, self.widths(), n, picked.len())?;
            be.load_meta(
                &mut ws.meta,
                &StepRows {
                    rows: &rows,
                    items: step.items,
                    tables: step.tables,
                    block_size: step.block_size,
                    picked: &picked,
                },
            )?;
            be.before_step(host)?;
            Ok::<_, Error>((n, picked, item_rows))
        })?;
        match input {
            StageInput::Tokens => {
                let embed = self.embed.as_ref().ok_or_else(|| {
                    Error::Shard("only the first pipeline stage embeds tokens".into())
                })?;
                timer.time(Op::Embed, spent, || {
                    embed.forward(be, &ws.meta, &mut ws.x, n, host)?;
                    if c.family().embed_scale {
                        be.scale(&mut ws.x, (h as f32).sqrt(), n * h)?;
                    }
                    if let Some(table) = &self.positions {
                        be.add_positions(table, &ws.meta, &mut ws.x, n)?;
                    }
                    Ok::<_, Error>(())
                })?;
            }
            StageInput::Hidden(v) => {
                if v.len() != n * h {
                    return Err(Error::Shard(format!(
                        "stage input holds {} floats, expected {n} rows of {h}",
                        v.len()
                    )));
                }
                timer.time(Op::Bookkeeping, spent, || be.upload(&mut ws.x, &v))?;
            }
        }
        self.run_layers(ws, n, kv, host, timer)?;
        let Some(head) = &self.head else {
            let hidden = timer.time(Op::Bookkeeping, spent, || be.download(&ws.x, n * h))?;
            return Ok(StageOutput::Hidden(hidden));
        };
        let hidden_only = step.hidden_only;
        let data = timer.time(Op::Head, spent, || {
            let buffers = HeadBuffers {
                x: &ws.x,
                last: &mut ws.last,
                last_normed: &mut ws.last_normed,
                logits: &mut ws.logits,
                meta: &ws.meta,
            };
            match hidden_only {
                true => head
                    .normed_rows(be, buffers, picked.len(), (h, c.norm_eps))
                    .map(Some),
                false => head.forward(
                    be,
                    buffers,
                    picked.len(),
                    (h, c.norm_eps),
                    host,
                    step.logits_to_root,
                ),
            }
        })?;
        Ok(match data {
            Some(data) => StageOutput::Logits(Logits {
                vocab: if hidden_only { h } else { c.vocab },
                data,
                item_rows,
            }),
            None => StageOutput::OnRoot,
        })
    }

    /// The layers over the `n` rows in `ws.x`, leaving their output there.
    fn run_layers<K: KvCache<B>>(
        &self,
        ws: &mut Workspace<B>,
        n: usize,
        kv: &mut K,
        host: &TimedCollective<'_>,
        timer: &mut Timer<'_>,
    ) -> Result<()> {
        let (be, eps, h) = (&self.backend, self.config.norm_eps, self.config.hidden);
        let ffn = self.layout.ffn.len();
        let family = self.config.family();
        let (act, rotary) = (family.act, matches!(family.positions, Positions::Rotary(_)));
        let ws = &mut *ws;
        let spent = || host.spent();
        // Whether `delta` holds a row-parallel output not yet added to `x`.
        let mut pending = false;
        for (layer, b) in self.blocks.iter().enumerate() {
            // The layer's index in the whole model (its window and rope).
            let global = self.layers.start + layer;
            let windowed = self.config.is_windowed(global);
            let attn = self.config.attn_params(global);
            let residual = pending.then_some(&ws.delta);
            timer.time(Op::Norm, spent, || {
                b.attn_norm
                    .forward(be, &mut ws.x, residual, eps, &mut ws.normed, n, h)
            })?;
            self.record(global, MatInput::Attn, &ws.normed, n)?;
            timer.time(Op::QkvMatmul, spent, || {
                b.qkv.forward(be, &ws.normed, &mut ws.qkv, n)
            })?;
            if let Some((q_norm, k_norm)) = &b.qk_norm {
                timer.time(Op::Norm, spent, || {
                    be.head_norm(&mut ws.qkv, q_norm, k_norm, eps, n)
                })?;
            }
            if rotary {
                timer.time(Op::Rope, spent, || {
                    be.rope(&mut ws.qkv, &ws.meta, n, windowed)
                })?;
            }
            timer.time(Op::Attention, spent, || {
                kv.attend(be, layer, &ws.qkv, &ws.meta, &mut ws.attn, n, &attn)
            })?;
            self.record(global, MatInput::AttnOut, &ws.attn, n)?;
            timer.time(Op::OMatmul, spent, || {
                b.o.forward(be, &ws.attn, &mut ws.delta, n, host)
            })?;
            if let Some((attn_post, _)) = &b.post_norms {
                timer.time(Op::Norm, spent, || {
                    be.rms_norm_f32(&mut ws.delta, attn_post, eps, n, h)
                })?;
            }
            timer.time(Op::Norm, spent, || {
                b.ffn_norm
                    .forward(be, &mut ws.x, Some(&ws.delta), eps, &mut ws.normed, n, h)
            })?;
            self.record(global, MatInput::Ffn, &ws.normed, n)?;
            timer.time(Op::GateUpMatmul, spent, || {
                b.gate_up.forward(be, &ws.normed, &mut ws.gate_up, n)
            })?;
            timer.time(Op::SiluMul, spent, || match family.gated_ffn {
                true => be.gated_act(&ws.gate_up, &mut ws.act, n, ffn, act),
                false => be.act(&ws.gate_up, &mut ws.act, n, ffn, act),
            })?;
            self.record(global, MatInput::FfnOut, &ws.act, n)?;
            timer.time(Op::DownMatmul, spent, || {
                b.down.forward(be, &ws.act, &mut ws.delta, n, host)
            })?;
            if let Some((_, ffn_post)) = &b.post_norms {
                timer.time(Op::Norm, spent, || {
                    be.rms_norm_f32(&mut ws.delta, ffn_post, eps, n, h)
                })?;
            }
            pending = true;
        }
        if pending {
            timer.time(Op::Bookkeeping, spent, || {
                be.add(&mut ws.x, &ws.delta, n * h)
            })?;
        }
        Ok(())
    }
}
