//! Tests of the attention kernel: the fast path against the scalar reference
//! over random GQA shapes (flat and paged caches with random block tables),
//! flat vs paged and serial vs parallel bit-identical, f16 caches bit-identical
//! to f32 caches of the same values.

use super::*;

use crate::test_rng::Rng;

thread_local! {
    /// Set: every row runs alone on the single-row kernel (for timings).
    pub(super) static ROWS_ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One sequence's keys and values, flat and scattered into a paged pool.
struct Seq<T> {
    k: Vec<T>,
    v: Vec<T>,
    pool_k: Vec<T>,
    pool_v: Vec<T>,
    table: Vec<u32>,
    block_size: usize,
}

impl<T: Copy> Seq<T> {
    fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> Seq<U> {
        let m = |v: &Vec<T>| v.iter().map(|&x| f(x)).collect();
        Seq {
            k: m(&self.k),
            v: m(&self.v),
            pool_k: m(&self.pool_k),
            pool_v: m(&self.pool_v),
            table: self.table.clone(),
            block_size: self.block_size,
        }
    }

    fn kv(&self, paged: bool) -> (KvRows<'_, T>, KvRows<'_, T>) {
        if paged {
            let paged = |data| KvRows::Paged {
                data,
                table: &self.table,
                block_size: self.block_size,
            };
            (paged(&self.pool_k), paged(&self.pool_v))
        } else {
            (KvRows::Flat(&self.k), KvRows::Flat(&self.v))
        }
    }
}

/// `len` positions of `width` random keys/values, in a pool with spare blocks
/// of garbage and a random block order.
fn seq(rng: &mut Rng, len: usize, width: usize, q_scale: f32) -> Seq<f32> {
    let _ = q_scale;
    let k = rng.f32s(len * width, 1.0);
    let v = rng.f32s(len * width, 1.0);
    let block_size = [1, 2, 3, 5, 8, 16, 32][rng.range(0, 6)];
    let blocks = len.div_ceil(block_size);
    let pool_blocks = blocks + rng.range(0, 3);
    let mut order: Vec<u32> = (0..pool_blocks as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i));
    }
    let table = order[..blocks].to_vec();
    let mut pool_k = rng.f32s(pool_blocks * block_size * width, 50.0);
    let mut pool_v = rng.f32s(pool_blocks * block_size * width, 50.0);
    for p in 0..len {
        let o = (table[p / block_size] as usize * block_size + p % block_size) * width;
        pool_k[o..o + width].copy_from_slice(&k[p * width..][..width]);
        pool_v[o..o + width].copy_from_slice(&v[p * width..][..width]);
    }
    Seq {
        k,
        v,
        pool_k,
        pool_v,
        table,
        block_size,
    }
}

struct Case {
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    q_stride: usize,
    q: Vec<f32>,
    seqs: Vec<Seq<f32>>,
    /// (sequence, position) of each query row.
    rows: Vec<(usize, usize)>,
}

fn case(rng: &mut Rng, n_heads: usize, n_kv: usize, hd: usize, max_pos: usize) -> Case {
    let kv_w = n_kv * hd;
    let q_w = n_heads * hd;
    let q_stride = if rng.range(0, 1) == 0 {
        q_w
    } else {
        q_w + 2 * kv_w
    };
    let mut seqs = Vec::new();
    let mut rows = Vec::new();
    for s in 0..rng.range(1, 3) {
        let len = rng.range(1, max_pos);
        seqs.push(seq(rng, len, kv_w, 3.0));
        // A decode row, or the tail of a prefill.
        let take = rng.range(1, 3).min(len);
        rows.extend((len - take..len).map(|p| (s, p)));
    }
    // Scores of a few units of magnitude, as in a real model.
    let q = rng.f32s(rows.len() * q_stride, 3.0);
    Case {
        n_heads,
        n_kv,
        hd,
        q_stride,
        q,
        seqs,
        rows,
    }
}

type Kernel<T> = fn(&[f32], usize, &[AttnRow<'_, T>], usize, usize, usize, &mut [f32]);

fn run<T: KvElem>(c: &Case, seqs: &[Seq<T>], paged: bool, kernel: Kernel<T>) -> Vec<f32> {
    let rows: Vec<AttnRow<'_, T>> = c
        .rows
        .iter()
        .map(|&(s, pos)| {
            let (k, v) = seqs[s].kv(paged);
            AttnRow { k, v, pos }
        })
        .collect();
    let mut out = vec![f32::NAN; rows.len() * c.n_heads * c.hd];
    kernel(&c.q, c.q_stride, &rows, c.n_heads, c.n_kv, c.hd, &mut out);
    out
}

const SHAPES: [(usize, usize); 4] = [(9, 3), (4, 2), (3, 3), (8, 1)];

#[test]
fn fast_matches_reference_and_layouts_agree() {
    let mut rng = Rng::new(7);
    let mut worst = 0f32;
    for iter in 0..48 {
        let (n_heads, n_kv) = SHAPES[iter % 4];
        let hd = [64, 32][iter / 4 % 2];
        let c = case(&mut rng, n_heads, n_kv, hd, 300);
        let fast = run(&c, &c.seqs, false, attention::<f32>);
        let reference = run(&c, &c.seqs, false, attention_scalar::<f32>);
        // Values are in [-1, 1): the bound is 1e-5 of their scale.
        for (i, (&a, &b)) in fast.iter().zip(&reference).enumerate() {
            let d = (a - b).abs();
            worst = worst.max(d);
            assert!(
                d <= 1e-5,
                "case {iter} ({n_heads}/{n_kv}×{hd}) [{i}]: {a} vs {b}"
            );
        }
        let paged = run(&c, &c.seqs, true, attention::<f32>);
        assert_eq!(fast, paged, "case {iter}: flat vs paged (fast)");
        let ref_paged = run(&c, &c.seqs, true, attention_scalar::<f32>);
        assert_eq!(
            reference, ref_paged,
            "case {iter}: flat vs paged (reference)"
        );
    }
    println!("worst |fast − reference| = {worst:e}");
}

/// A cache of `T` against an f32 cache holding the same (widened) values:
/// bit-identical, fast path and reference, flat and paged.
fn half_cache_equals_f32_cache<T: KvElem>(seed: u64, to: fn(f32) -> T, back: fn(T) -> f32) {
    let mut rng = Rng::new(seed);
    for iter in 0..16 {
        let (n_heads, n_kv) = SHAPES[iter % 4];
        let hd = [64, 32][iter / 4 % 2];
        let c = case(&mut rng, n_heads, n_kv, hd, 200);
        let halves: Vec<Seq<T>> = c.seqs.iter().map(|s| s.map(to)).collect();
        let widened: Vec<Seq<f32>> = halves.iter().map(|s| s.map(back)).collect();
        for paged in [false, true] {
            let h = run(&c, &halves, paged, attention::<T>);
            let f = run(&c, &widened, paged, attention::<f32>);
            assert_eq!(h, f, "case {iter} paged={paged}: fast vs f32");
            let h = run(&c, &halves, paged, attention_scalar::<T>);
            let f = run(&c, &widened, paged, attention_scalar::<f32>);
            assert_eq!(h, f, "case {iter} paged={paged}: reference vs f32");
        }
    }
}

#[test]
fn f16_cache_equals_f32_cache_of_the_same_values() {
    half_cache_equals_f32_cache(8, f16::from_f32, f16::to_f32);
}

#[test]
fn bf16_cache_equals_f32_cache_of_the_same_values() {
    half_cache_equals_f32_cache(18, half::bf16::from_f32, half::bf16::to_f32);
}

#[test]
fn serial_and_parallel_splits_agree() {
    let mut rng = Rng::new(9);
    let pool = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 3).unwrap());
    for (n_heads, n_kv) in SHAPES {
        // Big enough for the parallel split.
        let c = case(&mut rng, n_heads, n_kv, 64, 1200);
        let serial: Kernel<f32> = |q, qs, rows, h, kv, hd, out| {
            attention_with(
                detect_isa(hd),
                false,
                q,
                qs,
                rows,
                (h, kv, hd),
                &AttnParams::standard(hd),
                out,
            )
        };
        let a = run(&c, &c.seqs, true, serial);
        let b = crate::cpu::pool::enter(&pool, || run(&c, &c.seqs, true, attention::<f32>));
        assert_eq!(a, b, "{n_heads}/{n_kv}");
    }
}

#[test]
fn heads_do_not_depend_on_their_neighbours() {
    // A shard holding KV head 1 of 3 (and its query heads) computes the same
    // bits as the whole model does for those heads.
    let mut rng = Rng::new(10);
    let (n_heads, n_kv, hd) = (9, 3, 64);
    let c = case(&mut rng, n_heads, n_kv, hd, 100);
    let whole = run(&c, &c.seqs, false, attention::<f32>);
    let kv_w = n_kv * hd;
    let shard_seqs: Vec<Seq<f32>> = c
        .seqs
        .iter()
        .map(|s| {
            let pick = |v: &Vec<f32>| -> Vec<f32> {
                v.chunks_exact(kv_w)
                    .flat_map(|r| r[hd..2 * hd].to_vec())
                    .collect()
            };
            Seq {
                k: pick(&s.k),
                v: pick(&s.v),
                pool_k: pick(&s.pool_k),
                pool_v: pick(&s.pool_v),
                table: s.table.clone(),
                block_size: s.block_size,
            }
        })
        .collect();
    let q: Vec<f32> =
        c.q.chunks_exact(c.q_stride)
            .flat_map(|r| r[3 * hd..6 * hd].to_vec())
            .collect();
    let shard = Case {
        n_heads: 3,
        n_kv: 1,
        hd,
        q_stride: 3 * hd,
        q,
        seqs: Vec::new(),
        rows: c.rows.clone(),
    };
    let part = run(&shard, &shard_seqs, true, attention::<f32>);
    for (w, p) in whole
        .chunks_exact(n_heads * hd)
        .zip(part.chunks_exact(3 * hd))
    {
        assert_eq!(&w[3 * hd..6 * hd], p);
    }
}

#[test]
fn odd_head_dims_use_the_reference() {
    let mut rng = Rng::new(11);
    for hd in [2, 6, 12] {
        let c = case(&mut rng, 4, 2, hd, 40);
        let fast = run(&c, &c.seqs, true, attention::<f32>);
        let reference = run(&c, &c.seqs, false, attention_scalar::<f32>);
        assert_eq!(fast, reference, "head_dim {hd}");
    }
}

#[test]
fn attention_over_one_key_returns_its_value() {
    let k = [1.0; 16];
    let v: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let q = [0.5f32; 16];
    let mut out = [0.0; 16];
    let row = AttnRow {
        k: KvRows::Flat(&k),
        v: KvRows::Flat(&v),
        pos: 0,
    };
    attention(&q, 16, &[row], 2, 2, 8, &mut out);
    assert_eq!(out[..], v[..]);
}

#[test]
#[should_panic(expected = "cover")]
fn a_short_block_table_panics() {
    let data = [0f32; 32];
    let kv = KvRows::Paged {
        data: &data,
        table: &[0],
        block_size: 2,
    };
    let row = AttnRow {
        k: kv,
        v: kv,
        pos: 2,
    };
    let mut out = [0f32; 8];
    attention(&[0f32; 8], 8, &[row], 1, 1, 8, &mut out);
}

/// Old (reference) vs new for one decode row of the reference model's shape:
/// `cargo test --release -p parallm-kernels -- --ignored --nocapture attention_timing`.
#[test]
#[ignore = "a timing, not a check: cargo test --release -p parallm-kernels attention_timing -- --ignored --nocapture"]
fn attention_timing() {
    use std::time::Instant;
    let mut rng = Rng::new(12);
    let (n_heads, n_kv, hd) = (9, 3, 64);
    let one = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 1).unwrap());
    let two = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 2).unwrap());
    for pos in [128, 1024] {
        let s = seq(&mut rng, pos + 1, n_kv * hd, 1.0);
        let half: Seq<f16> = s.map(f16::from_f32);
        let q = rng.f32s(n_heads * hd, 3.0);
        let mut out = vec![0f32; n_heads * hd];
        let time = |f: &mut dyn FnMut()| {
            for _ in 0..20 {
                f();
            }
            let iters = if pos > 512 { 2000 } else { 10_000 };
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / iters as f64
        };
        for (name, paged) in [("flat", false), ("paged", true)] {
            let (k, v) = s.kv(paged);
            let rows = [AttnRow { k, v, pos }];
            let (hk, hv) = half.kv(paged);
            let hrows = [AttnRow { k: hk, v: hv, pos }];
            let old = crate::cpu::pool::enter(&one, || {
                time(&mut || attention_scalar(&q, n_heads * hd, &rows, n_heads, n_kv, hd, &mut out))
            });
            let new1 = crate::cpu::pool::enter(&one, || {
                time(&mut || attention(&q, n_heads * hd, &rows, n_heads, n_kv, hd, &mut out))
            });
            let new2 = crate::cpu::pool::enter(&two, || {
                time(&mut || attention(&q, n_heads * hd, &rows, n_heads, n_kv, hd, &mut out))
            });
            let f16_1 = crate::cpu::pool::enter(&one, || {
                time(&mut || attention(&q, n_heads * hd, &hrows, n_heads, n_kv, hd, &mut out))
            });
            println!(
                "pos {pos} {name}: reference {old:.2} µs, new {new1:.2} µs (1 thread), \
                 {new2:.2} µs (2 threads), new f16 {f16_1:.2} µs (1 thread)"
            );
        }
    }
}

#[test]
fn a_window_is_attention_over_the_last_keys_and_every_path_agrees() {
    let mut rng = Rng::new(41);
    for &(n_heads, n_kv, hd) in &[(4, 2, 16), (6, 3, 32), (2, 2, 8)] {
        let width = n_kv * hd;
        let len = 37;
        let s = seq(&mut rng, len, width, 1.0);
        let q = rng.f32s(n_heads * hd, 2.0);
        for (window, softcap, scale) in [
            (5, 0.0, 0.25),
            (1, 0.0, 0.1),
            (100, 0.0, 0.3),
            (7, 3.0, 0.5),
            (0, 2.0, 0.7),
        ] {
            let params = AttnParams {
                scale,
                softcap,
                window,
            };
            let pos = len - 1;
            let (k, v) = s.kv(true);
            let row = [AttnRow { k, v, pos }];
            let mut fast = vec![0f32; n_heads * hd];
            attention_params(
                &q,
                n_heads * hd,
                &row,
                (n_heads, n_kv, hd),
                &params,
                &mut fast,
            );
            let mut reference = vec![0f32; n_heads * hd];
            attention_scalar_params(
                &q,
                n_heads * hd,
                &row,
                (n_heads, n_kv, hd),
                &params,
                &mut reference,
            );
            let vmax = s.v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in fast.iter().zip(&reference) {
                assert!(
                    (a - b).abs() <= 1e-5 * vmax,
                    "window {window} cap {softcap}: {a} vs {b}"
                );
            }
            // The window's keys alone, unwindowed and uncapped when no cap:
            // the same result, bit for bit, on the scalar path.
            if softcap == 0.0 && window > 0 {
                let first = (pos + 1).saturating_sub(window);
                let tail = [AttnRow {
                    k: KvRows::Flat(&s.k[first * width..]),
                    v: KvRows::Flat(&s.v[first * width..]),
                    pos: pos - first,
                }];
                let mut want = vec![0f32; n_heads * hd];
                let plain = AttnParams {
                    window: 0,
                    ..params
                };
                attention_scalar_params(
                    &q,
                    n_heads * hd,
                    &tail,
                    (n_heads, n_kv, hd),
                    &plain,
                    &mut want,
                );
                assert_eq!(reference, want, "window {window}");
            }
        }
    }
}

#[test]
fn a_soft_cap_bounds_every_score() {
    // One key far more aligned than the rest: uncapped it takes all the
    // weight; capped at 1, its score is tanh(80) ≈ 1 against 0 for the
    // others, so every value keeps a share: (0·e + 1 + 2 + 3) / (e + 3).
    let hd = 8;
    let k: Vec<f32> = (0..4 * hd)
        .map(|i| if i < hd { 10.0 } else { 0.0 })
        .collect();
    let v: Vec<f32> = (0..4 * hd).map(|i| (i / hd) as f32).collect();
    let q = vec![1.0f32; hd];
    let row = [AttnRow {
        k: KvRows::Flat(&k),
        v: KvRows::Flat(&v),
        pos: 3,
    }];
    let run = |softcap| {
        let mut out = vec![0f32; hd];
        let p = AttnParams {
            scale: 1.0,
            softcap,
            window: 0,
        };
        attention_scalar_params(&q, hd, &row, (1, 1, hd), &p, &mut out);
        out[0]
    };
    assert!(run(0.0) < 1e-6, "uncapped: all weight on value 0");
    let capped = run(1.0);
    let e = 80f32.tanh().exp();
    let want = 6.0 / (e + 3.0);
    assert!((capped - want).abs() < 1e-5, "{capped} vs {want}");
}

/// A prefill chunk's attention: 32 rows of one sequence after a 384-token
/// prefix (the shape of a prefix-cached request's suffix), paged in blocks
/// of 16, the reference model's heads:
/// `cargo test --release -p parallm-kernels prefill_attention_timing -- --ignored --nocapture`.
#[test]
#[ignore = "a timing, not a check: cargo test --release -p parallm-kernels prefill_attention_timing -- --ignored --nocapture"]
fn prefill_attention_timing() {
    let mut rng = Rng::new(13);
    let (n_heads, n_kv, hd) = (9, 3, 64);
    let one = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 1).unwrap());
    for (depth, rows_n) in [(384, 32), (0, 416)] {
        let len = depth + rows_n;
        let mut s = seq(&mut rng, len, n_kv * hd, 1.0);
        while s.block_size != 16 {
            s = seq(&mut rng, len, n_kv * hd, 1.0);
        }
        let q = rng.f32s(rows_n * n_heads * hd, 3.0);
        let mut out = vec![0f32; rows_n * n_heads * hd];
        let (k, v) = s.kv(true);
        let rows: Vec<AttnRow<'_, f32>> = (depth..len).map(|pos| AttnRow { k, v, pos }).collect();
        let fmas: usize = rows.iter().map(|r| (r.pos + 1) * n_heads * hd * 2).sum();
        let (tiled, alone) = tiles_and_rows_alone(&one, &q, &rows, (n_heads, n_kv, hd), &mut out);
        for (name, us) in [("tiles", tiled), ("rows alone", alone)] {
            println!(
                "{rows_n} rows after {depth}, {name}: {us:.0} µs per layer (1 thread), {:.1} G multiply-adds/s",
                fmas as f64 / us / 1e3
            );
        }
    }
}

/// µs per call of `attention` over `rows` on one thread, with tiles and with
/// every row alone: alternating rounds, the best of each.
fn tiles_and_rows_alone(
    one: &std::sync::Arc<crate::cpu::pool::Pool>,
    q: &[f32],
    rows: &[AttnRow<'_, f32>],
    (n_heads, n_kv, hd): (usize, usize, usize),
    out: &mut [f32],
) -> (f64, f64) {
    let (mut tiled, mut alone) = (f64::MAX, f64::MAX);
    crate::cpu::pool::enter(one, || {
        for round in 0..10 {
            ROWS_ALONE.with(|a| a.set(round % 2 == 1));
            let t = std::time::Instant::now();
            for _ in 0..5 {
                attention(q, n_heads * hd, rows, n_heads, n_kv, hd, out);
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / 5.0;
            let best = if round % 2 == 1 {
                &mut alone
            } else {
                &mut tiled
            };
            *best = best.min(us);
        }
        ROWS_ALONE.with(|a| a.set(false));
    });
    (tiled, alone)
}

/// Runs of consecutive rows of one sequence (prefill chunks, speculative
/// steps) go through the multi-row kernel where the CPU has AVX-512; every
/// row's result must be the bits it gets alone (the single-row kernel), so
/// that a row's attention never depends on the other rows of its step.
fn tiles_equal_rows_alone<T: KvElem>(seed: u64, to: fn(f32) -> T) {
    let mut rng = Rng::new(seed);
    let tiled = crate::cpu::features::enabled(crate::cpu::features::Feature::Avx512);
    println!(
        "multi-row kernel {}",
        if tiled {
            "on (AVX-512)"
        } else {
            "off: no AVX-512 here, rows run alone"
        }
    );
    let shapes = [(9, 3), (4, 2), (3, 3), (8, 1), (16, 2), (2, 1)];
    for iter in 0..36 {
        let (n_heads, n_kv) = shapes[iter % shapes.len()];
        let hd = [64, 32, 16, 128, 48, 24][iter / shapes.len() % 6];
        let kv_w = n_kv * hd;
        let mut seqs: Vec<Seq<T>> = Vec::new();
        for _ in 0..rng.range(1, 3) {
            let len = rng.range(1, 200);
            seqs.push(seq(&mut rng, len, kv_w, 1.0).map(to));
        }
        // Each sequence's last rows (up to 30: several tiles), and now and
        // then a row of another sequence between two runs.
        let mut rows = Vec::new();
        for sq in &seqs {
            let len = sq.k.len() / kv_w;
            let take = rng.range(1, 30).min(len);
            let (k, v) = sq.kv(iter % 2 == 0);
            rows.extend((len - take..len).map(|pos| AttnRow { k, v, pos }));
        }
        let case = format!("case {iter} ({n_heads}/{n_kv}×{hd})");
        assert_varied_case_alone(&mut rng, iter, &rows, (n_heads, n_kv, hd), &case);
    }
}

/// [`assert_rows_get_their_bits_alone`] with random queries and settings
/// varied by `iter`: now and then scores far apart, so that most weights
/// underflow (then the scalar reference is not compared), and soft-capping
/// every third case.
fn assert_varied_case_alone<T: KvElem>(
    rng: &mut Rng,
    iter: usize,
    rows: &[AttnRow<'_, T>],
    heads: (usize, usize, usize),
    case: &str,
) {
    let (n_heads, _, hd) = heads;
    let wide = iter % 4 == 1;
    let q = rng.f32s(rows.len() * n_heads * hd, if wide { 300.0 } else { 3.0 });
    let params = AttnParams {
        softcap: if iter.is_multiple_of(3) { 20.0 } else { 0.0 },
        ..AttnParams::standard(hd)
    };
    assert_rows_get_their_bits_alone(&q, rows, heads, &params, !wide, case);
}

/// Attention of `rows` together equals each row's alone, bit for bit, and
/// (`near_reference`) the scalar reference within 1e-5.
fn assert_rows_get_their_bits_alone<T: KvElem>(
    q: &[f32],
    rows: &[AttnRow<'_, T>],
    heads: (usize, usize, usize),
    params: &AttnParams,
    near_reference: bool,
    case: &str,
) {
    let q_w = heads.0 * heads.2;
    let mut together = vec![f32::NAN; rows.len() * q_w];
    attention_params(q, q_w, rows, heads, params, &mut together);
    for (r, row) in rows.iter().enumerate() {
        let mut alone = vec![f32::NAN; q_w];
        attention_params(
            &q[r * q_w..][..q_w],
            q_w,
            &[*row],
            heads,
            params,
            &mut alone,
        );
        assert_eq!(
            &together[r * q_w..][..q_w],
            &alone[..],
            "{case}, row {r} at {}",
            row.pos
        );
    }
    if near_reference {
        let mut reference = vec![f32::NAN; rows.len() * q_w];
        attention_scalar_params(q, q_w, rows, heads, params, &mut reference);
        for (i, (a, b)) in together.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-5, "{case} [{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn tiles_of_rows_give_each_row_its_bits_alone() {
    tiles_equal_rows_alone::<f32>(21, |x| x);
    tiles_equal_rows_alone::<f16>(22, f16::from_f32);
    tiles_equal_rows_alone::<half::bf16>(23, half::bf16::from_f32);
}

/// Sequences whose block tables share leading blocks of one pool (a shared
/// prompt prefix, sampled siblings, beams): their decode rows go through
/// the multi-row kernel together where the CPU has AVX-512, and every row
/// must still get the bits it gets alone.
fn shared_blocks_equal_rows_alone<T: KvElem>(seed: u64, to: fn(f32) -> T) {
    let mut rng = Rng::new(seed);
    let tiled = crate::cpu::features::enabled(crate::cpu::features::Feature::Avx512);
    let shapes = [(9, 3), (4, 2), (3, 3), (8, 1), (16, 2), (2, 1)];
    let mut crossed = 0;
    for iter in 0..36 {
        let (n_heads, n_kv) = shapes[iter % shapes.len()];
        let hd = [64, 32, 16, 128, 48, 24][iter / shapes.len() % 6];
        let kv_w = n_kv * hd;
        let block_size = [1, 2, 3, 5, 8, 16, 32][rng.range(0, 6)];
        // One pool: a trunk of blocks some sequences share (up to a random
        // point), then blocks of their own.
        let trunk_blocks = rng.range(1, 200usize.div_ceil(block_size));
        let n_seqs = rng.range(2, 14);
        let mut next_block = trunk_blocks as u32;
        let mut tables = Vec::new();
        let mut lens = Vec::new();
        for _ in 0..n_seqs {
            let shared = rng.range(0, trunk_blocks);
            let len = rng.range((shared * block_size).max(1), shared * block_size + 60);
            let blocks = len.div_ceil(block_size);
            let mut table: Vec<u32> = (0..shared.min(blocks) as u32).collect();
            while table.len() < blocks {
                table.push(next_block);
                next_block += 1;
            }
            tables.push(table);
            lens.push(len);
        }
        let pool_k: Vec<T> = rng
            .f32s(next_block as usize * block_size * kv_w, 1.0)
            .into_iter()
            .map(to)
            .collect();
        let pool_v: Vec<T> = rng
            .f32s(next_block as usize * block_size * kv_w, 1.0)
            .into_iter()
            .map(to)
            .collect();
        // Each sequence's last row (a decode), now and then its last few
        // (a speculative step), in a shuffled order.
        let mut rows = Vec::new();
        for (table, &len) in tables.iter().zip(&lens) {
            let paged = |data| KvRows::Paged {
                data,
                table,
                block_size,
            };
            let (k, v) = (paged(&pool_k[..]), paged(&pool_v[..]));
            let take = if rng.range(0, 4) == 0 {
                rng.range(1, 4).min(len)
            } else {
                1
            };
            rows.extend((len - take..len).map(|pos| AttnRow { k, v, pos }));
        }
        for i in (1..rows.len()).rev() {
            rows.swap(i, rng.range(0, i));
        }
        if let Some(tiles) = row_tiles(&rows, n_heads / n_kv, hd, &AttnParams::standard(hd)) {
            crossed += tiles.spans.iter().filter(|s| s.2 && s.1 > 1).count();
        }
        let case = format!("case {iter} ({n_heads}/{n_kv}×{hd}, blocks of {block_size})");
        assert_varied_case_alone(&mut rng, iter, &rows, (n_heads, n_kv, hd), &case);
    }
    if tiled {
        println!("{crossed} tiles of rows of different sequences");
        assert!(
            crossed > 36,
            "the cases made only {crossed} cross-sequence tiles"
        );
    } else {
        println!("multi-row kernel off: no AVX-512 here, rows run alone");
    }
}

#[test]
fn rows_sharing_cache_blocks_get_their_bits_alone() {
    shared_blocks_equal_rows_alone::<f32>(31, |x| x);
    shared_blocks_equal_rows_alone::<f16>(32, f16::from_f32);
    shared_blocks_equal_rows_alone::<half::bf16>(33, half::bf16::from_f32);
}

#[test]
#[ignore = "a timing, not a check: cargo test --release -p parallm-kernels shared_prefix_decode_timing -- --ignored --nocapture"]
fn shared_prefix_decode_timing() {
    let mut rng = Rng::new(17);
    let (n_heads, n_kv, hd, bs) = (9, 3, 64, 16);
    let kv_w = n_kv * hd;
    let one = std::sync::Arc::new(crate::cpu::pool::Pool::new("t", 1).unwrap());
    // 16 and 64 sequences after a 384-token shared prompt, each 32–96
    // positions of its own (suffix and generated tokens); then the same
    // with nothing shared.
    for (n_seqs, trunk) in [(16, 24u32), (64, 24), (16, 0)] {
        let mut next = trunk;
        let mut tables = Vec::new();
        let mut lens = Vec::new();
        for _ in 0..n_seqs {
            let len = trunk as usize * bs + rng.range(32, 96);
            let mut table: Vec<u32> = (0..trunk).collect();
            while table.len() * bs < len {
                table.push(next);
                next += 1;
            }
            tables.push(table);
            lens.push(len);
        }
        let pool_k = rng.f32s(next as usize * bs * kv_w, 1.0);
        let pool_v = rng.f32s(next as usize * bs * kv_w, 1.0);
        let rows: Vec<AttnRow<'_, f32>> = tables
            .iter()
            .zip(&lens)
            .map(|(table, &len)| {
                let paged = |data| KvRows::Paged {
                    data,
                    table,
                    block_size: bs,
                };
                AttnRow {
                    k: paged(&pool_k[..]),
                    v: paged(&pool_v[..]),
                    pos: len - 1,
                }
            })
            .collect();
        let q = rng.f32s(rows.len() * n_heads * hd, 3.0);
        let mut out = vec![0f32; rows.len() * n_heads * hd];
        let fmas: usize = rows.iter().map(|r| (r.pos + 1) * n_heads * hd * 2).sum();
        let (tiled, alone) = tiles_and_rows_alone(&one, &q, &rows, (n_heads, n_kv, hd), &mut out);
        for (name, us) in [("tiles", tiled), ("rows alone", alone)] {
            println!(
                "{n_seqs} decode rows, {} shared positions, {name}: {us:.0} µs per layer (1 thread), {:.1} G multiply-adds/s",
                trunk as usize * bs,
                fmas as f64 / us / 1e3
            );
        }
    }
}
