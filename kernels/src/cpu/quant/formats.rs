//! Weight block formats: their byte layouts (documented on [`QuantFormat`])
//! and scalar dequantization.
//!
//! Dequantization evaluates exactly the expressions in the layout table (same
//! operation order as GGML's reference code), so its results are
//! bit-identical to other faithful implementations (the tests compare with
//! candle-core bit for bit).

/// Weights per block of the 32-wide formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
pub const QK: usize = 32;
/// Weights per super-block of the K formats (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).
pub const QK_K: usize = 256;

/// A quantized weight format whose blocks have the GGML/GGUF byte layout:
/// little-endian, blocks packed back to back with no padding, a row of `k`
/// weights = `k / block_size` consecutive blocks — so the raw bytes of a GGUF
/// tensor are a valid weight matrix as they are.
///
/// | format | weights | bytes | layout |
/// |--------|---------|-------|--------|
/// | Q4_0 | 32  | 18  | f16 `d`; 16 bytes: byte `j` holds weight `j` (low nibble) and `j + 16` (high); w = d·(q − 8) |
/// | Q4_1 | 32  | 20  | f16 `d`, f16 `m`; 16 nibble bytes as Q4_0; w = d·q + m |
/// | Q5_0 | 32  | 22  | f16 `d`; u32 `qh` (bit `j`: bit 4 of weight `j`); 16 nibble bytes as Q4_0; w = d·(q − 16) |
/// | Q5_1 | 32  | 24  | f16 `d`, f16 `m`; u32 `qh`; 16 nibble bytes; w = d·q + m |
/// | Q8_0 | 32  | 34  | f16 `d`; 32 × i8; w = d·q |
/// | Q4_K | 256 | 144 | f16 `d`, f16 `dmin`; 12 bytes of packed 6-bit (scale, min) for 8 sub-blocks of 32; 128 nibble bytes |
/// | Q6_K | 256 | 210 | 128 bytes low nibbles `ql`; 64 bytes high 2-bit pairs `qh`; 16 × i8 scales; f16 `d` |
/// | Q2_K | 256 | 84  | 16 scale bytes (low nibble scale, high nibble min, per 16 weights); 64 bytes of 2-bit values `qs`; f16 `d`, f16 `dmin` |
/// | Q3_K | 256 | 110 | 32 bytes `hmask`; 64 bytes of 2-bit values `qs`; 12 bytes of 16 packed 6-bit scales; f16 `d` |
/// | Q5_K | 256 | 176 | Q4_K's `d`, `dmin` and 12 scale bytes; 32 bytes `qh`; 128 nibble bytes |
///
/// Q2_K and Q3_K: weight `e` (half `n = e/128`, `r = e % 128`) takes bits
/// `2·(r/32)` of `qs[32n + r % 32]`, and its scale is number `e/16`. Q2_K's
/// weight is `d·(sc & 15)·q − dmin·(sc >> 4)`. Q3_K's value is `q − 4` where
/// bit `4n + r/32` of `hmask[r % 32]` is clear, `q` where it is set, times
/// `d·(s − 32)`; its scale `i` has low bits `s[i] & 15` (`i < 8`) or
/// `s[i − 8] >> 4`, and high bits `(s[8 + i % 4] >> 2·(i/4)) & 3`.
///
/// Q5_K: Q4_K's nibbles and scales, each value with bit 4 from bit `j` of
/// `qh[l]` (sub-block `j`, weight `l` of it).
///
/// Q4_K: sub-block `j` (weights `32j..32j+32`) takes the low nibbles of bytes
/// `32·(j/2) ..+32` when `j` is even and their high nibbles when odd; its
/// weight is `d·sc_j·q − dmin·m_j`. With `s` the 12 scale bytes: for `j < 4`,
/// `sc_j = s[j] & 63`, `m_j = s[j+4] & 63`; for `j ≥ 4`,
/// `sc_j = (s[j+4] & 15) | (s[j−4] >> 6) << 4`, `m_j = (s[j+4] >> 4) | (s[j] >> 6) << 4`.
///
/// Q6_K: in each half `h` (128 weights) with `ql = ql[64h..]`, `qh = qh[32h..]`,
/// for `l < 32` the 6-bit values of weights `l`, `l+32`, `l+64`, `l+96` are the
/// low nibble of `ql[l]`, low nibble of `ql[l+32]`, high nibble of `ql[l]`,
/// high nibble of `ql[l+32]`, each with bits 4..5 taken from bit pairs 0, 2, 4,
/// 6 of `qh[l]`; weight `e` (0..256) is `d·scales[e/16]·(q − 32)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// 32 weights: f16 scale and 4-bit values offset by 8 (18 bytes).
    Q4_0,
    /// 32 weights: f16 scale, f16 minimum and 4-bit values (20 bytes).
    Q4_1,
    /// 32 weights: f16 scale and 8-bit signed values (34 bytes).
    Q8_0,
    /// 32 weights: f16 scale and 5-bit values offset by 16 (22 bytes).
    Q5_0,
    /// 32 weights: f16 scale, f16 minimum and 5-bit values (24 bytes).
    Q5_1,
    /// 256 weights: 8 sub-blocks of 32 with 6-bit scales and mins (144 bytes).
    Q4K,
    /// 256 weights: 16 sub-blocks of 16 with i8 scales, 6-bit values (210 bytes).
    Q6K,
    /// 256 weights: 16 sub-blocks of 16 with 4-bit scales and mins, 2-bit values (84 bytes).
    Q2K,
    /// 256 weights: 16 sub-blocks of 16 with 6-bit scales, 3-bit values (110 bytes).
    Q3K,
    /// 256 weights: 8 sub-blocks of 32 with 6-bit scales and mins, 5-bit values (176 bytes).
    Q5K,
}

/// The activation block format a weight format's dot product consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActFormat {
    /// 32 × i8 per block with an f32 scale, `s = d·Σq` and the integer `Σq`
    /// (llama.cpp's Q8_1, with f32 instead of f16 fields).
    Q8_1,
    /// 256 × i8 per block with an f32 scale and the i16 sums of each group of
    /// 16 (llama.cpp's Q8_K).
    Q8K,
}

impl ActFormat {
    /// Values per activation block.
    pub const fn block_size(self) -> usize {
        match self {
            ActFormat::Q8_1 => QK,
            ActFormat::Q8K => QK_K,
        }
    }
}

impl QuantFormat {
    /// Every supported format.
    pub const ALL: [QuantFormat; 10] = [
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q8_0,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q5K,
    ];

    /// Weights per block.
    pub const fn block_size(self) -> usize {
        match self {
            QuantFormat::Q4_0
            | QuantFormat::Q4_1
            | QuantFormat::Q8_0
            | QuantFormat::Q5_0
            | QuantFormat::Q5_1 => QK,
            QuantFormat::Q4K
            | QuantFormat::Q6K
            | QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q5K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
            QuantFormat::Q5_0 => 22,
            QuantFormat::Q5_1 => 24,
            QuantFormat::Q4K => 144,
            QuantFormat::Q6K => 210,
            QuantFormat::Q2K => 84,
            QuantFormat::Q3K => 110,
            QuantFormat::Q5K => 176,
        }
    }

    /// Bytes of one row of `k` weights, or `None` if `k` is not a multiple of
    /// the block size (such a row cannot be stored in this format).
    pub const fn row_bytes(self, k: usize) -> Option<usize> {
        if k.is_multiple_of(self.block_size()) {
            Some(k / self.block_size() * self.block_bytes())
        } else {
            None
        }
    }

    /// The activation format [`super::quantize_activations`] produces for it.
    pub const fn act_format(self) -> ActFormat {
        match self {
            QuantFormat::Q4_0
            | QuantFormat::Q4_1
            | QuantFormat::Q8_0
            | QuantFormat::Q5_0
            | QuantFormat::Q5_1 => ActFormat::Q8_1,
            QuantFormat::Q4K
            | QuantFormat::Q6K
            | QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q5K => ActFormat::Q8K,
        }
    }

    /// The GGML type id (`ggml_type`) a GGUF tensor of this format carries.
    pub const fn ggml_type(self) -> u32 {
        match self {
            QuantFormat::Q4_0 => 2,
            QuantFormat::Q4_1 => 3,
            QuantFormat::Q8_0 => 8,
            QuantFormat::Q5_0 => 6,
            QuantFormat::Q5_1 => 7,
            QuantFormat::Q4K => 12,
            QuantFormat::Q6K => 14,
            QuantFormat::Q2K => 10,
            QuantFormat::Q3K => 11,
            QuantFormat::Q5K => 13,
        }
    }

    /// The format with GGML type id `t`, if it is one supported here.
    pub const fn from_ggml_type(t: u32) -> Option<Self> {
        match t {
            2 => Some(QuantFormat::Q4_0),
            3 => Some(QuantFormat::Q4_1),
            6 => Some(QuantFormat::Q5_0),
            7 => Some(QuantFormat::Q5_1),
            8 => Some(QuantFormat::Q8_0),
            12 => Some(QuantFormat::Q4K),
            14 => Some(QuantFormat::Q6K),
            10 => Some(QuantFormat::Q2K),
            11 => Some(QuantFormat::Q3K),
            13 => Some(QuantFormat::Q5K),
            _ => None,
        }
    }

    /// GGML's name for the format ("Q4_0", "Q4_K", ...).
    pub const fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4_0 => "Q4_0",
            QuantFormat::Q4_1 => "Q4_1",
            QuantFormat::Q8_0 => "Q8_0",
            QuantFormat::Q5_0 => "Q5_0",
            QuantFormat::Q5_1 => "Q5_1",
            QuantFormat::Q4K => "Q4_K",
            QuantFormat::Q6K => "Q6_K",
            QuantFormat::Q2K => "Q2_K",
            QuantFormat::Q3K => "Q3_K",
            QuantFormat::Q5K => "Q5_K",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The little-endian f16 at `b[off..off + 2]`, widened (exactly) to f32.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Unpacks Q4_K's 12 scale bytes into the 8 (scale, min) pairs, 6 bits each.
///
/// Sub-blocks 0..4 keep their scale and min in the low 6 bits of bytes
/// `j` and `j + 4`; sub-blocks 4..8 keep the low 4 bits in the nibbles of
/// byte `j + 4` and the high 2 bits in the top bits of bytes `j − 4` / `j`.
#[inline(always)]
pub(super) fn q4k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
    }
    for j in 4..8 {
        sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    (sc, mn)
}

/// Dequantizes one row: `out.len()` weights from `bytes`.
///
/// # Panics
/// If `out.len()` is not a multiple of the block size or `bytes.len()` is not
/// exactly the row size for `out.len()` weights.
pub fn dequantize_row(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    let row_bytes = format.row_bytes(out.len()).unwrap_or_else(|| {
        panic!(
            "{format}: {} weights is not a multiple of the block size {}",
            out.len(),
            format.block_size()
        )
    });
    assert_eq!(
        bytes.len(),
        row_bytes,
        "{format}: {} weights take {row_bytes} bytes",
        out.len()
    );
    let bb = format.block_bytes();
    let bs = format.block_size();
    for (blk, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        match format {
            QuantFormat::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    let q = blk[2 + j];
                    y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            QuantFormat::Q4_1 => {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    y[j] = (q & 0x0F) as f32 * d + m;
                    y[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            QuantFormat::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            QuantFormat::Q5_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = (q5_value(blk, 2, j) - 16) as f32 * d;
                }
            }
            QuantFormat::Q5_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..32 {
                    y[j] = q5_value(blk, 4, j) as f32 * d + m;
                }
            }
            QuantFormat::Q4K => {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                let qs = &blk[16..144];
                for j in 0..8 {
                    let scale = d * sc[j] as f32;
                    let min = dmin * mn[j] as f32;
                    let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    let shift = 4 * (j % 2);
                    for l in 0..32 {
                        y[32 * j + l] = scale * ((q[l] >> shift) & 0x0F) as f32 - min;
                    }
                }
            }
            QuantFormat::Q6K => {
                let d = f16_at(blk, 208);
                for e in 0..QK_K {
                    let q = q6k_value(blk, e);
                    let sc = blk[192 + e / 16] as i8;
                    y[e] = d * sc as f32 * q as f32;
                }
            }
            QuantFormat::Q2K => {
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                for e in 0..QK_K {
                    let sc = blk[e / 16];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    y[e] = dl * q2_bits(&blk[16..80], e) as f32 - ml;
                }
            }
            QuantFormat::Q3K => {
                let d = f16_at(blk, 108);
                let sc = q3k_scales(&blk[96..108]);
                for e in 0..QK_K {
                    let dl = d * sc[e / 16] as f32;
                    y[e] = dl * q3k_value(blk, e) as f32;
                }
            }
            QuantFormat::Q5K => {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let (sc, mn) = q4k_scales_mins(&blk[4..16]);
                for j in 0..8 {
                    let scale = d * sc[j] as f32;
                    let min = dmin * mn[j] as f32;
                    for l in 0..32 {
                        y[32 * j + l] = scale * q5k_value(blk, j, l) as f32 - min;
                    }
                }
            }
        }
    }
}

/// The 5-bit value (0..32) of weight `j` of a Q5_0/Q5_1 block whose `qh`
/// starts at byte `qh_at` (its 16 nibble bytes follow).
#[inline(always)]
pub(super) fn q5_value(blk: &[u8], qh_at: usize, j: usize) -> i32 {
    let qh = u32::from_le_bytes([blk[qh_at], blk[qh_at + 1], blk[qh_at + 2], blk[qh_at + 3]]);
    let q = blk[qh_at + 4 + j % 16];
    let nib = if j < 16 { q & 0x0F } else { q >> 4 };
    (nib as i32) | ((((qh >> j) & 1) as i32) << 4)
}

/// Q6_K weight `e` (0..256) of the block `blk` as a signed value `q − 32`.
#[inline(always)]
pub(super) fn q6k_value(blk: &[u8], e: usize) -> i32 {
    let (h, r) = (e / 128, e % 128);
    let (t, l) = (r / 32, r % 32);
    let ql = blk[64 * h + l + 32 * (t % 2)];
    let lo = if t < 2 { ql & 0x0F } else { ql >> 4 };
    let hi = (blk[128 + 32 * h + l] >> (2 * t)) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// The 2-bit field of weight `e` (0..256) in the 64 `qs` bytes of a Q2_K or
/// Q3_K block: bits `2·(r/32)` of `qs[32n + r % 32]`, `n = e/128`, `r = e % 128`.
#[inline(always)]
pub(super) fn q2_bits(qs: &[u8], e: usize) -> u8 {
    let (n, r) = (e / 128, e % 128);
    (qs[32 * n + r % 32] >> (2 * (r / 32))) & 3
}

/// Q3_K's 16 scales, unpacked from their 12 bytes and offset: `s − 32`.
#[inline(always)]
pub(super) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    std::array::from_fn(|i| {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// Q3_K weight `e` of block `blk` as a signed value (−4..4): its 2-bit field,
/// less 4 where its `hmask` bit is clear.
#[inline(always)]
pub(super) fn q3k_value(blk: &[u8], e: usize) -> i32 {
    let (n, r) = (e / 128, e % 128);
    let high = (blk[r % 32] >> (4 * n + r / 32)) & 1;
    q2_bits(&blk[32..96], e) as i32 - if high == 0 { 4 } else { 0 }
}

/// Q5_K's 5-bit value (0..32) of weight `l` of sub-block `j` of `blk`.
#[inline(always)]
pub(super) fn q5k_value(blk: &[u8], j: usize, l: usize) -> i32 {
    let nib = (blk[48 + 32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0F;
    let high = (blk[16 + l] >> j) & 1;
    (nib | (high << 4)) as i32
}
