//! Quantized matmul kernels over GGML/GGUF block formats.
//!
//! Owns: the weight formats [`QuantFormat`] (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
//! Q4_K, Q5_K, Q6_K;
//! byte-identical to GGUF tensor data, layouts on the enum) and
//! [`dequantize_row`]; activation quantization into 8-bit blocks
//! ([`QuantizedActs`]: Q8_1-style for the 32-wide formats, Q8_K-style for the
//! K formats); and the products [`vec_dot`], [`gemv`], [`gemm`]:
//! `y[i][j] = Σₖ W[j][k]·x[i][k]` for the `n` quantized weight rows `W` and
//! the `m` quantized activation rows `x`.
//!
//! What is true of every path:
//!
//! * Paths: scalar (the reference, always available), AVX2 (`vpmaddubsw`),
//!   AVX2 code with AVX-512 VNNI on 256-bit vectors (`vpdpbusd ymm`), AVX-512
//!   F+BW (`vpmaddubsw zmm`), AVX-512 VNNI (`vpdpbusd zmm`), and AMX int8
//!   tiles (`tdpbssd`, the `amx` module) for Q4_0/Q4_1/Q8_0 with at least 16
//!   activation rows on top of AVX-512 VNNI, picked at run time from what the
//!   CPU reports less what `PARALLM_CPU_FEATURES` turns off (every SIMD path
//!   also requires AVX2, FMA and F16C). The K formats and Q5_0/Q5_1 use 256-bit vectors on every
//!   SIMD path (a 32-byte load is a pair of 32-weight sub-blocks; a Q5 block's
//!   fifth bits are spread to bytes with a shuffle and a compare); the VNNI paths use
//!   `vpdpwssd` for their scale multiply-accumulate.
//! * Results are bit-identical across paths, and between [`gemm`] and
//!   [`vec_dot`]: integer math inside a block is exact, and every SIMD path
//!   evaluates the scalar reference's float expression in the same order
//!   (documented in the `scalar` module): 8 lane accumulators indexed by
//!   block number mod 8 for the 32-wide formats, one sum in block order for
//!   the K formats.
//! * Against f32 math on the dequantized weights the error is that of the
//!   8-bit activations (|Δx| ≤ max|x| of its block / 254) plus f32 rounding
//!   of the block terms; the tests check
//!   `|y − Σ w·x| ≤ Σ|w|·d/2 + 1e-5·Σ W·(|x| + d)` (`d` the activation block
//!   scale, `W` = |w| plus twice the block's offset magnitude).
//! * Work is split over weight rows (output columns) on a caller-provided
//!   [`Pool`] into `threads × c` chunks (`c` = 1, or 4 for big calls; the
//!   last chunk ragged), which the caller and the pool's helpers claim;
//!   calls below ~64 KB of weights run on the calling thread. Within a chunk, weight rows go in panels of ~32 KB, and each
//!   panel meets all activation rows, in tiles of up to 8, before the next:
//!   every weight byte is read from memory once per call, and for m ≤ 8 each
//!   weight block is also unpacked once per call. A panel's first sweep asks
//!   for the weight lines [`crate::cpu::prefetch::distance`] bytes ahead of
//!   each row, which batch-1 decode's memory bandwidth rests on.
//! * Latency: the caller starts on the chunks at once; helpers that spin
//!   between regions join within a microsecond or so, parked ones after a
//!   wake-up (see [`crate::cpu::pool`]).

// Index loops over const tile sizes read best as written.
#![allow(clippy::needless_range_loop)]

mod acts;
mod formats;
pub mod iq4;
mod scalar;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;

use acts::ActRow;
pub use acts::QuantizedActs;
pub use formats::{dequantize_row, ActFormat, QuantFormat, QK, QK_K};

use crate::cpu::out::{OutCols, SharedOut};
use crate::cpu::pool::Pool;

/// Weight bytes per panel: the rows one activation tile sweeps before the
/// next tile revisits them (kept small enough to stay in L1/L2).
const PANEL_BYTES: usize = 32 * 1024;

/// Below this many weight bytes × activation tiles a call runs on the calling
/// thread: waking the pool costs more than it saves.
const PAR_MIN_WORK: usize = 64 * 1024;

/// Above this many weight bytes × activation tiles every thread gets 4
/// chunks instead of 1 (load balance when a core is busy elsewhere).
const PAR_SPLIT_WORK: usize = 4 << 20;

/// Quantizes `x` (m×k row-major, `m = x.len() / k`) for the dot products of
/// `format`. Allocates; use [`QuantizedActs::quantize`] on a kept buffer to
/// avoid that per call.
///
/// # Panics
/// If `k` is 0, not a multiple of the format's block size, or does not
/// divide `x.len()`.
pub fn quantize_activations(format: QuantFormat, x: &[f32], k: usize) -> QuantizedActs {
    let mut acts = QuantizedActs::new();
    acts.quantize(format, x, k);
    acts
}

/// Dot product of one weight row (`w_row`: the row's blocks, `k` weights)
/// with activation row `row` of `acts`.
///
/// # Panics
/// If `acts` was not quantized for `format`, `row >= acts.rows()`, or
/// `w_row.len()` is not the row size for `acts.cols()` weights.
pub fn vec_dot(format: QuantFormat, w_row: &[u8], acts: &QuantizedActs, row: usize) -> f32 {
    vec_dot_with(detect_isa(), format, w_row, acts, row)
}

/// `y (1×n) = x · Wᵀ` for a single activation row; [`gemm`] with `m = 1`.
///
/// # Panics
/// As [`gemm`], and if `acts.rows() != 1`.
pub fn gemv(
    format: QuantFormat,
    w: &[u8],
    n: usize,
    acts: &QuantizedActs,
    y: &mut [f32],
    pool: &Pool,
) {
    assert_eq!(acts.rows(), 1, "gemv takes exactly one activation row");
    gemm(format, w, n, acts, y, pool)
}

/// `y (m×n, row-major) = x · Wᵀ`: `y[i][j] = Σₖ W[j][k]·x[i][k]`, where `W` is
/// `n` rows of `k = acts.cols()` weights in `format` (`w` = the rows' blocks
/// back to back, e.g. a GGUF tensor's data) and `x` the `m = acts.rows()`
/// activation rows. Runs on `pool`: a caller outside the pool blocks until
/// it is done, a caller on one of its threads takes part.
///
/// # Panics
/// If `acts` was not quantized for `format`, `w.len()` is not `n` rows of
/// `acts.cols()` weights, or `y.len() != m·n`.
pub fn gemm(
    format: QuantFormat,
    w: &[u8],
    n: usize,
    acts: &QuantizedActs,
    y: &mut [f32],
    pool: &Pool,
) {
    gemm_with(detect_isa(), format, w, n, acts, y, Some(pool))
}

/// [`gemm`] on the calling thread only (for callers already running inside
/// parallel work).
///
/// # Panics
/// As [`gemm`].
pub fn gemm_serial(format: QuantFormat, w: &[u8], n: usize, acts: &QuantizedActs, y: &mut [f32]) {
    gemm_with(detect_isa(), format, w, n, acts, y, None)
}

/// Name of the kernel path this CPU runs ("amx+avx512-vnni", "avx512-vnni",
/// "avx2", "scalar", ...).
pub fn kernel_path() -> &'static str {
    detect_isa().name()
}

/// Instruction-set level of a kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C, `vpmaddubsw`.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// The AVX2 kernels with `vpdpbusd ymm` (AVX-512 VNNI + VL).
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
    /// AVX-512 F + BW + VL, `vpmaddubsw zmm`.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX-512 F + BW + VL + VNNI, `vpdpbusd zmm`.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// [`Isa::Avx512Vnni`] with AMX int8 tiles for the 32-wide formats
    /// Q8_0/Q4_0/Q4_1 when a chunk has at least `amx::MIN_ROWS` activation rows.
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Isa {
    /// Every path, scalar first.
    #[cfg(test)]
    const ALL: &'static [Isa] = &[
        Isa::Scalar,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Vnni,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni,
        #[cfg(target_arch = "x86_64")]
        Isa::Amx,
    ];

    fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Vnni => "avx2-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => "avx512-vnni",
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => "amx+avx512-vnni",
        }
    }

    /// Whether this CPU can run the path.
    fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            // What the CPU reports, less what PARALLM_CPU_FEATURES turns off.
            use crate::cpu::features::{enabled, Feature};
            let avx2 = enabled(Feature::Avx2);
            let avx512 = enabled(Feature::Avx512);
            let vnni = enabled(Feature::Vnni);
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => avx2,
                // 256-bit VNNI is AVX-512 VNNI with VL.
                Isa::Avx2Vnni => avx2 && avx512 && vnni,
                Isa::Avx512 => avx2 && avx512,
                Isa::Avx512Vnni => avx2 && avx512 && vnni,
                Isa::Amx => avx2 && avx512 && vnni && amx::usable(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// Whether the AMX kernels will read `m` activation rows quantized for
/// `format` on path `isa` (the quantizer then also writes them as A tiles).
fn amx_reads(isa: Isa, format: QuantFormat, m: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa == Isa::Amx && amx::takes(format, m)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, format, m);
        false
    }
}

/// The best supported path, detected once.
fn detect_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        for isa in [
            Isa::Amx,
            Isa::Avx512Vnni,
            Isa::Avx2Vnni,
            Isa::Avx512,
            Isa::Avx2,
        ] {
            if isa.supported() {
                return isa;
            }
        }
        Isa::Scalar
    })
}

/// Checks the shapes shared by [`gemm`] and [`vec_dot`]; returns the row size.
fn check_shapes(format: QuantFormat, w_len: usize, n: usize, acts: &QuantizedActs) -> usize {
    assert_eq!(
        acts.act_format(),
        format.act_format(),
        "activations were quantized for {:?}, {format} needs {:?}",
        acts.act_format(),
        format.act_format()
    );
    let rb = format
        .row_bytes(acts.cols())
        .expect("acts.cols() is a multiple of the block size (checked when quantizing)");
    assert_eq!(
        Some(w_len),
        n.checked_mul(rb),
        "{format}: {n} rows of {} weights take {rb} bytes each",
        acts.cols()
    );
    rb
}

fn vec_dot_with(
    isa: Isa,
    format: QuantFormat,
    w_row: &[u8],
    acts: &QuantizedActs,
    row: usize,
) -> f32 {
    let rb = check_shapes(format, w_row.len(), 1, acts);
    assert!(row < acts.rows(), "activation row {row} of {}", acts.rows());
    let mut y = [0f32];
    let out = OutCols::new(&mut y, 1, 1, 0, 1);
    run_chunk(isa, format, w_row, 1, rb, acts, row, row + 1, out);
    y[0]
}

fn gemm_with(
    isa: Isa,
    format: QuantFormat,
    w: &[u8],
    n: usize,
    acts: &QuantizedActs,
    y: &mut [f32],
    pool: Option<&Pool>,
) {
    let rb = check_shapes(format, w.len(), n, acts);
    let m = acts.rows();
    assert_eq!(Some(y.len()), m.checked_mul(n), "y must be m×n = {m}×{n}");
    if m == 0 || n == 0 {
        return;
    }
    let threads = pool.map_or(1, Pool::threads);
    let work = w.len() * m.div_ceil(MAX_TILE);
    let pool = match pool {
        Some(p) if threads > 1 && work >= PAR_MIN_WORK && n >= 2 => p,
        _ => {
            run_chunk(
                isa,
                format,
                w,
                n,
                rb,
                acts,
                0,
                m,
                OutCols::new(y, m, n, 0, n),
            );
            return;
        }
    };
    // The tile path splits by whole 16-row weight tiles, into fewer chunks:
    // every chunk sweeps all the activation tiles and fills its own ring of
    // products, which costs more per chunk than the VNNI kernels' setup.
    let (chunks, align) = if amx_reads(isa, format, m) {
        (threads * AMX_CHUNKS_PER_THREAD, AMX_ROWS)
    } else {
        (threads * if work >= PAR_SPLIT_WORK { 4 } else { 1 }, 1)
    };
    let shared = SharedOut::new(y, m, n);
    pool.run(chunks, &|c| {
        let (j0, j1) = chunk_rows(n, chunks, c, align);
        if j0 == j1 {
            return;
        }
        // SAFETY: chunk c owns columns j0..j1; the ranges of different
        // chunks are disjoint, so no two live views overlap.
        let out = unsafe { shared.cols(j0, j1 - j0) };
        run_chunk(
            isa,
            format,
            &w[j0 * rb..j1 * rb],
            j1 - j0,
            rb,
            acts,
            0,
            m,
            out,
        );
    });
}

/// Weight rows `j0..j1` of chunk `c` of `chunks`, in units of `align`
/// rows (the last unit may be short): with `align` 1, equal chunks of
/// `ceil(n / chunks)` rows, the last ones shorter or empty; otherwise the
/// `ceil(n / align)` units spread as evenly as whole units allow, chunk
/// sizes differing by at most one unit (some empty when there are fewer
/// units than chunks).
fn chunk_rows(n: usize, chunks: usize, c: usize, align: usize) -> (usize, usize) {
    if align == 1 {
        let per = n.div_ceil(chunks);
        return ((c * per).min(n), ((c + 1) * per).min(n));
    }
    let units = n.div_ceil(align);
    let edge = |c: usize| (c * units / chunks * align).min(n);
    (edge(c), edge(c + 1))
}

/// Weight rows per unit of the tile path's chunks: one 16-row weight tile.
const AMX_ROWS: usize = 16;

/// Chunks per thread on the tile path. Measured on a 2-core Xeon with AMX
/// (`quant_timing`, Q4_1 at 512 activation rows): 2 chunks per thread ran
/// 10–15% faster than 4 per thread, and 1 per thread no faster than 2 while
/// leaving no room to rebalance when a core is busy elsewhere.
const AMX_CHUNKS_PER_THREAD: usize = 2;

/// Largest activation-row tile of the kernels.
const MAX_TILE: usize = 8;

/// `out[i - i_begin][j] = w_j · x_i` for the `rows` weight rows in `w` and
/// activation rows `i_begin..i_end`, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn run_chunk(
    isa: Isa,
    format: QuantFormat,
    w: &[u8],
    rows: usize,
    rb: usize,
    acts: &QuantizedActs,
    i_begin: usize,
    i_end: usize,
    mut out: OutCols<'_>,
) {
    assert!(w.len() == rows * rb && out.cols == rows && out.m == i_end - i_begin);
    assert!(i_begin <= i_end && i_end <= acts.rows());
    let job = Job {
        w,
        rows,
        rb,
        acts,
        i_begin,
        i_end,
    };
    match isa {
        Isa::Scalar => scalar_chunk(format, &job, &mut out),
        // SAFETY: an Isa value other than Scalar is only used after
        // `Isa::supported` confirmed that the CPU has every feature its entry
        // point enables (detect_isa; the tests check too).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::run_avx2(format, &job, &mut out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Vnni => unsafe { avx2::run_avx2_vnni(format, &job, &mut out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::run_avx512(format, &job, &mut out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::run_avx512_vnni(format, &job, &mut out) },
        // SAFETY: as above (Isa::Amx is supported only where `amx::usable`).
        #[cfg(target_arch = "x86_64")]
        Isa::Amx => unsafe { avx512::run_amx(format, &job, &mut out) },
    }
}

/// The inputs of one chunk: `rows` weight rows of `rb` bytes against
/// activation rows `i_begin..i_end`.
struct Job<'a> {
    w: &'a [u8],
    rows: usize,
    rb: usize,
    acts: &'a QuantizedActs,
    i_begin: usize,
    i_end: usize,
}

/// One weight row against `C` activation rows.
trait RowKernel {
    /// Dot products of `w_row` with each of `rows` (all of the same length).
    ///
    /// # Safety
    /// The CPU must support the instruction set the implementation uses; it
    /// must be called (inlined) from a function that enables it.
    unsafe fn tile<const C: usize>(w_row: &[u8], rows: &[ActRow<'_>; C]) -> [f32; C];
}

/// The `C` activation rows `i0..i0 + C` of `acts`.
#[inline(always)]
fn act_rows<const C: usize>(acts: &QuantizedActs, i0: usize) -> [ActRow<'_>; C] {
    assert!(i0 + C <= acts.rows());
    std::array::from_fn(|c| acts.row(i0 + c))
}

/// The weight rows `p0..p1` of the chunk against activation rows
/// `i0..i0 + C`.
///
/// # Safety
/// As [`RowKernel::tile`] for `K`.
#[inline(always)]
unsafe fn sweep<K: RowKernel, const C: usize>(
    job: &Job<'_>,
    p0: usize,
    p1: usize,
    i0: usize,
    out: &mut OutCols<'_>,
) {
    let rows = act_rows::<C>(job.acts, i0);
    // The panel's first sweep reads its rows from memory: ask for the lines
    // a fixed distance ahead (later sweeps find the panel in cache).
    let dist = if i0 == job.i_begin {
        crate::cpu::prefetch::distance()
    } else {
        0
    };
    for j in p0..p1 {
        crate::cpu::prefetch::ahead(job.w.as_ptr().wrapping_add(j * job.rb), job.rb, dist);
        let r = K::tile::<C>(&job.w[j * job.rb..(j + 1) * job.rb], &rows);
        out.write_col(i0 - job.i_begin, j, &r);
    }
}

/// Runs `K` over a chunk: panels of weight rows, each swept by every tile of
/// activation rows (8, then 4, 2, 1 for the rest).
///
/// # Safety
/// As [`RowKernel::tile`] for `K` (inlined into the ISA's entry point).
#[inline(always)]
unsafe fn drive_kernel<K: RowKernel>(job: &Job<'_>, out: &mut OutCols<'_>) {
    let panel = (PANEL_BYTES / job.rb.max(1)).max(1);
    let mut p0 = 0;
    while p0 < job.rows {
        let p1 = (p0 + panel).min(job.rows);
        let mut i0 = job.i_begin;
        while i0 < job.i_end {
            let left = job.i_end - i0;
            if left >= 8 {
                sweep::<K, 8>(job, p0, p1, i0, out);
                i0 += 8;
            } else if left >= 4 {
                sweep::<K, 4>(job, p0, p1, i0, out);
                i0 += 4;
            } else if left >= 2 {
                sweep::<K, 2>(job, p0, p1, i0, out);
                i0 += 2;
            } else {
                sweep::<K, 1>(job, p0, p1, i0, out);
                i0 += 1;
            }
        }
        p0 = p1;
    }
}

/// The scalar path over a chunk: one reference dot product per output.
fn scalar_chunk(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    for j in 0..job.rows {
        let w_row = &job.w[j * job.rb..(j + 1) * job.rb];
        for i in job.i_begin..job.i_end {
            let v = scalar::dot(format, w_row, job.acts.row(i));
            out.write_col(i - job.i_begin, j, &[v]);
        }
    }
}
