//! A GGUF v3 writer for tests and fuzz seeds that writes exactly what it is
//! told, malformed or not: offsets, types and counts are not checked, so a
//! test can build the files a careless or hostile writer would.
#![allow(dead_code)]

/// A metadata value.
#[derive(Debug, Clone)]
pub enum Meta {
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8.
    Str(String),
    /// An array of strings.
    Strs(Vec<String>),
    /// An array of i32.
    I32s(Vec<i32>),
    /// An array of f32.
    F32s(Vec<f32>),
}

/// One tensor-table entry; `dims` in GGUF order (fastest first).
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...).
    pub ggml_type: u32,
    pub offset: u64,
}

impl Tensor {
    pub fn new(name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Self {
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            offset,
        }
    }
}

fn string(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// The type (array), element type and length of an array value.
fn array_head(b: &mut Vec<u8>, element_type: u32, len: usize) {
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&element_type.to_le_bytes());
    b.extend_from_slice(&(len as u64).to_le_bytes());
}

/// The file: header, metadata, tensor table, padding to 32, then `data`
/// bytes of tensor data (zeros).
pub fn gguf(meta: &[(&str, Meta)], tensors: &[Tensor], data: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend_from_slice(&4u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend_from_slice(&6u32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Bool(x) => {
                b.extend_from_slice(&7u32.to_le_bytes());
                b.push(u8::from(*x));
            }
            Meta::Str(s) => {
                b.extend_from_slice(&8u32.to_le_bytes());
                string(&mut b, s);
            }
            Meta::Strs(items) => {
                array_head(&mut b, 8, items.len());
                for s in items {
                    string(&mut b, s);
                }
            }
            Meta::I32s(items) => {
                array_head(&mut b, 5, items.len());
                items
                    .iter()
                    .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
            }
            Meta::F32s(items) => {
                array_head(&mut b, 6, items.len());
                items
                    .iter()
                    .for_each(|x| b.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }
    for t in tensors {
        string(&mut b, &t.name);
        b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.ggml_type.to_le_bytes());
        b.extend_from_slice(&t.offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.resize(b.len() + data, 0);
    b
}

/// The metadata of a tiny valid `llama` model: 1 layer, width 64, 4 heads,
/// a vocabulary of `vocab` tokens named `t0`, `t1`, ... (GPT-2 BPE without
/// merges), `context` positions.
pub fn tiny_llama_meta(vocab: usize, context: u32) -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(128)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(4)),
        ("llama.context_length", Meta::U32(context)),
        ("llama.vocab_size", Meta::U32(vocab as u32)),
        ("llama.rope.dimension_count", Meta::U32(16)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            Meta::Strs((0..vocab).map(|i| format!("t{i}")).collect()),
        ),
        ("tokenizer.ggml.merges", Meta::Strs(Vec::new())),
        ("tokenizer.ggml.bos_token_id", Meta::U32(0)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(1)),
    ]
}
