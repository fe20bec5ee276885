//! Tests of the quantized kernels: layouts against candle-core's GGML
//! dequantization, every SIMD path bit-exact against the scalar reference
//! (random shapes and edge sizes, serial and on a thread pool), and the
//! products against f32 math on the dequantized weights within a stated bound.

use super::*;

use crate::test_rng::Rng;

/// Little-endian f16 bytes of `v`.
fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// `n` rows of `k` weights in `format`: random quantized bytes (every bit
/// pattern the format allows, e.g. Q8_0's −128) with finite, sane f16 scales.
fn random_weights(rng: &mut Rng, format: QuantFormat, n: usize, k: usize) -> Vec<u8> {
    let rb = format
        .row_bytes(k)
        .expect("k is a multiple of the block size");
    let mut w = rng.bytes(n * rb);
    for blk in w.chunks_exact_mut(format.block_bytes()) {
        let scale = |rng: &mut Rng, signed: bool| {
            let v = 0.001 + 0.05 * rng.f32().abs();
            f16_bytes(if signed && rng.u64().is_multiple_of(2) {
                -v
            } else {
                v
            })
        };
        match format {
            QuantFormat::Q4_0 | QuantFormat::Q8_0 | QuantFormat::Q5_0 => {
                blk[0..2].copy_from_slice(&scale(rng, true));
            }
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => {
                blk[0..2].copy_from_slice(&scale(rng, false));
                blk[2..4].copy_from_slice(&scale(rng, true));
            }
            QuantFormat::Q4K => {
                blk[0..2].copy_from_slice(&f16_bytes(0.002 * (1.0 + rng.f32().abs())));
                blk[2..4].copy_from_slice(&f16_bytes(0.001 * (1.0 + rng.f32().abs())));
            }
            QuantFormat::Q6K => {
                blk[208..210].copy_from_slice(&f16_bytes(0.0005 * (1.0 + rng.f32().abs())));
            }
            QuantFormat::Q2K => {
                blk[80..82].copy_from_slice(&f16_bytes(0.01 * (1.0 + rng.f32().abs())));
                blk[82..84].copy_from_slice(&f16_bytes(0.005 * (1.0 + rng.f32().abs())));
            }
            QuantFormat::Q3K => {
                blk[108..110].copy_from_slice(&f16_bytes(0.002 * (1.0 + rng.f32().abs())));
            }
            QuantFormat::Q5K => {
                blk[0..2].copy_from_slice(&f16_bytes(0.001 * (1.0 + rng.f32().abs())));
                blk[2..4].copy_from_slice(&f16_bytes(0.001 * (1.0 + rng.f32().abs())));
            }
        }
    }
    w
}

/// Activations with varied block magnitudes, some all-zero blocks and exact
/// ±max values.
fn random_acts(rng: &mut Rng, len: usize) -> Vec<f32> {
    let mut x = rng.f32s(len, 1.0);
    for blk in x.chunks_mut(32) {
        match rng.u64() % 8 {
            0 => blk.fill(0.0),
            1 => blk.iter_mut().for_each(|v| *v *= 100.0),
            2 => blk.iter_mut().for_each(|v| *v *= 1e-3),
            3 => blk[0] = 1.0,
            _ => {}
        }
    }
    x
}

fn supported_isas() -> Vec<Isa> {
    let mut v = Vec::new();
    for &isa in Isa::ALL {
        if isa.supported() {
            v.push(isa);
        } else {
            println!(
                "skipping the {} path: not supported by this CPU",
                isa.name()
            );
        }
    }
    v
}

fn pool(threads: usize) -> crate::cpu::pool::Pool {
    crate::cpu::pool::Pool::new("test", threads).expect("test thread pool")
}

fn candle_dtype(format: QuantFormat) -> candle_core::quantized::GgmlDType {
    use candle_core::quantized::GgmlDType;
    match format {
        QuantFormat::Q4_0 => GgmlDType::Q4_0,
        QuantFormat::Q4_1 => GgmlDType::Q4_1,
        QuantFormat::Q5_0 => GgmlDType::Q5_0,
        QuantFormat::Q5_1 => GgmlDType::Q5_1,
        QuantFormat::Q8_0 => GgmlDType::Q8_0,
        QuantFormat::Q4K => GgmlDType::Q4K,
        QuantFormat::Q6K => GgmlDType::Q6K,
        QuantFormat::Q2K => GgmlDType::Q2K,
        QuantFormat::Q3K => GgmlDType::Q3K,
        QuantFormat::Q5K => GgmlDType::Q5K,
    }
}

#[test]
fn format_constants_match_candle() {
    for f in QuantFormat::ALL {
        let c = candle_dtype(f);
        assert_eq!(f.block_size(), c.block_size(), "{f}");
        assert_eq!(f.block_bytes(), c.type_size(), "{f}");
        assert_eq!(QuantFormat::from_ggml_type(f.ggml_type()), Some(f));
    }
    assert_eq!(QuantFormat::Q4_0.row_bytes(64), Some(36));
    assert_eq!(QuantFormat::Q4K.row_bytes(255), None);
}

#[test]
fn dequantize_matches_candle() {
    let mut rng = Rng::new(1);
    for f in QuantFormat::ALL {
        let (n, k) = (3, 2 * f.block_size());
        let w = random_weights(&mut rng, f, n, k);
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_dtype(f),
            &w,
            vec![n, k],
            &candle_core::Device::Cpu,
        )
        .and_then(|q| q.dequantize(&candle_core::Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("candle dequantizes");
        let mut ours = vec![0f32; n * k];
        let rb = f.row_bytes(k).expect("whole blocks");
        for j in 0..n {
            dequantize_row(f, &w[j * rb..(j + 1) * rb], &mut ours[j * k..(j + 1) * k]);
        }
        for (i, (a, b)) in ours.iter().zip(&t).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{f} element {i}: ours {a}, candle {b}"
            );
        }
    }
}

#[test]
fn dequantize_hand_computed() {
    // Q4_0: d = 0.5, byte j = 0x9j -> weight j = 0.5·(j − 8), weight j+16 = 0.5·(9 − 8).
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16_bytes(0.5));
    for j in 0..16 {
        b[2 + j] = 0x90 | j as u8;
    }
    let mut y = [0f32; 32];
    dequantize_row(QuantFormat::Q4_0, &b, &mut y);
    for j in 0..16 {
        assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(y[j + 16], 0.5);
    }
    // Q4_K: scale/min of sub-block 5 from the split 6-bit encoding.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16_bytes(1.0));
    b[2..4].copy_from_slice(&f16_bytes(0.25));
    b[4 + 1] = 0b10_000000; // high bits of sc[5] = 2
    b[4 + 5] = 0b01_000000; // high bits of mn[5] = 1
    b[4 + 9] = 0x3_7; // mn[5] low = 3, sc[5] low = 7
    b[16 + 64..16 + 96].fill(0x50); // sub-block 5 = high nibbles of bytes 64..96 -> q = 5
    let mut y = [0f32; 256];
    dequantize_row(QuantFormat::Q4K, &b, &mut y);
    let (sc, mn) = (7.0 + 32.0, 3.0 + 16.0);
    assert_eq!(y[160], sc * 5.0 - 0.25 * mn);
    assert_eq!(y[159], 0.0);
}

#[test]
fn activation_quantization() {
    let mut rng = Rng::new(2);
    let k = 512;
    let x = random_acts(&mut rng, 3 * k);
    for f in [QuantFormat::Q4_1, QuantFormat::Q6K] {
        let mut acts = QuantizedActs::new();
        // Quantize twice into the same buffer: results must not depend on reuse.
        acts.quantize(f, &x[..k], k);
        acts.quantize(f, &x, k);
        assert_eq!(
            (acts.rows(), acts.cols(), acts.act_format()),
            (3, k, f.act_format())
        );
        let bs = f.act_format().block_size();
        for i in 0..3 {
            let r = acts.row(i);
            for b in 0..k / bs {
                let d = r.d[b];
                let xs = &x[i * k + b * bs..i * k + (b + 1) * bs];
                let q32;
                let qs = if bs == QK {
                    q32 = r.block32(b);
                    &q32[..]
                } else {
                    &r.qs[b * bs..(b + 1) * bs]
                };
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert_eq!(d, amax / 127.0);
                for (&xv, &q) in xs.iter().zip(qs) {
                    assert!((-127..=127).contains(&q));
                    assert!(
                        (d * q as f32 - xv).abs() <= d * 0.5001 + 1e-30,
                        "{xv} {q} {d}"
                    );
                }
                let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                if f.act_format() == ActFormat::Q8_1 {
                    assert_eq!(r.sum[b], sum);
                    assert_eq!(r.s[b], d * sum as f32);
                } else {
                    for g in 0..16 {
                        let gs: i32 = qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
                        assert_eq!(r.bsums[16 * b + g] as i32, gs);
                    }
                }
            }
        }
    }
}

#[test]
fn activation_quantization_paths_agree() {
    let mut rng = Rng::new(6);
    let pool = pool(3);
    for (f, m) in [
        (QuantFormat::Q8_0, 3),
        (QuantFormat::Q4K, 3),
        (QuantFormat::Q8_0, 40),
        (QuantFormat::Q4_1, 70),
        (QuantFormat::Q4K, 40),
    ] {
        for k in [f.block_size(), 3 * f.block_size(), 9 * f.block_size()] {
            let mut x = random_acts(&mut rng, m * k);
            // Ties at ±0.5 steps, and non-finite values (unspecified results,
            // but the same on every path).
            x[1] = 63.5 / 127.0 * x[0].abs().max(1.0);
            if k > 256 {
                x[300] = f32::NAN;
                x[301] = f32::INFINITY;
                x[2 * k + 7] = -f32::INFINITY;
            }
            let mut want = QuantizedActs::new();
            want.quantize_with(Isa::Scalar, f, &x, k, None);
            for (isa, threaded) in supported_isas()
                .into_iter()
                .flat_map(|isa| [(isa, false), (isa, true)])
            {
                let mut got = QuantizedActs::new();
                got.quantize_with(isa, f, &x, k, threaded.then_some(&pool));
                assert_eq!(got.qs, want.qs, "{f} m={m} k={k} {}", isa.name());
                if !got.tiles.is_empty() {
                    // The A tiles hold every row's blocks in natural order.
                    let nb = k / QK;
                    for i in 0..m {
                        for b in 0..nb {
                            let at = ((i / 16) * nb + b) * 512 + (i % 16) * 32;
                            assert_eq!(got.tiles[at..at + 32], want.row(i).block32(b));
                        }
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got.d), bits(&want.d), "{f} k={k} {}", isa.name());
                assert_eq!(bits(&got.s), bits(&want.s), "{f} k={k} {}", isa.name());
                assert_eq!(got.sum, want.sum);
                assert_eq!(got.bsums, want.bsums);
            }
        }
    }
}

/// Runs every supported path (serial, and on `pool`) and checks that all of
/// them, and `vec_dot`, agree bit for bit with the scalar path.
fn check_paths(
    f: QuantFormat,
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
    pool: &crate::cpu::pool::Pool,
) {
    let mut rng = Rng::new(seed);
    let w = random_weights(&mut rng, f, n, k);
    let x = random_acts(&mut rng, m * k);
    let acts = quantize_activations(f, &x, k);
    // Quantized on the scalar path: without the A tiles the AMX kernels
    // otherwise read, so they copy their own.
    let mut plain = QuantizedActs::new();
    plain.quantize_with(Isa::Scalar, f, &x, k, None);
    let mut want = vec![f32::NAN; m * n];
    gemm_with(Isa::Scalar, f, &w, n, &acts, &mut want, None);
    let rb = f.row_bytes(k).expect("whole blocks");
    for isa in supported_isas() {
        for (threaded, acts) in [(false, &acts), (true, &acts), (false, &plain)] {
            let mut y = vec![f32::NAN; m * n];
            gemm_with(isa, f, &w, n, acts, &mut y, threaded.then_some(pool));
            for idx in 0..m * n {
                assert_eq!(
                    y[idx].to_bits(),
                    want[idx].to_bits(),
                    "{f} {} threaded={threaded} m={m} n={n} k={k} (i={}, j={}): {} vs scalar {}",
                    isa.name(),
                    idx / n,
                    idx % n,
                    y[idx],
                    want[idx]
                );
            }
        }
        for (i, j) in [(0, 0), (m - 1, n - 1), (m / 2, n / 2)] {
            let v = vec_dot_with(isa, f, &w[j * rb..(j + 1) * rb], &acts, i);
            assert_eq!(
                v.to_bits(),
                want[i * n + j].to_bits(),
                "{f} {} vec_dot",
                isa.name()
            );
        }
    }
}

#[test]
fn simd_paths_match_scalar_random_shapes() {
    let pool = pool(3);
    let mut rng = Rng::new(3);
    for case in 0..60 {
        let f = QuantFormat::ALL[case % QuantFormat::ALL.len()];
        let max_blocks = if f.block_size() == QK { 20 } else { 4 };
        let k = f.block_size() * rng.range(1, max_blocks);
        let n = rng.range(1, 40);
        let m = rng.range(1, 9);
        check_paths(f, m, n, k, rng.u64(), &pool);
    }
}

#[test]
fn simd_paths_match_scalar_edge_sizes() {
    let pool = pool(3);
    for f in QuantFormat::ALL {
        let bs = f.block_size();
        // One block; k = one block with many rows; tile remainders (m = 16,
        // 17, 15); n not divisible by the thread count and large enough to
        // take the parallel path (n·row ≥ PAR_MIN_WORK) with a ragged chunk;
        // a group-of-8 tail of every length for the 32-wide formats.
        let mut shapes = vec![
            (1, 1, bs),
            (3, 301, bs),
            (16, 5, 2 * bs),
            (17, 7, bs),
            (15, 2, bs),
        ];
        let big_k = if bs == QK { 576 } else { 512 };
        shapes.push((1, 1000, big_k));
        shapes.push((9, 301, big_k));
        if bs == QK {
            for blocks in 8..=16 {
                shapes.push((2, 3, blocks * bs));
            }
        }
        for (seed, &(m, n, k)) in shapes.iter().enumerate() {
            check_paths(f, m, n, k, seed as u64 + 100, &pool);
        }
    }
}

/// Shapes for the AMX kernels (≥ 16 activation rows; tiles of 16 rows and
/// pairs of 16 weight rows, with partial tiles, and 8-block groups with
/// tails), checked like every other path against the scalar reference. On a
/// CPU without AMX this still compares the other paths at these shapes.
#[test]
fn simd_paths_match_scalar_large_batches() {
    let pool = pool(3);
    for f in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
        for (seed, &(m, n, k)) in [
            (16, 32, 8 * QK),
            (16, 1, QK),
            (17, 33, 9 * QK),
            (31, 47, 18 * QK),
            (48, 64, 7 * QK),
            (100, 300, 576),
            (64, 161, 1536),
        ]
        .iter()
        .enumerate()
        {
            check_paths(f, m, n, k, seed as u64 + 500, &pool);
        }
    }
}

#[test]
fn chunks_cover_every_row_once() {
    for n in 1..120 {
        for threads in 1..5 {
            for per_thread in [1, 2, 4] {
                for align in [1, 16] {
                    let chunks = threads * per_thread;
                    let (mut next, mut sizes) = (0, Vec::new());
                    for c in 0..chunks {
                        let (j0, j1) = chunk_rows(n, chunks, c, align);
                        assert!(j0 <= j1);
                        if j0 < j1 {
                            assert_eq!(j0, next, "n={n} chunks={chunks} c={c} align={align}");
                            // Chunks start on whole units.
                            assert_eq!(j0 % align, 0, "n={n} chunks={chunks} c={c}");
                            next = j1;
                            sizes.push((j1 - j0).div_ceil(align));
                        }
                    }
                    assert_eq!(next, n, "n={n} chunks={chunks} align={align}");
                    if align > 1 {
                        // Whole units, spread evenly.
                        let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                        assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{sizes:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn empty_shapes() {
    let pool = pool(2);
    let acts = quantize_activations(QuantFormat::Q4_1, &[], 32);
    assert_eq!(acts.rows(), 0);
    gemm(QuantFormat::Q4_1, &[0u8; 40], 2, &acts, &mut [], &pool);
    let acts = quantize_activations(QuantFormat::Q4_1, &[1.0; 32], 32);
    gemm(QuantFormat::Q4_1, &[], 0, &acts, &mut [], &pool);
}

#[test]
#[should_panic(expected = "activations were quantized")]
fn mismatched_act_format_panics() {
    let acts = quantize_activations(QuantFormat::Q4_1, &[1.0; 256], 256);
    let mut y = [0f32];
    gemm_serial(QuantFormat::Q4K, &[0u8; 144], 1, &acts, &mut y);
}

#[test]
#[should_panic(expected = "rows of")]
fn wrong_weight_length_panics() {
    let acts = quantize_activations(QuantFormat::Q8_0, &[1.0; 64], 64);
    let mut y = [0f32; 2];
    gemm_serial(QuantFormat::Q8_0, &[0u8; 67], 2, &acts, &mut y);
}

/// Sum over the row of |weight|, counting a block's offset (Q4_1 m, Q4_K
/// dmin·min) separately from its scaled values: the magnitudes the kernel's
/// float terms are made of.
fn weight_magnitudes(f: QuantFormat, w_row: &[u8], k: usize) -> Vec<f64> {
    let mut deq = vec![0f32; k];
    dequantize_row(f, w_row, &mut deq);
    let mut mag: Vec<f64> = deq.iter().map(|&v| (v as f64).abs()).collect();
    let bs = f.block_size();
    for (b, blk) in w_row.chunks_exact(f.block_bytes()).enumerate() {
        let off = match f {
            QuantFormat::Q4_1 | QuantFormat::Q5_1 => formats::f16_at(blk, 2).abs() as f64,
            QuantFormat::Q4K | QuantFormat::Q5K => formats::f16_at(blk, 2).abs() as f64 * 63.0,
            QuantFormat::Q2K => formats::f16_at(blk, 82).abs() as f64 * 15.0,
            _ => 0.0,
        };
        for v in &mut mag[b * bs..(b + 1) * bs] {
            *v += 2.0 * off;
        }
    }
    mag
}

#[test]
fn gemm_matches_dequantized_f32_within_bound() {
    // |y − Σ w·x| ≤ Σ |w_j|·(d_b/2)            (8-bit activations: |a − x| ≤ d/2)
    //             + 1e-5 · Σ W_j·(|x_j| + d_b)  (f32 rounding of the block terms,
    //                                             W_j = |w_j| + 2·|block offset|)
    let pool = pool(2);
    let mut rng = Rng::new(4);
    for f in QuantFormat::ALL {
        let (m, n, k) = (5, 37, if f.block_size() == QK { 576 } else { 768 });
        let w = random_weights(&mut rng, f, n, k);
        let x = random_acts(&mut rng, m * k);
        let acts = quantize_activations(f, &x, k);
        let mut y = vec![0f32; m * n];
        gemm(f, &w, n, &acts, &mut y, &pool);
        let rb = f.row_bytes(k).expect("whole blocks");
        let bs = f.act_format().block_size();
        for j in 0..n {
            let wr = &w[j * rb..(j + 1) * rb];
            let mut deq = vec![0f32; k];
            dequantize_row(f, wr, &mut deq);
            let mag = weight_magnitudes(f, wr, k);
            for i in 0..m {
                let xr = &x[i * k..(i + 1) * k];
                let (mut exact, mut quant_err, mut round_scale) = (0f64, 0f64, 0f64);
                for t in 0..k {
                    let d = acts.row(i).d[t / bs] as f64;
                    exact += deq[t] as f64 * xr[t] as f64;
                    quant_err += (deq[t] as f64).abs() * d * 0.5001;
                    round_scale += mag[t] * ((xr[t] as f64).abs() + d);
                }
                let tol = quant_err + 1e-5 * round_scale;
                let got = y[i * n + j] as f64;
                assert!(
                    (got - exact).abs() <= tol,
                    "{f} i={i} j={j}: got {got}, f32 math {exact}, |diff| {} > tol {tol}",
                    (got - exact).abs()
                );
            }
        }
    }
}

/// Best per-call time of 5 batches of ~40 ms of `f` (other processes share
/// the cores; the minimum is the stable figure), after one warm-up call.
fn best_time(mut f: impl FnMut()) -> f64 {
    use std::time::{Duration, Instant};
    f();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < Duration::from_millis(40) {
            f();
            calls += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / calls as f64);
    }
    best
}

/// Timing check, not a test of correctness: Q4_1 / Q8_0 / Q4_0 at the reference
/// model's shapes, every path, on 1 thread (`gemm_serial`) and on a 2-thread
/// compute pool (this thread and one helper). Run with
/// `cargo test --release -p parallm-kernels quant_timing -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check: cargo test --release -p parallm-kernels quant_timing -- --ignored --nocapture"]
fn quant_timing() {
    let pool = pool(2);
    let mut rng = Rng::new(5);
    println!("path         format  n      k    m    1 thread µs  GB/s   2 threads µs  GB/s");
    println!("(candle: its own threading over the global rayon pool, includes its activation quantization)");
    for &(f, n, k) in &[
        (QuantFormat::Q4_1, 1536, 576),
        (QuantFormat::Q4_1, 576, 1536),
        (QuantFormat::Q8_0, 49152, 576),
        (QuantFormat::Q8_0, 1536, 576),
        (QuantFormat::Q4_0, 1536, 576),
    ] {
        let w = random_weights(&mut rng, f, n, k);
        // 128 rows: a prefill chunk.
        // 512 rows: a whole prefill (not for the vocabulary-sized matrix).
        for m in [1, 4, 16, 128, 512] {
            if m == 512 && n > 4096 {
                continue;
            }
            let x = random_acts(&mut rng, m * k);
            let acts = quantize_activations(f, &x, k);
            let mut y = vec![0f32; m * n];
            // candle-core's quantized matmul on the same bytes (its own
            // threading, global rayon pool) for comparison.
            {
                use candle_core::{quantized::QMatMul, Device, Module, Tensor};
                let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    candle_dtype(f),
                    &w,
                    vec![n, k],
                    &Device::Cpu,
                )
                .expect("candle loads the weights");
                let mm = QMatMul::from_qtensor(qt).expect("candle QMatMul");
                let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).expect("tensor");
                let t = best_time(|| {
                    mm.forward(&xt).expect("candle forward");
                });
                println!(
                    "{:<12} {:<7} {:<6} {:<4} {:<4} {:>11} {:>6} {:>12.1} {:>6.1}",
                    "candle",
                    f.name(),
                    n,
                    k,
                    m,
                    "",
                    "",
                    t * 1e6,
                    w.len() as f64 / t / 1e9
                );
            }
            for isa in supported_isas() {
                let t1 = best_time(|| gemm_with(isa, f, &w, n, &acts, &mut y, None));
                let t2 = best_time(|| gemm_with(isa, f, &w, n, &acts, &mut y, Some(&pool)));
                let gbs = |t: f64| w.len() as f64 / t / 1e9;
                println!(
                    "{:<12} {:<7} {:<6} {:<4} {:<4} {:>11.1} {:>6.1} {:>12.1} {:>6.1}",
                    isa.name(),
                    f.name(),
                    n,
                    k,
                    m,
                    t1 * 1e6,
                    gbs(t1),
                    t2 * 1e6,
                    gbs(t2)
                );
            }
        }
    }
}

/// The K formats against candle's quantized matmul, an independent port of
/// GGML's: both quantize the activations to Q8_K the same way, so they agree
/// to float rounding (within 1e-5 of the largest output). (The 32-wide formats are
/// not compared: candle rounds their activations to Q8_0, these kernels to
/// Q8_1-style blocks with f32 scales.)
#[test]
fn k_formats_equal_candles_matmul() {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};
    let pool = pool(2);
    let mut rng = Rng::new(9);
    for f in QuantFormat::ALL
        .into_iter()
        .filter(|f| f.block_size() == QK_K)
    {
        let (m, n, k) = (3, 8, 512);
        let w = random_weights(&mut rng, f, n, k);
        let x = random_acts(&mut rng, m * k);
        let mut y = vec![0f32; m * n];
        gemm(f, &w, n, &quantize_activations(f, &x, k), &mut y, &pool);
        let theirs = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_dtype(f),
            &w,
            vec![n, k],
            &Device::Cpu,
        )
        .and_then(QMatMul::from_qtensor)
        .and_then(|mm| mm.forward(&Tensor::from_vec(x, (m, k), &Device::Cpu)?))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("candle's matmul");
        let largest = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in y.iter().zip(&theirs) {
            assert!((a - b).abs() <= 1e-5 * largest, "{f}: {a} vs candle {b}");
        }
    }
}
