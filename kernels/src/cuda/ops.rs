//! Typed launch wrappers, one per kernel (both 16-bit types where the kernel
//! has them). Each checks what it can of the shapes, picks the launch
//! configuration, and passes the arguments in the kernel's order.
//!
//! Layouts, shared by every kernel: matrices are row-major; 16-bit values are
//! [`Dtype`] bits in `u16`; the residual stream and norm weights are f32. The
//! paged KV cache of one layer is `n_blocks · block_size` rows of `kv_width`
//! values, position `p` of a sequence living in row
//! `table[p / block_size] · block_size + p % block_size` (its *slot*).
//!
//! # Safety
//! Every wrapper is `unsafe`: device addresses are not checked against the
//! memory they point to. The caller guarantees each address is valid for the
//! extent the documentation gives.

use std::ffi::c_void;

use super::device::{DevPtr, Device, Dtype, LaunchCfg};
use super::{Error, Result};

/// The most query rows one prefill attention tile holds.
pub const PREFILL_TILE: u32 = 16;
/// The most activation rows the quantized matrix-vector kernels take at once.
pub const QMV_MAX_ROWS: u32 = 8;
/// The largest `k` [`topk`] returns.
pub const TOPK_MAX: u32 = 64;
/// The largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: u32 = 256;

/// One kernel argument (each at most 8 bytes, passed by address).
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device address.
    Ptr(DevPtr),
    /// A `u32`.
    U32(u32),
    /// An `f32`.
    F32(f32),
    /// A `u64`.
    U64(u64),
}

/// Launches `name` with `args` in order.
///
/// # Safety
/// `args` must match the kernel's parameters in number, order and type, and
/// every address must be valid for what the kernel touches.
pub unsafe fn launch(dev: &dyn Device, name: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
    // Each argument lives in an 8-byte slot; the kernel reads its own width
    // from the slot's start (little-endian).
    let mut slots: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => p,
            Arg::U32(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
            Arg::U64(v) => v,
        })
        .collect();
    let mut params: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| (s as *mut u64).cast::<c_void>())
        .collect();
    // SAFETY: forwarded from the caller; the slots outlive the call.
    unsafe { dev.launch(name, cfg, &mut params) }
}

fn named(base: &str, t: Dtype) -> String {
    format!("{base}_{}", t.suffix())
}

fn shape(kernel: &'static str, ok: bool, reason: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Shape {
            kernel,
            reason: reason(),
        })
    }
}

fn u32_of(kernel: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Shape {
        kernel,
        reason: format!("{what} = {v} exceeds 32 bits"),
    })
}

/// `out[r] = table[tokens[r] − vocab_start]` as f32 for tokens in this shard's
/// `vocab_start..vocab_start + vocab_len`, zero rows for the others (a
/// vocab-parallel embedding, summed over ranks afterwards).
/// `table`: `vocab_len × hidden` (t); `tokens`: `rows` u32; `out`: `rows × hidden` f32.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn embed(
    dev: &dyn Device,
    t: Dtype,
    table: DevPtr,
    tokens: DevPtr,
    out: DevPtr,
    rows: usize,
    hidden: usize,
    vocab: std::ops::Range<usize>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let k = "embed";
    let args = [
        Arg::Ptr(table),
        Arg::Ptr(tokens),
        Arg::Ptr(out),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "hidden", hidden)?),
        Arg::U32(u32_of(k, "vocab_start", vocab.start)?),
        Arg::U32(u32_of(k, "vocab_len", vocab.len())?),
    ];
    // SAFETY: forwarded.
    unsafe {
        launch(
            dev,
            &named(k, t),
            LaunchCfg::linear(rows as u32, 256),
            &args,
        )
    }
}

/// RMSNorm of the residual stream: if `delta` is given, first `x += delta`
/// (written back); then `out = x · rsqrt(mean(x²) + eps) · w`, rounded to `t`.
/// `x`, `delta`: `rows × dim` f32; `w`: `dim` f32; `out`: `rows × dim` (t).
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rms_norm(
    dev: &dyn Device,
    t: Dtype,
    x: DevPtr,
    delta: Option<DevPtr>,
    w: DevPtr,
    out: DevPtr,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let k = "rms_norm";
    let args = [
        Arg::Ptr(x),
        Arg::Ptr(delta.unwrap_or(0)),
        Arg::Ptr(w),
        Arg::Ptr(out),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "dim", dim)?),
        Arg::F32(eps),
    ];
    // One pass of the block covers the row (four values a thread), up to
    // 1024 threads: a lone row (batch-1 decode) is read by as many threads
    // as it has float4s.
    let threads = dim.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
    // SAFETY: forwarded.
    unsafe {
        launch(
            dev,
            &named(k, t),
            LaunchCfg::linear(rows as u32, threads),
            &args,
        )
    }
}

/// Rotary embedding of the first `n_heads` heads of every row of `qkv` (the
/// q heads followed by the k heads): pair `i` of a head at position `pos[r]`
/// turns by the angle whose cosine and sine are `cos[pos·half + i]`,
/// `sin[pos·half + i]`. Pair `i` is the elements `(2i, 2i+1)` (llama.cpp's
/// "normal" rope), or `(i, i + half)` when `neox` (GPT-NeoX's pairing).
/// `qkv`: `rows × row_stride` (t); `pos`: `rows` u32; `cos`, `sin`:
/// `context × head_dim/2` f32.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rope(
    dev: &dyn Device,
    t: Dtype,
    qkv: DevPtr,
    pos: DevPtr,
    (cos, sin): (DevPtr, DevPtr),
    rows: usize,
    row_stride: usize,
    n_heads: usize,
    head_dim: usize,
    neox: bool,
) -> Result<()> {
    let k = if neox { "rope_neox" } else { "rope" };
    shape(
        k,
        head_dim.is_multiple_of(2) && n_heads * head_dim <= row_stride,
        || format!("{n_heads} heads of {head_dim} in rows of {row_stride}"),
    )?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(qkv),
        Arg::Ptr(pos),
        Arg::Ptr(cos),
        Arg::Ptr(sin),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "row_stride", row_stride)?),
        Arg::U32(u32_of(k, "n_heads", n_heads)?),
        Arg::U32(u32_of(k, "head_dim", head_dim)?),
    ];
    // A thread per pair, over as many blocks as a row needs, by as many
    // rows as the grid's second dimension holds (the kernel loops over more).
    let pairs = n_heads * head_dim / 2;
    let cfg = LaunchCfg {
        grid: (
            u32_of(k, "blocks", pairs.div_ceil(128))?,
            rows.min(65535) as u32,
            1,
        ),
        block: (128, 1, 1),
        shared: 0,
    };
    // SAFETY: forwarded.
    unsafe { launch(dev, &named(k, t), cfg, &args) }
}

/// `x[r][i] += bias[i]` for `rows` rows of `width` values of `x` (t), the
/// sum rounded once to t. `bias`: `width` f32.
///
/// # Safety
/// See the module documentation.
pub unsafe fn add_bias(
    dev: &dyn Device,
    t: Dtype,
    x: DevPtr,
    bias: DevPtr,
    rows: usize,
    width: usize,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let k = "add_bias";
    let args = [
        Arg::Ptr(x),
        Arg::Ptr(bias),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "width", width)?),
    ];
    // SAFETY: forwarded.
    unsafe {
        launch(
            dev,
            &named(k, t),
            LaunchCfg::linear(u32_of(k, "rows", rows)?, 128),
            &args,
        )
    }
}

/// RMSNorm, in place, of each of the first `n_q + n_k` heads of every row of
/// `qkv` (t): the q heads with weight `qw`, the k heads after them with `kw`
/// (`head_dim` f32 each); `x / sqrt(mean(x²) + eps) · w`, rounded once.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn head_norm(
    dev: &dyn Device,
    t: Dtype,
    qkv: DevPtr,
    (qw, kw): (DevPtr, DevPtr),
    rows: usize,
    row_stride: usize,
    (n_q, n_k): (usize, usize),
    head_dim: usize,
    eps: f32,
) -> Result<()> {
    let k = "head_norm";
    shape(k, (n_q + n_k) * head_dim <= row_stride, || {
        format!("{n_q} + {n_k} heads of {head_dim} in rows of {row_stride}")
    })?;
    if rows == 0 || n_q + n_k == 0 {
        return Ok(());
    }
    let blocks = u32_of(k, "rows × heads", rows * (n_q + n_k))?;
    let args = [
        Arg::Ptr(qkv),
        Arg::Ptr(qw),
        Arg::Ptr(kw),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "row_stride", row_stride)?),
        Arg::U32(u32_of(k, "n_q", n_q)?),
        Arg::U32(u32_of(k, "n_k", n_k)?),
        Arg::U32(u32_of(k, "head_dim", head_dim)?),
        Arg::F32(eps),
    ];
    // SAFETY: forwarded.
    unsafe { launch(dev, &named(k, t), LaunchCfg::linear(blocks, 64), &args) }
}

/// Writes each row's keys and values into its KV-cache slot:
/// `k_cache[slots[r]] = qkv[r][k_offset..+kv_width]` and
/// `v_cache[slots[r]] = qkv[r][k_offset+kv_width..+kv_width]`.
/// `qkv`: `rows × row_stride` (t); caches: `slots × kv_width` (t); `slots`: `rows` u32.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn kv_write(
    dev: &dyn Device,
    t: Dtype,
    qkv: DevPtr,
    (k_cache, v_cache): (DevPtr, DevPtr),
    slots: DevPtr,
    rows: usize,
    row_stride: usize,
    k_offset: usize,
    kv_width: usize,
) -> Result<()> {
    let k = "kv_write";
    shape(k, k_offset + 2 * kv_width <= row_stride, || {
        format!("k at {k_offset} and v of {kv_width} past rows of {row_stride}")
    })?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(qkv),
        Arg::Ptr(k_cache),
        Arg::Ptr(v_cache),
        Arg::Ptr(slots),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "row_stride", row_stride)?),
        Arg::U32(u32_of(k, "k_offset", k_offset)?),
        Arg::U32(u32_of(k, "kv_width", kv_width)?),
    ];
    // SAFETY: forwarded.
    unsafe {
        launch(
            dev,
            &named(k, t),
            LaunchCfg::linear(rows as u32, 128),
            &args,
        )
    }
}

/// `out = silu(gate) · up` for rows `[gate (width) | up (width)]`.
/// `gate_up`: `rows × 2·width` (t); `out`: `rows × width` (t).
///
/// # Safety
/// See the module documentation.
pub unsafe fn silu_mul(
    dev: &dyn Device,
    t: Dtype,
    gate_up: DevPtr,
    out: DevPtr,
    rows: usize,
    width: usize,
) -> Result<()> {
    let k = "silu_mul";
    let total = rows * width;
    if total == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(gate_up),
        Arg::Ptr(out),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "width", width)?),
    ];
    let grid = u32_of(k, "blocks", total.div_ceil(256))?;
    // SAFETY: forwarded.
    unsafe { launch(dev, &named(k, t), LaunchCfg::linear(grid, 256), &args) }
}

/// `dst[i] = src[idx[i]]` for f32 rows of `width`.
///
/// # Safety
/// See the module documentation.
pub unsafe fn gather_rows_f32(
    dev: &dyn Device,
    src: DevPtr,
    idx: DevPtr,
    dst: DevPtr,
    n: usize,
    width: usize,
) -> Result<()> {
    let k = "gather_rows_f32";
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(src),
        Arg::Ptr(idx),
        Arg::Ptr(dst),
        Arg::U32(u32_of(k, "n", n)?),
        Arg::U32(u32_of(k, "width", width)?),
    ];
    // SAFETY: forwarded.
    unsafe { launch(dev, k, LaunchCfg::linear(n as u32, 256), &args) }
}

/// `dst[i] += src[i]` for `n` f32 values.
///
/// # Safety
/// See the module documentation.
pub unsafe fn add_f32(dev: &dyn Device, dst: DevPtr, src: DevPtr, n: usize) -> Result<()> {
    let k = "add_f32";
    if n == 0 {
        return Ok(());
    }
    let grid = u32_of(k, "blocks", n.div_ceil(1024))?;
    let args = [Arg::Ptr(dst), Arg::Ptr(src), Arg::U64(n as u64)];
    // SAFETY: forwarded.
    unsafe { launch(dev, k, LaunchCfg::linear(grid, 256), &args) }
}

/// Where attention reads its query rows, caches and block tables.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    /// Query rows: `rows × q_stride` (t), the heads first in each row.
    pub q: DevPtr,
    /// Row stride of `q`.
    pub q_stride: usize,
    /// This layer's key cache (t).
    pub k_cache: DevPtr,
    /// This layer's value cache (t).
    pub v_cache: DevPtr,
    /// All block tables, concatenated (u32).
    pub tables: DevPtr,
    /// Output: `rows × n_heads·head_dim` (t).
    pub out: DevPtr,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (`n_heads` is a multiple).
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Score scale, `1/√head_dim`.
    pub scale: f32,
}

impl AttnArgs {
    fn check(&self, k: &'static str) -> Result<()> {
        shape(
            k,
            self.n_kv_heads > 0
                && self.n_heads.is_multiple_of(self.n_kv_heads)
                && self.head_dim > 0
                && self.head_dim.is_multiple_of(32)
                && self.head_dim <= MAX_HEAD_DIM as usize
                && self.block_size > 0
                && self.n_heads * self.head_dim <= self.q_stride,
            || {
                format!("{self:?}: head_dim must be a multiple of 32 up to {MAX_HEAD_DIM}, heads a multiple of kv heads")
            },
        )
    }
}

/// Causal attention for single query rows (decode): row `r` at position
/// `pos[r]` attends to positions `0..=pos[r]` of its sequence, whose block
/// table starts at `tables[table_start[r]]`. Grouped-query: head `h` reads KV
/// head `h / (n_heads / n_kv_heads)`.
///
/// # Safety
/// See the module documentation.
pub unsafe fn attn_decode(
    dev: &dyn Device,
    t: Dtype,
    a: &AttnArgs,
    table_start: DevPtr,
    pos: DevPtr,
    rows: usize,
) -> Result<()> {
    let k = "attn_decode";
    a.check(k)?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(a.q),
        Arg::Ptr(a.k_cache),
        Arg::Ptr(a.v_cache),
        Arg::Ptr(a.tables),
        Arg::Ptr(table_start),
        Arg::Ptr(pos),
        Arg::Ptr(a.out),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "q_stride", a.q_stride)?),
        Arg::U32(a.n_heads as u32),
        Arg::U32(a.n_kv_heads as u32),
        Arg::U32(a.head_dim as u32),
        Arg::U32(u32_of(k, "block_size", a.block_size)?),
        Arg::F32(a.scale),
    ];
    // Few blocks (small batches) leave most of the device idle: each block
    // then splits its row's positions over more warps.
    let warps = if a.n_heads * rows < DECODE_FEW_BLOCKS {
        DECODE_MAX_WARPS
    } else {
        4
    };
    let cfg = LaunchCfg {
        grid: (a.n_heads as u32, rows as u32, 1),
        block: (32 * warps, 1, 1),
        shared: 0,
    };
    // SAFETY: forwarded.
    unsafe { launch(dev, &named(k, t), cfg, &args) }
}

/// Below this many blocks (query heads × rows) a decode attention launch
/// gives each block [`DECODE_MAX_WARPS`] warps instead of 4. On an H200
/// (132 multiprocessors) batch-1 decode of a 32-head model is 32 blocks.
pub const DECODE_FEW_BLOCKS: usize = 512;

/// The most warps a decode attention block runs: `ATTN_DEC_WARPS` in
/// `attention.cu`, which sizes the block's shared arrays.
pub const DECODE_MAX_WARPS: u32 = 16;

/// One prefill attention tile: up to [`PREFILL_TILE`] consecutive query rows
/// of one sequence, at consecutive positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillTile {
    /// The tile's first query row.
    pub first_row: u32,
    /// Rows in the tile (1..=PREFILL_TILE).
    pub n_rows: u32,
    /// Where the sequence's block table starts in `tables`.
    pub table_start: u32,
    /// The position of the first row.
    pub first_pos: u32,
}

/// Cuts each item's rows into prefill tiles. `items`: `(first_row, rows,
/// table_start, first_pos)` per sequence.
pub fn prefill_tiles(items: impl IntoIterator<Item = (u32, u32, u32, u32)>) -> Vec<PrefillTile> {
    let mut tiles = Vec::new();
    for (row, rows, table_start, pos) in items {
        let mut done = 0;
        while done < rows {
            let n = (rows - done).min(PREFILL_TILE);
            tiles.push(PrefillTile {
                first_row: row + done,
                n_rows: n,
                table_start,
                first_pos: pos + done,
            });
            done += n;
        }
    }
    tiles
}

/// The tiles as the kernel reads them: four u32 per tile.
pub fn tiles_as_u32(tiles: &[PrefillTile]) -> Vec<u32> {
    tiles
        .iter()
        .flat_map(|t| [t.first_row, t.n_rows, t.table_start, t.first_pos])
        .collect()
}

/// Causal attention for prefill: each tile's rows share the keys and values
/// they read. `tiles`: [`tiles_as_u32`] of `n_tiles` tiles.
///
/// # Safety
/// See the module documentation.
pub unsafe fn attn_prefill(
    dev: &dyn Device,
    t: Dtype,
    a: &AttnArgs,
    tiles: DevPtr,
    n_tiles: usize,
) -> Result<()> {
    let k = "attn_prefill";
    a.check(k)?;
    if n_tiles == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(a.q),
        Arg::Ptr(a.k_cache),
        Arg::Ptr(a.v_cache),
        Arg::Ptr(a.tables),
        Arg::Ptr(tiles),
        Arg::Ptr(a.out),
        Arg::U32(u32_of(k, "n_tiles", n_tiles)?),
        Arg::U32(u32_of(k, "q_stride", a.q_stride)?),
        Arg::U32(a.n_heads as u32),
        Arg::U32(a.n_kv_heads as u32),
        Arg::U32(a.head_dim as u32),
        Arg::U32(u32_of(k, "block_size", a.block_size)?),
        Arg::F32(a.scale),
    ];
    let cfg = LaunchCfg {
        grid: (a.n_heads as u32, n_tiles as u32, 1),
        block: (128, 1, 1),
        shared: 0,
    };
    // SAFETY: forwarded.
    unsafe { launch(dev, &named(k, t), cfg, &args) }
}

/// The index of each row's largest value (the lowest index among ties).
/// `x`: `rows × n` f32; `idx`: `rows` u32.
///
/// # Safety
/// See the module documentation.
pub unsafe fn argmax(
    dev: &dyn Device,
    x: DevPtr,
    rows: usize,
    n: usize,
    idx: DevPtr,
) -> Result<()> {
    let k = "argmax_f32";
    if rows == 0 {
        return Ok(());
    }
    shape(k, n > 0, || "empty rows".into())?;
    let args = [
        Arg::Ptr(x),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "n", n)?),
        Arg::Ptr(idx),
    ];
    // SAFETY: forwarded.
    unsafe { launch(dev, k, LaunchCfg::linear(rows as u32, 1024), &args) }
}

/// Each row of `x` replaced in place by `softmax(x · inv_temperature)`.
///
/// # Safety
/// See the module documentation.
pub unsafe fn softmax(
    dev: &dyn Device,
    x: DevPtr,
    rows: usize,
    n: usize,
    inv_temperature: f32,
) -> Result<()> {
    let k = "softmax_f32";
    if rows == 0 {
        return Ok(());
    }
    shape(k, n > 0, || "empty rows".into())?;
    let args = [
        Arg::Ptr(x),
        Arg::U32(u32_of(k, "rows", rows)?),
        Arg::U32(u32_of(k, "n", n)?),
        Arg::F32(inv_temperature),
    ];
    // SAFETY: forwarded.
    unsafe { launch(dev, k, LaunchCfg::linear(rows as u32, 1024), &args) }
}

/// The `k` largest values of each row and their indices, largest first (the
/// lower index first among ties). `idx`, `val`: `rows × k`.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk(
    dev: &dyn Device,
    x: DevPtr,
    rows: usize,
    n: usize,
    k: usize,
    idx: DevPtr,
    val: DevPtr,
) -> Result<()> {
    let name = "topk_f32";
    shape(name, k >= 1 && k <= TOPK_MAX as usize && k <= n, || {
        format!("k = {k} must be 1..={TOPK_MAX} and at most n = {n}")
    })?;
    if rows == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(x),
        Arg::U32(u32_of(name, "rows", rows)?),
        Arg::U32(u32_of(name, "n", n)?),
        Arg::U32(k as u32),
        Arg::Ptr(idx),
        Arg::Ptr(val),
    ];
    // SAFETY: forwarded.
    unsafe { launch(dev, name, LaunchCfg::linear(rows as u32, 256), &args) }
}

/// GGUF block formats the CUDA kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// 32 weights: f16 scale, 16 bytes of 4-bit values − 8.
    Q4_0,
    /// 32 weights: f16 scale, f16 minimum, 16 bytes of 4-bit values.
    Q4_1,
    /// 32 weights: f16 scale, 32 signed bytes.
    Q8_0,
}

impl QFormat {
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q8_0 => 34,
        }
    }

    fn stem(self) -> &'static str {
        match self {
            QFormat::Q4_0 => "q4_0",
            QFormat::Q4_1 => "q4_1",
            QFormat::Q8_0 => "q8_0",
        }
    }
}

/// Dequantizes `n_blocks` blocks (32 weights each, in order) into `out` (t).
///
/// # Safety
/// See the module documentation.
pub unsafe fn dequantize(
    dev: &dyn Device,
    t: Dtype,
    f: QFormat,
    blocks: DevPtr,
    out: DevPtr,
    n_blocks: usize,
) -> Result<()> {
    if n_blocks == 0 {
        return Ok(());
    }
    let name = format!("dequant_{}_{}", f.stem(), t.suffix());
    let grid = u32_of("dequant", "blocks", n_blocks.div_ceil(8))?;
    let args = [Arg::Ptr(blocks), Arg::Ptr(out), Arg::U64(n_blocks as u64)];
    // SAFETY: forwarded.
    unsafe { launch(dev, &name, LaunchCfg::linear(grid, 256), &args) }
}

/// `y = x · Wᵀ` for block-quantized `W` (`n × k`, row-major blocks) and up to
/// [`QMV_MAX_ROWS`] activation rows `x` (`m × x_stride`, t). `y` is `m × n`,
/// f32 if `y_f32` else t. Each weight row is read once for all `m` rows.
///
/// # Safety
/// See the module documentation.
#[allow(clippy::too_many_arguments)]
pub unsafe fn qmv(
    dev: &dyn Device,
    t: Dtype,
    f: QFormat,
    w: DevPtr,
    x: DevPtr,
    x_stride: usize,
    y: DevPtr,
    y_f32: bool,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    let name_s = "qmv";
    shape(
        name_s,
        m >= 1 && m <= QMV_MAX_ROWS as usize && k.is_multiple_of(32) && k > 0 && x_stride >= k,
        || {
            format!(
                "m = {m} (1..={QMV_MAX_ROWS}), k = {k} (a multiple of 32), x_stride = {x_stride}"
            )
        },
    )?;
    if n == 0 {
        return Ok(());
    }
    let name = format!("qmv_{}_{}", f.stem(), t.suffix());
    let args = [
        Arg::Ptr(w),
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::U32(u32_of(name_s, "n", n)?),
        Arg::U32(u32_of(name_s, "k", k)?),
        Arg::U32(m as u32),
        Arg::U32(u32_of(name_s, "x_stride", x_stride)?),
        Arg::U32(u32::from(y_f32)),
    ];
    let grid = u32_of(name_s, "blocks", n.div_ceil(4))?;
    // SAFETY: forwarded.
    unsafe { launch(dev, &name, LaunchCfg::linear(grid, 128), &args) }
}
