use super::*;

use crate::cuda::ops;
use crate::test_rng::Rng;

/// The element order of the sampling kernels: larger value first, lower
/// index first among ties.
fn ranked(row: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    // A stable sort keeps equal values in index order.
    idx.sort_by(|&a, &b| row[b as usize].partial_cmp(&row[a as usize]).unwrap());
    idx
}

fn argmax_on_device(dev: &Arc<dyn Device>, x: &[f32], n: usize) -> Vec<u32> {
    let rows = x.len() / n;
    let (dx, di) = (buf(dev, x), buf(dev, &vec![u32::MAX; rows]));
    // SAFETY: dx holds rows × n f32, di rows u32.
    unsafe { ops::argmax(&**dev, dx.ptr(), rows, n, di.ptr()) }.unwrap();
    di.read(rows).unwrap()
}

#[test]
fn argmax_takes_the_lowest_index_among_ties() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(21);
    for n in [1, 1000, 49157] {
        // Row 0: random with the maximum at two places; row 1: all -inf;
        // row 2: mostly -inf, a few equal finite values near the end.
        let mut x: Vec<f32> = (0..3 * n).map(|_| rng.f32() * 10.0).collect();
        let (a, b) = (rng.below(n), rng.below(n));
        x[a] = 20.0;
        x[b] = 20.0;
        x[n..].fill(f32::NEG_INFINITY);
        for i in [n - 1, (n - 1) * 9 / 10, (n - 1) * 8 / 10] {
            x[2 * n + i] = -3.5;
        }
        let got = argmax_on_device(&dev, &x, n);
        let want: Vec<u32> = x.chunks(n).map(|row| ranked(row)[0]).collect();
        assert_eq!(got, want, "n = {n}");
        assert_eq!(got[0], a.min(b) as u32);
        assert_eq!(got[1], 0);
    }
}

#[test]
fn softmax_matches_reference() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(22);
    for (rows, n, inv_t) in [
        (2, 1000, 1.0f32),
        (2, 1000, 1.0 / 0.7),
        (1, 49152, 1.0 / 0.7),
        (1, 1, 2.0),
    ] {
        let mut x: Vec<f32> = (0..rows * n).map(|_| rng.f32() * 8.0).collect();
        for _ in 0..rows * n / 50 {
            x[rng.below(rows * n)] = f32::NEG_INFINITY;
        }
        if n > 1 {
            x[0] = 5.0; // never -inf everywhere
        }
        let dx = buf(&dev, &x);
        // SAFETY: dx holds rows × n f32.
        unsafe { ops::softmax(&*dev, dx.ptr(), rows, n, inv_t) }.unwrap();
        let got: Vec<f32> = dx.read(rows * n).unwrap();
        for (r, (row, out)) in x.chunks(n).zip(got.chunks(n)).enumerate() {
            // The kernel's f32 steps (scaled logit, minus the max), then
            // exp and the normalization in f64.
            let z: Vec<f32> = row.iter().map(|&v| v * inv_t).collect();
            let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = z.iter().map(|&v| ((v - m) as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (i, (&g, &ei)) in out.iter().zip(&e).enumerate() {
                let want = ei / sum;
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * want,
                    "n = {n}, row {r}, element {i}: got {g}, want {want}"
                );
            }
            let total: f64 = out.iter().map(|&p| p as f64).sum();
            assert!((total - 1.0).abs() < 1e-5, "n = {n}, row {r}: sum {total}");
        }
    }
}

#[test]
fn topk_matches_sorted_reference() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(23);
    let mut rows_of = |n: usize| -> Vec<f32> {
        // Row 0: distinct-ish values with some -inf; row 1: 40 levels, so
        // many ties (for n = 49152, 5000 copies of the maximum: more ties at
        // the threshold than the candidate buffer takes, the slow path).
        let mut x: Vec<f32> = (0..n).map(|_| rng.f32() * 30.0).collect();
        for _ in 0..n / 20 {
            x[rng.below(n)] = f32::NEG_INFINITY;
        }
        x.extend((0..n).map(|_| rng.below(40) as f32 * 0.25 - 3.0));
        if n > 10_000 {
            for _ in 0..5000 {
                x[n + rng.below(n)] = 100.0;
            }
        }
        x
    };
    let cases = [
        (rows_of(1000), 1000),
        (rows_of(49152), 49152),
        (vec![1.0, -1.0, 1.0], 1),
    ];
    for (x, n) in &cases {
        let (x, n) = (x.as_slice(), *n);
        let rows = x.len() / n;
        for k in [1, 5, 64, n] {
            if k > n || k > ops::TOPK_MAX as usize {
                continue;
            }
            let di = buf(&dev, &vec![u32::MAX; rows * k]);
            let dv = buf(&dev, &vec![f32::NAN; rows * k]);
            let dx = buf(&dev, x);
            // SAFETY: dx holds rows × n f32, di and dv rows × k.
            unsafe { ops::topk(&*dev, dx.ptr(), rows, n, k, di.ptr(), dv.ptr()) }.unwrap();
            let (gi, gv): (Vec<u32>, Vec<f32>) =
                (di.read(rows * k).unwrap(), dv.read(rows * k).unwrap());
            for r in 0..rows {
                let row = &x[r * n..][..n];
                let want: Vec<u32> = ranked(row)[..k].to_vec();
                let want_v: Vec<f32> = want.iter().map(|&i| row[i as usize]).collect();
                assert_eq!(
                    &gi[r * k..][..k],
                    want.as_slice(),
                    "n = {n}, k = {k}, row {r}: indices"
                );
                assert_eq!(
                    &gv[r * k..][..k],
                    want_v.as_slice(),
                    "n = {n}, k = {k}, row {r}: values"
                );
            }
        }
    }
    // Small rows: k = n = 64 (threads without elements), and n < 256.
    let x: Vec<f32> = (0..64).map(|i| ((i * 7) % 13) as f32).collect();
    let di = buf(&dev, &vec![0u32; 64]);
    let dv = buf(&dev, &vec![0f32; 64]);
    let dx = buf(&dev, &x);
    // SAFETY: dx holds 64 f32, di and dv 64 entries.
    unsafe { ops::topk(&*dev, dx.ptr(), 1, 64, 64, di.ptr(), dv.ptr()) }.unwrap();
    assert_eq!(di.read::<u32>(64).unwrap(), ranked(&x));
}
