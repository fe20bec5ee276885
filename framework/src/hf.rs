//! Hugging Face model directories, read as the GGUF file llama.cpp's
//! converter would write from them.
//!
//! A directory holds `config.json`, the weights as `model.safetensors` or as
//! shards listed by `model.safetensors.index.json`, and the tokenizer as
//! `tokenizer.json` (with `tokenizer_config.json`, and the chat template
//! there or in `chat_template.jinja`). `open` maps it, once, into GGUF's
//! vocabulary:
//! - `config.json`'s sizes become the family's metadata keys
//!   (`llama.block_count`, `qwen2.rope.freq_base`, …), so [`crate::config`]
//!   reads one set of keys whatever the source;
//! - each safetensors tensor gets its GGUF name (`model.layers.3.mlp.up_proj.weight`
//!   is `blk.3.ffn_up.weight`); the shapes of both are `[rows, cols]`;
//! - what the converter computes is computed here: Llama 3's rope scaling
//!   becomes `rope_freqs.weight`, and the rows of a Llama q and k are read in
//!   the order of GGUF's adjacent-pair rotary embedding (Hugging Face rotates
//!   the two halves of a head).
//!
//! `config.json` is checked against the weights and the family as it is
//! mapped, each fault named by its key: a layer count below the layers
//! stored; an FFN activation other than the one the family runs (under the
//! key transformers reads for it); `attention_bias` or `mlp_bias` turning on
//! biases the weights lack or the block does not run; a rope base, scaling
//! factor or attention factor that is not a finite number above 0 (named
//! here, not by the `rope_freqs.weight` computed from it). Every file read
//! must be a regular file (`crate::gguf::regular_file`): a FIFO is named,
//! not waited on.
//!
//! The shards are memory-mapped and their headers checked (by the
//! `safetensors` crate: every tensor inside the file, no overlap). Nothing is
//! read or converted until a tensor is asked for, and then only that tensor's
//! bytes are copied, in their stored type (f32, f16 or bf16): the loader cuts
//! a shard's rows from them before it widens anything.
//!
//! Families: `llama` (Llama, Mistral), `qwen2`, `qwen3`, `phi3`, `gpt2`
//! (GPT-2's own configuration names, and its `Conv1D` matrices, stored
//! `[in, out]`, transposed on read), `gemma2` and `gemma3` (text-only
//! checkpoints, and the text model of multimodal ones; their norms, stored as `w` for `1 + w`, read as `1 + w` as
//! the GGUF conversion stores them; `query_pre_attn_scalar` as
//! `attention.scale`, `layer_types` as the per-layer window flags).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::family::{Activation, Arch, Part};

mod vocab;
pub use vocab::gguf_metadata;

/// The architectures (`config.json`'s `architectures`) read from a directory.
pub const HF_ARCHS: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its text model)";

/// Per-layer tensors: the Hugging Face suffix after `model.layers.N.` and
/// the GGUF one after `blk.N.`.
const LAYER_NAMES: [(&str, &str); 17] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    // Phi-3's fused gate|up is GGUF's ffn_up of twice the rows.
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    // Not a weight: older checkpoints store the rotary frequencies.
    ("self_attn.rotary_emb.inv_freq", ""),
];

/// Whole-model tensors: Hugging Face name and GGUF name.
const MODEL_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Gemma's per-layer tensors where they differ from [`LAYER_NAMES`] (looked
/// up first): norms around both halves of the block.
const GEMMA_LAYER_NAMES: [(&str, &str); 3] = [
    (
        "post_attention_layernorm.weight",
        "post_attention_norm.weight",
    ),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

/// GPT-2's per-layer tensors after `h.N.` (`transformer.h.N.` in newer
/// checkpoints). Its matrices are `Conv1D`s, stored transposed.
const GPT2_LAYER_NAMES: [(&str, &str); 14] = [
    ("ln_1.weight", "attn_norm.weight"),
    ("ln_1.bias", "attn_norm.bias"),
    ("attn.c_attn.weight", "attn_qkv.weight"),
    ("attn.c_attn.bias", "attn_qkv.bias"),
    ("attn.c_proj.weight", "attn_output.weight"),
    ("attn.c_proj.bias", "attn_output.bias"),
    ("ln_2.weight", "ffn_norm.weight"),
    ("ln_2.bias", "ffn_norm.bias"),
    ("mlp.c_fc.weight", "ffn_up.weight"),
    ("mlp.c_fc.bias", "ffn_up.bias"),
    ("mlp.c_proj.weight", "ffn_down.weight"),
    ("mlp.c_proj.bias", "ffn_down.bias"),
    // Not weights: the causal mask buffers of older checkpoints.
    ("attn.bias", ""),
    ("attn.masked_bias", ""),
];

/// GPT-2's whole-model tensors (without the optional `transformer.`).
const GPT2_MODEL_NAMES: [(&str, &str); 5] = [
    ("wte.weight", "token_embd.weight"),
    ("wpe.weight", "position_embd.weight"),
    ("ln_f.weight", "output_norm.weight"),
    ("ln_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
];

/// BERT's whole-model tensors (after an optional `bert.`): Hugging Face
/// name and GGUF name, as llama.cpp's converter names them. The pooler and
/// a masked-LM head are not used for embeddings.
const BERT_MODEL_NAMES: [(&str, &str); 9] = [
    ("embeddings.word_embeddings.weight", "token_embd.weight"),
    (
        "embeddings.position_embeddings.weight",
        "position_embd.weight",
    ),
    (
        "embeddings.token_type_embeddings.weight",
        "token_types.weight",
    ),
    ("embeddings.LayerNorm.weight", "token_embd_norm.weight"),
    ("embeddings.LayerNorm.bias", "token_embd_norm.bias"),
    // Older checkpoints' names for a LayerNorm's weight and bias.
    ("embeddings.LayerNorm.gamma", "token_embd_norm.weight"),
    ("embeddings.LayerNorm.beta", "token_embd_norm.bias"),
    // Not weights: the position ids buffer.
    ("embeddings.position_ids", ""),
    ("embeddings.token_type_ids", ""),
];

/// BERT's per-layer modules after `encoder.layer.N.` and their GGUF names
/// after `blk.N.` (each with `.weight` and `.bias`).
const BERT_LAYER_NAMES: [(&str, &str); 8] = [
    ("attention.self.query", "attn_q"),
    ("attention.self.key", "attn_k"),
    ("attention.self.value", "attn_v"),
    ("attention.output.dense", "attn_output"),
    ("attention.output.LayerNorm", "attn_output_norm"),
    ("intermediate.dense", "ffn_up"),
    ("output.dense", "ffn_down"),
    ("output.LayerNorm", "layer_output_norm"),
];

/// The architectures (`config.json`'s `architectures`) read as BERT
/// encoders, for embeddings.
pub const HF_ENCODER_ARCHS: &str = "BertModel, BertForMaskedLM, BertForPreTraining";

/// The GGUF name of BERT tensor `hf` (`Some("")` for one that embeddings do
/// not use), or `None` for a name this mapping does not know.
fn bert_gguf_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("bert.").unwrap_or(hf);
    if hf.starts_with("pooler.") || hf.starts_with("cls.") {
        return Some(String::new());
    }
    if let Some((_, g)) = BERT_MODEL_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("encoder.layer.")?;
    let (n, suffix) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let kind = match kind {
        "weight" | "gamma" => "weight",
        "bias" | "beta" => "bias",
        _ => return None,
    };
    let (_, g) = BERT_LAYER_NAMES.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{n}.{g}.{kind}"))
}

/// The Hugging Face name a BERT GGUF tensor name stands for.
fn bert_hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = BERT_MODEL_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, suffix) = rest.split_once('.')?;
    let (module, kind) = suffix.rsplit_once('.')?;
    let (h, _) = BERT_LAYER_NAMES.iter().find(|(_, g)| *g == module)?;
    Some(format!("encoder.layer.{n}.{h}.{kind}"))
}

/// Name pairs: Hugging Face and GGUF.
type Names = &'static [(&'static str, &'static str)];

/// A family's name tables: whole-model names, the layer prefix, and the
/// per-layer names (the first table's pairs before the second's).
fn tables(arch: Arch) -> (Names, &'static str, [Names; 2]) {
    match arch {
        Arch::Gpt2 => (&GPT2_MODEL_NAMES, "h.", [&GPT2_LAYER_NAMES, &[]]),
        Arch::Gemma2 | Arch::Gemma3 => (
            &MODEL_NAMES,
            "model.layers.",
            [&GEMMA_LAYER_NAMES, &LAYER_NAMES],
        ),
        _ => (&MODEL_NAMES, "model.layers.", [&LAYER_NAMES, &[]]),
    }
}

/// The GGUF name of Hugging Face tensor `hf` of a model of `arch` (`Some("")`
/// for one that is not a weight), or `None` for a name this mapping does not
/// know.
fn gguf_name(arch: Arch, hf: &str) -> Option<String> {
    let (model, prefix, layer) = tables(arch);
    let owned;
    let hf = match arch {
        Arch::Gpt2 => hf.strip_prefix("transformer.").unwrap_or(hf),
        // A multimodal Gemma 3's text model, as transformers 4 and 5 name it.
        Arch::Gemma3 => {
            owned = ["language_model.model.", "model.language_model."]
                .iter()
                .find_map(|p| hf.strip_prefix(p))
                .map(|rest| format!("model.{rest}"))
                .or_else(|| hf.strip_prefix("language_model.").map(str::to_string));
            owned.as_deref().unwrap_or(hf)
        }
        _ => hf,
    };
    if let Some((_, g)) = model.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix(prefix)?;
    let (n, suffix) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (_, g) = layer
        .iter()
        .flat_map(|t| t.iter())
        .find(|(h, _)| *h == suffix)?;
    Some(if g.is_empty() {
        String::new()
    } else {
        format!("blk.{n}.{g}")
    })
}

/// The Hugging Face name a GGUF tensor name stands for in a directory of
/// `arch` (for errors about a tensor that is missing).
pub(crate) fn hf_name(arch: Arch, gguf: &str) -> Option<String> {
    let (model, prefix, layer) = tables(arch);
    if let Some((h, _)) = model.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (n, suffix) = rest.split_once('.')?;
    let phi3 = arch == Arch::Phi3;
    let (h, _) = layer.iter().flat_map(|t| t.iter()).find(|(h, g)| {
        *g == suffix
            && (suffix != "ffn_up.weight"
                || arch == Arch::Gpt2
                || phi3 == (*h == "mlp.gate_up_proj.weight"))
    })?;
    Some(format!("{prefix}{n}.{h}"))
}

/// Whether the norm weight `gguf` of `arch` is stored as `w` for a norm that
/// multiplies by `1 + w` (Gemma's; its GGUF conversion stores `1 + w`).
fn plus_one(arch: Arch, gguf: &str) -> bool {
    matches!(arch, Arch::Gemma2 | Arch::Gemma3) && gguf.ends_with("norm.weight")
}

/// Whether GGUF tensor `gguf` of `arch` is stored transposed (GPT-2's
/// `Conv1D` matrices: `[in, out]`).
fn transposed(arch: Arch, gguf: &str) -> bool {
    arch == Arch::Gpt2
        && gguf.starts_with("blk.")
        && gguf.ends_with(".weight")
        && ["attn_qkv", "attn_output", "ffn_up", "ffn_down"]
            .iter()
            .any(|m| gguf.contains(m))
}

/// A memory-mapped safetensors file.
struct Shard {
    /// Its file name within the directory.
    name: String,
    map: memmap2::Mmap,
}

/// Where a tensor's bytes come from.
enum Stored {
    /// A range of a shard's bytes; a Llama q or k (weight or bias) has its
    /// rows reordered per head of `rope_heads` heads; a transposed matrix
    /// (`[cols, rows]` as stored) is transposed; a Gemma norm gets 1 added
    /// (read as f32).
    Mapped {
        shard: usize,
        bytes: Range<usize>,
        dtype: GgmlDType,
        rows: usize,
        rope_heads: Option<usize>,
        transposed: bool,
        plus_one: bool,
    },
    /// Computed at open (f32).
    Computed(Vec<f32>),
}

/// The tensors and tokenizer files of an open Hugging Face directory.
pub struct HfModel {
    dir: PathBuf,
    /// The decoder family; `None` for a BERT encoder.
    arch: Option<Arch>,
    shards: Vec<Shard>,
    /// By GGUF name.
    tensors: HashMap<String, Stored>,
    /// The GGUF name → Hugging Face name of every stored tensor.
    hf_names: HashMap<String, String>,
    /// `config.json`.
    pub(crate) config: Json,
    /// `tokenizer_config.json` (`Null` when absent).
    pub(crate) tokenizer_config: Json,
    /// `generation_config.json` (`Null` when absent).
    pub(crate) generation_config: Json,
}

impl std::fmt::Debug for HfModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfModel")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Reads a JSON file of the directory; `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    crate::gguf::regular_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!("is not valid JSON: {e}"),
        })
}

/// The architecture `config.json` names.
fn arch_of(name: &str) -> Option<Arch> {
    match name {
        "LlamaForCausalLM" | "MistralForCausalLM" => Some(Arch::Llama),
        "Qwen2ForCausalLM" => Some(Arch::Qwen2),
        "Qwen3ForCausalLM" => Some(Arch::Qwen3),
        "Phi3ForCausalLM" => Some(Arch::Phi3),
        "GPT2LMHeadModel" => Some(Arch::Gpt2),
        "Gemma2ForCausalLM" => Some(Arch::Gemma2),
        // Gemma 3's text-only checkpoints (1B), and the text model of the
        // larger, multimodal ones.
        "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Some(Arch::Gemma3),
        _ => None,
    }
}

/// `config.json`'s values, with errors that name the file and key.
struct ConfigJson<'a> {
    path: &'a Path,
    json: &'a Json,
    /// Where `json` sits in the file (`text_config.` for a multimodal
    /// checkpoint's text model), so that errors name the key as written.
    prefix: &'static str,
}

impl ConfigJson<'_> {
    fn err(&self, key: &str, reason: &str) -> Error {
        Error::Metadata {
            path: self.path.to_path_buf(),
            key: format!("{}{key}", self.prefix),
            reason: reason.into(),
        }
    }

    /// The name `config.json` gives `key` in a model of `arch` (GPT-2's
    /// configuration has names of its own).
    fn key(&self, arch: Arch, key: &'static str) -> &'static str {
        match (arch, key) {
            (Arch::Gpt2, "num_hidden_layers") => "n_layer",
            (Arch::Gpt2, "hidden_size") => "n_embd",
            (Arch::Gpt2, "num_attention_heads") => "n_head",
            (Arch::Gpt2, "max_position_embeddings") => "n_positions",
            (Arch::Gpt2, "intermediate_size") => "n_inner",
            _ => key,
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.json.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as usize))
                .ok_or_else(|| self.err(key, "is not a non-negative integer")),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "is missing"))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        opt_f32_in(self.json, key).map_err(|_| self.err(key, "is not a number"))
    }
}

fn opt_f32_in(json: &Json, key: &str) -> std::result::Result<Option<f32>, ()> {
    match json.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v.as_f64().map(|v| Some(v as f32)).ok_or(()),
    }
}

/// Opens the Hugging Face model directory `dir`: its metadata and tensor
/// table in GGUF's vocabulary, and the mapped tensors behind them.
pub(crate) fn open(dir: &Path) -> Result<(Content, HfModel)> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?.ok_or_else(|| Error::ModelFile {
        path: dir.to_path_buf(),
        reason: "is a directory without config.json: a model is a .gguf file, or a Hugging Face directory with config.json, model.safetensors and tokenizer.json".into(),
    })?;
    let top = ConfigJson {
        path: &config_path,
        json: &config,
        prefix: "",
    };
    let arch_name = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Json::as_str)
        .ok_or_else(|| top.err("architectures", "is missing or not a list of names"))?;
    // Gemma 3's multimodal checkpoints nest the text model's configuration;
    // its weights are read, the vision tower's are not.
    let cfg = match arch_name {
        "Gemma3ForConditionalGeneration" => ConfigJson {
            path: &config_path,
            json: config
                .get("text_config")
                .filter(|t| t.is_object())
                .ok_or_else(|| top.err("text_config", "is missing or not an object"))?,
            prefix: "text_config.",
        },
        _ => top,
    };
    let encoder = HF_ENCODER_ARCHS.split(", ").any(|a| a == arch_name);
    let arch = match encoder {
        true => None,
        false => Some(arch_of(arch_name).ok_or_else(|| Error::Unsupported {
            path: config_path.clone(),
            what: "architecture",
            found: arch_name.to_string(),
            supported: HF_ARCHS,
        })?),
    };
    let metadata = match arch {
        Some(arch) => metadata(&cfg, arch, arch_name)?,
        None => bert_metadata(&cfg, dir)?,
    };
    let n_heads = cfg.usize(match arch {
        Some(arch) => cfg.key(arch, "num_attention_heads"),
        None => "num_attention_heads",
    })?;
    let n_kv = cfg.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
    // GPT-2's configuration ties them unless it says otherwise.
    let tied = cfg
        .json
        .get("tie_word_embeddings")
        .or_else(|| config.get("tie_word_embeddings"))
        .and_then(Json::as_bool)
        .unwrap_or(arch == Some(Arch::Gpt2));

    let shards = map_shards(dir)?;
    let mut tensors = HashMap::new();
    let mut hf_names = HashMap::new();
    let mut unknown = Vec::new();
    // Every tensor name the shards store, known or not.
    let mut stored_names = BTreeSet::new();
    for (i, shard) in shards.iter().enumerate() {
        let shard_path = dir.join(&shard.name);
        let (header, meta) =
            safetensors::SafeTensors::read_metadata(&shard.map).map_err(|e| Error::ModelFile {
                path: shard_path.clone(),
                reason: format!("not a readable safetensors file: {e:?}"),
            })?;
        let start = 8 + header;
        let mut names: Vec<(String, &safetensors::tensor::TensorInfo)> =
            meta.tensors().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in names {
            stored_names.insert(name.clone());
            let known = match arch {
                Some(arch) => gguf_name(arch, &name),
                None => bert_gguf_name(&name),
            };
            let Some(gguf) = known else {
                unknown.push(name);
                continue;
            };
            if gguf.is_empty() || (tied && gguf == "output.weight") {
                continue;
            }
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => GgmlDType::F32,
                safetensors::Dtype::F16 => GgmlDType::F16,
                safetensors::Dtype::BF16 => GgmlDType::BF16,
                other => {
                    return Err(Error::Tensor {
                        path: shard_path,
                        name,
                        reason: format!("has type {other:?}; f32, f16 and bf16 are read"),
                    })
                }
            };
            if info.shape.is_empty() || info.shape.len() > 2 {
                return Err(Error::Tensor {
                    path: shard_path,
                    name,
                    reason: format!(
                        "has shape {:?}; a vector or a matrix is expected",
                        info.shape
                    ),
                });
            }
            let rope_heads = match (arch, gguf.rsplit('.').nth(1)) {
                (Some(Arch::Llama), Some(last)) if last.ends_with("attn_q") => Some(n_heads),
                (Some(Arch::Llama), Some(last)) if last.ends_with("attn_k") => Some(n_kv),
                _ => None,
            };
            let transposed = arch.is_some_and(|arch| transposed(arch, &gguf));
            if transposed && info.shape.len() != 2 {
                return Err(Error::Tensor {
                    path: shard_path,
                    name,
                    reason: format!("has shape {:?}; a Conv1D matrix is expected", info.shape),
                });
            }
            let stored = Stored::Mapped {
                shard: i,
                bytes: start + info.data_offsets.0..start + info.data_offsets.1,
                dtype,
                rows: info.shape[0],
                rope_heads,
                transposed,
                plus_one: arch.is_some_and(|arch| plus_one(arch, &gguf)),
            };
            let shape = if transposed {
                vec![info.shape[1], info.shape[0]]
            } else {
                info.shape.clone()
            };
            if hf_names.insert(gguf.clone(), name.clone()).is_some() {
                return Err(Error::Tensor {
                    path: shard_path,
                    name,
                    reason: "is stored twice (in two shards, or as two names of one GGUF tensor)"
                        .into(),
                });
            }
            tensors.insert(gguf.clone(), (stored, shape));
        }
    }
    if let Some(arch) = arch {
        check_biases(&cfg, arch, arch_name, &stored_names)?;
    }
    // A layer past the count would be left out without a word (llama.cpp's
    // converter and loader refuse such a model).
    let count_key = match arch {
        Some(arch) => cfg.key(arch, "num_hidden_layers"),
        None => "num_hidden_layers",
    };
    let n_blocks = cfg.usize(count_key)?;
    if let Some((block, gguf)) = crate::gguf::first_block_beyond(tensors.keys(), n_blocks) {
        let hf = hf_names.get(gguf).map_or(gguf, String::as_str);
        let within = match tensors.get(gguf) {
            Some((Stored::Mapped { shard, .. }, _)) => format!(" in {}", shards[*shard].name),
            _ => String::new(),
        };
        return Err(cfg.err(
            count_key,
            &format!(
                "is {n_blocks}, but {hf}{within} is a tensor of layer {block}: the layer count disagrees with the weights"
            ),
        ));
    }
    if !unknown.is_empty() {
        tracing::warn!(
            "{}: {} tensors that a {} model does not use are ignored, first {}",
            dir.display(),
            unknown.len(),
            arch_name,
            unknown[0]
        );
    }
    let factors = match arch {
        Some(_) => llama3_rope_factors(&cfg, n_heads)?,
        None => None,
    };
    let long_rope = match arch {
        Some(_) => long_rope_factors(&cfg, n_heads)?,
        None => vec![],
    };
    for (name, factors) in factors
        .map(|f| ("rope_freqs.weight", f))
        .into_iter()
        .chain(long_rope)
    {
        let n = factors.len();
        tensors.insert(name.into(), (Stored::Computed(factors), vec![n]));
    }

    let mut tensor_infos = HashMap::new();
    let mut stored = HashMap::new();
    for (name, (s, shape)) in tensors {
        let ggml_dtype = match &s {
            Stored::Mapped { plus_one: true, .. } => GgmlDType::F32,
            Stored::Mapped { dtype, .. } => *dtype,
            Stored::Computed(_) => GgmlDType::F32,
        };
        tensor_infos.insert(
            name.clone(),
            TensorInfo {
                ggml_dtype,
                shape: shape.into(),
                offset: 0,
            },
        );
        stored.insert(name, s);
    }
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos,
        tensor_data_offset: 0,
    };
    let model = HfModel {
        dir: dir.to_path_buf(),
        arch,
        shards,
        tensors: stored,
        hf_names,
        config,
        tokenizer_config: read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null),
        generation_config: read_json(&dir.join("generation_config.json"))?.unwrap_or(Json::Null),
    };
    Ok((content, model))
}

/// The safetensors files of `dir`, mapped: the shards the index lists, or
/// `model.safetensors`.
fn map_shards(dir: &Path) -> Result<Vec<Shard>> {
    let index_path = dir.join("model.safetensors.index.json");
    let names: Vec<String> = match read_json(&index_path)? {
        Some(index) => {
            let map = index
                .get("weight_map")
                .and_then(Json::as_object)
                .ok_or_else(|| Error::Metadata {
                    path: index_path.clone(),
                    key: "weight_map".into(),
                    reason: "is missing or not an object".into(),
                })?;
            let files: BTreeSet<String> = map
                .values()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| Error::Metadata {
                            path: index_path.clone(),
                            key: "weight_map".into(),
                            reason: "holds a shard that is not a file name".into(),
                        })
                })
                .collect::<Result<_>>()?;
            if let Some(bad) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
                return Err(Error::Metadata {
                    path: index_path,
                    key: "weight_map".into(),
                    reason: format!("names {bad}, which is not a file of the directory"),
                });
            }
            files.into_iter().collect()
        }
        None if dir.join("model.safetensors").exists() => vec!["model.safetensors".into()],
        None => {
            return Err(Error::ModelFile {
                path: dir.to_path_buf(),
                reason: "has no model.safetensors and no model.safetensors.index.json".into(),
            })
        }
    };
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            crate::gguf::regular_file(&path)?;
            let file = File::open(&path).map_err(|e| Error::ModelFile {
                path: path.clone(),
                reason: format!("cannot open: {e}"),
            })?;
            // SAFETY: the map is read-only and private to this process. Like
            // every engine that maps its weights (candle, llama.cpp), this
            // relies on the model file not being truncated or rewritten while
            // it is open; the bytes are copied out at load.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::ModelFile {
                path: path.clone(),
                reason: format!("cannot map: {e}"),
            })?;
            Ok(Shard { name, map })
        })
        .collect()
}

/// The rope parameters of `config.json`: `rope_scaling`, or the newer
/// `rope_parameters` (which also holds `rope_theta`), and their key (the
/// prefix of the keys named in errors).
fn rope_params(json: &Json) -> Option<(&'static str, &Json)> {
    let (key, params) = ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|k| Some((*k, json.get(*k)?)))
        .find(|(_, v)| v.is_object())?;
    // transformers 5 saves a model with windowed layers (Gemma 3) with one
    // set per layer type: the global layers' is the model's.
    match params.get("full_attention") {
        Some(full) if full.is_object() => Some(("rope_parameters.full_attention", full)),
        _ => Some((key, params)),
    }
}

/// Refuses `value` of `config.json`'s `key` unless it is a finite number
/// greater than 0 (a rope base, a scaling factor, an attention factor):
/// named here, before a tensor computed from it would hold NaN.
fn positive(cfg: &ConfigJson<'_>, key: &str, value: f64) -> Result<()> {
    // As f32, which is what the model runs with.
    let v = value as f32;
    if v.is_finite() && v > 0.0 {
        return Ok(());
    }
    Err(cfg.err(
        key,
        &format!("is {value}, not a finite number greater than 0"),
    ))
}

/// The FFN activations transformers names that are SiLU.
const SILU_NAMES: [&str; 2] = ["silu", "swish"];

/// The FFN activations transformers names that are GELU's tanh
/// approximation (`gelu_fast` computes the same formula).
const GELU_TANH_NAMES: [&str; 3] = ["gelu_pytorch_tanh", "gelu_new", "gelu_fast"];

/// Refuses an FFN activation in `config.json` other than the one the family
/// runs: the key transformers reads for the architecture (`hidden_act`;
/// Gemma's `hidden_activation`, GPT-2's `activation_function`), absent or
/// null for its default.
fn check_activation(cfg: &ConfigJson<'_>, arch: Arch) -> Result<()> {
    let (key, names, runs): (&str, &[&str], &str) = match (arch, arch.family().act) {
        (_, Activation::Silu) => ("hidden_act", &SILU_NAMES, "SiLU"),
        (Arch::Gpt2, Activation::GeluTanh) => (
            "activation_function",
            &GELU_TANH_NAMES,
            "GELU's tanh approximation",
        ),
        (_, Activation::GeluTanh) => (
            "hidden_activation",
            &GELU_TANH_NAMES,
            "GELU's tanh approximation",
        ),
    };
    match cfg.json.get(key) {
        None | Some(Json::Null) => Ok(()),
        Some(Json::String(name)) if names.contains(&name.as_str()) => Ok(()),
        // Exact GELU (Cerebras-GPT's, Gemma 1's): run as its tanh
        // approximation, as llama.cpp and transformers' Gemma do (they
        // differ by about 1e-3), with a word.
        Some(Json::String(name)) if name == "gelu" && runs.starts_with("GELU") => {
            tracing::warn!(
                "{}: '{}{key}' is \"gelu\" (exact); it runs as GELU's tanh approximation, as llama.cpp does",
                cfg.path.display(),
                cfg.prefix
            );
            Ok(())
        }
        Some(other) => Err(cfg.err(
            key,
            &format!(
                "is {other}; a {} block runs {runs} ({})",
                arch.name(),
                names.join(", ")
            ),
        )),
    }
}

/// The biases `attention_bias` and `mlp_bias` turn on, per layer (the
/// suffixes after `layers.N.`), for the architectures whose transformers
/// model reads those keys.
fn bias_keys(arch_name: &str) -> &'static [(&'static str, &'static [&'static str])] {
    const ATTENTION: [&str; 4] = [
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.bias",
    ];
    const MLP: [&str; 3] = [
        "mlp.gate_proj.bias",
        "mlp.up_proj.bias",
        "mlp.down_proj.bias",
    ];
    match arch_name {
        "LlamaForCausalLM" => &[("attention_bias", &ATTENTION), ("mlp_bias", &MLP)],
        "Qwen3ForCausalLM"
        | "Gemma2ForCausalLM"
        | "Gemma3ForCausalLM"
        | "Gemma3ForConditionalGeneration" => &[("attention_bias", &ATTENTION)],
        _ => &[],
    }
}

/// Refuses `attention_bias: true` or `mlp_bias: true` (transformers then
/// adds those biases to every layer): naming the first of layer 0's biases
/// missing from the weights (`names`, as stored), else the first the
/// family's block does not run (only a Llama block runs q, k and v biases;
/// none runs o_proj's or the MLP's), rather than running without them.
fn check_biases(
    cfg: &ConfigJson<'_>,
    arch: Arch,
    arch_name: &str,
    names: &BTreeSet<String>,
) -> Result<()> {
    let stored = |suffix: &str| {
        let tail = format!(".layers.0.{suffix}");
        names
            .iter()
            .find(|n| n.ends_with(&tail) || n.starts_with(&tail[1..]))
    };
    let runs = |suffix: &str| {
        arch.family().qkv_bias != Part::Absent
            && ["q_proj", "k_proj", "v_proj"]
                .iter()
                .any(|m| suffix == format!("self_attn.{m}.bias"))
    };
    for (key, suffixes) in bias_keys(arch_name) {
        if cfg.json.get(*key).and_then(Json::as_bool) != Some(true) {
            continue;
        }
        if let Some(missing) = suffixes.iter().find(|s| stored(s).is_none()) {
            return Err(cfg.err(
                key,
                &format!("is true, but model.layers.0.{missing} is missing from the weights"),
            ));
        }
        if let Some(extra) = suffixes.iter().find(|s| !runs(s)) {
            let name = stored(extra).map_or(extra.to_string(), String::clone);
            return Err(cfg.err(
                key,
                &format!(
                    "is true: the weights have biases such as {name}, which a {} block does not run",
                    arch.name()
                ),
            ));
        }
    }
    Ok(())
}

/// The windowed layers' rope base of a transformers 5 configuration
/// (`rope_parameters.sliding_attention.rope_theta`), if it has one.
fn sliding_rope_theta(json: &Json) -> Option<f32> {
    json.get("rope_parameters")?
        .get("sliding_attention")?
        .get("rope_theta")?
        .as_f64()
        .map(|v| v as f32)
}

/// GGUF metadata for the family `arch` from `config.json`.
fn metadata(cfg: &ConfigJson<'_>, arch: Arch, arch_name: &str) -> Result<HashMap<String, Value>> {
    let p = arch.family().prefix;
    let mut m = HashMap::new();
    let mut put = |k: &str, v: Value| {
        m.insert(format!("{p}.{k}"), v);
    };
    let u = |v: usize| Value::U64(v as u64);
    let k = |name| cfg.key(arch, name);
    check_activation(cfg, arch)?;
    put("block_count", u(cfg.usize(k("num_hidden_layers"))?));
    let hidden = cfg.usize(k("hidden_size"))?;
    put("embedding_length", u(hidden));
    let ffn = match (arch, cfg.opt_usize(k("intermediate_size"))?) {
        (_, Some(n)) => n,
        // GPT-2's n_inner: null for 4 × n_embd.
        (Arch::Gpt2, None) => 4 * hidden,
        (_, None) => cfg.usize("intermediate_size")?,
    };
    put("feed_forward_length", u(ffn));
    put("vocab_size", u(cfg.usize("vocab_size")?));
    let heads = cfg.usize(k("num_attention_heads"))?;
    put("attention.head_count", u(heads));
    if let Some(kv) = cfg.opt_usize("num_key_value_heads")? {
        put("attention.head_count_kv", u(kv));
    }
    let head_dim = cfg.opt_usize("head_dim")?;
    if let Some(d) = head_dim {
        put("attention.key_length", u(d));
        put("attention.value_length", u(d));
    }
    if let Some(n) = cfg.opt_usize(k("max_position_embeddings"))? {
        put("context_length", u(n));
    }
    if let Some(eps) = cfg.opt_f32("rms_norm_eps")? {
        put("attention.layer_norm_rms_epsilon", Value::F32(eps));
    }
    if let Some(eps) = cfg.opt_f32("layer_norm_epsilon")? {
        put("attention.layer_norm_epsilon", Value::F32(eps));
    }
    let params = rope_params(cfg.json);
    let theta = match cfg.opt_f32("rope_theta")? {
        Some(t) => Some(("rope_theta".to_string(), t)),
        None => match params {
            Some((at, p)) => {
                let key = format!("{at}.rope_theta");
                opt_f32_in(p, "rope_theta")
                    .map_err(|_| cfg.err(&key, "is not a number"))?
                    .map(|t| (key, t))
            }
            None => None,
        },
    };
    if let Some((key, t)) = theta {
        positive(cfg, &key, t as f64)?;
        put("rope.freq_base", Value::F32(t));
    }
    let full = head_dim.unwrap_or(hidden.checked_div(heads).unwrap_or(0));
    if let Some(d) = partial_rotary_dims(cfg, full)? {
        put("rope.dimension_count", u(d));
    }
    let sliding = match arch_name {
        "MistralForCausalLM" => true,
        _ => cfg
            .json
            .get("use_sliding_window")
            .and_then(Json::as_bool)
            .unwrap_or(false),
    };
    if sliding {
        if let Some(w) = cfg.opt_usize("sliding_window")? {
            put("attention.sliding_window", u(w));
        }
    }
    if let Some((at, params)) = params {
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("default");
        let key = |field: &str| format!("{at}.{field}");
        let factor =
            opt_f32_in(params, "factor").map_err(|_| cfg.err(&key("factor"), "is not a number"))?;
        // A number the scaling divides by or scales with: greater than 0.
        let check = |field: &str| -> Result<()> {
            match params.get(field) {
                None | Some(Json::Null) => Ok(()),
                Some(v) => match v.as_f64() {
                    Some(x) => positive(cfg, &key(field), x),
                    None => Err(cfg.err(&key(field), "is not a number")),
                },
            }
        };
        match kind {
            "default" | "none" => {}
            // Computed as rope_freqs.weight.
            "llama3" => {
                for field in [
                    "factor",
                    "low_freq_factor",
                    "high_freq_factor",
                    "original_max_position_embeddings",
                ] {
                    check(field)?;
                }
            }
            "linear" | "yarn" => {
                put("rope.scaling.type", Value::String(kind.into()));
                let factor = factor.ok_or_else(|| cfg.err(&key("factor"), "is missing"))?;
                check("factor")?;
                put("rope.scaling.factor", Value::F32(factor));
                if kind == "yarn" {
                    let orig = params
                        .get("original_max_position_embeddings")
                        .and_then(Json::as_u64)
                        .ok_or_else(|| {
                            cfg.err(
                                &key("original_max_position_embeddings"),
                                "is missing or not an integer",
                            )
                        })?;
                    check("original_max_position_embeddings")?;
                    put("rope.scaling.original_context_length", Value::U64(orig));
                    check("attention_factor")?;
                    if let Some(a) = opt_f32_in(params, "attention_factor")
                        .map_err(|_| cfg.err(&key("attention_factor"), "is not a number"))?
                    {
                        put("rope.scaling.attn_factor", Value::F32(a));
                    }
                }
            }
            // Phi-3's: the factors become rope_factors_long/_short.
            "longrope" | "su" => {
                let orig = params
                    .get("original_max_position_embeddings")
                    .or_else(|| cfg.json.get("original_max_position_embeddings"))
                    .and_then(Json::as_u64)
                    .ok_or_else(|| {
                        cfg.err(
                            "original_max_position_embeddings",
                            "is missing or not an integer (LongRoPE needs it)",
                        )
                    })?;
                positive(cfg, "original_max_position_embeddings", orig as f64)?;
                put("rope.scaling.original_context_length", Value::U64(orig));
                check("attention_factor")?;
                let given = opt_f32_in(params, "attention_factor")
                    .map_err(|_| cfg.err(&key("attention_factor"), "is not a number"))?;
                // transformers' default, which llama.cpp's converter writes:
                // sqrt(1 + ln(scale) / ln(original)) for a context `scale`
                // times the original.
                let attn = given.unwrap_or_else(|| {
                    let context = cfg
                        .json
                        .get("max_position_embeddings")
                        .and_then(Json::as_u64)
                        .unwrap_or(orig);
                    let scale = context as f64 / orig as f64;
                    if scale <= 1.0 || orig < 2 {
                        1.0
                    } else {
                        (1.0 + scale.ln() / (orig as f64).ln()).sqrt() as f32
                    }
                });
                put("rope.scaling.attn_factor", Value::F32(attn));
            }
            // Named to the config's reader, which refuses it by name.
            other => put("rope.scaling.type", Value::String(other.into())),
        }
    }
    if matches!(arch, Arch::Gemma2 | Arch::Gemma3) {
        gemma_metadata(cfg, &mut m, p)?;
    }
    m.insert(
        "general.architecture".into(),
        Value::String(arch.family().prefix.into()),
    );
    Ok(m)
}

/// GGUF metadata of a BERT encoder, as llama.cpp's converter writes it
/// (`bert.*`), with the pooling of the directory's sentence-transformers
/// `1_Pooling/config.json` (CLS without one, as BERT's own pooler and
/// vLLM's default) and whether `modules.json` normalizes (yes without one).
fn bert_metadata(cfg: &ConfigJson<'_>, dir: &Path) -> Result<HashMap<String, Value>> {
    let mut m = HashMap::new();
    let u = |v: usize| Value::U64(v as u64);
    m.insert("general.architecture".into(), Value::String("bert".into()));
    for (key, hf) in [
        ("bert.block_count", "num_hidden_layers"),
        ("bert.embedding_length", "hidden_size"),
        ("bert.feed_forward_length", "intermediate_size"),
        ("bert.attention.head_count", "num_attention_heads"),
        ("bert.context_length", "max_position_embeddings"),
    ] {
        m.insert(key.into(), u(cfg.usize(hf)?));
    }
    let eps = cfg.opt_f32("layer_norm_eps")?.unwrap_or(1e-12);
    m.insert("bert.attention.layer_norm_epsilon".into(), Value::F32(eps));
    m.insert("bert.attention.causal".into(), Value::Bool(false));
    match cfg
        .json
        .get("position_embedding_type")
        .and_then(Json::as_str)
    {
        None | Some("absolute") => {}
        Some(other) => {
            return Err(cfg.err(
                "position_embedding_type",
                &format!("is '{other}'; absolute position embeddings are read"),
            ))
        }
    }
    let tanh = match cfg.json.get("hidden_act").and_then(Json::as_str) {
        None | Some("gelu") => false,
        Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => true,
        Some(other) => {
            return Err(cfg.err(
                "hidden_act",
                &format!("is '{other}'; gelu and its tanh approximations are run"),
            ))
        }
    };
    m.insert(crate::encoder::GELU_TANH_KEY.into(), Value::Bool(tanh));
    let pooling_path = dir.join("1_Pooling/config.json");
    let pooling = match read_json(&pooling_path)? {
        None => 2,
        Some(p) => {
            let on = |k: &str| p.get(k).and_then(Json::as_bool).unwrap_or(false);
            match (
                on("pooling_mode_mean_tokens"),
                on("pooling_mode_cls_token"),
                on("pooling_mode_lasttoken"),
            ) {
                (true, false, false) => 1,
                (false, true, false) => 2,
                (false, false, true) => 3,
                _ => {
                    return Err(Error::ModelFile {
                        path: pooling_path,
                        reason: "sets no pooling mode, or several, or one other than mean, cls and lasttoken".into(),
                    })
                }
            }
        }
    };
    m.insert("bert.pooling_type".into(), Value::U32(pooling));
    let normalize = match read_json(&dir.join("modules.json"))? {
        None => true,
        Some(modules) => modules.as_array().is_some_and(|list| {
            list.iter().any(|module| {
                module.get("type").and_then(Json::as_str)
                    == Some("sentence_transformers.models.Normalize")
            })
        }),
    };
    m.insert(crate::encoder::NORMALIZE_KEY.into(), Value::Bool(normalize));
    Ok(m)
}

/// Gemma's keys: soft-caps, the window and which layers have it, the
/// windowed layers' rope base, and the query scale.
fn gemma_metadata(cfg: &ConfigJson<'_>, m: &mut HashMap<String, Value>, p: &str) -> Result<()> {
    let mut put = |k: &str, v: Value| {
        m.insert(format!("{p}.{k}"), v);
    };
    for (hf, gguf) in [
        ("attn_logit_softcapping", "attn_logit_softcapping"),
        ("final_logit_softcapping", "final_logit_softcapping"),
        ("rope_local_base_freq", "rope.freq_base_swa"),
    ] {
        // Null turns a cap off.
        match cfg.json.get(hf) {
            Some(Json::Null) if hf.ends_with("capping") => put(gguf, Value::F32(0.0)),
            _ => {
                if let Some(v) = cfg.opt_f32(hf)? {
                    put(gguf, Value::F32(v));
                }
            }
        }
    }
    match cfg.opt_f32("rope_local_base_freq")? {
        Some(base) => positive(cfg, "rope_local_base_freq", base as f64)?,
        None => {
            if let Some(base) = sliding_rope_theta(cfg.json) {
                positive(
                    cfg,
                    "rope_parameters.sliding_attention.rope_theta",
                    base as f64,
                )?;
                put("rope.freq_base_swa", Value::F32(base));
            }
        }
    }
    if let Some(w) = cfg.opt_usize("sliding_window")? {
        put("attention.sliding_window", Value::U64(w as u64));
    }
    if let Some(types) = cfg.json.get("layer_types").and_then(Json::as_array) {
        let flags = types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(Value::I32(1)),
                Some("full_attention") => Ok(Value::I32(0)),
                _ => Err(cfg.err(
                    "layer_types",
                    "holds a type other than sliding_attention and full_attention",
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        put("attention.sliding_window_pattern", Value::Array(flags));
    } else if let Some(n) = cfg.opt_usize("sliding_window_pattern")? {
        put("attention.sliding_window_pattern", Value::U64(n as u64));
    }
    if let Some(s) = cfg.opt_f32("query_pre_attn_scalar")? {
        if !(s.is_finite() && s > 0.0) {
            return Err(cfg.err("query_pre_attn_scalar", "is not a number greater than 0"));
        }
        put("attention.scale", Value::F32(1.0 / s.sqrt()));
    }
    Ok(())
}

/// The rotated dimensions of a `head_dim`-wide head when `config.json` sets
/// a `partial_rotary_factor` (what becomes `rope.dimension_count`).
fn partial_rotary_dims(cfg: &ConfigJson<'_>, head_dim: usize) -> Result<Option<usize>> {
    Ok(cfg
        .opt_f32("partial_rotary_factor")?
        .map(|f| (head_dim as f32 * f).round() as usize))
}

/// LongRoPE's two sets of per-frequency divisors (`rope_scaling.long_factor`
/// and `short_factor`, Phi-3's), as llama.cpp's converter stores them:
/// `rope_factors_long.weight` and `rope_factors_short.weight`, one per
/// rotated pair.
fn long_rope_factors(
    cfg: &ConfigJson<'_>,
    n_heads: usize,
) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let Some((at, params)) = rope_params(cfg.json) else {
        return Ok(vec![]);
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Json::as_str);
    if !matches!(kind, Some("longrope" | "su")) {
        return Ok(vec![]);
    }
    // The rotated dimensions, as the metadata's rope.dimension_count.
    let head_dim = match cfg.opt_usize("head_dim")? {
        Some(d) => d,
        None => cfg.usize("hidden_size")?.checked_div(n_heads).unwrap_or(0),
    };
    let dims = partial_rotary_dims(cfg, head_dim)?.unwrap_or(head_dim);
    let list = |key: &str| -> Result<Vec<f32>> {
        let at = format!("{at}.{key}");
        let list: Vec<f32> = params
            .get(key)
            .and_then(Json::as_array)
            .and_then(|a| a.iter().map(|v| v.as_f64().map(|f| f as f32)).collect())
            .ok_or_else(|| cfg.err(&at, "is missing or not a list of numbers"))?;
        if let Some(bad) = list.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            let reason = format!("holds {bad}, not a finite number greater than 0");
            return Err(cfg.err(&at, &reason));
        }
        if list.len() != dims / 2 {
            let reason = format!(
                "has {} values; {dims} rotated dimensions need one per pair, {}",
                list.len(),
                dims / 2
            );
            return Err(cfg.err(&at, &reason));
        }
        Ok(list)
    };
    Ok(vec![
        ("rope_factors_long.weight", list("long_factor")?),
        ("rope_factors_short.weight", list("short_factor")?),
    ])
}

/// Llama 3's rope scaling as per-frequency divisors (what llama.cpp's
/// converter stores as `rope_freqs.weight`), when `config.json` asks for it.
fn llama3_rope_factors(cfg: &ConfigJson<'_>, n_heads: usize) -> Result<Option<Vec<f32>>> {
    let Some((at, params)) = rope_params(cfg.json) else {
        return Ok(None);
    };
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Json::as_str);
    if kind != Some("llama3") {
        return Ok(None);
    }
    let get = |k: &str, default: Option<f64>| -> Result<f64> {
        params
            .get(k)
            .and_then(Json::as_f64)
            .or(default)
            .ok_or_else(|| cfg.err(&format!("{at}.{k}"), "is missing or not a number"))
    };
    let factor = get("factor", None)?;
    let low = get("low_freq_factor", Some(1.0))?;
    let high = get("high_freq_factor", Some(4.0))?;
    let old_context = get("original_max_position_embeddings", Some(8192.0))?;
    let base = match cfg.opt_f32("rope_theta")? {
        Some(t) => t as f64,
        None => params
            .get("rope_theta")
            .and_then(Json::as_f64)
            .unwrap_or(10_000.0),
    };
    let hidden = cfg.usize("hidden_size")?;
    let dim = match cfg.opt_usize("head_dim")? {
        Some(d) => d,
        None if n_heads > 0 => hidden / n_heads,
        None => return Ok(None),
    };
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    let factors = (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect();
    Ok(Some(factors))
}

impl HfModel {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The decoder family; `None` for a BERT encoder.
    pub fn arch(&self) -> Option<Arch> {
        self.arch
    }

    /// The total size of the weight files.
    pub(crate) fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.map.len() as u64).sum()
    }

    /// Every weight file's name and bytes, in the directory's order.
    pub(crate) fn shard_bytes(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.shards.iter().map(|s| (s.name.as_str(), &s.map[..]))
    }

    /// The Hugging Face name and shard of a stored tensor, for errors.
    pub(crate) fn describe(&self, gguf: &str) -> String {
        match (self.hf_names.get(gguf), self.tensors.get(gguf)) {
            (Some(hf), Some(Stored::Mapped { shard, .. })) => {
                format!("{hf} in {}", self.shards[*shard].name)
            }
            _ => match self
                .arch
                .map_or_else(|| bert_hf_name(gguf), |a| hf_name(a, gguf))
            {
                Some(hf) => format!("{hf} (GGUF {gguf})"),
                None => gguf.to_string(),
            },
        }
    }

    /// The bytes of tensor `gguf`, in its stored type and GGUF's row order.
    pub(crate) fn raw(&self, gguf: &str) -> Option<Vec<u8>> {
        Some(match self.tensors.get(gguf)? {
            Stored::Computed(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Stored::Mapped {
                shard,
                bytes,
                rows,
                rope_heads,
                transposed,
                dtype,
                plus_one,
            } => {
                let data = self.shards[*shard].map.get(bytes.clone())?;
                if *plus_one {
                    return Some(
                        widen(data, *dtype)?
                            .into_iter()
                            .flat_map(|w| (1.0 + w).to_le_bytes())
                            .collect(),
                    );
                }
                match (rope_heads, transposed) {
                    (Some(heads), _) => adjacent_pairs(data, *rows, *heads)?,
                    (None, true) => transpose(data, *rows, dtype.type_size())?,
                    (None, false) => data.to_vec(),
                }
            }
        })
    }
}

/// Little-endian f32, f16 or bf16 values as f32.
fn widen(data: &[u8], dtype: GgmlDType) -> Option<Vec<f32>> {
    Some(match dtype {
        GgmlDType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlDType::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlDType::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// `rows × cols` elements of `elem` bytes, transposed to `cols × rows`.
fn transpose(data: &[u8], rows: usize, elem: usize) -> Option<Vec<u8>> {
    if rows == 0 || elem == 0 || !data.len().is_multiple_of(rows * elem) {
        return None;
    }
    let cols = data.len() / (rows * elem);
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let (src, dst) = ((r * cols + c) * elem, (c * rows + r) * elem);
            out[dst..dst + elem].copy_from_slice(&data[src..src + elem]);
        }
    }
    Some(out)
}

/// The rows of a q or k projection (or bias) reordered from Hugging Face's
/// rotary layout (a head's first half pairs with its second half) to GGUF's
/// (adjacent rows pair): row `2i + j` of a head is Hugging Face's row
/// `j·d/2 + i`. `None` when the rows do not split into heads of even width.
fn adjacent_pairs(data: &[u8], rows: usize, heads: usize) -> Option<Vec<u8>> {
    if heads == 0
        || rows == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !data.len().is_multiple_of(rows)
    {
        return None;
    }
    let (d, row) = (rows / heads, data.len() / rows);
    let half = d / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + j * half + i;
                out.extend_from_slice(&data[src * row..(src + 1) * row]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (hf, gguf) in [
            ("model.embed_tokens.weight", "token_embd.weight"),
            (
                "model.layers.11.self_attn.q_proj.bias",
                "blk.11.attn_q.bias",
            ),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
            (
                "model.layers.2.self_attn.k_norm.weight",
                "blk.2.attn_k_norm.weight",
            ),
        ] {
            assert_eq!(gguf_name(Arch::Llama, hf).as_deref(), Some(gguf));
            assert_eq!(hf_name(Arch::Llama, gguf).as_deref(), Some(hf));
        }
        assert_eq!(
            hf_name(Arch::Phi3, "blk.1.ffn_up.weight").as_deref(),
            Some("model.layers.1.mlp.gate_up_proj.weight")
        );
        assert_eq!(
            hf_name(Arch::Llama, "blk.1.ffn_up.weight").as_deref(),
            Some("model.layers.1.mlp.up_proj.weight")
        );
        assert_eq!(
            gguf_name(Arch::Llama, "model.layers.0.self_attn.rotary_emb.inv_freq").as_deref(),
            Some("")
        );
        assert_eq!(
            gguf_name(Arch::Llama, "vision_tower.patch_embed.weight"),
            None
        );
        for hf in ["transformer.h.3.mlp.c_fc.bias", "h.3.mlp.c_fc.bias"] {
            assert_eq!(
                gguf_name(Arch::Gpt2, hf).as_deref(),
                Some("blk.3.ffn_up.bias")
            );
        }
        assert_eq!(gguf_name(Arch::Gpt2, "h.0.attn.bias").as_deref(), Some(""));
        assert_eq!(
            hf_name(Arch::Gpt2, "blk.0.ffn_up.weight").as_deref(),
            Some("h.0.mlp.c_fc.weight")
        );
        assert!(transposed(Arch::Gpt2, "blk.0.attn_qkv.weight"));
        assert!(!transposed(Arch::Gpt2, "blk.0.attn_qkv.bias"));
        assert!(!transposed(Arch::Gpt2, "token_embd.weight"));
        for hf in [
            "language_model.model.layers.2.mlp.up_proj.weight",
            "model.language_model.layers.2.mlp.up_proj.weight",
            "model.layers.2.mlp.up_proj.weight",
        ] {
            assert_eq!(
                gguf_name(Arch::Gemma3, hf).as_deref(),
                Some("blk.2.ffn_up.weight")
            );
        }
        assert_eq!(
            gguf_name(Arch::Gemma3, "language_model.lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name(Arch::Gemma3, "vision_tower.encoder.x.weight"),
            None
        );
    }

    #[test]
    fn rotary_rows_pair_adjacently() {
        // Two heads of width 4, one byte per row: HF rows [a0 a1 b0 b1] per
        // head (a pairs with b) become [a0 b0 a1 b1].
        let data: Vec<u8> = (0..8).collect();
        assert_eq!(
            adjacent_pairs(&data, 8, 2),
            Some(vec![0, 2, 1, 3, 4, 6, 5, 7])
        );
        assert_eq!(adjacent_pairs(&data, 8, 3), None);
    }

    #[test]
    fn conv1d_matrices_transpose() {
        // 2 × 3 of 2-byte elements.
        let data: Vec<u8> = (0..12).collect();
        assert_eq!(
            transpose(&data, 2, 2),
            Some(vec![0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11])
        );
    }
}
