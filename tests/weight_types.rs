//! Every weight type a GGUF file may store loads, and computes what its
//! dequantized f32 copy computes.
//!
//! For each type, a two-layer Llama (hidden 256, FFN 512, 32 tokens) is
//! written with every matrix in that type (random blocks with sane scales;
//! norms and the embedding f32) and loaded twice: with its own blocks on
//! parallm's kernels (`--weights native`) and dequantized to f32 on load.
//! The quantized kernels round each activation row to 8-bit blocks (|Δx| ≤
//! max|x|/254 per block) in every matmul, and the logits part by up to
//! [`QUANT_BOUND`] of their norm (measured: 0.4–1.5% for the 32-wide
//! formats, 2.3% for Q3_K and 2.7% for Q6_K, whose activations round in
//! blocks of 256; under 0.1% for Q2_K, Q4_K and Q5_K, whose block minimums
//! add a large common part to every logit); the f16 and bf16 kernels keep
//! activations f32, and equal the f32 copy here. (Each kernel against its
//! dequantized weights, per matmul, within a formula bound, and the K formats
//! against candle's matmul: `kernels::cpu::quant`'s tests.)

#[path = "support/gguf.rs"]
mod gguf;

use gguf::{Meta, Tensor};
use parallm::framework::collective::SingleCollective;
use parallm::framework::weights::Mat;
use parallm::framework::{BatchItem, GgufFile, LlamaShard, LogitsWanted, ShardSpec, WeightFormat};

/// The largest logit difference allowed with 8-bit activations, as a
/// fraction of the largest |logit|.
const QUANT_BOUND: f32 = 0.05;

/// ... and with f16/bf16 weights (f32 activations).
const HALF_BOUND: f32 = 1e-5;

const HIDDEN: u64 = 256;
const FFN: u64 = 512;
const VOCAB: u64 = 32;
const LAYERS: u32 = 2;

/// A GGUF type: id, name, bytes per block of `block` weights, and where its
/// f16 scales sit in a block with the value each gets, about what gives the
/// weights an RMS of 1/√cols (the rest of a block is random bytes: every
/// value the format can hold).
struct Type {
    id: u32,
    name: &'static str,
    block: u64,
    bytes: u64,
    scales: &'static [(usize, f32)],
}

const TYPES: [Type; 15] = [
    Type {
        id: 0,
        name: "F32",
        block: 1,
        bytes: 4,
        scales: &[],
    },
    Type {
        id: 1,
        name: "F16",
        block: 1,
        bytes: 2,
        scales: &[],
    },
    Type {
        id: 30,
        name: "BF16",
        block: 1,
        bytes: 2,
        scales: &[],
    },
    Type {
        id: 2,
        name: "Q4_0",
        block: 32,
        bytes: 18,
        scales: &[(0, 0.01)],
    },
    Type {
        id: 3,
        name: "Q4_1",
        block: 32,
        bytes: 20,
        scales: &[(0, 0.01), (2, -0.07)],
    },
    Type {
        id: 6,
        name: "Q5_0",
        block: 32,
        bytes: 22,
        scales: &[(0, 0.005)],
    },
    Type {
        id: 7,
        name: "Q5_1",
        block: 32,
        bytes: 24,
        scales: &[(0, 0.005), (2, -0.07)],
    },
    Type {
        id: 8,
        name: "Q8_0",
        block: 32,
        bytes: 34,
        scales: &[(0, 0.0008)],
    },
    Type {
        id: 10,
        name: "Q2_K",
        block: 256,
        bytes: 84,
        scales: &[(80, 0.008), (82, 0.006)],
    },
    Type {
        id: 11,
        name: "Q3_K",
        block: 256,
        bytes: 110,
        scales: &[(108, 0.0015)],
    },
    Type {
        id: 12,
        name: "Q4_K",
        block: 256,
        bytes: 144,
        scales: &[(0, 0.0004), (2, 0.0003)],
    },
    Type {
        id: 13,
        name: "Q5_K",
        block: 256,
        bytes: 176,
        scales: &[(0, 0.0002), (2, 0.0003)],
    },
    Type {
        id: 14,
        name: "Q6_K",
        block: 256,
        bytes: 210,
        scales: &[(208, 0.00005)],
    },
    Type {
        id: 20,
        name: "IQ4_NL",
        block: 32,
        bytes: 18,
        scales: &[(0, 0.001)],
    },
    Type {
        id: 23,
        name: "IQ4_XS",
        block: 256,
        bytes: 136,
        scales: &[(0, 0.00007)],
    },
];

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `rows × cols` weights of type `t`, as the file stores them.
fn matrix_bytes(rng: &mut Rng, t: &Type, rows: u64, cols: u64) -> Vec<u8> {
    let n = (rows * cols) as usize;
    let scale = 1.0 / (cols as f32).sqrt();
    match t.name {
        "F32" => (0..n)
            .flat_map(|_| (rng.f32() * scale).to_le_bytes())
            .collect(),
        "F16" => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.f32() * scale).to_le_bytes())
            .collect(),
        "BF16" => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.f32() * scale).to_le_bytes())
            .collect(),
        _ => {
            let blocks = n / t.block as usize;
            let mut b: Vec<u8> = (0..blocks * t.bytes as usize)
                .map(|_| rng.next() as u8)
                .collect();
            for blk in b.chunks_exact_mut(t.bytes as usize) {
                for &(at, v) in t.scales {
                    // ±25% around the type's typical scale.
                    let v = v * (1.0 + 0.25 * rng.f32());
                    blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
            b
        }
    }
}

/// The tiny model with every matrix of type `t`, and the bytes written for
/// `blk.0.attn_q.weight`.
fn model_file(t: &Type) -> (GgufFile, Vec<u8>) {
    let mut meta = gguf::tiny_llama_meta(VOCAB as usize, 64);
    for (k, v) in meta.iter_mut() {
        match *k {
            "llama.block_count" => *v = Meta::U32(LAYERS),
            "llama.embedding_length" => *v = Meta::U32(HIDDEN as u32),
            "llama.feed_forward_length" => *v = Meta::U32(FFN as u32),
            "llama.rope.dimension_count" => *v = Meta::U32((HIDDEN / 4) as u32),
            _ => {}
        }
    }
    let mut rng = Rng(t.id as u64 + 1);
    // (name, GGUF dims: columns first, rows, type, bytes)
    let mut parts: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let f32s = |rng: &mut Rng, n: u64, around: f32, spread: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| (around + spread * rng.f32()).to_le_bytes())
            .collect()
    };
    let embd = f32s(&mut rng, VOCAB * HIDDEN, 0.0, 1.0);
    parts.push(("token_embd.weight".into(), vec![HIDDEN, VOCAB], 0, embd));
    let norm = f32s(&mut rng, HIDDEN, 1.0, 0.2);
    parts.push(("output_norm.weight".into(), vec![HIDDEN], 0, norm));
    let head = matrix_bytes(&mut rng, t, VOCAB, HIDDEN);
    parts.push(("output.weight".into(), vec![HIDDEN, VOCAB], t.id, head));
    for l in 0..LAYERS {
        for norm in ["attn_norm", "ffn_norm"] {
            let v = f32s(&mut rng, HIDDEN, 1.0, 0.2);
            parts.push((format!("blk.{l}.{norm}.weight"), vec![HIDDEN], 0, v));
        }
        for (name, rows, cols) in [
            ("attn_q", HIDDEN, HIDDEN),
            ("attn_k", HIDDEN, HIDDEN),
            ("attn_v", HIDDEN, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN),
            ("ffn_gate", FFN, HIDDEN),
            ("ffn_up", FFN, HIDDEN),
            ("ffn_down", HIDDEN, FFN),
        ] {
            let w = matrix_bytes(&mut rng, t, rows, cols);
            parts.push((format!("blk.{l}.{name}.weight"), vec![cols, rows], t.id, w));
        }
    }
    let mut table = Vec::new();
    let mut offset = 0u64;
    for (name, dims, id, bytes) in &parts {
        table.push(Tensor::new(name, dims, *id, offset));
        offset = (offset + bytes.len() as u64).div_ceil(32) * 32;
    }
    let mut file = gguf::gguf(&meta, &table, offset as usize);
    let data_start = file.len() - offset as usize;
    for ((_, _, _, bytes), t) in parts.iter().zip(&table) {
        let at = data_start + t.offset as usize;
        file[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let q = parts
        .iter()
        .find(|p| p.0 == "blk.0.attn_q.weight")
        .map(|p| p.3.clone())
        .unwrap_or_default();
    let file =
        GgufFile::from_bytes(format!("{}.gguf", t.name), file).expect("the file is well formed");
    (file, q)
}

fn logits(file: &GgufFile, format: WeightFormat, tokens: &[u32]) -> Vec<f32> {
    let m = LlamaShard::load(file, ShardSpec::SINGLE, format).expect("the model loads");
    let mut cache = m.new_cache();
    let out = m
        .forward(
            &mut [BatchItem {
                tokens,
                cache: &mut cache,
                logits: LogitsWanted::All,
            }],
            &SingleCollective,
        )
        .expect("forward");
    (0..tokens.len())
        .flat_map(|r| out.row(r).to_vec())
        .collect()
}

#[test]
fn every_weight_type_computes_what_its_dequantized_copy_computes() {
    let tokens: Vec<u32> = (0..24).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    for t in &TYPES {
        let (file, _) = model_file(t);
        let reference = logits(&file, WeightFormat::F32, &tokens);
        let own = logits(&file, WeightFormat::Native, &tokens);
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        let size = norm(&mut reference.iter().copied());
        let diff = norm(&mut reference.iter().zip(&own).map(|(a, b)| a - b));
        let bound = match t.block {
            1 => HALF_BOUND,
            _ => QUANT_BOUND,
        };
        println!(
            "{}: |logits| {size:.3}, |difference| {diff:.2e} ({:.3}%)",
            t.name,
            100.0 * diff / size
        );
        assert!(size > 1.0, "{}: logits too small to compare", t.name);
        assert!(
            diff <= bound * size,
            "{}: the logits differ by {diff} in norm ({size}), over {bound} of it",
            t.name
        );
    }
}

/// IQ4_NL / IQ4_XS blocks dequantized as llama.cpp's `dequantize_row_iq4_*`
/// define them (written here independently of the reader).
fn iq4_reference(xs: bool, raw: &[u8]) -> Vec<f32> {
    const LEVELS: [f32; 16] = [
        -127., -104., -83., -65., -49., -35., -22., -10., 1., 13., 25., 38., 53., 69., 89., 113.,
    ];
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::new();
    let mut sub = |scale: f32, qs: &[u8]| {
        out.extend(qs.iter().map(|q| scale * LEVELS[(q & 15) as usize]));
        out.extend(qs.iter().map(|q| scale * LEVELS[(q >> 4) as usize]));
    };
    if xs {
        for b in raw.chunks_exact(136) {
            let high = u16::from_le_bytes([b[2], b[3]]);
            for i in 0..8 {
                let low = (b[4 + i / 2] >> (4 * (i % 2))) & 15;
                let ls = (low as i32) | ((((high >> (2 * i)) & 3) as i32) << 4);
                sub(f16(b) * (ls - 32) as f32, &b[8 + 16 * i..24 + 16 * i]);
            }
        }
    } else {
        for b in raw.chunks_exact(18) {
            sub(f16(b), &b[2..18]);
        }
    }
    out
}

#[test]
fn iq4_weights_read_as_llama_cpp_defines_them() {
    for t in TYPES.iter().filter(|t| t.name.starts_with("IQ4")) {
        let (file, raw) = model_file(t);
        let name = "blk.0.attn_q.weight";
        assert_eq!(file.stored_type(name).as_deref(), Some(t.name));
        let q = file
            .tensor(name, &[HIDDEN as usize, HIDDEN as usize])
            .expect("reads");
        let got = match Mat::from_qtensor(&q).and_then(|m| m.to_f32()) {
            Ok(Mat::F32 { data, .. }) => data,
            other => panic!("{}: not dequantized: {other:?}", t.name),
        };
        let want = iq4_reference(t.name == "IQ4_XS", &raw);
        assert_eq!(got.len(), want.len());
        if t.name == "IQ4_NL" {
            // Re-blocked into Q8_0 exactly.
            assert_eq!(got, want);
        }
        // IQ4_XS's sub-block scales are rounded to f16.
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 2048.0, "{}: {g} vs {w}", t.name);
        }
    }
}
