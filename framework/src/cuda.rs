//! The CUDA backend: [`CudaBackend`] implements [`crate::backend::Backend`]
//! over a [`kernels::cuda::Device`] (one stream on one GPU, or the host
//! emulation in tests), so a CUDA shard runs the one layer loop
//! ([`crate::backend::transformer::Transformer`]) that the CPU shard runs,
//! over the same inputs ([`crate::model::PagedItem`] block tables from the
//! scheduler's [`crate::kv::KvManager`]). [`CudaShard`] is that loop with its
//! paged KV cache ([`CudaKv`]) and workspace, on one device.
//!
//! * weights and activations are f16 or bf16 ([`Dtype`]), GEMMs go through the
//!   device (cuBLAS, f32 accumulation); the residual stream, norm weights and
//!   the row-parallel outputs that are all-reduced stay f32;
//! * GGUF blocks of Q4_0 / Q4_1 / Q8_0 are dequantized on the device at load,
//!   or, with [`CudaOptions::quantized`], kept as blocks: steps of at most
//!   [`ops::QMV_MAX_ROWS`] rows use the quantized matrix-vector kernel and
//!   larger ones dequantize into a scratch matrix first;
//! * the KV cache of each layer is `n_blocks · block_size` rows of this shard's
//!   KV width, laid out as the CPU pool is, so block ids mean the same thing;
//! * the workspace (activations) and the step's bookkeeping (positions, KV
//!   slots, block tables, prefill tiles, picked rows) are device buffers kept
//!   between steps and grown only when a step needs more, so steady-state
//!   steps allocate no device memory;
//! * tensor-parallel sums go through a [`TpGroup`]: NCCL between GPUs, or a
//!   device-memory collective where the ranks share one GPU (which uses the
//!   step's host collective for its barriers). NCCL all-reduces are issued
//!   with no host barrier before them; one host barrier before each forward
//!   ([`crate::backend::Backend::before_step`]) lets the peers of a rank that
//!   failed before the step return. A rank failing in the middle of a forward
//!   leaves its peers to NCCL (its abort or timeout), not to the host collective;
//! * the logits come back to the host f32, gathered to the stage's rank 0 by
//!   the host collective (the engine draws tokens there, on the host).
//!
//! **Invariant:** nothing outside this module and `kernels::cuda` touches
//! CUDA; a missing library or GPU is an [`Error::Cuda`], never a panic.

use std::ops::Range;
use std::sync::{Arc, Mutex};

pub use kernels::cuda::device::Dtype;
use kernels::cuda::device::{DevBuf, DevPtr, Device, Gemm};
use kernels::cuda::nccl::NcclGroup;
use kernels::cuda::ops::{self, AttnArgs, QFormat};
use kernels::cuda::CudaDevice;

use crate::backend::shard::{ShardSource, StageShard};
use crate::backend::transformer::Transformer;
use crate::backend::{Backend, Elem, Heads, KvCache, PagedKv, StepRows};
use crate::collective::Collective;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::family::{Activation, NormKind, Positions, RopeStyle};
use crate::ops::RopeTable;
use crate::shard::ShardLayout;
use crate::weights::Mat;
use kernels::cpu::attn::AttnParams;

fn dev_err(e: kernels::cuda::Error) -> Error {
    Error::Cuda(e.to_string())
}

/// The error for a family feature the CUDA kernels do not have yet (a model
/// needing one is refused when its backend is built; see
/// [`CudaBackend::new`]).
fn unsupported_on_cuda(what: &str) -> Error {
    Error::Config(format!(
        "the CUDA backend does not run {what} yet (the model runs on the CPU)"
    ))
}

/// How the CUDA backend stores weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Type of weights and activations.
    pub dtype: Dtype,
    /// Keep Q4_0 / Q4_1 / Q8_0 blocks quantized on the device.
    pub quantized: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            dtype: Dtype::F16,
            quantized: false,
        }
    }
}

/// How the tensor-parallel ranks of one pipeline stage sum their partial
/// results on the device. One value is shared by the stage's ranks.
pub enum TpGroup {
    /// Every rank on one GPU (NCCL refuses two ranks on one device): ranks
    /// publish their buffers' addresses, then each sums all of them in rank
    /// order on its own stream, so every rank gets bit-identical results.
    SameDevice(SharedSlots),
    /// One rank per GPU, through NCCL.
    Nccl(NcclGroup),
}

impl std::fmt::Debug for TpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TpGroup::SameDevice(_) => f.write_str("TpGroup::SameDevice"),
            TpGroup::Nccl(g) => write!(f, "TpGroup::Nccl({g:?})"),
        }
    }
}

/// The published buffer addresses of a same-device group.
#[derive(Debug)]
pub struct SharedSlots {
    slots: Mutex<Vec<DevPtr>>,
}

impl SharedSlots {
    /// Slots for `world_size` ranks.
    pub fn new(world_size: usize) -> Self {
        Self {
            slots: Mutex::new(vec![0; world_size]),
        }
    }
}

impl TpGroup {
    /// The group for ranks placed on `devices` (rank r on `devices[r]`): the
    /// same-device collective if they all share one GPU, else NCCL.
    pub fn for_devices(devices: &[usize]) -> Result<Self> {
        if devices.windows(2).all(|w| w[0] == w[1]) {
            Ok(TpGroup::SameDevice(SharedSlots::new(devices.len())))
        } else {
            Ok(TpGroup::Nccl(NcclGroup::new(devices).map_err(dev_err)?))
        }
    }
}

/// A device's handle as the backend holds it.
#[derive(Clone)]
pub struct DeviceHandle {
    dev: Arc<dyn Device>,
    /// The concrete GPU device, for NCCL (absent on the emulation).
    gpu: Option<Arc<CudaDevice>>,
}

impl DeviceHandle {
    /// A new stream on GPU `ordinal`.
    pub fn gpu(ordinal: usize) -> Result<Self> {
        let gpu = Arc::new(CudaDevice::new(ordinal).map_err(dev_err)?);
        Ok(Self {
            dev: gpu.clone(),
            gpu: Some(gpu),
        })
    }

    /// The host emulation (tests).
    pub fn emulated() -> Result<Self> {
        let dev = kernels::cuda::EmuDevice::new().map_err(dev_err)?;
        Ok(Self {
            dev: Arc::new(dev),
            gpu: None,
        })
    }

    /// The device's description.
    pub fn name(&self) -> String {
        self.dev.name()
    }

    /// The device's copy bandwidth: the median of `runs` device-to-device
    /// copies of `bytes`, as bytes read plus bytes written per second
    /// (`2·bytes / t`), after one copy untimed.
    pub fn copy_bandwidth(&self, bytes: usize, runs: usize) -> Result<f64> {
        let src = DevBuf::zeroed(&self.dev, bytes).map_err(dev_err)?;
        let dst = DevBuf::zeroed(&self.dev, bytes).map_err(dev_err)?;
        let copy = || -> Result<std::time::Duration> {
            self.dev.synchronize().map_err(dev_err)?;
            let t = std::time::Instant::now();
            self.dev
                .copy(dst.ptr(), src.ptr(), bytes)
                .map_err(dev_err)?;
            self.dev.synchronize().map_err(dev_err)?;
            Ok(t.elapsed())
        };
        copy()?;
        let mut times = (0..runs.max(1))
            .map(|_| copy())
            .collect::<Result<Vec<_>>>()?;
        times.sort();
        let t = times[times.len() / 2].as_secs_f64();
        Ok(2.0 * bytes as f64 / t.max(f64::MIN_POSITIVE))
    }
}

/// A weight matrix on the device.
pub enum DevLinear {
    /// `n × k` in the backend's type.
    Dense {
        /// The values.
        w: DevBuf,
        /// Rows (output features).
        n: usize,
        /// Columns (input features).
        k: usize,
    },
    /// `n × k` as GGUF blocks.
    Quant {
        /// The blocks.
        w: DevBuf,
        /// Their format.
        f: QFormat,
        /// Rows (output features).
        n: usize,
        /// Columns (input features).
        k: usize,
    },
}

impl DevLinear {
    fn n(&self) -> usize {
        match self {
            DevLinear::Dense { n, .. } | DevLinear::Quant { n, .. } => *n,
        }
    }

    fn k(&self) -> usize {
        match self {
            DevLinear::Dense { k, .. } | DevLinear::Quant { k, .. } => *k,
        }
    }

    fn elements(&self) -> usize {
        match self {
            DevLinear::Dense { n, k, .. } | DevLinear::Quant { n, k, .. } => n * k,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            DevLinear::Dense { w, .. } | DevLinear::Quant { w, .. } => w.bytes(),
        }
    }
}

fn qformat(m: &Mat) -> Option<QFormat> {
    use candle_core::quantized::GgmlDType as G;
    match m {
        Mat::Quant { dtype: G::Q4_0, .. } => Some(QFormat::Q4_0),
        Mat::Quant { dtype: G::Q4_1, .. } => Some(QFormat::Q4_1),
        Mat::Quant { dtype: G::Q8_0, .. } => Some(QFormat::Q8_0),
        _ => None,
    }
}

/// The CUDA backend of one shard: its device stream, weight type, RoPE
/// tables, the dequantization scratch of quantized weights, and its stage's
/// [`TpGroup`].
pub struct CudaBackend {
    dev: DeviceHandle,
    opts: CudaOptions,
    heads: Heads,
    cos: DevBuf,
    sin: DevBuf,
    /// Dequantized weights for large steps of a quantized shard (as large as
    /// the largest quantized matrix).
    scratch: Option<DevBuf>,
    /// Whether the rotary embedding pairs the halves of a head (GPT-NeoX).
    neox: bool,
    /// The same-GPU all-reduce's sum, grown on demand and kept.
    sum: Mutex<GrowBuf>,
    tp: Option<Arc<TpGroup>>,
    weight_bytes: usize,
}

impl CudaBackend {
    /// The backend of a shard with `layout` on `dev`.
    pub fn new(
        config: &ModelConfig,
        layout: &ShardLayout,
        dev: DeviceHandle,
        opts: CudaOptions,
        tp: Option<Arc<TpGroup>>,
    ) -> Result<Self> {
        let hd = config.head_dim;
        if !hd.is_multiple_of(32) || hd > ops::MAX_HEAD_DIM as usize {
            return Err(Error::Config(format!(
                "the CUDA attention kernels take head dimensions that are multiples of 32 up to {}; this model's is {hd}",
                ops::MAX_HEAD_DIM
            )));
        }
        let family = config.family();
        let cpu_only = [
            (family.act != Activation::Silu, "a GELU FFN"),
            (!family.gated_ffn, "an ungated FFN"),
            (family.norm != NormKind::Rms, "LayerNorm"),
            (
                family.positions == Positions::Learned,
                "learned position embeddings",
            ),
            (
                family.dense_bias,
                "biases on the attention output and the FFN",
            ),
            (family.post_norms, "norms after attention and FFN"),
            (family.embed_scale, "scaled embeddings"),
            (config.sliding.is_some(), "sliding-window attention"),
            (config.attn_softcap > 0.0, "soft-capped attention"),
            (config.rope.rot_dims.is_some(), "a partial rotary embedding"),
            (config.final_softcap > 0.0, "soft-capped logits"),
        ];
        if let Some((_, what)) = cpu_only.iter().find(|(needed, _)| *needed) {
            return Err(Error::Config(format!(
                "{}: {}",
                config.arch,
                unsupported_on_cuda(what)
            )));
        }
        if layout.spec.world_size > 1 && tp.is_none() {
            return Err(Error::Shard(
                "a tensor-parallel CUDA shard needs its stage's TpGroup".into(),
            ));
        }
        let rope = RopeTable::new(hd, &config.rope, config.context);
        let (cos, sin) = rope.tables();
        Ok(Self {
            cos: f32_buf(&dev.dev, cos)?,
            sin: f32_buf(&dev.dev, sin)?,
            dev,
            opts,
            heads: Heads {
                n_heads: layout.heads.len(),
                n_kv: layout.kv_heads.len(),
                head_dim: hd,
            },
            neox: config.rope.style == RopeStyle::Neox,
            scratch: None,
            sum: Mutex::new(GrowBuf::default()),
            tp,
            weight_bytes: 0,
        })
    }

    fn d(&self) -> &dyn Device {
        &*self.dev.dev
    }
}

/// A device buffer that grows when asked for more than it holds, and is kept.
#[derive(Default)]
pub struct GrowBuf(Option<DevBuf>);

impl GrowBuf {
    /// Makes room for `bytes` (at least 4).
    fn reserve(&mut self, d: &Arc<dyn Device>, bytes: usize) -> Result<DevPtr> {
        let bytes = bytes.max(4);
        match &self.0 {
            Some(b) if b.bytes() >= bytes => {}
            _ => {
                // Free the old buffer before taking the larger one.
                self.0 = None;
                self.0 = Some(DevBuf::zeroed(d, bytes.next_power_of_two()).map_err(dev_err)?);
            }
        }
        Ok(self.ptr())
    }

    /// Puts `v` at the start of the buffer.
    fn put(&mut self, d: &Arc<dyn Device>, v: &[u32]) -> Result<()> {
        self.reserve(d, v.len() * 4)?;
        match &self.0 {
            Some(b) if !v.is_empty() => b.write(v).map_err(dev_err),
            _ => Ok(()),
        }
    }

    fn ptr(&self) -> DevPtr {
        self.0.as_ref().map_or(0, DevBuf::ptr)
    }
}

/// This shard's rows of the embedding table on the device.
pub struct DevTable {
    w: DevBuf,
    vocab: Range<usize>,
}

/// One step's bookkeeping in device memory, kept between steps.
#[derive(Default)]
pub struct CudaMeta {
    tokens: GrowBuf,
    pos: GrowBuf,
    slots: GrowBuf,
    tables: GrowBuf,
    table_start: GrowBuf,
    tiles: GrowBuf,
    picked_rows: GrowBuf,
    n_tiles: usize,
    picked: usize,
    decode_only: bool,
}

/// The paged KV cache on the device: per layer, keys and values of
/// `n_blocks · block_size` positions of the shard's KV width, in the
/// backend's 16-bit type.
pub struct CudaKv {
    layers: Vec<(DevBuf, DevBuf)>,
    block_size: usize,
    n_blocks: usize,
    kv_width: usize,
}

impl CudaKv {
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }
}

impl Backend for CudaBackend {
    type Buf = DevBuf;
    type Weight = DevLinear;
    type Vector = DevBuf;
    type Table = DevTable;
    type Meta = CudaMeta;
    type Kv = CudaKv;

    fn fence(&self) -> Result<()> {
        self.d().synchronize().map_err(dev_err)
    }

    fn heads(&self) -> Heads {
        self.heads
    }

    fn weight(&mut self, m: Mat) -> Result<DevLinear> {
        let d = &self.dev.dev;
        let l = upload_linear(d, self.opts.dtype, self.opts.quantized, m)?;
        if let DevLinear::Quant { .. } = l {
            let need = l.elements() * 2;
            if self.scratch.as_ref().is_none_or(|s| s.bytes() < need) {
                self.scratch = None;
                self.scratch = Some(DevBuf::zeroed(d, need).map_err(dev_err)?);
            }
        }
        self.weight_bytes += l.bytes();
        Ok(l)
    }

    fn out_features(w: &DevLinear) -> usize {
        w.n()
    }

    fn vector(&mut self, v: &[f32]) -> Result<DevBuf> {
        f32_buf(&self.dev.dev, v)
    }

    fn table(&mut self, m: Mat, vocab: Range<usize>) -> Result<DevTable> {
        match upload_linear(&self.dev.dev, self.opts.dtype, false, m)? {
            DevLinear::Dense { w, .. } => {
                self.weight_bytes += w.bytes();
                Ok(DevTable { w, vocab })
            }
            DevLinear::Quant { .. } => Err(Error::Cuda("a dense table came back quantized".into())),
        }
    }

    fn new_kv(&self, layers: usize, block_size: usize, n_blocks: usize) -> Result<CudaKv> {
        let kv_width = self.heads.kv_width();
        let bytes = n_blocks * block_size * kv_width * 2;
        let mut kv = Vec::with_capacity(layers);
        for _ in 0..layers {
            kv.push((
                DevBuf::zeroed(&self.dev.dev, bytes).map_err(dev_err)?,
                DevBuf::zeroed(&self.dev.dev, bytes).map_err(dev_err)?,
            ));
        }
        Ok(CudaKv {
            layers: kv,
            block_size,
            n_blocks,
            kv_width,
        })
    }

    fn alloc(&self, elem: Elem, len: usize) -> Result<DevBuf> {
        let size = match elem {
            Elem::F32 => 4,
            Elem::Act => 2,
        };
        DevBuf::zeroed(&self.dev.dev, len * size).map_err(dev_err)
    }

    fn new_meta(&self) -> Result<CudaMeta> {
        Ok(CudaMeta::default())
    }

    fn load_meta(&self, meta: &mut CudaMeta, step: &StepRows<'_>) -> Result<()> {
        let bs = step.block_size;
        if bs == 0 {
            return Err(Error::Shard(
                "the CUDA backend runs paged caches only".into(),
            ));
        }
        let n = step.rows.pos.len();
        let mut tables = Vec::new();
        let mut table_start = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut tile_items = Vec::with_capacity(step.items.len());
        let mut row = 0u32;
        for (&(tokens, start_pos, _), table) in step.items.iter().zip(step.tables) {
            let start = tables.len() as u32;
            tables.extend_from_slice(table);
            for k in 0..tokens.len() {
                let p = start_pos + k;
                table_start.push(start);
                slots.push(table[p / bs] * bs as u32 + (p % bs) as u32);
            }
            tile_items.push((row, tokens.len() as u32, start, start_pos as u32));
            row += tokens.len() as u32;
        }
        let tiles = ops::tiles_as_u32(&ops::prefill_tiles(tile_items));
        let pos: Vec<u32> = step.rows.pos.iter().map(|&p| p as u32).collect();
        let picked: Vec<u32> = step.picked.iter().map(|&r| r as u32).collect();
        let d = &self.dev.dev;
        meta.tokens.put(d, &step.rows.tokens)?;
        meta.pos.put(d, &pos)?;
        meta.slots.put(d, &slots)?;
        meta.tables.put(d, &tables)?;
        meta.table_start.put(d, &table_start)?;
        meta.tiles.put(d, &tiles)?;
        meta.picked_rows.put(d, &picked)?;
        meta.n_tiles = tiles.len() / 4;
        meta.picked = picked.len();
        meta.decode_only = step.items.iter().all(|i| i.0.len() == 1);
        Ok(())
    }

    fn before_step(&self, host: &dyn Collective) -> Result<()> {
        // NCCL cannot be interrupted from the host: peers of a rank that
        // failed before this step return here instead of waiting in NCCL.
        match self.tp.as_deref() {
            Some(TpGroup::Nccl(_)) if host.world_size() > 1 => host.barrier(),
            _ => Ok(()),
        }
    }

    fn upload(&self, buf: &mut DevBuf, data: &[f32]) -> Result<()> {
        buf.write(data).map_err(dev_err)
    }

    fn download(&self, buf: &DevBuf, len: usize) -> Result<Vec<f32>> {
        buf.read(len).map_err(dev_err)
    }

    fn embed(
        &self,
        table: &DevTable,
        meta: &CudaMeta,
        out: &mut DevBuf,
        rows: usize,
    ) -> Result<()> {
        let h = self.cols_of(table);
        // SAFETY: the table holds the local vocabulary × h; the meta's tokens
        // `rows` ids; the workspace's `out` at least rows × h f32.
        unsafe {
            ops::embed(
                self.d(),
                self.opts.dtype,
                table.w.ptr(),
                meta.tokens.ptr(),
                out.ptr(),
                rows,
                h,
                table.vocab.clone(),
            )
        }
        .map_err(dev_err)
    }

    fn add_positions(
        &self,
        _table: &DevTable,
        _meta: &CudaMeta,
        _x: &mut DevBuf,
        _rows: usize,
    ) -> Result<()> {
        Err(unsupported_on_cuda("learned position embeddings"))
    }

    fn layer_norm(
        &self,
        _x: &mut DevBuf,
        _residual: Option<&DevBuf>,
        _w: &DevBuf,
        _b: &DevBuf,
        _eps: f32,
        _out: &mut DevBuf,
        _rows: usize,
        _width: usize,
    ) -> Result<()> {
        Err(unsupported_on_cuda("LayerNorm"))
    }

    fn rms_norm(
        &self,
        x: &mut DevBuf,
        residual: Option<&DevBuf>,
        w: &DevBuf,
        eps: f32,
        out: &mut DevBuf,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        // SAFETY: the workspace sized x, residual (f32) and out (Act) for
        // `rows` rows of `width`; w holds `width` f32.
        unsafe {
            ops::rms_norm(
                self.d(),
                self.opts.dtype,
                x.ptr(),
                residual.map(DevBuf::ptr),
                w.ptr(),
                out.ptr(),
                rows,
                width,
                eps,
            )
        }
        .map_err(dev_err)
    }

    fn linear(
        &self,
        w: &DevLinear,
        x: &DevBuf,
        out: &mut DevBuf,
        out_elem: Elem,
        rows: usize,
    ) -> Result<()> {
        let (m, n, k) = (rows, w.n(), w.k());
        let f32_out = out_elem == Elem::F32;
        let size = if f32_out { 4 } else { 2 };
        if x.bytes() < m * k * 2 || out.bytes() < m * n * size {
            return Err(Error::Shard(format!(
                "a {n}×{k} weight on {m} rows met buffers of {} and {} bytes",
                x.bytes(),
                out.bytes()
            )));
        }
        let d = self.d();
        let t = self.opts.dtype;
        let gemm = |b: DevPtr| -> Result<()> {
            d.gemm(&Gemm {
                a: x.ptr(),
                lda: k,
                b,
                c: out.ptr(),
                m,
                n,
                k,
                dtype: t,
                c_f32: f32_out,
                accumulate: false,
            })
            .map_err(dev_err)
        };
        match w {
            DevLinear::Dense { w, .. } => gemm(w.ptr()),
            DevLinear::Quant { w, f, .. } => {
                if m <= ops::QMV_MAX_ROWS as usize {
                    // SAFETY: w holds n × k/32 blocks; x and out were checked
                    // above for m rows.
                    unsafe {
                        ops::qmv(d, t, *f, w.ptr(), x.ptr(), k, out.ptr(), f32_out, (m, n, k))
                    }
                    .map_err(dev_err)
                } else {
                    let scratch = self
                        .scratch
                        .as_ref()
                        .ok_or_else(|| Error::Shard("a quantized shard without scratch".into()))?;
                    // SAFETY: the scratch holds the largest quantized matrix in `t`.
                    unsafe { ops::dequantize(d, t, *f, w.ptr(), scratch.ptr(), n * k / 32) }
                        .map_err(dev_err)?;
                    gemm(scratch.ptr())
                }
            }
        }
    }

    fn add_bias(
        &self,
        x: &mut DevBuf,
        bias: &DevBuf,
        rows: usize,
        width: usize,
        elem: Elem,
    ) -> Result<()> {
        if elem == Elem::F32 {
            return Err(unsupported_on_cuda(
                "biases after the row-parallel matrices",
            ));
        }
        // SAFETY: x holds `rows` rows of `width` (Act), bias `width` f32.
        unsafe { ops::add_bias(self.d(), self.opts.dtype, x.ptr(), bias.ptr(), rows, width) }
            .map_err(dev_err)
    }

    fn head_norm(
        &self,
        qkv: &mut DevBuf,
        q_w: &DevBuf,
        k_w: &DevBuf,
        eps: f32,
        rows: usize,
    ) -> Result<()> {
        let hd = self.heads;
        // SAFETY: qkv holds `rows` fused rows (Act); the weights `head_dim` f32.
        unsafe {
            ops::head_norm(
                self.d(),
                self.opts.dtype,
                qkv.ptr(),
                (q_w.ptr(), k_w.ptr()),
                rows,
                hd.qkv_width(),
                (hd.n_heads, hd.n_kv),
                hd.head_dim,
                eps,
            )
        }
        .map_err(dev_err)
    }

    fn rope(&self, qkv: &mut DevBuf, meta: &CudaMeta, rows: usize, _windowed: bool) -> Result<()> {
        // Windowed layers with a rope of their own are refused at load.
        let hd = self.heads;
        // SAFETY: qkv holds `rows` fused rows; the meta's positions `rows`
        // u32 below the context the tables cover.
        unsafe {
            ops::rope(
                self.d(),
                self.opts.dtype,
                qkv.ptr(),
                meta.pos.ptr(),
                (self.cos.ptr(), self.sin.ptr()),
                rows,
                hd.qkv_width(),
                hd.n_heads + hd.n_kv,
                hd.head_dim,
                self.neox,
            )
        }
        .map_err(dev_err)
    }

    fn gated_act(
        &self,
        gate_up: &DevBuf,
        out: &mut DevBuf,
        rows: usize,
        width: usize,
        act: Activation,
    ) -> Result<()> {
        if act != Activation::Silu {
            return Err(unsupported_on_cuda("a GELU-gated FFN"));
        }
        // SAFETY: gate_up holds rows × 2·width, out rows × width (Act).
        unsafe {
            ops::silu_mul(
                self.d(),
                self.opts.dtype,
                gate_up.ptr(),
                out.ptr(),
                rows,
                width,
            )
        }
        .map_err(dev_err)
    }

    fn act(
        &self,
        _x: &DevBuf,
        _out: &mut DevBuf,
        _rows: usize,
        _width: usize,
        _act: Activation,
    ) -> Result<()> {
        Err(unsupported_on_cuda("an ungated FFN"))
    }

    fn scale(&self, _x: &mut DevBuf, _s: f32, _len: usize) -> Result<()> {
        Err(unsupported_on_cuda("scaled embeddings"))
    }

    fn rms_norm_f32(
        &self,
        _x: &mut DevBuf,
        _w: &DevBuf,
        _eps: f32,
        _rows: usize,
        _width: usize,
    ) -> Result<()> {
        Err(unsupported_on_cuda("norms after attention and FFN"))
    }

    fn softcap(&self, _x: &mut DevBuf, _cap: f32, _len: usize) -> Result<()> {
        Err(unsupported_on_cuda("soft-capped logits"))
    }

    fn add(&self, x: &mut DevBuf, delta: &DevBuf, len: usize) -> Result<()> {
        // SAFETY: x and delta hold at least `len` f32.
        unsafe { ops::add_f32(self.d(), x.ptr(), delta.ptr(), len) }.map_err(dev_err)
    }

    fn gather_rows(
        &self,
        x: &DevBuf,
        meta: &CudaMeta,
        out: &mut DevBuf,
        width: usize,
    ) -> Result<()> {
        // SAFETY: the meta's picked rows are row indices of x; out holds
        // that many rows of `width` f32.
        unsafe {
            ops::gather_rows_f32(
                self.d(),
                x.ptr(),
                meta.picked_rows.ptr(),
                out.ptr(),
                meta.picked,
                width,
            )
        }
        .map_err(dev_err)
    }

    fn all_reduce(&self, buf: &mut DevBuf, len: usize, host: &dyn Collective) -> Result<()> {
        let Some(tp) = &self.tp else { return Ok(()) };
        if host.world_size() == 1 {
            return Ok(());
        }
        let d = &self.dev.dev;
        let rank = host.rank();
        match &**tp {
            TpGroup::SameDevice(slots) => {
                let mut sum = self
                    .sum
                    .lock()
                    .map_err(|_| Error::Collective("poisoned scratch".into()))?;
                let sum = sum.reserve(d, len * 4)?;
                // Our partial sum must be complete before peers read it.
                d.synchronize().map_err(dev_err)?;
                slots.publish(rank, buf.ptr())?;
                host.barrier()?;
                let peers = slots.read()?;
                d.zero(sum, len * 4).map_err(dev_err)?;
                for &p in &peers {
                    // SAFETY: every peer's buffer holds `len` f32 on this GPU
                    // and stays untouched until the barrier below.
                    unsafe { ops::add_f32(&**d, sum, p, len) }.map_err(dev_err)?;
                }
                d.synchronize().map_err(dev_err)?;
                // Nobody may overwrite its buffer before every rank has read it.
                host.barrier()?;
                d.copy(buf.ptr(), sum, len * 4).map_err(dev_err)
            }
            TpGroup::Nccl(group) => {
                let gpu = self
                    .dev
                    .gpu
                    .as_ref()
                    .ok_or_else(|| Error::Cuda("NCCL needs a real GPU device".into()))?;
                // SAFETY: buf holds len f32 on this rank's GPU.
                unsafe { group.all_reduce_sum_f32(rank, gpu, buf.ptr(), len) }.map_err(dev_err)
            }
        }
    }
}

impl CudaBackend {
    fn cols_of(&self, table: &DevTable) -> usize {
        table.w.bytes() / 2 / table.vocab.len().max(1)
    }
}

impl KvCache<CudaBackend> for CudaKv {
    fn attend(
        &mut self,
        be: &CudaBackend,
        layer: usize,
        qkv: &DevBuf,
        meta: &CudaMeta,
        out: &mut DevBuf,
        rows: usize,
        params: &AttnParams,
    ) -> Result<()> {
        if params.window > 0 || params.softcap > 0.0 {
            return Err(unsupported_on_cuda(
                "sliding-window or soft-capped attention",
            ));
        }
        let (d, t, hd) = (be.d(), be.opts.dtype, be.heads);
        let (kc, vc) = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Shard(format!("no KV layer {layer}")))?;
        // SAFETY: qkv holds `rows` fused rows; the meta's slots, tables and
        // tiles were built for this step from tables the caller checked
        // against this cache's blocks; out holds rows × q_width (Act).
        unsafe {
            ops::kv_write(
                d,
                t,
                qkv.ptr(),
                (kc.ptr(), vc.ptr()),
                meta.slots.ptr(),
                rows,
                hd.qkv_width(),
                hd.q_width(),
                hd.kv_width(),
            )
            .map_err(dev_err)?;
            let a = AttnArgs {
                q: qkv.ptr(),
                q_stride: hd.qkv_width(),
                k_cache: kc.ptr(),
                v_cache: vc.ptr(),
                tables: meta.tables.ptr(),
                out: out.ptr(),
                n_heads: hd.n_heads,
                n_kv_heads: hd.n_kv,
                head_dim: hd.head_dim,
                block_size: self.block_size,
                scale: params.scale,
            };
            if meta.decode_only {
                ops::attn_decode(d, t, &a, meta.table_start.ptr(), meta.pos.ptr(), rows)
            } else {
                ops::attn_prefill(d, t, &a, meta.tiles.ptr(), meta.n_tiles)
            }
        }
        .map_err(dev_err)
    }
}

impl PagedKv<CudaBackend> for CudaKv {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    fn n_layers(&self) -> usize {
        self.layers.len()
    }

    fn elem_bytes(&self) -> usize {
        2
    }

    fn copy_block(&mut self, be: &CudaBackend, src: u32, dst: u32) -> Result<()> {
        if src as usize >= self.n_blocks || dst as usize >= self.n_blocks {
            return Err(Error::Shard(format!(
                "block copy {src} → {dst} outside a {}-block cache",
                self.n_blocks
            )));
        }
        let row = self.block_size * self.kv_width * 2;
        let (s, d) = (src as usize * row, dst as usize * row);
        for (k, v) in &self.layers {
            be.d().copy(k.at(d), k.at(s), row).map_err(dev_err)?;
            be.d().copy(v.at(d), v.at(s), row).map_err(dev_err)?;
        }
        Ok(())
    }
}

/// One tensor-parallel shard of a pipeline stage, on one device, with its
/// paged KV cache and workspace.
pub type CudaShard = StageShard<CudaBackend>;

impl StageShard<CudaBackend> {
    /// Loads the shard `s` describes onto `dev` (its `node` and `format` are
    /// the engine's and the CPU's concerns, not read here). Ranks of one
    /// stage with `world_size > 1` share one `tp` group. The workspace is
    /// sized for `s.max_batch_tokens` rows and grows if a step needs more.
    pub fn load(
        s: ShardSource<'_>,
        dev: DeviceHandle,
        opts: CudaOptions,
        tp: Option<Arc<TpGroup>>,
    ) -> Result<Self> {
        let (config, mats) = s.mats()?;
        let backend = CudaBackend::new(&config, &mats.layout, dev, opts, tp)?;
        let model = Transformer::new(backend, config, mats, s.layers.clone())?;
        StageShard::new(model, s.kv, s.max_batch_tokens)
    }

    /// Device bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        self.model.backend().weight_bytes
    }

    /// Device bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }
}

impl SharedSlots {
    fn publish(&self, rank: usize, ptr: DevPtr) -> Result<()> {
        let mut s = self
            .slots
            .lock()
            .map_err(|_| Error::Collective("poisoned slots".into()))?;
        *s.get_mut(rank)
            .ok_or_else(|| Error::Collective(format!("rank {rank} outside the group")))? = ptr;
        Ok(())
    }

    fn read(&self) -> Result<Vec<DevPtr>> {
        Ok(self
            .slots
            .lock()
            .map_err(|_| Error::Collective("poisoned slots".into()))?
            .clone())
    }
}

fn f32_buf(d: &Arc<dyn Device>, v: &[f32]) -> Result<DevBuf> {
    DevBuf::from_slice(d, v).map_err(dev_err)
}

/// Puts a weight matrix on the device: GGUF blocks the kernels read stay
/// blocks if `quantized`, else are dequantized there; everything else is
/// converted on the host.
fn upload_linear(d: &Arc<dyn Device>, t: Dtype, quantized: bool, m: Mat) -> Result<DevLinear> {
    let (n, k) = (m.rows(), m.cols());
    if let (Some(f), Mat::Quant { bytes, .. }) = (qformat(&m), &m) {
        let blocks = DevBuf::from_bytes(d, bytes).map_err(dev_err)?;
        if quantized {
            return Ok(DevLinear::Quant { w: blocks, f, n, k });
        }
        let w = DevBuf::zeroed(d, n * k * 2).map_err(dev_err)?;
        // SAFETY: `blocks` holds n·k/32 blocks; `w` n·k 16-bit values.
        unsafe { ops::dequantize(&**d, t, f, blocks.ptr(), w.ptr(), n * k / 32) }
            .map_err(dev_err)?;
        d.synchronize().map_err(dev_err)?;
        return Ok(DevLinear::Dense { w, n, k });
    }
    let Mat::F32 { data, .. } = m.to_f32()? else {
        return Err(Error::Cuda("to_f32 returned blocks".into()));
    };
    let bits: Vec<u16> = {
        use rayon::prelude::*;
        data.par_iter().map(|&v| t.from_f32(v)).collect()
    };
    let w = DevBuf::from_slice(d, &bits).map_err(dev_err)?;
    Ok(DevLinear::Dense { w, n, k })
}

#[cfg(test)]
mod tests {
    //! The backend on the host emulation of a GPU, against the CPU backend.
    use super::*;
    use crate::collective::{SingleCollective, ThreadCollective};
    use crate::family::Arch;
    use crate::kv::KvPool;
    use crate::model::{LogitsWanted, PagedItem, StageInput, StageOutput};
    use crate::shard::ShardSpec;
    use crate::Logits;
    use crate::{LlamaShard, WeightFormat};

    /// Small, with head_dim 32 (the CUDA attention's granularity) and GQA,
    /// as a model of family `arch` (synthetic weights give its biases and
    /// q/k norms as ones).
    fn config_of(arch: Arch) -> ModelConfig {
        let mut c = ModelConfig::synthetic("tiny32").unwrap();
        c.arch = arch;
        c.rope.style = arch.family().rope_style();
        assert_eq!(
            (c.head_dim, c.n_heads, c.n_kv_heads, c.vocab),
            (32, 4, 2, 384)
        );
        c
    }

    /// The emulated GPU; `None` only where no C++ compiler exists and
    /// `PARALLM_SKIP_EMULATION=1` asks to skip (without it, no compiler fails
    /// the test). A compiler that fails on the kernels fails the test.
    fn emulated() -> Option<DeviceHandle> {
        if !kernels::cuda::emu::available_for_tests() {
            return None;
        }
        Some(DeviceHandle::emulated().unwrap_or_else(|e| panic!("{e}")))
    }

    fn cuda_shard(
        dev: DeviceHandle,
        dtype: Dtype,
        spec: ShardSpec,
        tp: Option<Arc<TpGroup>>,
    ) -> CudaShard {
        family_shard(dev, dtype, spec, tp, Arch::Llama)
    }

    fn family_shard(
        dev: DeviceHandle,
        dtype: Dtype,
        spec: ShardSpec,
        tp: Option<Arc<TpGroup>>,
        arch: Arch,
    ) -> CudaShard {
        let c = config_of(arch);
        CudaShard::load(
            ShardSource {
                file: None,
                seed: 11,
                layers: 0..c.n_layers,
                config: c,
                spec,
                format: WeightFormat::F32,
                kv: (4, 16),
                max_batch_tokens: 0,
                node: 0,
            },
            dev,
            CudaOptions {
                dtype,
                quantized: false,
            },
            tp,
        )
        .unwrap()
    }

    /// One item of a step: new tokens, start position, block table.
    type StepRow = (Vec<u32>, usize, Vec<u32>);

    /// The steps every comparison runs: two prompts in one prefill step
    /// (scattered block tables), then three decode steps of both.
    fn steps() -> Vec<Vec<StepRow>> {
        let t0 = vec![9, 2, 14, 5];
        let t1 = vec![3, 11];
        let mut s = vec![vec![
            ((0..7).map(|i| (i * 37 + 5) % 384).collect(), 0, t0.clone()),
            (vec![1, 200, 77], 0, t1.clone()),
        ]];
        for k in 0..3u32 {
            s.push(vec![
                (vec![(k * 91 + 13) % 384], 7 + k as usize, t0.clone()),
                (vec![(k * 53 + 201) % 384], 3 + k as usize, t1.clone()),
            ]);
        }
        s
    }

    fn items(step: &[(Vec<u32>, usize, Vec<u32>)]) -> Vec<PagedItem<'_>> {
        step.iter()
            .map(|(t, start, table)| PagedItem {
                tokens: t,
                start: *start,
                table,
                logits: LogitsWanted::Last,
            })
            .collect()
    }

    fn cpu_logits() -> Vec<Logits> {
        family_cpu_logits(Arch::Llama)
    }

    fn family_cpu_logits(arch: Arch) -> Vec<Logits> {
        let c = config_of(arch);
        let cpu = LlamaShard::synthetic(c, 11, ShardSpec::SINGLE, WeightFormat::F32).unwrap();
        let mut pool: KvPool = cpu.new_pool(4, 16);
        steps()
            .iter()
            .map(|s| {
                match cpu
                    .forward_paged(&items(s), StageInput::Tokens, &mut pool, &SingleCollective)
                    .unwrap()
                {
                    StageOutput::Logits(l) => l,
                    StageOutput::Hidden(_) | StageOutput::OnRoot => {
                        panic!("a whole model of one rank returns logits")
                    }
                }
            })
            .collect()
    }

    /// Each step's logits; `None` on a rank other than 0 (the logits go to
    /// rank 0 only).
    fn run_ranked(shard: &mut CudaShard, collective: &dyn Collective) -> Vec<Option<Logits>> {
        steps()
            .iter()
            .map(|s| {
                match shard
                    .forward_paged(&items(s), StageInput::Tokens, collective)
                    .unwrap()
                {
                    StageOutput::Logits(l) => Some(l),
                    StageOutput::OnRoot => None,
                    StageOutput::Hidden(_) => panic!("a whole model returns logits"),
                }
            })
            .collect()
    }

    fn run(shard: &mut CudaShard, collective: &dyn Collective) -> Vec<Logits> {
        run_ranked(shard, collective)
            .into_iter()
            .map(|l| l.expect("rank 0 gets the logits"))
            .collect()
    }

    fn argmax(v: &[f32]) -> usize {
        (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
    }

    /// Same argmax and logits within `tol` of the logits' scale.
    fn assert_close(got: &[Logits], want: &[Logits], tol: f32) {
        for (step, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.item_rows, w.item_rows);
            assert_eq!(g.data.len(), w.data.len());
            let scale = w.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = g
                .data
                .iter()
                .zip(&w.data)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= tol * scale,
                "step {step}: max diff {worst} vs scale {scale}"
            );
            for r in 0..w.data.len() / w.vocab {
                assert_eq!(argmax(g.row(r)), argmax(w.row(r)), "step {step} row {r}");
            }
        }
    }

    #[test]
    fn emulated_backend_matches_the_cpu_backend() {
        let Some(dev) = emulated() else { return };
        let want = cpu_logits();
        // f16 keeps 11 significant bits: 2% of the logits' scale bounds the
        // drift through two layers of 16-bit activations.
        let mut f16 = cuda_shard(dev.clone(), Dtype::F16, ShardSpec::SINGLE, None);
        assert_close(&run(&mut f16, &SingleCollective), &want, 0.02);
        // bf16 keeps 8 bits: a looser bound, same argmax.
        let mut bf16 = cuda_shard(dev, Dtype::Bf16, ShardSpec::SINGLE, None);
        assert_close(&run(&mut bf16, &SingleCollective), &want, 0.08);
    }

    #[test]
    fn emulated_backend_runs_every_family_like_the_cpu_backend() {
        let Some(dev) = emulated() else { return };
        // Qwen2's q/k/v biases, Qwen3's q/k norms, NeoX rope, Phi-3's fused
        // gate|up: the same loop on both backends.
        for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Phi3] {
            let want = family_cpu_logits(arch);
            let mut f16 = family_shard(dev.clone(), Dtype::F16, ShardSpec::SINGLE, None, arch);
            assert_close(&run(&mut f16, &SingleCollective), &want, 0.02);
        }
    }

    #[test]
    fn a_family_the_kernels_cannot_run_is_refused_by_name() {
        let Some(dev) = emulated() else { return };
        // Phi-4-mini's partial rotary embedding too.
        let mut partial = config_of(Arch::Phi3);
        partial.rope.rot_dims = Some(partial.head_dim / 2);
        let configs = [Arch::Gemma2, Arch::Gemma3, Arch::Gpt2]
            .map(config_of)
            .into_iter()
            .chain([partial]);
        for c in configs {
            let arch = c.arch;
            let layout = crate::shard::ShardLayout::new(&c, ShardSpec::SINGLE).unwrap();
            let opts = CudaOptions {
                dtype: Dtype::F16,
                quantized: false,
            };
            let err = CudaBackend::new(&c, &layout, dev.clone(), opts, None)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains(arch.name()) && err.contains("CUDA backend does not run"),
                "{err}"
            );
        }
    }

    #[test]
    fn emulated_tensor_parallel_ranks_on_one_device_match_one_rank() {
        let Some(dev) = emulated() else { return };
        let mut one = cuda_shard(dev, Dtype::F16, ShardSpec::SINGLE, None);
        let want = run(&mut one, &SingleCollective);
        let tp = 2;
        let group = Arc::new(TpGroup::SameDevice(SharedSlots::new(tp)));
        let collectives = ThreadCollective::group(tp);
        let results: Vec<Vec<Option<Logits>>> = std::thread::scope(|s| {
            let handles: Vec<_> = collectives
                .iter()
                .enumerate()
                .map(|(rank, coll)| {
                    let group = group.clone();
                    s.spawn(move || {
                        // Each rank its own stream on the shared (emulated) GPU.
                        let dev = DeviceHandle::emulated().unwrap();
                        let mut shard = cuda_shard(
                            dev,
                            Dtype::F16,
                            ShardSpec::new(rank, tp).unwrap(),
                            Some(group),
                        );
                        run_ranked(&mut shard, coll)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The logits go to rank 0 only.
        for r in &results[1..] {
            assert!(r.iter().all(Option::is_none));
        }
        let rank0: Vec<Logits> = results[0]
            .iter()
            .map(|l| l.clone().expect("rank 0 gets the logits"))
            .collect();
        // Partial sums round differently in 16 bits; 2% of the scale.
        assert_close(&rank0, &want, 0.02);
    }

    #[test]
    fn copy_block_copies_every_layer() {
        let Some(dev) = emulated() else { return };
        let mut s = cuda_shard(dev, Dtype::F16, ShardSpec::SINGLE, None);
        run(&mut s, &SingleCollective);
        let row = s.kv.block_size * s.kv.kv_width * 2;
        s.copy_block(9, 1).unwrap();
        for (k, v) in &s.kv.layers {
            let (kb, vb): (Vec<u8>, Vec<u8>) =
                (k.read(k.bytes()).unwrap(), v.read(v.bytes()).unwrap());
            assert_eq!(kb[row..2 * row], kb[9 * row..10 * row]);
            assert_eq!(vb[row..2 * row], vb[9 * row..10 * row]);
            assert!(
                kb[9 * row..10 * row].iter().any(|&b| b != 0),
                "block 9 holds keys"
            );
        }
    }

    /// A GPU that is not there: on a machine without CUDA a missing
    /// library, on one with GPUs an ordinal past the last; either way an
    /// error, on every machine.
    #[test]
    fn a_missing_gpu_is_an_error_not_a_panic() {
        let err = DeviceHandle::gpu(4096).err().expect("no GPU 4096 here");
        assert!(matches!(err, Error::Cuda(_)), "{err}");
        assert!(err.to_string().len() > 20, "{err}");
    }
}
