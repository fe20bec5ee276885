//! The GGUF block kernels (`cu/quant.cu`): dequantization bit-exact against
//! the CPU kernels' scalar dequantization, and the quantized matrix-vector
//! products against f64 sums over the same dequantized weights.

use super::elementwise::{rounded, Rng, DTYPES};
use super::*;
use crate::cpu::quant::{dequantize_row, QuantFormat};
use crate::cuda::device::Dtype;
use crate::cuda::ops::{self, QFormat};

const FORMATS: [QFormat; 3] = [QFormat::Q4_0, QFormat::Q4_1, QFormat::Q8_0];

fn cpu_format(f: QFormat) -> QuantFormat {
    match f {
        QFormat::Q4_0 => QuantFormat::Q4_0,
        QFormat::Q4_1 => QuantFormat::Q4_1,
        QFormat::Q8_0 => QuantFormat::Q8_0,
    }
}

/// `n_blocks` random blocks of `f`: random quantized bytes with f16 scales
/// (and Q4_1 minimums) of both signs in ±0.05; with `extremes`, also zero,
/// subnormal and huge scales (whose weights overflow f16).
fn random_blocks(rng: &mut Rng, f: QFormat, n_blocks: usize, extremes: bool) -> Vec<u8> {
    let mut bytes = rng.bytes(n_blocks * f.block_bytes());
    for blk in bytes.chunks_exact_mut(f.block_bytes()) {
        let mut scale = || -> [u8; 2] {
            let v = match rng.below(if extremes { 6 } else { 1 }) {
                0 => half::f16::from_f32(0.05 * rng.f32()),
                1 => half::f16::ZERO,
                2 => half::f16::from_bits(1 + rng.below(0x3ff) as u16),
                3 => half::f16::from_f32(30000.0),
                4 => half::f16::from_f32(-1.5e-3),
                _ => half::f16::from_f32(4.0 * rng.f32()),
            };
            v.to_bits().to_le_bytes()
        };
        blk[0..2].copy_from_slice(&scale());
        if f == QFormat::Q4_1 {
            blk[2..4].copy_from_slice(&scale());
        }
    }
    bytes
}

/// The weights of `bytes` (whole blocks) as f32, by the CPU reference.
fn dequantized(f: QFormat, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / f.block_bytes() * 32];
    dequantize_row(cpu_format(f), bytes, &mut out);
    out
}

#[test]
fn dequant_matches_cpu_dequantization_exactly() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(11);
    for f in FORMATS {
        for t in DTYPES {
            // 9 and 37 blocks leave the last CUDA block (8 per launch block) partial.
            for n_blocks in [1, 7, 9, 37] {
                let blocks = random_blocks(&mut rng, f, n_blocks, true);
                let want: Vec<u16> = dequantized(f, &blocks)
                    .iter()
                    .map(|&v| t.from_f32(v))
                    .collect();
                let (db, dout) = (
                    buf(&dev, &blocks),
                    buf(&dev, &vec![0x7777u16; n_blocks * 32 + 1]),
                );
                // SAFETY: `blocks` holds n_blocks blocks, out n_blocks·32 values.
                unsafe { ops::dequantize(&*dev, t, f, db.ptr(), dout.ptr(), n_blocks) }.unwrap();
                let got: Vec<u16> = dout.read(n_blocks * 32 + 1).unwrap();
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g, w, "{f:?} [{t}] {n_blocks} blocks: weight {i}");
                }
                assert_eq!(
                    got[n_blocks * 32],
                    0x7777,
                    "{f:?} [{t}]: wrote past the end"
                );
            }
        }
    }
}

/// One `ops::qmv` launch: `w` at byte `w_off` of its buffer, `m` rows of `x`
/// starting at row `x_row`, returning `y` (`m × n`) as f32 values.
#[allow(clippy::too_many_arguments)]
fn qmv(
    dev: &Arc<dyn Device>,
    t: Dtype,
    f: QFormat,
    (dw, w_off): (&DevBuf, usize),
    (dx, x_row, x_stride): (&DevBuf, usize, usize),
    y_f32: bool,
    (m, n, k): (usize, usize, usize),
) -> Vec<f32> {
    let dy = buf(dev, &vec![0u32; m * n]);
    // SAFETY: the weight buffer holds n·(k/32) blocks after w_off, x holds
    // at least x_row + m rows of x_stride ≥ k values (the callers allocate
    // 8 rows), and y m·n values of 4 (or 2) bytes.
    unsafe {
        ops::qmv(
            &**dev,
            t,
            f,
            dw.at(w_off),
            dx.at(x_row * x_stride * 2),
            x_stride,
            dy.ptr(),
            y_f32,
            (m, n, k),
        )
    }
    .unwrap();
    if y_f32 {
        dy.read::<f32>(m * n).unwrap()
    } else {
        dy.read::<u16>(m * n)
            .unwrap()
            .into_iter()
            .map(|b| t.to_f32(b))
            .collect()
    }
}

/// y = x·Wᵀ for every format and type, m = 8 with both output types against
/// f64 sums over the dequantized weights; then every m = 1..=8 and single rows
/// give those same bits (so each is checked too: a row's result does not
/// depend on its batch), and so does the unaligned path (weights at an odd
/// 16-bit address, an odd x stride).
///
/// Tolerance: the kernel sums in f32, 8 products per partial sum, then per
/// lane over the row's blocks and across the warp (a tree of depth ≤ 20 for
/// these k), so its error is below 20·2⁻²⁴·Σ|wᵢxᵢ| < 2e-6·Σ|wᵢxᵢ|; we allow
/// 4e-6·Σ|wᵢxᵢ|. A 16-bit output adds half an ulp: 2⁻¹¹ (f16) or 2⁻⁸ (bf16)
/// of the value, plus f16's subnormal spacing.
#[test]
fn qmv_matches_f32_reference_and_rows_are_batch_invariant() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(12);
    let n = 13; // not a multiple of the 4 rows per block
                // k = 1088 (34 blocks) takes the 32-block loop twice, with a tail.
    for k in [32, 96, 576, 1088] {
        for f in FORMATS {
            let nb = k / 32;
            let blocks = random_blocks(&mut rng, f, n * nb, false);
            let wf = dequantized(f, &blocks);
            // The same blocks at byte 2 of another buffer: not 4-byte aligned.
            let mut shifted = vec![0u8; 2];
            shifted.extend(&blocks);
            let (dw, dw2) = (buf(&dev, &blocks), buf(&dev, &shifted));
            for t in DTYPES {
                let x_stride = k + 4;
                let (xb, xv) = rounded(&mut rng, t, 8 * x_stride, 1.0);
                let dx = buf(&dev, &xb);
                // The same rows with an odd stride (the unaligned path).
                let odd = k + 1;
                let xb_odd: Vec<u16> = (0..8 * odd)
                    .map(|i| xb[(i / odd) * x_stride + i % odd])
                    .collect();
                let dx_odd = buf(&dev, &xb_odd);
                let full = qmv(&dev, t, f, (&dw, 0), (&dx, 0, x_stride), true, (8, n, k));
                let full_t = qmv(&dev, t, f, (&dw, 0), (&dx, 0, x_stride), false, (8, n, k));
                for (y_f32, y8) in [(true, &full), (false, &full_t)] {
                    for j in 0..8 {
                        for r in 0..n {
                            let (wr, xr) =
                                (&wf[r * k..(r + 1) * k], &xv[j * x_stride..j * x_stride + k]);
                            let want: f64 = wr
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            let mag: f64 = wr
                                .iter()
                                .zip(xr)
                                .map(|(&a, &b)| f64::from(a * b).abs())
                                .sum();
                            let got = f64::from(y8[j * n + r]);
                            let rounding = match (y_f32, t) {
                                (true, _) => 0.0,
                                (false, Dtype::F16) => {
                                    got.abs().max(want.abs()) * 2f64.powi(-11) + 2f64.powi(-25)
                                }
                                (false, Dtype::Bf16) => got.abs().max(want.abs()) * 2f64.powi(-8),
                            };
                            let tol = 4e-6 * mag + rounding;
                            assert!(
                                (got - want).abs() <= tol,
                                "{f:?} [{t}] k {k} y_f32 {y_f32}: y[{j}][{r}] = {got}, want {want} ± {tol}"
                            );
                        }
                    }
                }
                // Rows give the same bits in any batch (the first m rows) and
                // alone (m = 1 at that row).
                for m in 1..=8 {
                    let batch = qmv(&dev, t, f, (&dw, 0), (&dx, 0, x_stride), true, (m, n, k));
                    assert_eq!(batch, full[..m * n], "{f:?} [{t}] k {k}: batch of {m}");
                }
                for j in [0, 3, 7] {
                    let alone = qmv(&dev, t, f, (&dw, 0), (&dx, j, x_stride), true, (1, n, k));
                    assert_eq!(
                        alone,
                        full[j * n..(j + 1) * n],
                        "{f:?} [{t}] k {k}: row {j} alone"
                    );
                }
                // The unaligned path (bytes and 16-bit loads) gives the same bits.
                let slow = qmv(&dev, t, f, (&dw2, 2), (&dx_odd, 0, odd), true, (8, n, k));
                assert_eq!(slow, full, "{f:?} [{t}] k {k}: unaligned weights and x");
                let slow3 = qmv(&dev, t, f, (&dw, 0), (&dx_odd, 0, odd), false, (3, n, k));
                assert_eq!(slow3, full_t[..3 * n], "{f:?} [{t}] k {k}: odd x stride");
            }
        }
    }
}
