//! IQ4_NL and IQ4_XS, the non-linear 4-bit formats, read by re-blocking them
//! into Q8_0 (whose kernels then run them).
//!
//! Both store 4-bit indices into one fixed table of 16 signed levels
//! ([`IQ4_LEVELS`], from −127 to 113), each an `i8`, so a block's weights are
//! `scale · level` and a Q8_0 block holds them as they are:
//!
//! | format | weights | bytes | layout |
//! |--------|---------|-------|--------|
//! | IQ4_NL | 32  | 18  | f16 `d`; 16 bytes: byte `j` holds the index of weight `j` (low nibble) and `j + 16` (high); w = d·L(q) |
//! | IQ4_XS | 256 | 136 | f16 `d`; u16 `scales_h`; 4 bytes `scales_l`; 128 index bytes, 16 per sub-block of 32 as IQ4_NL's |
//!
//! IQ4_XS sub-block `i` has the 6-bit scale `ls = ((scales_l[i/2] >> 4·(i%2)) & 15) |
//! ((scales_h >> 2i) & 3) << 4` and weights `d·(ls − 32)·L[q]`.
//!
//! IQ4_NL becomes Q8_0 exactly (the same f16 `d`, the levels as `i8`).
//! IQ4_XS becomes one Q8_0 block per sub-block whose scale is `d·(ls − 32)`
//! rounded to f16: within 2⁻¹¹ of the stored scale, relatively; the weights
//! are otherwise exact. Twice the bytes of the original: a native kernel
//! would read half as much.

use super::formats::f16_at;

/// The 16 levels a 4-bit IQ4 index selects (llama.cpp's `kvalues_iq4nl`).
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Bytes of one Q8_0 block (f16 scale and 32 × i8).
const Q8_0_BYTES: usize = 34;

/// The 32 weights of 16 index bytes (IQ4_NL's order) as `i8` levels.
fn levels(qs: &[u8], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = IQ4_LEVELS[(qs[j] & 0x0F) as usize] as u8;
        out[j + 16] = IQ4_LEVELS[(qs[j] >> 4) as usize] as u8;
    }
}

/// Re-blocks IQ4_NL `blocks` (18 bytes each) into Q8_0 (34 bytes each),
/// exactly.
///
/// # Panics
/// If `blocks.len()` is not a multiple of 18.
pub fn iq4_nl_to_q8_0(blocks: &[u8]) -> Vec<u8> {
    assert!(
        blocks.len().is_multiple_of(18),
        "IQ4_NL blocks are 18 bytes"
    );
    let mut out = vec![0u8; blocks.len() / 18 * Q8_0_BYTES];
    for (b, o) in blocks
        .chunks_exact(18)
        .zip(out.chunks_exact_mut(Q8_0_BYTES))
    {
        o[..2].copy_from_slice(&b[..2]);
        levels(&b[2..18], &mut o[2..]);
    }
    out
}

/// The scale of IQ4_XS sub-block `i` of `blk`, `d·(ls − 32)`, in f32 (exact).
fn iq4_xs_scale(blk: &[u8], i: usize) -> f32 {
    let high = u16::from_le_bytes([blk[2], blk[3]]);
    let ls =
        ((blk[4 + i / 2] >> (4 * (i % 2))) & 0x0F) as i32 | ((((high >> (2 * i)) & 3) as i32) << 4);
    f16_at(blk, 0) * (ls - 32) as f32
}

/// Re-blocks IQ4_XS `blocks` (136 bytes each) into Q8_0, eight blocks each,
/// with each sub-block's scale rounded to f16. `None` if a scale does not fit
/// in f16 (a file no quantizer writes).
///
/// # Panics
/// If `blocks.len()` is not a multiple of 136.
pub fn iq4_xs_to_q8_0(blocks: &[u8]) -> Option<Vec<u8>> {
    assert!(
        blocks.len().is_multiple_of(136),
        "IQ4_XS blocks are 136 bytes"
    );
    let mut out = vec![0u8; blocks.len() / 136 * 8 * Q8_0_BYTES];
    for (b, o) in blocks
        .chunks_exact(136)
        .zip(out.chunks_exact_mut(8 * Q8_0_BYTES))
    {
        for (i, q) in o.chunks_exact_mut(Q8_0_BYTES).enumerate() {
            let d = half::f16::from_f32(iq4_xs_scale(b, i));
            if !d.is_finite() {
                return None;
            }
            q[..2].copy_from_slice(&d.to_le_bytes());
            levels(&b[8 + 16 * i..24 + 16 * i], &mut q[2..]);
        }
    }
    Some(out)
}

/// IQ4_NL or IQ4_XS `blocks` dequantized as llama.cpp defines them (f32
/// scale times level), for tests: the reference the re-blocked Q8_0 is held to.
pub fn dequantize_iq4(xs: bool, blocks: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    if xs {
        for b in blocks.chunks_exact(136) {
            for i in 0..8 {
                let dl = iq4_xs_scale(b, i);
                let qs = &b[8 + 16 * i..24 + 16 * i];
                let lo = qs
                    .iter()
                    .map(|&q| dl * IQ4_LEVELS[(q & 0x0F) as usize] as f32);
                let hi = qs
                    .iter()
                    .map(|&q| dl * IQ4_LEVELS[(q >> 4) as usize] as f32);
                out.extend(lo.collect::<Vec<_>>());
                out.extend(hi.collect::<Vec<_>>());
            }
        }
    } else {
        for b in blocks.chunks_exact(18) {
            let d = f16_at(b, 0);
            out.extend(
                b[2..18]
                    .iter()
                    .map(|&q| d * IQ4_LEVELS[(q & 0x0F) as usize] as f32),
            );
            out.extend(
                b[2..18]
                    .iter()
                    .map(|&q| d * IQ4_LEVELS[(q >> 4) as usize] as f32),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::quant::{dequantize_row, QuantFormat};
    use crate::test_rng::Rng;

    /// Random blocks of `bytes` with a sane f16 `d` first.
    fn blocks(rng: &mut Rng, n: usize, bytes: usize) -> Vec<u8> {
        let mut b = rng.bytes(n * bytes);
        for blk in b.chunks_exact_mut(bytes) {
            let d = half::f16::from_f32(0.001 + 0.01 * rng.f32().abs());
            blk[..2].copy_from_slice(&d.to_le_bytes());
        }
        b
    }

    #[test]
    fn iq4_nl_becomes_q8_0_exactly() {
        let mut rng = Rng::new(7);
        let b = blocks(&mut rng, 9, 18);
        let q8 = iq4_nl_to_q8_0(&b);
        let mut got = vec![0f32; 9 * 32];
        dequantize_row(QuantFormat::Q8_0, &q8, &mut got);
        assert_eq!(got, dequantize_iq4(false, &b));
    }

    #[test]
    fn iq4_xs_becomes_q8_0_within_f16_scale_rounding() {
        let mut rng = Rng::new(8);
        let b = blocks(&mut rng, 5, 136);
        let q8 = iq4_xs_to_q8_0(&b).expect("finite scales");
        let mut got = vec![0f32; 5 * 256];
        dequantize_row(QuantFormat::Q8_0, &q8, &mut got);
        let want = dequantize_iq4(true, &b);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() / 2048.0, "{g} vs {w}");
        }
        // A hand-made block: d = 0.5, sub-block 3 with ls = 0b10_0101 = 37
        // (low nibble 5 in scales_l[1]'s high half, high bits 2 at bits 6..8
        // of scales_h), every index 15 -> 0.5·5·113.
        let mut blk = vec![0u8; 136];
        blk[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        blk[2..4].copy_from_slice(&(2u16 << 6).to_le_bytes());
        blk[5] = 0x50;
        blk[8 + 48..8 + 64].fill(0xFF);
        let deq = dequantize_iq4(true, &blk);
        assert_eq!(deq[96], 0.5 * 5.0 * 113.0);
        assert_eq!(deq[127], 0.5 * 5.0 * 113.0);
        assert_eq!(deq[0], 0.5 * -32.0 * -127.0);
    }
}
