//! The shape of a transformer model of one of the supported families, read
//! from GGUF metadata or built synthetically.
//!
//! [`ModelConfig`] is always validated: KV heads divide the query heads,
//! sizes are non-zero and within sanity bounds, the rotary settings are
//! finite. Code downstream may rely on those facts without re-checking them.
//! What sets the family's block apart is its [`Family`] ([`ModelConfig::family`]).

use crate::error::{Error, Result};
use crate::family::{Arch, Family, NormKind, Positions, RopeStyle, Swa, SUPPORTED_ARCHS};
use crate::gguf::GgufFile;

/// The rotary embedding of a model (Su et al. 2021, RoFormer) with the
/// scaling its metadata gives: the angle of pair `i` at position `p` is
/// `p · freq_scale · base^(-2i/dims) / freq_factors[i]`, over the first
/// `dims` of each head (`rot_dims`, the whole head unless the model rotates
/// part of it), and every cosine and sine is scaled by `attn_factor`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeConfig {
    /// The base of the frequencies.
    pub base: f32,
    /// How a head's dimensions are paired.
    pub style: RopeStyle,
    /// Linear position scaling (`1 / rope.scaling.factor`; 1 when unscaled).
    pub freq_scale: f32,
    /// Per-frequency divisors, one per rotated pair: Llama 3's rope
    /// scaling, stored by its GGUF conversion as the tensor
    /// `rope_freqs.weight`, or LongRoPE's (Phi-3's) `rope_factors_long` or
    /// `rope_factors_short`, chosen by the context the model runs with.
    pub freq_factors: Option<Vec<f32>>,
    /// The rotated dimensions of a head when fewer than all of them
    /// (partial rotary embedding, `rope.dimension_count`); the rest pass
    /// through unrotated. `None`: the whole head.
    #[serde(default)]
    pub rot_dims: Option<usize>,
    /// The factor on every cosine and sine (`rope.scaling.attn_factor`:
    /// LongRoPE's attention scaling; 1 when unset), on top of YaRN's
    /// `mscale`.
    #[serde(default = "one")]
    pub attn_factor: f32,
    /// YaRN (Peng et al. 2023): the frequencies between the correction
    /// dimensions blend interpolated and original angles, and the rotation
    /// is scaled by `mscale`.
    pub yarn: Option<Yarn>,
}

/// YaRN's parameters, as llama.cpp derives them from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Yarn {
    /// The context the model was trained with before scaling
    /// (`rope.scaling.original_context_length`).
    pub orig_context: usize,
    /// Rotations per original context above which a frequency keeps its
    /// original angle (32).
    pub beta_fast: f32,
    /// ... and below which it is fully interpolated (1).
    pub beta_slow: f32,
    /// The factor on every cosine and sine: `attn_factor ·
    /// (1 + 0.1 ln(1 / freq_scale))` as llama.cpp's `rope_yarn` computes it.
    pub mscale: f32,
}

impl Yarn {
    /// The pair range `[low, high]` over which the angles blend, for a head
    /// of `dims` rotated dimensions and frequency base `base` (ggml's
    /// `ggml_rope_yarn_corr_dims`).
    pub fn corr_dims(&self, dims: usize, base: f32) -> (f32, f32) {
        let dim = |rotations: f32| {
            dims as f32 * (self.orig_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = dim(self.beta_fast).floor().max(0.0);
        let high = dim(self.beta_slow).ceil().min(dims as f32 - 1.0);
        (low, high)
    }

    /// How much of pair `i` keeps its original angle: 1 below `low`, 0
    /// above `high`, linear between.
    pub fn ramp(low: f32, high: f32, i: usize) -> f32 {
        let y = (i as f32 - low) / (high - low).max(0.001);
        1.0 - y.clamp(0.0, 1.0)
    }
}

impl RopeConfig {
    /// Unscaled rotary embedding with `base`, paired `style`.
    pub fn plain(base: f32, style: RopeStyle) -> Self {
        Self {
            base,
            style,
            freq_scale: 1.0,
            freq_factors: None,
            rot_dims: None,
            attn_factor: 1.0,
            yarn: None,
        }
    }

    /// The rotated dimensions of a `head_dim`-wide head.
    pub fn dims(&self, head_dim: usize) -> usize {
        self.rot_dims.unwrap_or(head_dim)
    }
}

/// Whether `dims` dimensions of a `head_dim`-wide head can be rotated: an
/// even number from 2 to the head width.
fn rotatable(dims: usize, head_dim: usize) -> bool {
    dims > 0 && dims.is_multiple_of(2) && dims <= head_dim
}

/// Serde's default for [`RopeConfig::attn_factor`].
fn one() -> f32 {
    1.0
}

/// LongRoPE's two sets of frequency divisors (Phi-3's 128k models): the
/// long ones when the model runs with a context beyond the one it was
/// trained with before scaling, else the short ones (llama.cpp's rule).
struct LongRope {
    long: Option<Vec<f32>>,
    short: Option<Vec<f32>>,
    orig_context: usize,
}

/// The layers that attend through a sliding window, and how.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlidingWindow {
    /// A windowed layer's row at position `p` sees keys after `p − window`.
    pub window: usize,
    /// Whether each layer is windowed.
    pub layers: Vec<bool>,
    /// The rotary embedding of the windowed layers (Gemma 3's differs from
    /// the global layers').
    pub rope: RopeConfig,
}

/// Hyper-parameters of a transformer of one of the supported families.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// The family.
    pub arch: Arch,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one attention head (`hidden / n_heads` unless the file says
    /// otherwise, as Qwen3's does).
    pub head_dim: usize,
    /// Feed-forward inner width.
    pub ffn: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Trained context window in tokens.
    pub context: usize,
    /// The norms' epsilon (RMSNorm's or LayerNorm's, as the family has).
    pub norm_eps: f32,
    /// The rotary embedding (of the global layers, where some are windowed).
    pub rope: RopeConfig,
    /// Windowed layers, where the family has a pattern of them.
    pub sliding: Option<SlidingWindow>,
    /// The factor on `q·k` (`1/√head_dim` but for Gemma's 27B models).
    pub attn_scale: f32,
    /// The attention scores' soft-cap, `cap · tanh(s / cap)`; 0 for none.
    pub attn_softcap: f32,
    /// The logits' soft-cap; 0 for none.
    pub final_softcap: f32,
}

/// The longest context a model may run with (2^20 positions). Tables sized
/// by the context (rotary angles) are built at load, so a file claiming
/// billions of positions is refused before anything is allocated, unless a
/// `max_model_len` caps it (see [`ModelConfig::from_gguf_capped`]).
pub const MAX_CONTEXT: usize = 1 << 20;

/// Sanity bounds on each dimension, far above any released model, so that
/// no product of them overflows and no table sized by them is absurd.
const MAX_DIMS: [(&str, usize); 6] = [
    ("n_layers", 4096),
    ("hidden", 1 << 17),
    ("n_heads", 4096),
    ("ffn", 1 << 20),
    ("vocab", 1 << 22),
    ("head_dim", 1024),
];

impl ModelConfig {
    /// What sets this family's block apart.
    pub fn family(&self) -> Family {
        self.arch.family()
    }

    /// Whether layer `layer` (of the whole model) attends through a window.
    pub fn is_windowed(&self, layer: usize) -> bool {
        self.sliding
            .as_ref()
            .is_some_and(|s| s.layers.get(layer).copied().unwrap_or(false))
    }

    /// Layer `layer`'s attention: scale, soft-cap and window.
    pub fn attn_params(&self, layer: usize) -> kernels::cpu::attn::AttnParams {
        kernels::cpu::attn::AttnParams {
            scale: self.attn_scale,
            softcap: self.attn_softcap,
            window: match &self.sliding {
                Some(s) if self.is_windowed(layer) => s.window,
                _ => 0,
            },
        }
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of all query heads together (`hidden` in most families).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Reads the family's keys of a GGUF file (`general.architecture` must
    /// be one of [`SUPPORTED_ARCHS`]).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_capped(file, None)
    }

    /// [`ModelConfig::from_gguf`], with the context capped to `max_model_len`
    /// positions when the file trained a longer one (a warning says so).
    /// The cap is applied before validation, so a file claiming more than
    /// [`MAX_CONTEXT`] runs under a cap within it.
    pub fn from_gguf_capped(file: &GgufFile, max_model_len: Option<usize>) -> Result<Self> {
        let name = file.get_str("general.architecture")?;
        let unsupported = |what, found: String, supported| Error::Unsupported {
            path: file.path().to_path_buf(),
            what,
            found,
            supported,
        };
        let arch = Arch::from_gguf(name)
            .ok_or_else(|| unsupported("architecture", name.to_string(), SUPPORTED_ARCHS))?;
        let p = arch.family().prefix;
        let key = |k: &str| format!("{p}.{k}");
        let model_err = |reason: String| Error::ModelFile {
            path: file.path().to_path_buf(),
            reason,
        };
        let n_heads = file.get_usize(&key("attention.head_count"))?;
        let hidden = file.get_usize(&key("embedding_length"))?;
        let vocab = match file.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => file.tensor_info("token_embd.weight")?.1[0],
        };
        let head_dim = match file.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            // Validation names the zero head count.
            None if n_heads == 0 => 0,
            None if hidden.is_multiple_of(n_heads) => hidden / n_heads,
            None => {
                return Err(model_err(format!(
                    "hidden size {hidden} is not a multiple of the head count {n_heads}, and {} is not set",
                    key("attention.key_length")
                )))
            }
        };
        if let Some(v) = file.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(unsupported(
                    "value head width",
                    format!("{v} (keys {head_dim})"),
                    "values as wide as keys",
                ));
            }
        }
        // The rotary tables are sized by these: a zero is named as such
        // before a rope tensor's shape is checked against it.
        for (field, v) in [
            ("hidden", hidden),
            ("n_heads", n_heads),
            ("head_dim", head_dim),
        ] {
            if v == 0 {
                return Err(model_err(format!("{field} must be greater than 0")));
            }
        }
        let (rope, long_rope) = Self::rope_from_gguf(file, arch, head_dim)?;
        let family = arch.family();
        let n_layers = file.get_usize(&key("block_count"))?;
        file.check_block_count(&key("block_count"), n_layers)?;
        let attn_softcap = match family.attn_softcap {
            Some(default) => file
                .opt_f32(&key("attn_logit_softcapping"))?
                .unwrap_or(default),
            None => 0.0,
        };
        let final_softcap = file
            .opt_f32(&key("final_logit_softcapping"))?
            .unwrap_or(family.final_softcap);
        // `attention.scale` (llama.cpp's key; what a Hugging Face Gemma's
        // query_pre_attn_scalar becomes) overrides the family's rule.
        let attn_scale = match (
            file.opt_f32(&key("attention.scale"))?,
            family.hidden_query_scale_at_layers,
        ) {
            (Some(s), _) if s.is_finite() && s > 0.0 => s,
            (Some(s), _) => {
                return Err(model_err(format!(
                    "{} is {s}, not a number greater than 0",
                    key("attention.scale")
                )))
            }
            (None, Some(l)) if l == n_layers && n_heads > 0 => {
                1.0 / ((hidden / n_heads) as f32).sqrt()
            }
            _ if head_dim > 0 => 1.0 / (head_dim as f32).sqrt(),
            _ => 1.0,
        };
        let mut config = Self {
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads: file
                .opt_usize(&key("attention.head_count_kv"))?
                .unwrap_or(n_heads),
            head_dim,
            ffn: file.get_usize(&key("feed_forward_length"))?,
            vocab,
            context: file.opt_usize(&key("context_length"))?.unwrap_or(2048),
            norm_eps: file
                .opt_f32(&key(match family.norm {
                    NormKind::Rms => "attention.layer_norm_rms_epsilon",
                    NormKind::Layer => "attention.layer_norm_epsilon",
                }))?
                .unwrap_or(1e-5),
            sliding: None,
            rope,
            attn_scale,
            attn_softcap,
            final_softcap,
        };
        let window = file
            .opt_usize(&key("attention.sliding_window"))?
            .filter(|&w| w > 0);
        match family.swa {
            // Within its window, sliding-window attention is full attention:
            // a model whose every layer is windowed, with a window shorter
            // than its context, runs with the window as its context, exactly.
            Swa::All => {
                if let Some(window) = window.filter(|&w| w < config.context) {
                    tracing::warn!(
                        "{}: sliding-window attention ({window} positions) is run as full attention over a context of {window} (of {} trained)",
                        file.path().display(),
                        config.context
                    );
                    config.context = window;
                }
            }
            Swa::Pattern {
                every,
                default_window,
                rope_base,
            } => {
                if let Some(window) = window.or(default_window) {
                    let layers = match file.opt_usize(&key("attention.sliding_window_pattern")) {
                        Ok(Some(n)) => pattern(n_layers, n),
                        Ok(None) => pattern(n_layers, every),
                        // An array: one flag per layer.
                        Err(_) => file
                            .opt_int_array(&key("attention.sliding_window_pattern"))?
                            .unwrap_or_default()
                            .into_iter()
                            .map(|v| v != 0)
                            .collect(),
                    };
                    let base_swa = file.opt_f32(&key("rope.freq_base_swa"))?;
                    let rope = match (base_swa, rope_base) {
                        (Some(b), None) => RopeConfig {
                            base: b,
                            ..config.rope.clone()
                        },
                        (None, None) => config.rope.clone(),
                        (b, Some(default)) => {
                            RopeConfig::plain(b.unwrap_or(default), config.rope.style)
                        }
                    };
                    config.sliding = Some(SlidingWindow {
                        window,
                        layers,
                        rope,
                    });
                }
            }
        }
        if let Some(cap) = max_model_len.filter(|&cap| cap < config.context) {
            tracing::warn!(
                "{}: the model was trained for {} positions; running it with {cap} (max_model_len)",
                file.path().display(),
                config.context
            );
            config.context = cap;
        }
        if let Some(l) = long_rope {
            // llama.cpp's rule: the long factors when the context run
            // exceeds the one trained before scaling.
            if config.rope.freq_factors.is_none() {
                let long = config.context > l.orig_context;
                config.rope.freq_factors = if long { l.long } else { l.short };
                tracing::info!(
                    "{}: LongRoPE with its {} factors (context {} against {} trained before scaling)",
                    file.path().display(),
                    if long { "long" } else { "short" },
                    config.context,
                    l.orig_context
                );
            }
        }
        config.validate().map_err(|e| model_err(e.to_string()))?;
        Ok(config)
    }

    /// The rotary embedding's base, pairing, rotated dimensions and scaling
    /// from `file`, and LongRoPE's factors where the file has them (chosen
    /// by the caller once the context is known).
    fn rope_from_gguf(
        file: &GgufFile,
        arch: Arch,
        head_dim: usize,
    ) -> Result<(RopeConfig, Option<LongRope>)> {
        let p = arch.family().prefix;
        let key = |k: &str| format!("{p}.{k}");
        let model_err = |reason: String| Error::ModelFile {
            path: file.path().to_path_buf(),
            reason,
        };
        let base = file.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let mut rope = RopeConfig::plain(base, arch.family().rope_style());
        let rotary = matches!(arch.family().positions, Positions::Rotary(_));
        if let Some(dims) = file
            .opt_usize(&key("rope.dimension_count"))?
            // (No heads: validation names that.)
            .filter(|&d| rotary && head_dim > 0 && d != head_dim)
        {
            if !rotatable(dims, head_dim) {
                return Err(model_err(format!(
                    "{} is {dims}: the rotated dimensions must be an even number from 2 to the head width {head_dim}",
                    key("rope.dimension_count")
                )));
            }
            rope.rot_dims = Some(dims);
        }
        let pairs = rope.dims(head_dim) / 2;
        if let Some(a) = file.opt_f32(&key("rope.scaling.attn_factor"))? {
            if !(a.is_finite() && a > 0.0) {
                return Err(model_err(format!(
                    "{} is {a}, not a finite number greater than 0",
                    key("rope.scaling.attn_factor")
                )));
            }
            rope.attn_factor = a;
        }
        const SUPPORTED: &str = "none, linear, yarn, longrope with its rope_factors_long and rope_factors_short tensors, and Llama 3's (rope_freqs.weight)";
        let scaling = file.opt_str(&key("rope.scaling.type"))?;
        let yarn = match scaling {
            None | Some("none") | Some("linear") | Some("longrope") => false,
            Some("yarn") => true,
            Some(other) => {
                return Err(Error::Unsupported {
                    path: file.path().to_path_buf(),
                    what: "rope scaling",
                    found: other.to_string(),
                    supported: SUPPORTED,
                })
            }
        };
        // llama.cpp's order: the scaling factor, else the older linear key.
        let factor = match file.opt_f32(&key("rope.scaling.factor"))? {
            Some(f) if f != 0.0 => Some(f),
            _ => file.opt_f32(&key("rope.scale_linear"))?,
        };
        if let Some(f) = factor.filter(|&f| f != 0.0) {
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::ModelFile {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "rope scaling factor {f} is not a finite number greater than 0"
                    ),
                });
            }
            rope.freq_scale = 1.0 / f;
        }
        if yarn {
            if file
                .opt_f32(&key("rope.scaling.yarn_log_multiplier"))?
                .is_some_and(|m| m != 0.0)
            {
                return Err(Error::Unsupported {
                    path: file.path().to_path_buf(),
                    what: "rope scaling",
                    found: "yarn with a log multiplier (DeepSeek's)".into(),
                    supported: "yarn without rope.scaling.yarn_log_multiplier",
                });
            }
            let orig_context = match file.opt_usize(&key("rope.scaling.original_context_length"))? {
                Some(n) => n,
                None => file.opt_usize(&key("context_length"))?.unwrap_or(2048),
            };
            // llama.cpp: yarn_attn_factor = mscale(factor) / (1 + 0.1 ln
            // factor), times rope.scaling.attn_factor; rope_yarn multiplies
            // it by 1 + 0.1 ln(1 / freq_scale) again.
            let factor = 1.0 / rope.freq_scale;
            let get_mscale = |s: f32| if s <= 1.0 { 1.0 } else { 0.1 * s.ln() + 1.0 };
            // (rope.scaling.attn_factor is the table's attn_factor.)
            let yarn_factor = get_mscale(factor) / (1.0 + 0.1 * factor.ln());
            rope.yarn = Some(Yarn {
                orig_context,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: yarn_factor * (1.0 + 0.1 * (1.0 / rope.freq_scale).ln()),
            });
        }
        let factors = |name: &str| -> Result<Option<Vec<f32>>> {
            if !file.has_tensor(name) {
                return Ok(None);
            }
            let factors = file
                .tensor(name, &[pairs])?
                .dequantize(&candle_core::Device::Cpu)?
                .to_vec1::<f32>()?;
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(model_err(format!(
                    "{name} holds {bad}, not a finite number greater than 0"
                )));
            }
            Ok(Some(factors))
        };
        rope.freq_factors = factors("rope_freqs.weight")?;
        let long = factors("rope_factors_long.weight")?;
        let short = factors("rope_factors_short.weight")?;
        if scaling == Some("longrope") && (long.is_none() || short.is_none()) {
            return Err(Error::Unsupported {
                path: file.path().to_path_buf(),
                what: "rope scaling",
                found: "longrope".into(),
                supported: SUPPORTED,
            });
        }
        let long_rope = if long.is_some() || short.is_some() {
            let orig_context = match file.opt_usize(&key("rope.scaling.original_context_length"))? {
                Some(n) => n,
                None => file.opt_usize(&key("context_length"))?.unwrap_or(2048),
            };
            Some(LongRope {
                long,
                short,
                orig_context,
            })
        } else {
            None
        };
        Ok((rope, long_rope))
    }

    /// A named synthetic Llama shape: `135m` (the reference model's shape),
    /// `1b`, `8b`, or for tests `tiny` and `tiny32` (the same with head_dim
    /// 32, the CUDA attention's granularity).
    pub fn synthetic(name: &str) -> Result<Self> {
        let (n_layers, hidden, n_heads, n_kv_heads, ffn, vocab) = match name {
            "tiny" => (2, 64, 4, 2, 128, 256),
            "tiny32" => (2, 128, 4, 2, 256, 384),
            "135m" => (30, 576, 9, 3, 1536, 49152),
            "1b" => (16, 2048, 32, 8, 8192, 32000),
            "8b" => (32, 4096, 32, 8, 14336, 32000),
            other => {
                return Err(Error::Config(format!(
                    "unknown synthetic model '{other}' (choose tiny, tiny32, 135m, 1b or 8b)"
                )))
            }
        };
        let config = Self {
            arch: Arch::Llama,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim: hidden / n_heads,
            ffn,
            vocab,
            context: 8192,
            norm_eps: 1e-5,
            rope: RopeConfig::plain(10_000.0, RopeStyle::Normal),
            sliding: None,
            attn_scale: 1.0 / ((hidden / n_heads) as f32).sqrt(),
            attn_softcap: 0.0,
            final_softcap: 0.0,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the cross-field facts the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let nonzero = [
            ("n_layers", self.n_layers),
            ("hidden", self.hidden),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
            ("context", self.context),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Config(format!("{name} must be greater than 0")));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::Config(format!(
                "head count {} is not a multiple of the KV head count {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.context > MAX_CONTEXT {
            return Err(Error::Config(format!(
                "context {} is beyond the {MAX_CONTEXT} positions this engine runs (set max_model_len to run it with a shorter context)",
                self.context
            )));
        }
        let dims = [
            self.n_layers,
            self.hidden,
            self.n_heads,
            self.ffn,
            self.vocab,
            self.head_dim,
        ];
        for ((name, max), v) in MAX_DIMS.iter().zip(dims) {
            if v > *max {
                return Err(Error::Config(format!(
                    "{name} {v} is beyond the sanity bound of {max}"
                )));
            }
        }
        // Finite, and greater than 0 (or, where a 0 means "off", at least 0).
        let mut floats = vec![
            ("rope_base", self.rope.base, false),
            ("rope freq_scale", self.rope.freq_scale, false),
            ("norm_eps", self.norm_eps, false),
            ("attn_scale", self.attn_scale, false),
            ("attn_softcap", self.attn_softcap, true),
            ("final_softcap", self.final_softcap, true),
        ];
        if let Some(s) = &self.sliding {
            floats.push(("rope_base (windowed layers)", s.rope.base, false));
            floats.push((
                "rope freq_scale (windowed layers)",
                s.rope.freq_scale,
                false,
            ));
        }
        for (name, v, zero_ok) in floats {
            if !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))) {
                return Err(Error::Config(format!(
                    "{name} must be a finite number {}, not {v}",
                    if zero_ok {
                        "of at least 0"
                    } else {
                        "greater than 0"
                    }
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head dim {} must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if let Some(s) = &self.sliding {
            if s.window == 0 || s.layers.len() != self.n_layers {
                return Err(Error::Config(format!(
                    "a sliding window of {} over {} layer flags for {} layers",
                    s.window,
                    s.layers.len(),
                    self.n_layers
                )));
            }
        }
        if let Some(y) = &self.rope.yarn {
            if y.orig_context == 0 || !(y.mscale.is_finite() && y.mscale > 0.0) {
                return Err(Error::Config(format!(
                    "YaRN over an original context of {} with mscale {}",
                    y.orig_context, y.mscale
                )));
            }
        }
        let ropes = std::iter::once(&self.rope).chain(self.sliding.as_ref().map(|s| &s.rope));
        for rope in ropes {
            let dims = rope.dims(self.head_dim);
            if !rotatable(dims, self.head_dim) {
                return Err(Error::Config(format!(
                    "rotary embedding over {dims} dimensions of a head of {} (an even number from 2 to the head width is needed)",
                    self.head_dim
                )));
            }
            if let Some(f) = &rope.freq_factors {
                if f.len() != dims / 2 {
                    return Err(Error::Config(format!(
                        "{} rope frequency factors for {dims} rotated dimensions (one per pair is needed)",
                        f.len(),
                    )));
                }
            }
            if !(rope.attn_factor.is_finite() && rope.attn_factor > 0.0) {
                return Err(Error::Config(format!(
                    "rope attn_factor must be a finite number greater than 0, not {}",
                    rope.attn_factor
                )));
            }
        }
        Ok(())
    }

    /// Parameters in the transformer (embedding counted once when tied).
    /// (Post-norms and biases, a few vectors per layer, are left out.)
    pub fn parameter_count(&self) -> usize {
        let attn = self.hidden * self.q_width() * 2 + self.hidden * self.kv_width() * 2;
        let mats = if self.family().gated_ffn { 3 } else { 2 };
        let mlp = mats * self.hidden * self.ffn;
        self.n_layers * (attn + mlp + 2 * self.hidden) + self.vocab * self.hidden + self.hidden
    }
}

/// Layers `0..n` of a pattern of `every`: the last of each cycle global, the
/// others windowed (`every` 0: all windowed), as llama.cpp's `set_swa_pattern`.
fn pattern(n: usize, every: usize) -> Vec<bool> {
    (0..n)
        .map(|l| every == 0 || l % every < every - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file of `llama` metadata (u32 and f32 values) and no tensors.
    fn llama_gguf(name: &str, ints: &[(&str, u32)], floats: &[(&str, f32)]) -> std::path::PathBuf {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&((1 + ints.len() + floats.len()) as u64).to_le_bytes());
        let key = |b: &mut Vec<u8>, k: &str, ty: u32| {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
        };
        key(&mut b, "general.architecture", 8);
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(b"llama");
        for (k, v) in ints {
            key(&mut b, k, 4);
            b.extend_from_slice(&v.to_le_bytes());
        }
        for (k, v) in floats {
            key(&mut b, k, 6);
            b.extend_from_slice(&v.to_le_bytes());
        }
        let path = std::env::temp_dir().join(format!("parallm-{}-{name}.gguf", std::process::id()));
        std::fs::write(&path, b).expect("write the test file");
        path
    }

    #[test]
    fn a_model_file_with_a_bad_shape_is_an_error_naming_it_not_a_panic() {
        let shape = |heads: u32| {
            vec![
                ("llama.attention.head_count", heads),
                ("llama.embedding_length", 64),
                ("llama.block_count", 1),
                ("llama.feed_forward_length", 128),
                ("llama.vocab_size", 32),
                ("llama.rope.dimension_count", 16),
            ]
        };
        type Case<'a> = (&'a str, Vec<(&'a str, u32)>, Vec<(&'a str, f32)>, &'a str);
        let cases: [Case; 6] = [
            (
                "huge-context",
                [shape(4), vec![("llama.context_length", 1 << 24)]].concat(),
                vec![],
                "context 16777216 is beyond the 1048576 positions",
            ),
            (
                "max-context",
                [shape(4), vec![("llama.context_length", u32::MAX)]].concat(),
                vec![],
                "context 4294967295 is beyond",
            ),
            (
                "zero-heads",
                shape(0),
                vec![],
                "n_heads must be greater than 0",
            ),
            (
                "nan-rope",
                shape(4),
                vec![("llama.rope.freq_base", f32::NAN)],
                "rope_base must be a finite number greater than 0",
            ),
            (
                "zero-rope",
                shape(4),
                vec![("llama.rope.freq_base", 0.0)],
                "rope_base",
            ),
            (
                "negative-eps",
                shape(4),
                vec![("llama.attention.layer_norm_rms_epsilon", -1e-5)],
                "norm_eps must be a finite number greater than 0, not -0.00001",
            ),
        ];
        for (name, ints, floats, want) in cases {
            let path = llama_gguf(name, &ints, &floats);
            let file = GgufFile::open(&path).expect("a well-formed file");
            let err = ModelConfig::from_gguf(&file).expect_err(name).to_string();
            std::fs::remove_file(&path).ok();
            assert!(err.contains(want), "{name}: {err}");
            assert!(err.contains(&format!("{name}.gguf")), "{name}: {err}");
        }
        // The same shape with four heads is fine.
        let path = llama_gguf("four-heads", &shape(4), &[]);
        let file = GgufFile::open(&path).expect("a well-formed file");
        let c = ModelConfig::from_gguf(&file);
        std::fs::remove_file(&path).ok();
        assert_eq!(c.expect("valid").head_dim, 16);
    }

    #[test]
    fn synthetic_shapes_validate() {
        for name in ["tiny", "tiny32", "135m", "1b", "8b"] {
            let c = ModelConfig::synthetic(name).unwrap();
            assert_eq!(c.head_dim * c.n_heads, c.hidden);
        }
        assert!(ModelConfig::synthetic("huge").is_err());
    }

    #[test]
    fn bad_head_counts_are_named() {
        let mut c = ModelConfig::synthetic("tiny").unwrap();
        c.n_kv_heads = 3;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("KV head count 3"), "{err}");
    }
}
