//! Model families: what sets one transformer family's block apart, as data
//! the one layer loop ([`crate::backend::transformer`]) reads.
//!
//! A [`Family`] says which optional parts a family's blocks have (biases on
//! q/k/v and on the other matrices, a per-head RMSNorm on q and k, norms after
//! attention and FFN), its norm kind ([`NormKind`]), its FFN's activation and
//! whether it is gated, how positions enter ([`Positions`]: a rotary
//! embedding and how it pairs a head's dimensions, [`RopeStyle`], or learned
//! position embeddings), which layers a sliding window applies to ([`Swa`]), its
//! soft-caps and embedding scale, and the GGUF metadata prefix its keys use. GGUF names a block's tensors the same way in every family
//! (`blk.N.attn_q.weight`, `blk.N.attn_q.bias`, `blk.N.attn_q_norm.weight`
//! ...), so a family adds no tensor names of its own here; it says which of
//! them exist.
//!
//! This is a description per family over a single loop, not a forward per
//! family: candle-transformers writes a file per model, llama.cpp a graph
//! builder per architecture, mistral.rs a loader per family over per-model
//! forwards. Here every family runs the same `Transformer::step`, which asks
//! the block for its optional parts, so a backend implements each operation
//! once and every family gains it (tensor and pipeline parallelism, paged KV,
//! the CUDA backend).
//!
//! **Invariant:** [`Arch::family`] is the only place a family's traits are
//! written down; code elsewhere asks the [`Family`], never the [`Arch`].

use serde::{Deserialize, Serialize};

/// A GGUF `general.architecture` this engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2 and 3.x, TinyLlama, Mistral, SmolLM.
    Llama,
    /// Qwen2 and Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: a per-head RMSNorm on q and k before the rotary embedding.
    Qwen3,
    /// Phi-3: fused `q|k|v` and `gate|up` tensors, NeoX rope.
    Phi3,
    /// Gemma 2: embeddings scaled by √hidden, norms after attention and FFN
    /// too, GELU gating, soft-capped attention and logits, every other layer
    /// windowed.
    Gemma2,
    /// Gemma 3: Gemma 2's block with Qwen3's q/k norms and no soft-capping;
    /// five windowed layers (with their own rope base) to each global one.
    Gemma3,
    /// GPT-2: learned position embeddings rather than a rotary one,
    /// LayerNorm with biases, an ungated GELU FFN, and biases on every
    /// matrix (`q|k|v` fused).
    Gpt2,
}

/// The architectures accepted, as GGUF names them (for error messages).
pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3, phi3, gemma2, gemma3, gpt2";

/// How a rotary embedding pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's "normal" rope, for which
    /// GGUF's Llama q/k weights are stored permuted.
    Normal,
    /// Halves `(i, i + d/2)`: GPT-NeoX's pairing (Qwen, Gemma, Phi-3).
    Neox,
}

/// How a model tells its attention the positions of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// A rotary embedding of q and k (RoFormer), paired as given.
    Rotary(RopeStyle),
    /// A learned embedding per position (`position_embd.weight`, one row
    /// per trained position), added to the token embeddings (GPT-2).
    Learned,
}

/// The kind of a model's normalizations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    /// RMSNorm, `x / rms(x) · w` (Zhang & Sennrich 2019).
    Rms,
    /// LayerNorm, `(x − mean) / std · w + b` (Ba et al. 2016), with a bias
    /// (`*_norm.bias`) beside every weight.
    Layer,
}

/// The activation of the FFN: gated, `act(gate) · up`, or on `up` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU, tanh approximation (GeGLU).
    GeluTanh,
}

/// Which layers attend through a sliding window, when the metadata sets one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Swa {
    /// Every layer (Mistral, Phi-3): the model runs with the window as its
    /// context, within which windowed attention is full attention.
    All,
    /// A repeating pattern of `every` layers, the last of each global and
    /// the others windowed (unless `attention.sliding_window_pattern` says
    /// otherwise).
    Pattern {
        /// Layers per cycle.
        every: usize,
        /// The window when the file names none (none: no windowed layers).
        default_window: Option<usize>,
        /// The rope base of the windowed layers when the file names none
        /// (`rope.freq_base_swa`), with no scaling; `None`: the global rope.
        rope_base: Option<f32>,
    },
}

/// Whether a block's tensor is in every file of a family, may be, or never is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Never read.
    Absent,
    /// Read when the file has it.
    Optional,
    /// Read, and its absence is an error naming the file and tensor.
    Required,
}

/// What sets a family's transformer block apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Family {
    /// The architecture.
    pub arch: Arch,
    /// The prefix of the family's GGUF metadata keys (`qwen2.block_count`).
    pub prefix: &'static str,
    /// How positions reach the attention: a rotary embedding (and its
    /// pairing) or learned position embeddings.
    pub positions: Positions,
    /// RMSNorm or LayerNorm (with biases), for every norm of the model but
    /// the per-head q/k norms (always RMSNorm).
    pub norm: NormKind,
    /// Biases on q, k and v (`blk.N.attn_{q,k,v}.bias`).
    pub qkv_bias: Part,
    /// A per-head RMSNorm of q and k before the rotary embedding
    /// (`blk.N.attn_{q,k}_norm.weight`, one `head_dim` vector each).
    pub qk_norm: Part,
    /// Whether the FFN's gate and up projections are one tensor
    /// (`blk.N.ffn_up.weight`, gate rows first) rather than `ffn_gate` and
    /// `ffn_up`. (A fused `attn_qkv.weight` is read wherever a file has one,
    /// as llama.cpp does.)
    pub fused_gate_up: bool,
    /// The FFN's activation.
    pub act: Activation,
    /// Whether the FFN is gated (`down(act(gate) · up)`, with a `ffn_gate`)
    /// or not (`down(act(up))`, GPT-2).
    pub gated_ffn: bool,
    /// Biases on the attention output and the FFN's up and down matrices
    /// (`attn_output.bias`, `ffn_up.bias`, `ffn_down.bias`).
    pub dense_bias: bool,
    /// RMSNorms of the attention and FFN outputs before their residual adds
    /// (`blk.N.post_attention_norm.weight`, `blk.N.post_ffw_norm.weight`).
    pub post_norms: bool,
    /// Whether the token embeddings are scaled by √hidden.
    pub embed_scale: bool,
    /// Which layers a sliding window applies to.
    pub swa: Swa,
    /// The attention scores' soft-cap when the file names none
    /// (`attn_logit_softcapping`); `None`: never capped.
    pub attn_softcap: Option<f32>,
    /// The logits' soft-cap when the file names none
    /// (`final_logit_softcapping`, read for every family); 0: none.
    pub final_softcap: f32,
    /// Gemma's 27B models scale queries by `1/√(hidden / heads)` rather
    /// than `1/√head_dim` (their `query_pre_attn_scalar`); GGUF does not
    /// carry it, so llama.cpp tells them by their layer count, as here.
    pub hidden_query_scale_at_layers: Option<usize>,
}

/// The traits most families share: a Llama block.
const LLAMA_LIKE: Family = Family {
    arch: Arch::Llama,
    prefix: "llama",
    positions: Positions::Rotary(RopeStyle::Normal),
    norm: NormKind::Rms,
    qkv_bias: Part::Absent,
    qk_norm: Part::Absent,
    fused_gate_up: false,
    act: Activation::Silu,
    gated_ffn: true,
    dense_bias: false,
    post_norms: false,
    embed_scale: false,
    swa: Swa::All,
    attn_softcap: None,
    final_softcap: 0.0,
    hidden_query_scale_at_layers: None,
};

impl Arch {
    /// The architecture GGUF names `name`, if this engine runs it.
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "phi3" => Some(Self::Phi3),
            "gemma2" => Some(Self::Gemma2),
            "gemma3" => Some(Self::Gemma3),
            "gpt2" => Some(Self::Gpt2),
            _ => None,
        }
    }

    /// The name GGUF gives it.
    pub fn name(self) -> &'static str {
        self.family().prefix
    }

    /// The family's description.
    pub fn family(self) -> Family {
        match self {
            Self::Llama => Family {
                // llama.cpp reads them when present (some Llama-architecture
                // conversions carry them).
                qkv_bias: Part::Optional,
                ..LLAMA_LIKE
            },
            Self::Qwen2 => Family {
                arch: self,
                prefix: "qwen2",
                positions: Positions::Rotary(RopeStyle::Neox),
                qkv_bias: Part::Required,
                ..LLAMA_LIKE
            },
            Self::Qwen3 => Family {
                arch: self,
                prefix: "qwen3",
                positions: Positions::Rotary(RopeStyle::Neox),
                qk_norm: Part::Required,
                ..LLAMA_LIKE
            },
            Self::Phi3 => Family {
                arch: self,
                prefix: "phi3",
                positions: Positions::Rotary(RopeStyle::Neox),
                fused_gate_up: true,
                ..LLAMA_LIKE
            },
            Self::Gemma2 => Family {
                arch: self,
                prefix: "gemma2",
                positions: Positions::Rotary(RopeStyle::Neox),
                act: Activation::GeluTanh,
                post_norms: true,
                embed_scale: true,
                swa: Swa::Pattern {
                    every: 2,
                    default_window: Some(4096),
                    rope_base: None,
                },
                attn_softcap: Some(50.0),
                final_softcap: 30.0,
                hidden_query_scale_at_layers: Some(46),
                ..LLAMA_LIKE
            },
            Self::Gemma3 => Family {
                arch: self,
                prefix: "gemma3",
                positions: Positions::Rotary(RopeStyle::Neox),
                qk_norm: Part::Required,
                act: Activation::GeluTanh,
                post_norms: true,
                embed_scale: true,
                swa: Swa::Pattern {
                    every: 6,
                    default_window: None,
                    rope_base: Some(10_000.0),
                },
                hidden_query_scale_at_layers: Some(62),
                ..LLAMA_LIKE
            },
            Self::Gpt2 => Family {
                arch: self,
                prefix: "gpt2",
                positions: Positions::Learned,
                norm: NormKind::Layer,
                qkv_bias: Part::Required,
                act: Activation::GeluTanh,
                gated_ffn: false,
                dense_bias: true,
                ..LLAMA_LIKE
            },
        }
    }
}

impl Family {
    /// The rotary embedding's pairing (adjacent pairs, unused, for a family
    /// with learned positions).
    pub fn rope_style(&self) -> RopeStyle {
        match self.positions {
            Positions::Rotary(style) => style,
            Positions::Learned => RopeStyle::Normal,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_arch_round_trips_through_its_gguf_name() {
        for arch in [
            Arch::Llama,
            Arch::Qwen2,
            Arch::Qwen3,
            Arch::Phi3,
            Arch::Gemma2,
            Arch::Gemma3,
            Arch::Gpt2,
        ] {
            assert_eq!(Arch::from_gguf(arch.name()), Some(arch));
            assert_eq!(arch.family().arch, arch);
            assert!(SUPPORTED_ARCHS.contains(arch.name()));
        }
        assert_eq!(Arch::from_gguf("gptneox"), None);
    }
}
