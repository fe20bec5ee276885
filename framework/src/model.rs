//! The Llama-family forward pass, written for one tensor-parallel shard.
//!
//! Follows "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al.
//! 2023): pre-norm blocks of RMSNorm → grouped-query attention with rotary
//! embeddings → residual, RMSNorm → SwiGLU FFN → residual; final RMSNorm and the
//! LM head. Numerics follow llama.cpp's `llm_build_llama` (adjacent-pair rope on
//! GGUF's permuted q/k, f32 softmax).
//!
//! A [`LlamaShard`] holds one rank's slice of every weight (see [`crate::shard`]):
//! fused `q|k|v` and `gate|up` column-parallel projections, row-parallel `o` and
//! `down` followed by an all-reduce, a vocab-parallel embedding (all-reduced) and
//! LM head (all-gathered). With world size 1 the collective is the identity and
//! the shard is the whole model.
//!
//! [`LlamaShard::forward`] runs a *batch*: any number of sequences, each adding
//! any number of tokens (a prefill chunk or one decode token) to its own
//! [`SeqKvCache`]. All rows go through each matmul together; attention is per row
//! over that row's sequence. The caches hold only this shard's KV heads.

use std::ops::Range;

use crate::collective::Collective;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::ops::{self, AttnRow, RopeTable};
use crate::sampling::Rng;
use crate::shard::{ShardLayout, ShardSpec};
use crate::weights::{Embedding, Linear, Mat, WeightFormat, AUTO_DENSE_MAX_BYTES};

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
    fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Gguf(f) => f.has_tensor(name),
            WeightSource::Synthetic { .. } => name != "output.weight",
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

struct Block {
    attn_norm: Vec<f32>,
    qkv: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
    gate_up: Linear,
    down: Linear,
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
#[derive(Debug, Clone)]
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
}

/// One tensor-parallel shard of a Llama-family model.
pub struct LlamaShard {
    config: LlamaConfig,
    layout: ShardLayout,
    format: WeightFormat,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: RopeTable,
}

impl std::fmt::Debug for LlamaShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaShard")
            .field("config", &self.config)
            .field("layout", &self.layout)
            .field("format", &self.format)
            .finish()
    }
}

impl LlamaShard {
    /// Loads shard `spec` of the model in `file`.
    pub fn load(file: &GgufFile, spec: ShardSpec, format: WeightFormat) -> Result<Self> {
        let config = LlamaConfig::from_gguf(file)?;
        Self::build(config, &WeightSource::Gguf(file), spec, format)
    }

    /// Shard `spec` of a model of shape `config` with seeded random weights.
    pub fn synthetic(
        config: LlamaConfig,
        seed: u64,
        spec: ShardSpec,
        format: WeightFormat,
    ) -> Result<Self> {
        config.validate()?;
        Self::build(config, &WeightSource::Synthetic { seed }, spec, format)
    }

    fn build(
        config: LlamaConfig,
        src: &WeightSource<'_>,
        spec: ShardSpec,
        format: WeightFormat,
    ) -> Result<Self> {
        let layout = ShardLayout::new(&config, spec)?;
        let (h, hd) = (config.hidden, config.head_dim());
        let kv_rows = config.n_kv_heads * hd;
        let q_local = layout.heads.start * hd..layout.heads.end * hd;
        let kv_local = layout.kv_heads.start * hd..layout.kv_heads.end * hd;

        let embd = src.matrix("token_embd.weight", config.vocab, h)?;
        let embed_local = embd.select_rows(std::slice::from_ref(&layout.vocab));
        let lm_source = if src.has("output.weight") {
            src.matrix("output.weight", config.vocab, h)?
                .select_rows(std::slice::from_ref(&layout.vocab))
        } else {
            embed_local.clone()
        };
        let dense = config.parameter_count() * 4 / spec.world_size <= AUTO_DENSE_MAX_BYTES;
        let linear = |m: Mat| Linear::with_format(m, format, dense);
        let lm_head = linear(lm_source)?;
        let embed = Embedding::new(embed_local, layout.vocab.clone())?;

        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let q = src.matrix(&name("attn_q"), h, h)?;
            let k = src.matrix(&name("attn_k"), kv_rows, h)?;
            let v = src.matrix(&name("attn_v"), kv_rows, h)?;
            let qkv = Mat::concat_rows(vec![
                q.select_rows(std::slice::from_ref(&q_local)),
                k.select_rows(std::slice::from_ref(&kv_local)),
                v.select_rows(std::slice::from_ref(&kv_local)),
            ])?;
            let o = src
                .matrix(&name("attn_output"), h, h)?
                .select_cols(q_local.clone())?;
            let gate = src.matrix(&name("ffn_gate"), config.ffn, h)?;
            let up = src.matrix(&name("ffn_up"), config.ffn, h)?;
            let gate_up = Mat::concat_rows(vec![
                gate.select_rows(std::slice::from_ref(&layout.ffn)),
                up.select_rows(std::slice::from_ref(&layout.ffn)),
            ])?;
            let down = src
                .matrix(&name("ffn_down"), h, config.ffn)?
                .select_cols(layout.ffn.clone())?;
            blocks.push(Block {
                attn_norm: src.vector(&name("attn_norm"), h)?,
                qkv: linear(qkv)?,
                o: linear(o)?,
                ffn_norm: src.vector(&name("ffn_norm"), h)?,
                gate_up: linear(gate_up)?,
                down: linear(down)?,
            });
        }
        let norm = src.vector("output_norm.weight", h)?;
        let rope = RopeTable::new(hd, config.rope_base, config.context);
        Ok(Self {
            config,
            layout,
            format,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// This shard's ranges.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The format the matmuls run in.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// An empty cache for one sequence on this shard.
    pub fn new_cache(&self) -> SeqKvCache {
        SeqKvCache {
            layers: vec![LayerKv::default(); self.config.n_layers],
            len: 0,
            kv_width: self.layout.kv_heads.len() * self.config.head_dim(),
        }
    }

    /// Runs one batched step: appends every item's tokens to its cache and
    /// returns the logits the items asked for. Every rank of `collective` must
    /// call this with the same items (tokens and cache lengths) at the same time.
    pub fn forward(
        &self,
        items: &mut [BatchItem<'_>],
        collective: &dyn Collective,
    ) -> Result<Logits> {
        let c = &self.config;
        let (h, hd) = (c.hidden, c.head_dim());
        let n_heads = self.layout.heads.len();
        let n_kv = self.layout.kv_heads.len();
        let (q_w, kv_w) = (n_heads * hd, n_kv * hd);
        let ffn = self.layout.ffn.len();

        // Row bookkeeping: every new token is one row; remember its sequence and position.
        let mut tokens = Vec::new();
        let mut row_item = Vec::new();
        let mut row_pos = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let start = item.cache.len;
            if start + item.tokens.len() > c.context {
                return Err(Error::invalid(
                    "tokens",
                    format!(
                        "{} cached plus {} new tokens exceed the model's context of {} tokens",
                        start,
                        item.tokens.len(),
                        c.context
                    ),
                ));
            }
            if item.cache.kv_width != kv_w || item.cache.layers.len() != c.n_layers {
                return Err(Error::Shard(
                    "KV cache belongs to another shard layout".into(),
                ));
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(Error::invalid(
                    "tokens",
                    format!("token id {bad} is outside the vocabulary of {}", c.vocab),
                ));
            }
            for (k, &t) in item.tokens.iter().enumerate() {
                tokens.push(t);
                row_item.push(i);
                row_pos.push(start + k);
            }
        }
        let rows = tokens.len();

        let mut x = vec![0f32; rows * h];
        self.embed.lookup_into(&tokens, &mut x)?;
        collective.all_reduce_sum(&mut x)?;

        let mut normed = vec![0f32; rows * h];
        let mut attn = vec![0f32; rows * q_w];
        let mut act = vec![0f32; rows * ffn];
        for (layer, b) in self.blocks.iter().enumerate() {
            ops::rms_norm(&x, &b.attn_norm, c.rms_eps, &mut normed);
            let mut qkv = b.qkv.forward(&normed, rows)?;
            let qkv_w = q_w + 2 * kv_w;
            for (r, row) in qkv.chunks_exact_mut(qkv_w).enumerate() {
                let (q, kv) = row.split_at_mut(q_w);
                self.rope.apply(q, row_pos[r]);
                self.rope.apply(&mut kv[..kv_w], row_pos[r]);
                let cache = &mut items[row_item[r]].cache.layers[layer];
                cache.k.extend_from_slice(&kv[..kv_w]);
                cache.v.extend_from_slice(&kv[kv_w..]);
            }
            let attn_rows: Vec<AttnRow<'_>> = (0..rows)
                .map(|r| {
                    let l = &items[row_item[r]].cache.layers[layer];
                    AttnRow {
                        k: &l.k,
                        v: &l.v,
                        pos: row_pos[r],
                    }
                })
                .collect();
            ops::attention(&qkv, qkv_w, &attn_rows, n_heads, n_kv, hd, &mut attn);
            let mut o = b.o.forward(&attn, rows)?;
            collective.all_reduce_sum(&mut o)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);

            ops::rms_norm(&x, &b.ffn_norm, c.rms_eps, &mut normed);
            let gu = b.gate_up.forward(&normed, rows)?;
            ops::silu_mul(&gu, ffn, &mut act);
            let mut d = b.down.forward(&act, rows)?;
            collective.all_reduce_sum(&mut d)?;
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        for item in items.iter_mut() {
            item.cache.len += item.tokens.len();
        }

        // Only the rows whose logits were asked for go through the LM head.
        let mut picked = Vec::new();
        let mut item_rows = Vec::with_capacity(items.len());
        let mut row = 0;
        for item in items.iter() {
            let n = item.tokens.len();
            let start = picked.len();
            match item.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if n > 0 => picked.push(row + n - 1),
                LogitsWanted::Last => {}
                LogitsWanted::All => picked.extend(row..row + n),
            }
            item_rows.push(start..picked.len());
            row += n;
        }
        let mut last = vec![0f32; picked.len() * h];
        for (k, &r) in picked.iter().enumerate() {
            ops::rms_norm(
                &x[r * h..(r + 1) * h],
                &self.norm,
                c.rms_eps,
                &mut last[k * h..(k + 1) * h],
            );
        }
        let local = self.lm_head.forward(&last, picked.len())?;
        let data =
            collective.all_gather_cols(&local, picked.len(), self.layout.vocab.start, c.vocab)?;
        Ok(Logits {
            vocab: c.vocab,
            data,
            item_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{SingleCollective, ThreadCollective};

    fn tiny(spec: ShardSpec) -> LlamaShard {
        let c = LlamaConfig::synthetic("tiny").unwrap();
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
