//! AMX int8 tiles for the 32-wide formats Q8_0, Q4_0 and Q4_1: the
//! activation × weight products of prefill and of large batches.
//!
//! Owns: the tile-data permission request (once per process), the tile
//! configuration, and the chunk driver that runs on the tiles.
//!
//! What is true of it:
//!
//! * Each block's exact integer sum comes from one `tdpbssd` (signed bytes ×
//!   signed bytes, K = 32: one block) for 16 activation rows × 16 weight rows
//!   at once. The float part is the scalar reference's expression
//!   (`acc[b % 8] += (dw·da)·isum`, Q4_1 `+ m·s`, the lanes summed in the
//!   reference order), evaluated in AVX-512 over 16 weight rows, so results
//!   are bit-identical to the scalar, AVX2 and VNNI paths.
//! * Weights are re-packed once per call, a panel of 16-row weight tiles at
//!   a time, into the tiles' layout (4 consecutive weights of one row per
//!   dword, 16 rows side by side, gathered); Q4 nibbles are widened to
//!   signed bytes (Q4_0: `q − 8`, Q4_1: `q`). The activations come as A
//!   tiles written by the quantizer (`QuantizedActs::tiles`), or are copied
//!   into that layout when it did not write them. Both live in a per-thread
//!   scratch that grows with the largest shape seen.
//! * Each activation tile sweeps a panel's weight tiles. The products run
//!   [`RING`] ahead of the float work through a ring of C tiles (two sets
//!   of tile registers alternate), so the tile unit and the vector units
//!   work at once. The products of a pair run lane by lane (blocks `l, l +
//!   8, …` for lane `l`), so the float work keeps a lane's 16 rows of sums
//!   in registers while it adds each block's 16 × 16 terms, and stores a
//!   lane only when its last block is in.
//! * Runs when the CPU reports `amx_int8`, `PARALLM_CPU_FEATURES` does not
//!   turn AMX off, and Linux grants the process the tile data
//!   (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); otherwise, for other formats, and
//!   for chunks of fewer than [`MIN_ROWS`] activation rows (batch-1 decode
//!   is bandwidth-bound), the AVX-512 VNNI kernels run.
//! * Every call loads its tile configuration and releases the tiles when it
//!   returns, so no other code sees AMX state.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use super::formats::{QuantFormat, QK};
use super::{Job, OutCols};

/// Rows of a tile: activation rows per A tile, weight rows per B tile.
const TR: usize = 16;
/// Bytes of one B tile (one block of 16 weight rows): 8 rows × 64 bytes.
const B_TILE: usize = 512;
/// Activation rows below which a chunk runs the VNNI kernels instead.
const MIN_ROWS: usize = 16;

/// Whether the AMX kernels may run in this process: the feature is on and
/// the OS granted the tile data (asked once).
pub(super) fn usable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        use crate::cpu::features::{enabled, Feature};
        enabled(Feature::Amx)
            && enabled(Feature::Avx512)
            && enabled(Feature::Vnni)
            && request_tile_data()
    })
}

/// Asks Linux for the AMX tile data state (XFEATURE_XTILEDATA) for this
/// process; false where it is refused or the OS is not Linux.
fn request_tile_data() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only extends the set of
        // xsave features this process may use; it touches no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Whether a chunk of `rows` activation rows in `format` runs on the tiles
/// (on the AMX path): an AMX kernel for the format, and enough rows.
pub(super) fn takes(format: QuantFormat, rows: usize) -> bool {
    matches!(
        format,
        QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1
    ) && rows >= MIN_ROWS
}

/// The 64-byte `ldtilecfg` operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    _reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Two independent sets of tiles (so that two products are in flight):
/// tmm0 and tmm3: C (16 × 16 i32); tmm1 and tmm4: A (16 rows × 32 bytes:
/// one block of 16 activation rows); tmm2 and tmm5: B (8 × 64 bytes: one
/// block of 16 weight rows).
const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut set = 0;
    while set < 2 {
        let t = 3 * set;
        colsb[t] = 64;
        rows[t] = 16;
        colsb[t + 1] = 32;
        rows[t + 1] = 16;
        colsb[t + 2] = 64;
        rows[t + 2] = 8;
        set += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        _reserved: [0; 14],
        colsb,
        rows,
    }
};

/// Per-thread buffers of the AMX driver.
#[derive(Default)]
struct Scratch {
    /// The chunk's activation rows as A tiles, when the quantizer did not
    /// write them.
    acts: Vec<i8>,
    /// A panel's weight tiles in the B layout: `[tile][block][8 × 64]`.
    btile: Vec<u8>,
    /// Their per-block scales `d` (and Q4_1 `m`): `[tile][block][16]`.
    dw: Vec<f32>,
    mw: Vec<f32>,
    /// The ring of C tiles: `[slot][16 × 16]`.
    cbuf: Vec<i32>,
    /// Lane sums of one pair: `[row][lane][16]`.
    acc: Vec<f32>,
    /// The current activation tile's scales `d` (and Q4_1 `s`), `[block][16
    /// rows]`, rows past the chunk's end 0.
    da: Vec<f32>,
    sa: Vec<f32>,
    /// The blocks in the order their products run: lane by lane (blocks
    /// `l, l + 8, …` for lane `l`).
    order: Vec<u32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Grows `v` to at least `len` values (contents unspecified).
fn sized<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// The dwords at `p + idx[n]` for the rows `n` in `mask`, zeros elsewhere.
///
/// # Safety
/// AVX-512F; those dwords readable.
#[inline(always)]
unsafe fn gather16(mask: __mmask16, idx: __m512i, p: *const u8) -> __m512i {
    _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, idx, p as *const i32)
}

/// Re-packs weight rows `j0..j0 + 16` of the job (rows past the end are
/// zeros) into the panel's tile `h`: per block, B row `r` holds weights
/// `4r..4r + 4` of each of the 16 rows, gathered a dword per row.
///
/// # Safety
/// AVX-512F + F16C; the scratch sized by `run_with`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn repack(format: QuantFormat, job: &Job<'_>, j0: usize, h: usize, s: &mut Scratch) {
    let bb = format.block_bytes();
    let nb = job.rb / bb;
    // A panel's tiles start below `rows`: at least one row is real.
    assert!(j0 < job.rows);
    let valid = (job.rows - j0).min(TR);
    let mask: __mmask16 = if valid == TR {
        0xFFFF
    } else {
        (1u16 << valid) - 1
    };
    let rb = job.rb as i32;
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(rb),
    );
    let base = job.w.as_ptr().add(j0 * job.rb);
    let tile = s.btile.as_mut_ptr().add(h * nb * B_TILE);
    let dw = s.dw.as_mut_ptr().add(h * nb * TR);
    let mw = s.mw.as_mut_ptr().add(h * nb * TR);
    let m4 = _mm512_set1_epi8(0x0F);
    for b in 0..nb {
        let blk = base.add(b * bb);
        // The f16 pair at the block's start: d, then (Q4_1) m.
        let head = gather16(mask, idx, blk);
        _mm512_storeu_ps(dw.add(b * TR), _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head)));
        if format == QuantFormat::Q4_1 {
            let m = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(head));
            _mm512_storeu_ps(mw.add(b * TR), _mm512_cvtph_ps(m));
        }
        let t = tile.add(b * B_TILE);
        match format {
            QuantFormat::Q8_0 => {
                for r in 0..8 {
                    _mm512_storeu_si512(
                        t.add(64 * r) as *mut _,
                        gather16(mask, idx, blk.add(2 + 4 * r)),
                    );
                }
            }
            _ => {
                let off = if format == QuantFormat::Q4_0 { 2 } else { 4 };
                let bias = _mm512_set1_epi8(if format == QuantFormat::Q4_0 { 8 } else { 0 });
                for r in 0..4 {
                    // Bytes 4r..4r + 4 of each row's nibbles: weights
                    // 4r.. (low nibbles) and 16 + 4r.. (high nibbles).
                    let x = gather16(mask, idx, blk.add(off + 4 * r));
                    let lo = _mm512_sub_epi8(_mm512_and_si512(x, m4), bias);
                    let hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<4>(x), m4), bias);
                    _mm512_storeu_si512(t.add(64 * r) as *mut _, lo);
                    _mm512_storeu_si512(t.add(64 * (r + 4)) as *mut _, hi);
                }
            }
        }
    }
}

/// Copies the job's activation rows into A tiles in the scratch (for
/// activations quantized without them): for each tile of 16 rows and each
/// block, the 16 rows' 32 values in order, 512 contiguous bytes (rows
/// padded to `m_pad` with zeros).
fn copy_acts(job: &Job<'_>, m_pad: usize, s: &mut Scratch) {
    let k = job.acts.cols();
    let nb = k / QK;
    let m = job.i_end - job.i_begin;
    for i in 0..m_pad {
        let (t, r) = (i / TR, i % TR);
        for b in 0..nb {
            let at = (t * nb + b) * TR * QK + r * QK;
            let dst = &mut s.acts[at..at + QK];
            if i >= m {
                dst.fill(0);
            } else {
                let row = job.acts.row(job.i_begin + i);
                let (lo, hi) = row.halves(b);
                dst[..16].copy_from_slice(lo);
                dst[16..].copy_from_slice(hi);
            }
        }
    }
}

/// Loads the tile configuration of this module.
///
/// # Safety
/// AMX usable ([`usable`]).
#[inline(always)]
unsafe fn load_config() {
    let cfg = &CONFIG;
    // SAFETY (of the asm): ldtilecfg reads the 64-byte config it is given.
    asm!("ldtilecfg [{}]", in(reg) cfg as *const TileConfig, options(nostack, readonly));
}

/// Returns the tiles to their initial state.
///
/// # Safety
/// AMX usable.
#[inline(always)]
unsafe fn release() {
    // SAFETY: tilerelease only returns the tile registers to their initial
    // state; no memory is touched.
    asm!("tilerelease", options(nostack, nomem));
}

/// The product of one block of activation tile `a` against weight tile `b`
/// into the C tile of tile set `SET` (0 or 1), left in the tile: its store
/// ([`store_product`]) comes after the next product is issued, so the tile
/// unit is not left waiting for this one's result.
///
/// # Safety
/// Configuration loaded; `a` readable as 16 rows of 32 bytes `lda` apart,
/// `b` 512 readable bytes.
#[inline(always)]
unsafe fn block_product<const SET: usize>(a: *const i8, lda: usize, b: *const u8) {
    /// The product on tiles `$c` (C), `$a` (A), `$b` (B).
    macro_rules! product {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tilezero tmm", $c),
                concat!("tileloadd tmm", $a, ", [{a} + {lda}*1]"),
                concat!("tileloadd tmm", $b, ", [{b} + {ld}*1]"),
                concat!("tdpbssd tmm", $c, ", tmm", $a, ", tmm", $b),
                a = in(reg) a,
                lda = in(reg) lda,
                b = in(reg) b,
                ld = in(reg) 64usize,
                options(nostack, readonly)
            )
        };
    }
    // SAFETY (of both): the tiles are configured (caller); the loads read
    // 16 rows of 32 bytes from `a` and 8 rows of 64 bytes from `b`, inside
    // what the caller guarantees; no memory is written and no other
    // register of the program is touched.
    if SET == 0 {
        product!("0", "1", "2");
    } else {
        product!("3", "4", "5");
    }
}

/// Stores the C tile of tile set `SET` at `c` (16 × 16 i32).
///
/// # Safety
/// Configuration loaded; `c` 1 KiB writable.
#[inline(always)]
unsafe fn store_product<const SET: usize>(c: *mut i32) {
    // SAFETY (of both): the tiles are configured (caller); the store writes
    // 16 rows of 64 bytes to `c`, which the caller guarantees writable.
    if SET == 0 {
        asm!("tilestored [{c} + {ld}*1], tmm0", c = in(reg) c, ld = in(reg) 64usize, options(nostack));
    } else {
        asm!("tilestored [{c} + {ld}*1], tmm3", c = in(reg) c, ld = in(reg) 64usize, options(nostack));
    }
}

/// The AMX chunk driver.
///
/// # Safety
/// AVX2 + FMA + F16C + AVX-512F enabled by the caller; [`usable`] true;
/// [`takes`] the job.
#[inline(always)]
pub(super) unsafe fn run(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        run_with(format, job, out, &mut s)
    })
}

/// C tiles in flight: products are issued this many ahead of the float
/// work that consumes them.
const RING: usize = 8;

/// Bytes of re-packed weights per panel: the weight tiles every activation
/// tile sweeps before the next panel (kept within L2).
const PANEL_BYTES: usize = 256 * 1024;

/// [`run`] on a given scratch (its own entry point with the features
/// enabled: the scratch closure is not compiled with the caller's).
///
/// The chunk's weight rows go in panels of 16-row weight tiles, re-packed
/// once per call. Each activation tile (its A tiles in L1) sweeps a panel's
/// weight tiles (streamed from L2); the (activation tile, weight tile)
/// pairs' block products form one sequence, issued [`RING`] ahead of the
/// float work that consumes them. Output rows are written 16 columns at a
/// time, a panel's width contiguous.
///
/// # Safety
/// As [`run`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn run_with(format: QuantFormat, job: &Job<'_>, out: &mut OutCols<'_>, s: &mut Scratch) {
    let k = job.acts.cols();
    let nb = k / QK;
    let m = job.i_end - job.i_begin;
    let m_pad = m.div_ceil(TR) * TR;
    let panel_tiles = (PANEL_BYTES / (nb * B_TILE)).clamp(1, job.rows.div_ceil(TR));
    sized(&mut s.btile, panel_tiles * nb * B_TILE);
    sized(&mut s.dw, panel_tiles * nb * TR);
    sized(&mut s.mw, panel_tiles * nb * TR);
    sized(&mut s.cbuf, RING * TR * TR);
    sized(&mut s.acc, TR * 8 * TR);
    sized(&mut s.da, nb * TR);
    sized(&mut s.sa, nb * TR);
    s.order.clear();
    s.order.extend(
        (0..8.min(nb))
            .flat_map(|l| (l..nb).step_by(8))
            .map(|b| b as u32),
    );
    // A tiles: the quantizer's, or a copy.
    let acts = if job.acts.tiles.len() >= job.acts.rows().div_ceil(TR) * TR * k
        && job.i_begin.is_multiple_of(TR)
    {
        job.acts.tiles.as_ptr().add(job.i_begin * k)
    } else {
        sized(&mut s.acts, m_pad * k);
        copy_acts(job, m_pad, s);
        s.acts.as_ptr()
    };
    load_config();
    let tiles = m_pad / TR;
    let mut p0 = 0;
    while p0 < job.rows {
        let wt = (job.rows - p0).div_ceil(TR).min(panel_tiles);
        for w in 0..wt {
            repack(format, job, p0 + w * TR, w, s);
        }
        let pass = Pass {
            q4_1: format == QuantFormat::Q4_1,
            nb,
            wt,
            acts,
            btile: s.btile.as_ptr(),
            cbuf: s.cbuf.as_mut_ptr(),
            acc: s.acc.as_mut_ptr(),
            dw: s.dw.as_ptr(),
            mw: s.mw.as_ptr(),
            da: s.da.as_mut_ptr(),
            sa: s.sa.as_mut_ptr(),
            order: s.order.as_ptr(),
            total: tiles * wt * nb,
            next: Cell::new(Next::default()),
        };
        // Products g = q·nb + p (pair q = t·wt + w, the block at position p
        // of the order) in order; C tile g lives in ring slot g % RING,
        // issued RING products ahead.
        for g in 0..RING.min(pass.total) {
            pass.issue(g);
        }
        for q in 0..tiles * wt {
            let (t, w) = (q / wt, q % wt);
            let valid = (m - t * TR).min(TR);
            let j = p0 + w * TR;
            let cols = (job.rows - j).min(TR);
            if w == 0 {
                pass.tile_scales(job, t, valid);
            }
            pass.finish(q, valid, cols, j, out);
        }
        p0 += wt * TR;
    }
    release();
}

/// One panel of re-packed weight tiles against the chunk's activation
/// tiles, as a sequence of (activation tile, weight tile) pairs.
struct Pass {
    q4_1: bool,
    nb: usize,
    /// Weight tiles in the panel.
    wt: usize,
    /// A tiles: `[activation tile][block][16 × 32]`.
    acts: *const i8,
    /// B tiles: `[weight tile][block][8 × 64]`.
    btile: *const u8,
    /// C tiles: `[product % RING][16 × 16]`.
    cbuf: *mut i32,
    /// Lane sums of the current pair: `[row][lane][16]`.
    acc: *mut f32,
    /// `[weight tile][block][16]`.
    dw: *const f32,
    mw: *const f32,
    /// The current activation tile's scales: `[block][16 rows]`.
    da: *mut f32,
    sa: *mut f32,
    /// Block of each position in a pair's sequence of products (`nb`).
    order: *const u32,
    /// Products in the pass: pairs × blocks.
    total: usize,
    /// The next product to issue, counted up rather than divided out of
    /// its index (a division per product showed in the kernel's time).
    next: Cell<Next>,
}

/// Where product `g` of a pass sits: position `p` of the block order in
/// pair `t·wt + w`.
#[derive(Clone, Copy, Default)]
struct Next {
    g: usize,
    p: usize,
    t: usize,
    w: usize,
}

impl Pass {
    /// Product `g` (pair `g / nb`, the block at position `g % nb` of
    /// [`Pass::order`]) on tile set `g % 2`; then the C tile of product
    /// `g − 1`, whose result is due by now, is stored into ring slot
    /// `(g − 1) % RING`, and the last product's own tile at once. So every
    /// product up to `g − 1` is in the ring when this returns (and `g` too
    /// if it is the last).
    ///
    /// # Safety
    /// Configuration loaded; products issued in order from 0 within the
    /// pass; `g` a product of the pass, slot `(g − 1) % RING` consumed.
    #[inline(always)]
    unsafe fn issue(&self, g: usize) {
        let Next { p, t, w, .. } = self.next.get();
        debug_assert_eq!(g, self.next.get().g, "products are issued in order");
        // Position by position, pair by pair: the next product's place.
        let mut next = Next {
            g: g + 1,
            p: p + 1,
            t,
            w,
        };
        if next.p == self.nb {
            next.p = 0;
            next.w += 1;
            if next.w == self.wt {
                next.w = 0;
                next.t += 1;
            }
        }
        self.next.set(next);
        let b = *self.order.add(p) as usize;
        let a = self.acts.add((t * self.nb + b) * TR * QK);
        let bt = self.btile.add((w * self.nb + b) * B_TILE);
        let slot = |g: usize| self.cbuf.add((g % RING) * TR * TR);
        if g.is_multiple_of(2) {
            block_product::<0>(a, QK, bt);
            if g > 0 {
                store_product::<1>(slot(g - 1));
            }
            if g + 1 == self.total {
                store_product::<0>(slot(g));
            }
        } else {
            block_product::<1>(a, QK, bt);
            store_product::<0>(slot(g - 1));
            if g + 1 == self.total {
                store_product::<1>(slot(g));
            }
        }
    }

    /// Copies activation tile `t`'s scales (`valid` rows of the chunk) into
    /// `[block][16 rows]`, the rows past them 0, for [`Pass::finish`].
    ///
    /// # Safety
    /// AVX-512F; `t` a tile of the job; the scratch sized by `run_with`.
    #[inline(always)]
    unsafe fn tile_scales(&self, job: &Job<'_>, t: usize, valid: usize) {
        let nb = self.nb;
        let row0 = job.i_begin + t * TR;
        // Row i's scale of block b is at (row0 + i)·nb + b: a gather per
        // block, rows past `valid` masked to 0.
        let mask: __mmask16 = if valid == TR {
            0xFFFF
        } else {
            (1u16 << valid) - 1
        };
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(nb as i32),
        );
        let end = (row0 + valid) * nb;
        assert!(job.acts.d.len() >= end && (!self.q4_1 || job.acts.s.len() >= end));
        let d = job.acts.d.as_ptr().add(row0 * nb);
        let s = job
            .acts
            .s
            .as_ptr()
            .add(if self.q4_1 { row0 * nb } else { 0 });
        for b in 0..nb {
            let gather = |p: *const f32| {
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, idx, p.add(b))
            };
            _mm512_storeu_ps(self.da.add(b * TR), gather(d));
            if self.q4_1 {
                _mm512_storeu_ps(self.sa.add(b * TR), gather(s));
            }
        }
    }

    /// The float work of pair `q`, lane by lane: for lane `l`, the blocks
    /// `l, l + 8, …` in order add their terms for the 16 rows to the lane's
    /// sums, held in registers from 0.0 (as the reference starts every
    /// lane), and as soon as a block's C tile is consumed, product `RING`
    /// further on is issued into its slot. Then each row's lanes are summed
    /// in the reference order `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` and
    /// the first `valid` rows' first `cols` columns written at column `j`.
    ///
    /// # Safety
    /// AVX-512F; as [`Pass::issue`]; products up to `q·nb + RING` issued;
    /// the activation tile's scales copied by [`Pass::tile_scales`].
    #[inline(always)]
    unsafe fn finish(&self, q: usize, valid: usize, cols: usize, j: usize, out: &mut OutCols<'_>) {
        let nb = self.nb;
        let (t, w) = (q / self.wt, q % self.wt);
        let dw = self.dw.add(w * nb * TR);
        let mw = self.mw.add(w * nb * TR);
        let mut g = q * nb;
        for l in 0..8.min(nb) {
            let mut acc = [_mm512_setzero_ps(); TR];
            for b in (l..nb).step_by(8) {
                let c = self.cbuf.add((g % RING) * TR * TR);
                let dwb = _mm512_loadu_ps(dw.add(b * TR));
                let da = self.da.add(b * TR);
                if self.q4_1 {
                    let mwb = _mm512_loadu_ps(mw.add(b * TR));
                    let sa = self.sa.add(b * TR);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let isum =
                            _mm512_cvtepi32_ps(_mm512_loadu_si512(c.add(i * TR) as *const _));
                        let p = _mm512_mul_ps(dwb, _mm512_set1_ps(*da.add(i)));
                        let ms = _mm512_mul_ps(mwb, _mm512_set1_ps(*sa.add(i)));
                        *a = _mm512_add_ps(*a, _mm512_add_ps(_mm512_mul_ps(p, isum), ms));
                    }
                } else {
                    for (i, a) in acc.iter_mut().enumerate() {
                        let isum =
                            _mm512_cvtepi32_ps(_mm512_loadu_si512(c.add(i * TR) as *const _));
                        let p = _mm512_mul_ps(dwb, _mm512_set1_ps(*da.add(i)));
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(p, isum));
                    }
                }
                if g + RING < self.total {
                    self.issue(g + RING);
                }
                g += 1;
            }
            for (i, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(self.acc.add((i * 8 + l) * TR), *a);
            }
        }
        for i in 0..valid {
            let acc = self.acc.add(i * 8 * TR);
            // Lanes no block reached (nb < 8) are 0.
            let l = |n: usize| {
                if n < nb {
                    _mm512_loadu_ps(acc.add(n * TR))
                } else {
                    _mm512_setzero_ps()
                }
            };
            let v = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(l(0), l(4)), _mm512_add_ps(l(2), l(6))),
                _mm512_add_ps(_mm512_add_ps(l(1), l(5)), _mm512_add_ps(l(3), l(7))),
            );
            let mut row = [0f32; TR];
            _mm512_storeu_ps(row.as_mut_ptr(), v);
            if cols == TR {
                // A constant length: the copy is two vector moves, not a
                // call to memcpy.
                out.write(t * TR + i, j, &row);
            } else {
                out.write(t * TR + i, j, &row[..cols]);
            }
        }
    }
}
