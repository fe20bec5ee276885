//! Encoder models for embeddings: BERT-family transformers read from GGUF
//! (`general.architecture = bert`, as llama.cpp converts all-MiniLM and bge)
//! or from a Hugging Face directory (opened through [`crate::hf`] as the
//! same GGUF), their WordPiece tokenizer, one tensor-parallel shard's
//! forward, and pooling.
//!
//! What is true here:
//! - a forward is one-shot: a batch of whole sequences in, one pooled vector
//!   per sequence out; no state survives a call (no KV cache), so any shard
//!   can run any batch;
//! - attention is bidirectional within a sequence and never crosses
//!   sequences packed into the same batch;
//! - a shard holds whole heads of q/k/v and `attn_output`'s matching columns,
//!   and a contiguous share of the FFN's columns (block-aligned for
//!   quantized weights); the two row-parallel products are summed over the
//!   group's [`Collective`], their biases added once after the sum, so
//!   every rank holds the same hidden rows after each block and pools them
//!   the same way (rank 0's answer is the one used);
//! - pooling ([`Pooling`]) and L2 normalization come from the model's
//!   metadata (`bert.pooling_type`; a directory's sentence-transformers
//!   `1_Pooling/config.json` and `modules.json`), and may be overridden.

use std::ops::Range;

use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::shard::{split_even, ShardSpec};
use crate::weights::{Embedding, Linear, Mat, WeightFormat};

/// GGUF's `general.architecture` of the encoders read here.
pub const ENCODER_ARCHS: &str = "bert";

/// The metadata key (parallm's own) a Hugging Face directory's
/// `modules.json` sets: whether the pooled vector is L2-normalized.
pub const NORMALIZE_KEY: &str = "parallm.embedding.normalize";

/// The metadata key (parallm's own) for the FFN's GELU: `true` for the tanh
/// approximation (`hidden_act = gelu_new`), absent or `false` for erf's.
pub const GELU_TANH_KEY: &str = "parallm.embedding.gelu_tanh";

/// How a sequence's hidden rows become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean of every row (sentence-transformers' mean pooling).
    Mean,
    /// The first row (BERT's `[CLS]`).
    Cls,
    /// The last row (decoder models: the one that saw every token).
    Last,
}

impl Pooling {
    /// llama.cpp's `pooling_type` number (1 mean, 2 cls, 3 last).
    pub fn from_gguf(v: usize) -> Option<Self> {
        match v {
            1 => Some(Pooling::Mean),
            2 => Some(Pooling::Cls),
            3 => Some(Pooling::Last),
            _ => None,
        }
    }

    /// Its name in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "last" => Ok(Pooling::Last),
            other => Err(Error::Setting {
                field: "pooling",
                reason: format!("'{other}' is not one of mean, cls, last"),
            }),
        }
    }
}

/// Pools `rows` (one sequence's hidden rows, `width` wide) into one vector,
/// L2-normalized when `normalize` is set (a zero vector stays zero).
pub fn pool(rows: &[f32], width: usize, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let n = rows.len().checked_div(width).unwrap_or(0);
    let mut v = match (pooling, n) {
        (_, 0) => vec![0.0; width],
        (Pooling::Cls, _) => rows[..width].to_vec(),
        (Pooling::Last, _) => rows[(n - 1) * width..n * width].to_vec(),
        (Pooling::Mean, _) => {
            let mut sum = vec![0f64; width];
            for row in rows.chunks_exact(width) {
                for (s, &x) in sum.iter_mut().zip(row) {
                    *s += x as f64;
                }
            }
            sum.iter().map(|s| (s / n as f64) as f32).collect()
        }
    };
    if normalize {
        l2_normalize(&mut v);
    }
    v
}

/// Scales `v` to unit Euclidean length (the norm summed in f64); a zero
/// vector stays zero.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
}

/// An encoder's shape and how it pools.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// FFN width.
    pub ffn: usize,
    /// Trained positions: the longest sequence.
    pub positions: usize,
    /// Token types (segments); 0 when the model has no type embedding.
    pub type_vocab: usize,
    /// LayerNorm's epsilon.
    pub eps: f32,
    /// The FFN's GELU is the tanh approximation (else erf's).
    pub gelu_tanh: bool,
    /// How sequences are pooled.
    pub pooling: Pooling,
    /// Whether pooled vectors are L2-normalized.
    pub normalize: bool,
}

impl EncoderConfig {
    /// The configuration of an encoder file (or directory opened as one).
    ///
    /// # Errors
    /// If the file is not an encoder this build runs, or a key is missing,
    /// malformed or out of bounds.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.get_str("general.architecture")?;
        if arch != "bert" {
            return Err(Error::Unsupported {
                path: file.path().to_path_buf(),
                what: "encoder architecture",
                found: arch.to_string(),
                supported: ENCODER_ARCHS,
            });
        }
        let meta_err = |key: &str, reason: String| Error::Metadata {
            path: file.path().to_path_buf(),
            key: key.into(),
            reason,
        };
        let hidden = file.get_usize("bert.embedding_length")?;
        let heads = file.get_usize("bert.attention.head_count")?;
        let layers = file.get_usize("bert.block_count")?;
        file.check_block_count("bert.block_count", layers)?;
        let ffn = file.get_usize("bert.feed_forward_length")?;
        let positions = file.get_usize("bert.context_length")?;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(meta_err(
                "bert.attention.head_count",
                format!("is {heads}, which does not divide the hidden width {hidden}"),
            ));
        }
        for (key, v, max) in [
            ("bert.embedding_length", hidden, 1 << 16),
            ("bert.block_count", layers, 1 << 10),
            ("bert.feed_forward_length", ffn, 1 << 18),
            ("bert.context_length", positions, 1 << 20),
        ] {
            if v == 0 || v > max {
                return Err(meta_err(key, format!("is {v}, outside 1..={max}")));
            }
        }
        let pooling = match file.opt_usize("bert.pooling_type")? {
            None | Some(0) => Pooling::Mean,
            Some(v) => Pooling::from_gguf(v).ok_or_else(|| {
                meta_err(
                    "bert.pooling_type",
                    format!("is {v}; 1 (mean), 2 (cls) and 3 (last) pool an embedding"),
                )
            })?,
        };
        let (_, embd) = file.tensor_info("token_embd.weight")?;
        // [rows, cols]: a row per token.
        let vocab = embd.first().copied().unwrap_or(0);
        let type_vocab = match file.has_tensor("token_types.weight") {
            true => file
                .tensor_info("token_types.weight")?
                .1
                .first()
                .copied()
                .unwrap_or(0),
            false => 0,
        };
        Ok(Self {
            vocab,
            hidden,
            layers,
            heads,
            ffn,
            positions,
            type_vocab,
            eps: file
                .opt_f32("bert.attention.layer_norm_epsilon")?
                .unwrap_or(1e-12),
            gelu_tanh: file.opt_bool(GELU_TANH_KEY)?.unwrap_or(false),
            pooling,
            // llama.cpp normalizes a GGUF's embeddings (--embd-normalize 2);
            // a directory says so in modules.json.
            normalize: file.opt_bool(NORMALIZE_KEY)?.unwrap_or(true),
        })
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// An encoder's tokenizer: WordPiece with BERT's normalizer and
/// pre-tokenizer, `[CLS] … [SEP]` around each text.
pub struct EncoderTokenizer {
    inner: tokenizers::Tokenizer,
    vocab: usize,
}

impl std::fmt::Debug for EncoderTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncoderTokenizer({} tokens)", self.vocab)
    }
}

impl EncoderTokenizer {
    /// The tokenizer of an encoder file: a directory's `tokenizer.json`, or
    /// a GGUF's `bert` vocabulary (llama.cpp's spelling: `▁` before a word's
    /// first piece, none before a continuation).
    ///
    /// # Errors
    /// If the vocabulary is missing or is not WordPiece.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let mut inner = match file.hf() {
            Some(hf) => {
                let path = hf.dir().join("tokenizer.json");
                crate::gguf::regular_file(&path)?;
                tokenizers::Tokenizer::from_file(&path).map_err(|e| {
                    Error::Tokenizer(format!("{}: does not parse: {e}", path.display()))
                })?
            }
            None => Self::wordpiece(file)?,
        };
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("cannot turn truncation off: {e}")))?;
        let vocab = inner.get_vocab_size(true);
        Ok(Self { inner, vocab })
    }

    fn wordpiece(file: &GgufFile) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::wordpiece::WordPiece;
        use tokenizers::normalizers::bert::BertNormalizer;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        use tokenizers::processors::bert::BertProcessing;
        let err = |m: String| Error::Tokenizer(format!("{}: {m}", file.path().display()));
        let kind = file.get_str("tokenizer.ggml.model")?;
        if kind != "bert" {
            return Err(Error::Unsupported {
                path: file.path().to_path_buf(),
                what: "encoder tokenizer model",
                found: kind.to_string(),
                supported: "bert (WordPiece)",
            });
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let texts: Vec<String> = tokens
            .iter()
            .map(|t| {
                if t.starts_with('[') && t.ends_with(']') {
                    t.to_string()
                } else if let Some(word) = t.strip_prefix('\u{2581}') {
                    word.to_string()
                } else {
                    format!("##{t}")
                }
            })
            .collect();
        let id = |keys: &[&str]| -> Result<Option<u32>> {
            for key in keys {
                if let Some(v) = file.opt_usize(key)? {
                    if v >= texts.len() {
                        return Err(err(format!(
                            "{key} is {v}, outside the vocabulary of {} tokens",
                            texts.len()
                        )));
                    }
                    return Ok(Some(v as u32));
                }
            }
            Ok(None)
        };
        let named = |keys: &[&str], what: &str| -> Result<(String, u32)> {
            let i = id(keys)?.ok_or_else(|| err(format!("no {what} token ({})", keys[0])))?;
            Ok((texts[i as usize].clone(), i))
        };
        let cls = named(
            &["tokenizer.ggml.cls_token_id", "tokenizer.ggml.bos_token_id"],
            "[CLS]",
        )?;
        let sep = named(
            &[
                "tokenizer.ggml.seperator_token_id",
                "tokenizer.ggml.eos_token_id",
            ],
            "[SEP]",
        )?;
        let unk = named(&["tokenizer.ggml.unknown_token_id"], "unknown")?;
        let vocab: tokenizers::models::bpe::Vocab = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token(unk.0)
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| err(format!("not a WordPiece vocabulary: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_post_processor(Some(BertProcessing::new(sep, cls)));
        Ok(tok)
    }

    /// The token ids of `text`, `[CLS]` and `[SEP]` included.
    ///
    /// # Errors
    /// If the tokenizer fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))
    }

    /// Tokens in the vocabulary (token ids given as input must be below).
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Checks that what this tokenizer can produce fits a model of `rows`
    /// token embeddings: the ids its post-processor adds to every input
    /// (`[CLS]`, `[SEP]`) must be rows of the model, or every request would
    /// be refused as if its text were at fault. A vocabulary larger than the
    /// model is only warned of: texts that use none of its extra tokens run.
    ///
    /// # Errors
    /// If an added special token's id is outside the model's rows.
    pub fn check_fits(&self, rows: usize, source: &std::path::Path) -> Result<()> {
        let added = self.encode("")?;
        if let Some(&t) = added.iter().find(|&&t| t as usize >= rows) {
            return Err(Error::Tokenizer(format!(
                "{}: the tokenizer adds token id {t} to every input ([CLS]/[SEP]), outside the model's vocabulary of {rows} tokens",
                source.display()
            )));
        }
        if self.vocab > rows {
            tracing::warn!(
                "{}: the tokenizer knows {} tokens, more than the model's {rows}; a text that uses the others is refused",
                source.display(),
                self.vocab
            );
        }
        Ok(())
    }
}

/// LayerNorm's weight and bias.
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// One block of one shard.
struct Block {
    /// `q`, `k` and `v` of this shard's heads, each with its bias.
    q: (Linear, Vec<f32>),
    k: (Linear, Vec<f32>),
    v: (Linear, Vec<f32>),
    /// `attn_output`'s columns of this shard's heads; its bias whole.
    o: (Linear, Vec<f32>),
    attn_norm: Norm,
    /// This shard's FFN columns with their bias; `down`'s matching columns.
    up: (Linear, Vec<f32>),
    down: (Linear, Vec<f32>),
    out_norm: Norm,
}

/// One tensor-parallel shard of an encoder.
pub struct EncoderShard {
    cfg: EncoderConfig,
    spec: ShardSpec,
    token_embd: Embedding,
    position_embd: Embedding,
    type_embd: Option<Embedding>,
    embd_norm: Norm,
    blocks: Vec<Block>,
    /// This shard's heads.
    heads: Range<usize>,
}

impl std::fmt::Debug for EncoderShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderShard")
            .field("spec", &self.spec)
            .field("heads", &self.heads)
            .finish()
    }
}

/// Reads encoder tensors, naming the file in errors.
struct Reader<'a> {
    file: &'a GgufFile,
    format: WeightFormat,
}

impl Reader<'_> {
    /// Matrix `name`, `rows × cols` as stored (GGUF dims `[cols, rows]`).
    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat> {
        Mat::from_qtensor(&self.file.tensor(name, &[rows, cols])?)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self
            .file
            .tensor(name, &[len])?
            .dequantize(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?)
    }

    fn norm(&self, stem: &str, len: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.vector(&format!("{stem}.weight"), len)?,
            bias: self.vector(&format!("{stem}.bias"), len)?,
        })
    }

    /// Rows `rows` of matrix `stem` (`out × cols`) and of its bias.
    fn column_parallel(
        &self,
        stem: &str,
        out: usize,
        cols: usize,
        rows: Range<usize>,
    ) -> Result<(Linear, Vec<f32>)> {
        let m = self
            .mat(&format!("{stem}.weight"), out, cols)?
            .select_rows(std::slice::from_ref(&rows));
        let bias = self.vector(&format!("{stem}.bias"), out)?[rows].to_vec();
        Ok((Linear::with_format(m, self.format)?, bias))
    }

    /// Columns `cols` of matrix `stem` (`out × all`) and its whole bias.
    fn row_parallel(
        &self,
        stem: &str,
        out: usize,
        all: usize,
        cols: Range<usize>,
    ) -> Result<(Linear, Vec<f32>)> {
        let m = self
            .mat(&format!("{stem}.weight"), out, all)?
            .select_cols(cols)?;
        Ok((
            Linear::with_format(m, self.format)?,
            self.vector(&format!("{stem}.bias"), out)?,
        ))
    }

    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        Embedding::new(self.mat(name, rows, cols)?, 0..rows)
    }
}

/// The columns of an FFN of `ffn` columns that rank `spec` holds: whole
/// blocks of 256 (or 32) columns where the width allows, so quantized rows
/// cut cleanly.
fn ffn_columns(ffn: usize, spec: ShardSpec) -> Range<usize> {
    let unit = [256, 32, 1]
        .into_iter()
        .find(|&u| ffn.is_multiple_of(u) && ffn / u >= spec.world_size)
        .unwrap_or(1);
    let r = split_even(ffn / unit, spec.world_size, spec.rank);
    r.start * unit..r.end * unit
}

impl EncoderShard {
    /// Loads rank `spec`'s shard of the encoder in `file`, its matrices in
    /// `format`.
    ///
    /// # Errors
    /// If a tensor is missing or misshapen, or the model has fewer heads
    /// than the group has ranks.
    pub fn load(file: &GgufFile, spec: ShardSpec, format: WeightFormat) -> Result<Self> {
        let cfg = EncoderConfig::from_gguf(file)?;
        if cfg.heads < spec.world_size {
            return Err(Error::Setting {
                field: "tp",
                reason: format!(
                    "{} shards, but the encoder has only {} attention heads",
                    spec.world_size, cfg.heads
                ),
            });
        }
        let r = Reader { file, format };
        let (h, d) = (cfg.hidden, cfg.head_dim());
        let heads = split_even(cfg.heads, spec.world_size, spec.rank);
        let head_rows = heads.start * d..heads.end * d;
        let ffn_cols = ffn_columns(cfg.ffn, spec);
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}");
            blocks.push(Block {
                q: r.column_parallel(&format!("{p}.attn_q"), h, h, head_rows.clone())?,
                k: r.column_parallel(&format!("{p}.attn_k"), h, h, head_rows.clone())?,
                v: r.column_parallel(&format!("{p}.attn_v"), h, h, head_rows.clone())?,
                o: r.row_parallel(&format!("{p}.attn_output"), h, h, head_rows.clone())?,
                attn_norm: r.norm(&format!("{p}.attn_output_norm"), h)?,
                up: r.column_parallel(&format!("{p}.ffn_up"), cfg.ffn, h, ffn_cols.clone())?,
                down: r.row_parallel(&format!("{p}.ffn_down"), h, cfg.ffn, ffn_cols.clone())?,
                out_norm: r.norm(&format!("{p}.layer_output_norm"), h)?,
            });
        }
        Ok(Self {
            token_embd: r.embedding("token_embd.weight", cfg.vocab, h)?,
            position_embd: r.embedding("position_embd.weight", cfg.positions, h)?,
            type_embd: match cfg.type_vocab {
                0 => None,
                n => Some(r.embedding("token_types.weight", n, h)?),
            },
            embd_norm: r.norm("token_embd_norm", h)?,
            blocks,
            heads,
            spec,
            cfg,
        })
    }

    /// Pools with `pooling`, normalizing or not, instead of the model's
    /// own choice.
    pub fn set_pooling(&mut self, pooling: Pooling, normalize: bool) {
        self.cfg.pooling = pooling;
        self.cfg.normalize = normalize;
    }

    /// The configuration.
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// The pooled vector of each sequence of `seqs` (token ids, `[CLS]` and
    /// `[SEP]` included), packed into one batch; every rank of the group
    /// must call it with the same sequences.
    ///
    /// # Errors
    /// If a sequence is empty, longer than the trained positions or holds a
    /// token outside the vocabulary, or the collective fails.
    pub fn forward(&self, seqs: &[&[u32]], collective: &dyn Collective) -> Result<Vec<Vec<f32>>> {
        let h = self.cfg.hidden;
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() || s.len() > self.cfg.positions {
                return Err(Error::Shard(format!(
                    "sequence {i} has {} tokens; an encoder pass takes 1 to {}",
                    s.len(),
                    self.cfg.positions
                )));
            }
            if let Some(&t) = s.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                return Err(Error::Shard(format!(
                    "sequence {i} holds token {t}, outside the vocabulary of {}",
                    self.cfg.vocab
                )));
            }
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let positions: Vec<u32> = seqs.iter().flat_map(|s| 0..s.len() as u32).collect();
        let t = tokens.len();
        let mut x = vec![0f32; t * h];
        let mut add = vec![0f32; t * h];
        self.token_embd.lookup_into(&tokens, &mut x)?;
        self.position_embd.lookup_into(&positions, &mut add)?;
        x.iter_mut().zip(&add).for_each(|(a, b)| *a += b);
        if let Some(types) = &self.type_embd {
            types.lookup_into(&vec![0u32; t], &mut add)?;
            x.iter_mut().zip(&add).for_each(|(a, b)| *a += b);
        }
        let mut hidden = x;
        rows_on_pool(&mut hidden, h, |_, rows| {
            let copy = rows.to_vec();
            layer_norm_rows(&copy, &self.embd_norm, self.cfg.eps, rows);
        });
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        for block in &self.blocks {
            self.block(block, &mut hidden, &lens, collective)?;
        }
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for &len in &lens {
            out.push(pool(
                &hidden[start * h..(start + len) * h],
                h,
                self.cfg.pooling,
                self.cfg.normalize,
            ));
            start += len;
        }
        Ok(out)
    }

    /// One post-norm block over the packed rows of `hidden`, replaced by
    /// its output. The row-wise work (biases, GELU, residual and LayerNorm)
    /// runs on the current compute pool, split by rows.
    fn block(
        &self,
        b: &Block,
        hidden: &mut Vec<f32>,
        lens: &[usize],
        collective: &dyn Collective,
    ) -> Result<()> {
        let (h, d, eps) = (self.cfg.hidden, self.cfg.head_dim(), self.cfg.eps);
        let t = hidden.len() / h;
        let project = |(lin, bias): &(Linear, Vec<f32>)| -> Result<Vec<f32>> {
            let mut y = lin.forward(hidden, t)?;
            rows_on_pool(&mut y, bias.len(), |_, rows| add_bias(rows, bias));
            Ok(y)
        };
        let (q, k, v) = (project(&b.q)?, project(&b.k)?, project(&b.v)?);
        let ctx = attention(&q, &k, &v, lens, self.heads.len(), d);
        let mut attn = b.o.0.forward(&ctx, t)?;
        collective.all_reduce_sum(&mut attn)?;
        residual_norm(&mut attn, &b.o.1, hidden, &b.attn_norm, eps);
        *hidden = attn;

        let mut up = b.up.0.forward(hidden, t)?;
        let (bias, tanh) = (&b.up.1, self.cfg.gelu_tanh);
        rows_on_pool(&mut up, bias.len(), |_, rows| {
            add_bias(rows, bias);
            gelu(rows, tanh);
        });
        let mut down = b.down.0.forward(&up, t)?;
        collective.all_reduce_sum(&mut down)?;
        residual_norm(&mut down, &b.down.1, hidden, &b.out_norm, eps);
        *hidden = down;
        Ok(())
    }
}

/// `f(first row, rows)` over blocks of whole `width`-wide rows of `data`,
/// on the current compute pool (a few blocks per thread).
fn rows_on_pool(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = data.len().checked_div(width).unwrap_or(0);
    if rows == 0 {
        return;
    }
    crate::threads::with_current(|pool| {
        let per = rows.div_ceil(pool.threads() * 4).max(1);
        pool.chunks_mut(data, per * width, |c, chunk| f(c * per, chunk));
    });
}

/// `y = LayerNorm(y + bias + residual)`, row by row on the current pool.
fn residual_norm(y: &mut [f32], bias: &[f32], residual: &[f32], norm: &Norm, eps: f32) {
    let width = bias.len();
    rows_on_pool(y, width, |first, rows| {
        let res = &residual[first * width..first * width + rows.len()];
        for (row, r) in rows.chunks_exact_mut(width).zip(res.chunks_exact(width)) {
            for ((a, &b), &x) in row.iter_mut().zip(bias).zip(r) {
                *a += b + x;
            }
        }
        let copy = rows.to_vec();
        layer_norm_rows(&copy, norm, eps, rows);
    });
}

fn add_bias(y: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in y.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

fn layer_norm_rows(x: &[f32], norm: &Norm, eps: f32, out: &mut [f32]) {
    crate::ops::layer_norm(x, &norm.weight, &norm.bias, eps, out);
}

/// GELU in place: erf's (BERT's `gelu`) or the tanh approximation.
fn gelu(x: &mut [f32], tanh: bool) {
    if tanh {
        let copy = x.to_vec();
        crate::ops::gelu_tanh(&copy, x);
        return;
    }
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// The error function, by Abramowitz and Stegun's 7.1.26 (absolute error
/// below 1.5e-7 in exact arithmetic, 1e-6 in f32 near 0): a short
/// polynomial and one `exp`, with no branch but the sign.
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * (-a * a).exp();
    y.copysign(x)
}

/// Bidirectional attention of each sequence (lengths `lens`, packed rows)
/// over its own rows, for `heads` heads of width `d`; q, k and v are
/// `rows × heads·d`. Each (sequence, head) pair is one task on the current
/// compute pool.
fn attention(q: &[f32], k: &[f32], v: &[f32], lens: &[usize], heads: usize, d: usize) -> Vec<f32> {
    let width = heads * d;
    let starts: Vec<usize> = lens
        .iter()
        .scan(0, |s, &l| {
            let start = *s;
            *s += l;
            Some(start)
        })
        .collect();
    let scale = 1.0 / (d as f32).sqrt();
    let mut parts: Vec<Vec<f32>> = vec![Vec::new(); lens.len() * heads];
    crate::threads::with_current(|pool| {
        pool.for_each_mut(&mut parts, |i, out| {
            let (s, head) = (i / heads, i % heads);
            let (start, len) = (starts[s], lens[s]);
            let gather = |m: &[f32]| -> Vec<f32> {
                let mut out = vec![0f32; len * d];
                for (r, o) in out.chunks_exact_mut(d).enumerate() {
                    let at = (start + r) * width + head * d;
                    o.copy_from_slice(&m[at..at + d]);
                }
                out
            };
            let (qh, kh, vh) = (gather(q), gather(k), gather(v));
            let mut scores = vec![0f32; len * len];
            kernels::cpu::skinny::matmul_xwt(&qh, len, &kh, len, d, &mut scores);
            for row in scores.chunks_exact_mut(len) {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x * scale - max).exp();
                    sum += *x;
                }
                row.iter_mut().for_each(|x| *x /= sum);
            }
            let mut vt = vec![0f32; d * len];
            for r in 0..len {
                for c in 0..d {
                    vt[c * len + r] = vh[r * d + c];
                }
            }
            *out = vec![0f32; len * d];
            kernels::cpu::skinny::matmul_xwt(&scores, len, &vt, d, len, out);
        });
    });
    let rows: usize = lens.iter().sum();
    let mut ctx = vec![0f32; rows * width];
    for (i, part) in parts.iter().enumerate() {
        let (s, head) = (i / heads, i % heads);
        for (r, row) in part.chunks_exact(d).enumerate() {
            let at = (starts[s] + r) * width + head * d;
            ctx[at..at + d].copy_from_slice(row);
        }
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_takes_the_mean_first_or_last_row_and_normalizes() {
        let rows = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(pool(&rows, 2, Pooling::Mean, false), vec![3.0, 4.0]);
        assert_eq!(pool(&rows, 2, Pooling::Cls, false), vec![1.0, 2.0]);
        assert_eq!(pool(&rows, 2, Pooling::Last, false), vec![5.0, 6.0]);
        let n = pool(&rows, 2, Pooling::Last, true);
        assert!((n[0] * n[0] + n[1] * n[1] - 1.0).abs() < 1e-6);
        assert_eq!(pool(&[0.0, 0.0], 2, Pooling::Mean, true), vec![0.0, 0.0]);
    }

    #[test]
    fn ffn_columns_cover_the_width_in_whole_blocks() {
        for (ffn, world) in [(1536, 2), (1536, 3), (128, 2), (100, 3), (37, 2)] {
            let parts: Vec<_> = (0..world)
                .map(|rank| {
                    ffn_columns(
                        ffn,
                        ShardSpec {
                            rank,
                            world_size: world,
                        },
                    )
                })
                .collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[world - 1].end, ffn);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            if ffn % 32 == 0 {
                assert!(parts.iter().all(|p| p.start % 32 == 0));
            }
        }
    }

    #[test]
    fn erf_is_within_its_bound_of_candles() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let (a, b) = (erf(x), candle_core::cpu::erf::erf_f32(x));
            // The formula's 1.5e-7, plus f32's rounding of 1 − p·e^(−x²),
            // which cancels near 0 (there GELU multiplies it by x/2).
            assert!((a - b).abs() < 1e-6, "erf({x}) = {a}, candle {b}");
        }
    }

    #[test]
    fn attention_stays_within_each_sequence() {
        // Two sequences of one row each: a row attends only to itself, so
        // its output is its own value row.
        let (q, k) = (vec![1.0, 0.0, 0.0, 1.0], vec![1.0, 0.0, 0.0, 1.0]);
        let v = vec![5.0, 6.0, 7.0, 8.0];
        assert_eq!(attention(&q, &k, &v, &[1, 1], 1, 2), v);
        // One sequence of two rows with equal scores: the mean of the values.
        let out = attention(&[0.0; 4], &[0.0; 4], &v, &[2], 1, 2);
        assert_eq!(out, vec![6.0, 7.0, 6.0, 7.0]);
    }
}
