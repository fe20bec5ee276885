//! Criterion micro-benchmarks of the CPU kernels at the reference model's
//! shapes (SmolLM2-135M: hidden 576, FFN 1536, vocab 49152), plus the
//! machine's streaming memory bandwidth to compare them with.
//!
//! Throughput is reported in bytes: for the quantized products, the weight
//! bytes read per call (so criterion's GB/s is the weight-streaming rate a
//! decode step achieves); for `memory/copy`, bytes read plus bytes written.
//! GFLOP/s follow from the times: a product does `2·m·n·k` flops.
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench --bench kernels
//! ```
//! Every kernel runs on one compute pool of `RAYON_NUM_THREADS` (else every
//! core) threads, this thread among them, as a compute node calls it.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::cpu::half_mm::{self, Half};
use kernels::cpu::pool::{enter, Pool};
use kernels::cpu::quant::{self, QuantFormat, QuantizedActs};
use kernels::cpu::skinny;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Weight blocks of `format` for an `n × k` matrix, quantized from random values.
fn weights(format: QuantFormat, n: usize, k: usize) -> Vec<u8> {
    let row = format.row_bytes(k).expect("whole blocks");
    let mut bytes = vec![0u8; n * row];
    // Random bytes are valid blocks for these formats once the scales are
    // small finite f16 values: write every block's f16 scale fields as 0.01.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for b in bytes.iter_mut() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *b = (s >> 56) as u8;
    }
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let bb = format.block_bytes();
    for block in bytes.chunks_exact_mut(bb) {
        match format {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 | QuantFormat::Q5_0 => {
                block[..2].copy_from_slice(&scale)
            }
            QuantFormat::Q4_1 | QuantFormat::Q5_1 | QuantFormat::Q4K | QuantFormat::Q5K => {
                block[..2].copy_from_slice(&scale);
                block[2..4].copy_from_slice(&scale);
            }
            QuantFormat::Q6K | QuantFormat::Q3K => {
                let l = block.len();
                block[l - 2..].copy_from_slice(&scale);
            }
            QuantFormat::Q2K => {
                block[80..82].copy_from_slice(&scale);
                block[82..84].copy_from_slice(&scale);
            }
        }
    }
    bytes
}

fn pool() -> Arc<Pool> {
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Arc::new(Pool::new("bench", threads).expect("pool"))
}

fn quantized(c: &mut Criterion) {
    let pool = pool();
    let shapes = [
        ("q4_1 ffn_up 1536x576", QuantFormat::Q4_1, 1536, 576),
        ("q4_1 ffn_down 576x1536", QuantFormat::Q4_1, 576, 1536),
        ("q8_0 lm_head 49152x576", QuantFormat::Q8_0, 49152, 576),
        ("q4_0 1536x576", QuantFormat::Q4_0, 1536, 576),
        ("q5_0 1536x576", QuantFormat::Q5_0, 1536, 576),
        ("q5_1 1536x576", QuantFormat::Q5_1, 1536, 576),
        ("q4_k 1536x1536", QuantFormat::Q4K, 1536, 1536),
        ("q6_k 1536x1536", QuantFormat::Q6K, 1536, 1536),
        ("q5_k 1536x1536", QuantFormat::Q5K, 1536, 1536),
        ("q3_k 1536x1536", QuantFormat::Q3K, 1536, 1536),
        ("q2_k 1536x1536", QuantFormat::Q2K, 1536, 1536),
    ];
    let mut group = c.benchmark_group("quant_gemm");
    for (name, format, n, k) in shapes {
        let w = weights(format, n, k);
        for m in [1usize, 4, 16] {
            let x = random(m * k, 7);
            let mut acts = QuantizedActs::new();
            acts.quantize(format, &x, k);
            let mut y = vec![0f32; m * n];
            group.throughput(Throughput::Bytes(w.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, _| {
                enter(&pool, || {
                    b.iter(|| quant::gemm(format, &w, n, &acts, &mut y, &pool));
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("quantize_activations");
    for (k, m) in [(576usize, 1usize), (576, 16), (1536, 16)] {
        let x = random(m * k, 3);
        let mut acts = QuantizedActs::new();
        group.throughput(Throughput::Bytes((x.len() * 4) as u64));
        group.bench_with_input(BenchmarkId::new(format!("q8_1 k{k}"), m), &m, |b, _| {
            b.iter(|| acts.quantize(QuantFormat::Q4_1, &x, k))
        });
    }
    group.finish();
}

fn dense(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("skinny_f32");
    let (n, k) = (1536usize, 576usize);
    let w = random(n * k, 11);
    for m in [1usize, 4, 16, 64] {
        let x = random(m * k, 5);
        let mut y = vec![0f32; m * n];
        group.throughput(Throughput::Bytes((w.len() * 4) as u64));
        group.bench_with_input(BenchmarkId::new("f32 1536x576", m), &m, |b, _| {
            enter(&pool, || {
                b.iter(|| skinny::matmul_xwt(&x, m, &w, n, k, &mut y))
            })
        });
    }
    group.finish();
}

/// f16 and bf16 weights (16-bit in memory, widened in registers); the
/// gate|up shape of the reference model, 3.5 MB in f16.
fn half(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("half_weights");
    let (n, k) = (3072usize, 576usize);
    for kind in [Half::F16, Half::Bf16] {
        let w: Vec<u16> = random(n * k, 13)
            .iter()
            .map(|&v| kind.from_f32(v))
            .collect();
        for m in [1usize, 4, 16, 64] {
            let x = random(m * k, 5);
            let mut y = vec![0f32; m * n];
            group.throughput(Throughput::Bytes((w.len() * 2) as u64));
            let name = format!("{} 3072x576", kind.name());
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, _| {
                enter(&pool, || {
                    b.iter(|| half_mm::matmul_xwt(kind, &x, m, &w, n, k, &mut y))
                })
            });
        }
    }
    group.finish();
}

/// Streaming copy of a buffer far larger than the caches, split across the
/// pool's threads: the bandwidth the weight-streaming rates are compared to.
fn memory(c: &mut Criterion) {
    let pool = pool();
    let len = 64 << 20; // 256 MiB of f32
    let src = random(len, 1);
    let mut dst = vec![0f32; len];
    let mut group = c.benchmark_group("memory");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((len * 4 * 2) as u64));
    group.bench_function("copy 256MiB", |b| {
        b.iter(|| {
            pool.chunks_mut(&mut dst, 1 << 16, |c, d| {
                d.copy_from_slice(&src[c << 16..][..d.len()])
            })
        })
    });
    group.throughput(Throughput::Bytes((len * 4) as u64));
    group.bench_function("read 256MiB", |b| {
        let mut sums = vec![0f32; len.div_ceil(1 << 16)];
        b.iter(|| {
            pool.for_each_mut(&mut sums, |c, sum| {
                // Sixteen independent sums: a load-bound loop, not an add chain.
                *sum = src[c << 16..][..(1 << 16).min(len - (c << 16))]
                    .chunks_exact(16)
                    .fold([0f32; 16], |mut acc, c| {
                        for (a, v) in acc.iter_mut().zip(c) {
                            *a += v;
                        }
                        acc
                    })
                    .iter()
                    .sum::<f32>()
            });
            sums.iter().sum::<f32>()
        })
    });
    group.finish();
}

/// Decode attention (one query row, the reference model's 9 query heads over
/// 3 KV heads of 64) at two context lengths, paged in blocks of 16, and the
/// elementwise ops at the model's widths.
fn attention_and_ops(c: &mut Criterion) {
    use kernels::cpu::attn::{attention, attention_scalar, AttnRow, KvRows};
    use kernels::cpu::ops;
    let pool = pool();
    let (heads, kv_heads, dim) = (9usize, 3usize, 64usize);
    let kv_width = kv_heads * dim;
    let mut group = c.benchmark_group("attention_decode");
    for pos in [128usize, 1024] {
        let n = pos + 1;
        let k = random(n * kv_width, 21);
        let v = random(n * kv_width, 22);
        let q = random(heads * dim, 23);
        let table: Vec<u32> = (0..n.div_ceil(16) as u32).collect();
        let row = AttnRow {
            k: KvRows::Paged {
                data: &k,
                table: &table,
                block_size: 16,
            },
            v: KvRows::Paged {
                data: &v,
                table: &table,
                block_size: 16,
            },
            pos,
        };
        let mut out = vec![0f32; heads * dim];
        group.throughput(Throughput::Bytes((2 * n * kv_width * 4) as u64));
        group.bench_with_input(BenchmarkId::new("gqa", pos), &pos, |b, _| {
            enter(&pool, || {
                b.iter(|| attention(&q, heads * dim, &[row], heads, kv_heads, dim, &mut out))
            })
        });
        group.bench_with_input(BenchmarkId::new("scalar reference", pos), &pos, |b, _| {
            b.iter(|| attention_scalar(&q, heads * dim, &[row], heads, kv_heads, dim, &mut out))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("ops");
    for width in [576usize, 1536] {
        let x = random(width, 31);
        let w = random(width, 32);
        let gate_up = random(2 * width, 33);
        let mut out = vec![0f32; width];
        group.throughput(Throughput::Bytes((width * 4) as u64));
        group.bench_with_input(BenchmarkId::new("rms_norm", width), &width, |b, _| {
            b.iter(|| ops::rms_norm(&x, &w, 1e-5, &mut out))
        });
        group.bench_with_input(BenchmarkId::new("silu_mul", width), &width, |b, _| {
            b.iter(|| ops::silu_mul(&gate_up, width, &mut out))
        });
    }
    let mut heads_buf = random(12 * 64, 34);
    let cos = random(32, 35);
    let sin = random(32, 36);
    group.bench_function("rope 12x64", |b| {
        b.iter(|| ops::rope(&mut heads_buf, &cos, &sin))
    });
    group.finish();
}

criterion_group!(benches, quantized, dense, half, attention_and_ops, memory);
criterion_main!(benches);
