//! The element-wise kernels (`cu/elementwise.cu`) against plain Rust on the
//! same rounded inputs: both 16-bit types, odd row counts, and widths that
//! take both the vectorized and the scalar paths of each kernel.
//!
//! Tolerances: copies and f32 adds are exact. Where a kernel rounds an f32
//! expression to the 16-bit type, the reference evaluates the same expression
//! (in f64 or f32) and the result may differ by one unit in the last place of
//! the 16-bit type: the f32 values differ by a few f32 ulps at most (summation
//! order, `rsqrtf`/`expf` precision and fused multiply-adds on a GPU), which
//! moves a value across a 16-bit rounding boundary at most once.

use super::*;
use crate::cuda::device::Dtype;
use crate::cuda::ops;
pub(super) use crate::test_rng::Rng;

/// Both 16-bit types.
pub(super) const DTYPES: [Dtype; 2] = [Dtype::F16, Dtype::Bf16];

/// `len` random values in [-scale, scale) rounded to `t`: the bits and their
/// values.
pub(super) fn rounded(rng: &mut Rng, t: Dtype, len: usize, scale: f32) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = rng
        .f32s(len, scale)
        .into_iter()
        .map(|v| t.from_f32(v))
        .collect();
    let vals = bits.iter().map(|&b| t.to_f32(b)).collect();
    (bits, vals)
}

/// The distance in units in the last place between two 16-bit values of one
/// type (f16 and bf16 are both sign-magnitude, so the bits order them).
pub(super) fn ulps(a: u16, b: u16) -> u32 {
    let key = |v: u16| {
        if v & 0x8000 != 0 {
            -i32::from(v & 0x7fff)
        } else {
            i32::from(v)
        }
    };
    key(a).abs_diff(key(b))
}

/// Asserts that `got` (bits of `t`) is within one ulp of `want` rounded to `t`.
fn assert_1ulp(t: Dtype, got: &[u16], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let wb = t.from_f32(w);
        assert!(
            ulps(g, wb) <= 1,
            "{what} [{t}] at {i}: got {} ({g:#06x}), want {w} ({wb:#06x})",
            t.to_f32(g)
        );
    }
}

#[test]
fn ulps_orders_values_across_zero() {
    let t = Dtype::F16;
    assert_eq!(ulps(t.from_f32(1.0), t.from_f32(1.0)), 0);
    assert_eq!(ulps(t.from_f32(-1.0), 0xbc01), 1);
    assert_eq!(ulps(0x0001, 0x8001), 2);
    assert_eq!(ulps(0x0000, 0x8000), 0);
}

#[test]
fn embed_copies_shard_rows_and_zeroes_foreign_tokens() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(1);
    let (start, len) = (10usize, 20usize);
    // (rows, hidden, output offset in f32): hidden % 8 == 0 with an aligned
    // output takes the 16-byte path; the others the scalar one.
    for &(rows, hidden, off) in &[(1, 64, 0), (3, 96, 0), (17, 100, 0), (5, 13, 0), (3, 64, 1)] {
        for t in DTYPES {
            let (table, vals) = rounded(&mut rng, t, len * hidden, 3.0);
            // The shard's edges, tokens on both sides, then random ones.
            let mut tokens: Vec<u32> = vec![10, 29, 9, 30, 0];
            tokens.extend((0..rows).map(|_| rng.below(40) as u32));
            tokens.truncate(rows);
            let dt = buf(&dev, &table);
            let dtok = buf(&dev, &tokens);
            let dout = buf(&dev, &vec![7.0f32; off + rows * hidden]);
            // SAFETY: table holds len·hidden values, tokens `rows` u32, and
            // out `rows·hidden` f32 after `off`.
            unsafe {
                ops::embed(
                    &*dev,
                    t,
                    dt.ptr(),
                    dtok.ptr(),
                    dout.at(off * 4),
                    rows,
                    hidden,
                    start..start + len,
                )
            }
            .unwrap();
            let got: Vec<f32> = dout.read(off + rows * hidden).unwrap();
            assert!(
                got[..off].iter().all(|&v| v == 7.0),
                "wrote before the output"
            );
            for (r, &tok) in tokens.iter().enumerate() {
                let row = &got[off + r * hidden..off + (r + 1) * hidden];
                let tok = tok as usize;
                if (start..start + len).contains(&tok) {
                    let want = &vals[(tok - start) * hidden..(tok - start + 1) * hidden];
                    assert_eq!(
                        row, want,
                        "[{t}] rows {rows} hidden {hidden}: row {r} (token {tok})"
                    );
                } else {
                    assert!(
                        row.iter().all(|&v| v == 0.0),
                        "[{t}] row {r}: token {tok} is not in the shard"
                    );
                }
            }
        }
    }
}

/// RMSNorm with and without the residual add, against f64 math, on both the
/// float4 and the scalar path; then single rows against their batch, bit for
/// bit.
#[test]
fn rms_norm_matches_reference_and_rows_are_batch_invariant() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(2);
    let eps = 1e-5f32;
    // dim % 4 == 0 takes the float4 path, 30 and 1001 the scalar one.
    for &(rows, dim) in &[(1, 64), (3, 96), (17, 576), (2, 1000), (3, 30), (2, 1001)] {
        for t in DTYPES {
            for with_delta in [false, true] {
                let x = rng.f32s(rows * dim, 2.0);
                let delta = rng.f32s(rows * dim, 1.0);
                let w: Vec<f32> = rng.f32s(dim, 0.5).into_iter().map(|v| 1.0 + v).collect();
                let (dx, dd, dw) = (buf(&dev, &x), buf(&dev, &delta), buf(&dev, &w));
                let dout = buf(&dev, &vec![0u16; rows * dim]);
                let run = |dx: &DevBuf, dd: &DevBuf, dout: &DevBuf, rows: usize| {
                    // SAFETY: x, delta and out hold rows·dim values, w dim.
                    unsafe {
                        ops::rms_norm(
                            &*dev,
                            t,
                            dx.ptr(),
                            with_delta.then(|| dd.ptr()),
                            dw.ptr(),
                            dout.ptr(),
                            rows,
                            dim,
                            eps,
                        )
                    }
                    .unwrap();
                };
                run(&dx, &dd, &dout, rows);
                let xs: Vec<f32> = if with_delta {
                    x.iter().zip(&delta).map(|(a, b)| a + b).collect()
                } else {
                    x.clone()
                };
                assert_eq!(
                    dx.read::<f32>(rows * dim).unwrap(),
                    xs,
                    "[{t}] x after the kernel"
                );
                let got: Vec<u16> = dout.read(rows * dim).unwrap();
                for r in 0..rows {
                    let xr = &xs[r * dim..(r + 1) * dim];
                    let ms =
                        xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64;
                    let scale = 1.0 / (ms + f64::from(eps)).sqrt();
                    let want: Vec<f32> = xr
                        .iter()
                        .zip(&w)
                        .map(|(&v, &g)| (f64::from(v) * scale * f64::from(g)) as f32)
                        .collect();
                    let what = format!("rms_norm rows {rows} dim {dim} delta {with_delta} row {r}");
                    assert_1ulp(t, &got[r * dim..(r + 1) * dim], &want, &what);
                }
                // Each row alone gives the same bits as in the batch.
                for r in [0, rows / 2, rows - 1] {
                    let one = |v: &[f32]| buf(&dev, &v[r * dim..(r + 1) * dim]);
                    let (ox, od) = (one(&x), one(&delta));
                    let oout = buf(&dev, &vec![0u16; dim]);
                    run(&ox, &od, &oout, 1);
                    let alone: Vec<u16> = oout.read(dim).unwrap();
                    assert_eq!(
                        alone,
                        got[r * dim..(r + 1) * dim],
                        "[{t}] dim {dim}: row {r} alone"
                    );
                }
            }
        }
    }
}

#[test]
fn rope_rotates_adjacent_pairs_of_the_first_heads() {
    rope_rotates_pairs_of_the_first_heads(false);
}

#[test]
fn rope_neox_rotates_the_halves_of_the_first_heads() {
    rope_rotates_pairs_of_the_first_heads(true);
}

fn rope_rotates_pairs_of_the_first_heads(neox: bool) {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(3);
    let context = 50;
    // (rows, rotated heads, head_dim, row_stride): an odd row stride takes
    // the 16-bit path, even ones the 32-bit pair path.
    for &(rows, n_heads, head_dim, stride) in &[
        (1, 2, 64, 128),
        (3, 6, 32, 256),
        (17, 3, 16, 99),
        (2, 5, 96, 480),
    ] {
        for t in DTYPES {
            let half = head_dim / 2;
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for p in 0..context {
                for i in 0..half {
                    let theta = p as f32 * 10000f32.powf(-2.0 * i as f32 / head_dim as f32);
                    cos.push(theta.cos());
                    sin.push(theta.sin());
                }
            }
            let (qkv, vals) = rounded(&mut rng, t, rows * stride, 2.0);
            let pos: Vec<u32> = (0..rows).map(|_| rng.below(context) as u32).collect();
            let dq = buf(&dev, &qkv);
            let (dp, dc, ds) = (buf(&dev, &pos), buf(&dev, &cos), buf(&dev, &sin));
            // SAFETY: qkv holds rows·stride values, pos `rows`, the tables
            // context·half ≥ (max pos + 1)·half.
            unsafe {
                ops::rope(
                    &*dev,
                    t,
                    dq.ptr(),
                    dp.ptr(),
                    (dc.ptr(), ds.ptr()),
                    rows,
                    stride,
                    n_heads,
                    head_dim,
                    neox,
                )
            }
            .unwrap();
            let got: Vec<u16> = dq.read(rows * stride).unwrap();
            for r in 0..rows {
                let (row, vrow) = (
                    &got[r * stride..(r + 1) * stride],
                    &vals[r * stride..(r + 1) * stride],
                );
                let mut want = vrow[..n_heads * head_dim].to_vec();
                for pair in 0..n_heads * half {
                    let (h, i) = (pair / half, pair % half);
                    let (c, s) = (
                        cos[pos[r] as usize * half + i],
                        sin[pos[r] as usize * half + i],
                    );
                    let (ia, ib) = if neox {
                        (h * head_dim + i, h * head_dim + i + half)
                    } else {
                        (2 * pair, 2 * pair + 1)
                    };
                    let (a, b) = (vrow[ia], vrow[ib]);
                    want[ia] = a * c - b * s;
                    want[ib] = a * s + b * c;
                }
                let rotated = n_heads * head_dim;
                let what =
                    format!("rope rows {rows} heads {n_heads}×{head_dim} stride {stride} row {r}");
                assert_1ulp(t, &row[..rotated], &want, &what);
                assert_eq!(
                    row[rotated..],
                    qkv[r * stride + rotated..(r + 1) * stride],
                    "{what}: past the heads"
                );
            }
        }
    }
}

#[test]
fn add_bias_adds_the_bias_to_every_row() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(11);
    for &(rows, width) in &[(1, 8), (3, 96), (5, 131)] {
        for t in DTYPES {
            let (x, vals) = rounded(&mut rng, t, rows * width, 2.0);
            let bias = rng.f32s(width, 1.0);
            let (dx, db) = (buf(&dev, &x), buf(&dev, &bias));
            // SAFETY: x holds rows·width values, bias width.
            unsafe { ops::add_bias(&*dev, t, dx.ptr(), db.ptr(), rows, width) }.unwrap();
            let got: Vec<u16> = dx.read(rows * width).unwrap();
            let want: Vec<f32> = vals
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias[i % width])
                .collect();
            assert_1ulp(t, &got, &want, &format!("add_bias {rows}×{width}"));
        }
    }
}

#[test]
fn head_norm_normalizes_each_q_and_k_head() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(12);
    // (rows, q heads, k heads, head_dim, row_stride)
    for &(rows, n_q, n_k, head_dim, stride) in
        &[(1, 2, 1, 32, 128), (3, 4, 2, 16, 128), (2, 3, 1, 40, 170)]
    {
        for t in DTYPES {
            let (x, vals) = rounded(&mut rng, t, rows * stride, 2.0);
            let qw = rng.f32s(head_dim, 1.5);
            let kw = rng.f32s(head_dim, 1.5);
            let (dx, dq, dk) = (buf(&dev, &x), buf(&dev, &qw), buf(&dev, &kw));
            let eps = 1e-6;
            // SAFETY: x holds rows·stride values, the weights head_dim each.
            unsafe {
                ops::head_norm(
                    &*dev,
                    t,
                    dx.ptr(),
                    (dq.ptr(), dk.ptr()),
                    rows,
                    stride,
                    (n_q, n_k),
                    head_dim,
                    eps,
                )
            }
            .unwrap();
            let got: Vec<u16> = dx.read(rows * stride).unwrap();
            for r in 0..rows {
                let row = &vals[r * stride..(r + 1) * stride];
                let normed = (n_q + n_k) * head_dim;
                let mut want = Vec::with_capacity(normed);
                for h in 0..n_q + n_k {
                    let head = &row[h * head_dim..(h + 1) * head_dim];
                    let w = if h < n_q { &qw } else { &kw };
                    let ms =
                        head.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / head_dim as f64;
                    let scale = 1.0 / (ms + eps as f64).sqrt();
                    want.extend(
                        head.iter()
                            .zip(w)
                            .map(|(v, g)| (*v as f64 * scale * *g as f64) as f32),
                    );
                }
                let what = format!("head_norm {rows}×({n_q}+{n_k})×{head_dim} row {r}");
                assert_1ulp(t, &got[r * stride..r * stride + normed], &want, &what);
                assert_eq!(
                    got[r * stride + normed..(r + 1) * stride],
                    x[r * stride + normed..(r + 1) * stride],
                    "{what}: past the heads"
                );
            }
        }
    }
}

#[test]
fn kv_write_copies_rows_into_their_slots() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(4);
    // (rows, row_stride, k_offset, kv_width): all multiples of 8 take the
    // 16-byte path.
    for &(rows, stride, k_off, width) in &[
        (1, 96, 32, 32),
        (3, 100, 36, 20),
        (17, 384, 128, 128),
        (2, 77, 3, 37),
    ] {
        for t in DTYPES {
            let n_slots = 2 * rows + 3;
            // Distinct slots: a shuffled prefix of 0..n_slots.
            let mut all: Vec<u32> = (0..n_slots as u32).collect();
            for i in (1..all.len()).rev() {
                all.swap(i, rng.below(i + 1));
            }
            let slots = &all[..rows];
            let qkv: Vec<u16> = (0..rows * stride).map(|_| rng.u64() as u16).collect();
            let fill = vec![0xABCDu16; n_slots * width];
            let (dq, ds, dk, dv) = (
                buf(&dev, &qkv),
                buf(&dev, slots),
                buf(&dev, &fill),
                buf(&dev, &fill),
            );
            // SAFETY: qkv holds rows·stride values, slots `rows` u32 below
            // n_slots, each cache n_slots·width values.
            unsafe {
                ops::kv_write(
                    &*dev,
                    t,
                    dq.ptr(),
                    (dk.ptr(), dv.ptr()),
                    ds.ptr(),
                    rows,
                    stride,
                    k_off,
                    width,
                )
            }
            .unwrap();
            let (k, v): (Vec<u16>, Vec<u16>) = (
                dk.read(n_slots * width).unwrap(),
                dv.read(n_slots * width).unwrap(),
            );
            let mut want_k = fill.clone();
            let mut want_v = fill.clone();
            for (r, &s) in slots.iter().enumerate() {
                let src = &qkv[r * stride + k_off..];
                let s = s as usize;
                want_k[s * width..(s + 1) * width].copy_from_slice(&src[..width]);
                want_v[s * width..(s + 1) * width].copy_from_slice(&src[width..2 * width]);
            }
            assert_eq!(
                k, want_k,
                "[{t}] keys, rows {rows} stride {stride} offset {k_off} width {width}"
            );
            assert_eq!(
                v, want_v,
                "[{t}] values, rows {rows} stride {stride} offset {k_off} width {width}"
            );
        }
    }
}

#[test]
fn silu_mul_matches_reference() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(5);
    for &(rows, width) in &[(1, 64), (3, 96), (17, 100), (2, 5)] {
        for t in DTYPES {
            // Gates up to ±12 reach both of silu's saturated ends.
            let mut gu = Vec::new();
            for _ in 0..rows {
                gu.extend(rng.f32s(width, 12.0));
                gu.extend(rng.f32s(width, 2.0));
            }
            let bits: Vec<u16> = gu.iter().map(|&v| t.from_f32(v)).collect();
            let vals: Vec<f32> = bits.iter().map(|&b| t.to_f32(b)).collect();
            let (dgu, dout) = (buf(&dev, &bits), buf(&dev, &vec![0u16; rows * width]));
            // SAFETY: gate_up holds rows·2·width values, out rows·width.
            unsafe { ops::silu_mul(&*dev, t, dgu.ptr(), dout.ptr(), rows, width) }.unwrap();
            let got: Vec<u16> = dout.read(rows * width).unwrap();
            let mut want = Vec::new();
            for r in 0..rows {
                let row = &vals[r * 2 * width..(r + 1) * 2 * width];
                for c in 0..width {
                    let (g, u) = (row[c], row[width + c]);
                    want.push(g / (1.0 + (-g).exp()) * u);
                }
            }
            assert_1ulp(
                t,
                &got,
                &want,
                &format!("silu_mul rows {rows} width {width}"),
            );
        }
    }
}

#[test]
fn gather_rows_f32_copies_indexed_rows() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(6);
    // (n, width, source rows, destination offset in f32): width % 4 == 0 with
    // aligned rows takes the 16-byte path.
    for &(n, width, src_rows, off) in &[
        (1, 64, 5, 0),
        (3, 30, 7, 0),
        (17, 100, 40, 0),
        (4, 64, 9, 2),
    ] {
        let src = rng.f32s(src_rows * width, 5.0);
        let idx: Vec<u32> = (0..n).map(|_| rng.below(src_rows) as u32).collect();
        let (dsrc, didx) = (buf(&dev, &src), buf(&dev, &idx));
        let ddst = buf(&dev, &vec![-1.0f32; off + n * width]);
        // SAFETY: src holds src_rows·width f32 and every index is below
        // src_rows; dst holds n·width f32 after `off`.
        unsafe { ops::gather_rows_f32(&*dev, dsrc.ptr(), didx.ptr(), ddst.at(off * 4), n, width) }
            .unwrap();
        let got: Vec<f32> = ddst.read(off + n * width).unwrap();
        assert!(got[..off].iter().all(|&v| v == -1.0));
        for (i, &s) in idx.iter().enumerate() {
            let s = s as usize;
            assert_eq!(
                got[off + i * width..off + (i + 1) * width],
                src[s * width..(s + 1) * width],
                "row {i}"
            );
        }
    }
}
