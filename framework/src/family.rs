//! Model families: what sets one transformer family's block apart, as data
//! the one layer loop ([`crate::backend::transformer`]) reads.
//!
//! A [`Family`] says which optional parts a family's blocks have (biases on
//! q/k/v, a per-head RMSNorm on q and k), how its rotary embedding pairs a
//! head's dimensions ([`RopeStyle`]), and the GGUF metadata prefix its keys
//! use. GGUF names a block's tensors the same way in every family
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
}

/// The architectures accepted, as GGUF names them (for error messages).
pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3, phi3";

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The architecture.
    pub arch: Arch,
    /// The prefix of the family's GGUF metadata keys (`qwen2.block_count`).
    pub prefix: &'static str,
    /// The rotary embedding's pairing.
    pub rope: RopeStyle,
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
}

impl Arch {
    /// The architecture GGUF names `name`, if this engine runs it.
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "phi3" => Some(Self::Phi3),
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
                arch: self,
                prefix: "llama",
                rope: RopeStyle::Normal,
                // llama.cpp reads them when present (some Llama-architecture
                // conversions carry them).
                qkv_bias: Part::Optional,
                qk_norm: Part::Absent,
                fused_gate_up: false,
            },
            Self::Qwen2 => Family {
                arch: self,
                prefix: "qwen2",
                rope: RopeStyle::Neox,
                qkv_bias: Part::Required,
                qk_norm: Part::Absent,
                fused_gate_up: false,
            },
            Self::Qwen3 => Family {
                arch: self,
                prefix: "qwen3",
                rope: RopeStyle::Neox,
                qkv_bias: Part::Absent,
                qk_norm: Part::Required,
                fused_gate_up: false,
            },
            Self::Phi3 => Family {
                arch: self,
                prefix: "phi3",
                rope: RopeStyle::Neox,
                qkv_bias: Part::Absent,
                qk_norm: Part::Absent,
                fused_gate_up: true,
            },
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
        for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Phi3] {
            assert_eq!(Arch::from_gguf(arch.name()), Some(arch));
            assert_eq!(arch.family().arch, arch);
            assert!(SUPPORTED_ARCHS.contains(arch.name()));
        }
        assert_eq!(Arch::from_gguf("gpt-neox"), None);
    }
}
