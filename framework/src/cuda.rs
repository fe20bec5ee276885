//! The CUDA backend: one tensor-parallel shard of a pipeline stage, its
//! weights and paged KV cache in device memory, computed through a
//! [`kernels::cuda::Device`] (one stream on one GPU, or the host emulation in
//! tests).
//!
//! It runs the same step as the CPU backend ([`crate::LlamaShard::forward_paged`])
//! over the same inputs ([`PagedItem`] block tables from the scheduler's
//! [`crate::kv::KvManager`]), so the actors drive either one:
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
//! * tensor-parallel sums go through a [`TpGroup`]: NCCL between GPUs, or a
//!   device-memory collective where the ranks share one GPU;
//! * the logits come back to the host f32, gathered across ranks by the host
//!   collective (the merger samples on the host).
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

use crate::collective::Collective;
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{self, PagedItem, ShardMats, StageInput, StageOutput, WeightSource};
use crate::ops::RopeTable;
use crate::shard::{ShardLayout, ShardSpec};
use crate::weights::Mat;
use crate::Logits;

fn dev_err(e: kernels::cuda::Error) -> Error {
    Error::Cuda(e.to_string())
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
}

/// A weight matrix on the device.
enum DevLinear {
    /// `n × k` in the backend's type.
    Dense { w: DevBuf, n: usize, k: usize },
    /// `n × k` as GGUF blocks.
    Quant {
        w: DevBuf,
        f: QFormat,
        n: usize,
        k: usize,
    },
}

impl DevLinear {
    fn n(&self) -> usize {
        match self {
            DevLinear::Dense { n, .. } | DevLinear::Quant { n, .. } => *n,
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

struct Block {
    attn_norm: DevBuf,
    qkv: DevLinear,
    o: DevLinear,
    ffn_norm: DevBuf,
    gate_up: DevLinear,
    down: DevLinear,
}

/// One tensor-parallel shard of a pipeline stage, on one device.
pub struct CudaShard {
    config: LlamaConfig,
    layout: ShardLayout,
    layers: Range<usize>,
    opts: CudaOptions,
    dev: DeviceHandle,
    embed: Option<DevBuf>,
    blocks: Vec<Block>,
    head: Option<(DevBuf, DevLinear)>,
    cos: DevBuf,
    sin: DevBuf,
    /// Per layer: keys and values, `n_blocks · block_size × kv_width`.
    kv: Vec<(DevBuf, DevBuf)>,
    block_size: usize,
    n_blocks: usize,
    /// Dequantized weights for large steps of a quantized shard.
    scratch: Option<DevBuf>,
    tp: Option<Arc<TpGroup>>,
}

impl std::fmt::Debug for CudaShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaShard(rank {}/{}, layers {:?}, {} on {})",
            self.layout.spec.rank,
            self.layout.spec.world_size,
            self.layers,
            self.opts.dtype,
            self.dev.name()
        )
    }
}

/// Where a shard's weights come from and what it holds.
pub struct CudaShardSpec<'a> {
    /// The model file, or `None` for seeded synthetic weights.
    pub file: Option<&'a GgufFile>,
    /// The model's shape (from the file, or the synthetic shape).
    pub config: LlamaConfig,
    /// Seed of synthetic weights.
    pub seed: u64,
    /// The tensor-parallel rank.
    pub spec: ShardSpec,
    /// The pipeline stage's layers.
    pub layers: Range<usize>,
    /// KV cache: positions per block and blocks.
    pub kv: (usize, usize),
}

impl CudaShard {
    /// Loads a shard onto `dev`. Ranks of one stage with `world_size > 1`
    /// share one `tp` group.
    pub fn load(
        s: CudaShardSpec<'_>,
        dev: DeviceHandle,
        opts: CudaOptions,
        tp: Option<Arc<TpGroup>>,
    ) -> Result<Self> {
        let config = s.config.clone();
        config.validate()?;
        if s.spec.world_size > 1 && tp.is_none() {
            return Err(Error::Shard(
                "a tensor-parallel CUDA shard needs its stage's TpGroup".into(),
            ));
        }
        let src = match s.file {
            Some(f) => WeightSource::Gguf(f),
            None => WeightSource::Synthetic { seed: s.seed },
        };
        let hd = config.head_dim();
        if !hd.is_multiple_of(32) || hd > ops::MAX_HEAD_DIM as usize {
            return Err(Error::Config(format!(
                "the CUDA attention kernels take head dimensions that are multiples of 32 up to {}; this model's is {hd}",
                ops::MAX_HEAD_DIM
            )));
        }
        let mats = ShardMats::build(&config, &src, s.spec, s.layers.clone())?;
        let d = &dev.dev;
        let t = opts.dtype;
        let mut largest_quant = 0usize;
        let mut linear = |m: Mat| -> Result<DevLinear> {
            let l = upload_linear(d, t, opts.quantized, m)?;
            if let DevLinear::Quant { .. } = l {
                largest_quant = largest_quant.max(l.elements());
            }
            Ok(l)
        };
        let embed = match mats.embed {
            Some(m) => match upload_linear(d, t, false, m)? {
                DevLinear::Dense { w, .. } => Some(w),
                DevLinear::Quant { .. } => unreachable!("dense requested"),
            },
            None => None,
        };
        let head = match mats.head {
            Some((norm, m)) => Some((f32_buf(d, &norm)?, linear(m)?)),
            None => None,
        };
        let mut blocks = Vec::with_capacity(mats.blocks.len());
        for b in mats.blocks {
            blocks.push(Block {
                attn_norm: f32_buf(d, &b.attn_norm)?,
                qkv: linear(b.qkv)?,
                o: linear(b.o)?,
                ffn_norm: f32_buf(d, &b.ffn_norm)?,
                gate_up: linear(b.gate_up)?,
                down: linear(b.down)?,
            });
        }
        let scratch = if largest_quant > 0 {
            Some(DevBuf::zeroed(d, largest_quant * 2).map_err(dev_err)?)
        } else {
            None
        };
        let rope = RopeTable::new(hd, config.rope_base, config.context);
        let (cos, sin) = rope.tables();
        let (block_size, n_blocks) = s.kv;
        let kv_width = mats.layout.kv_heads.len() * hd;
        let kv_bytes = n_blocks * block_size * kv_width * 2;
        let mut kv = Vec::with_capacity(blocks.len());
        for _ in 0..blocks.len() {
            kv.push((
                DevBuf::zeroed(d, kv_bytes).map_err(dev_err)?,
                DevBuf::zeroed(d, kv_bytes).map_err(dev_err)?,
            ));
        }
        Ok(Self {
            cos: f32_buf(d, cos)?,
            sin: f32_buf(d, sin)?,
            config,
            layout: mats.layout,
            layers: s.layers,
            opts,
            dev,
            embed,
            blocks,
            head,
            kv,
            block_size,
            n_blocks,
            scratch,
            tp,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// This shard's layers.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Device bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &DevLinear| l.bytes();
        self.blocks
            .iter()
            .map(|b| lin(&b.qkv) + lin(&b.o) + lin(&b.gate_up) + lin(&b.down))
            .sum::<usize>()
            + self.head.as_ref().map_or(0, |(_, l)| lin(l))
            + self.embed.as_ref().map_or(0, DevBuf::bytes)
    }

    /// Device bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().map(|(k, v)| k.bytes() + v.bytes()).sum()
    }

    fn kv_width(&self) -> usize {
        self.layout.kv_heads.len() * self.config.head_dim()
    }

    /// Copies KV block `src` to `dst` in every layer (copy-on-write forks).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let row = self.block_size * self.kv_width() * 2;
        let (s, d) = (src as usize * row, dst as usize * row);
        for (k, v) in &self.kv {
            self.dev.dev.copy(k.at(d), k.at(s), row).map_err(dev_err)?;
            self.dev.dev.copy(v.at(d), v.at(s), row).map_err(dev_err)?;
        }
        Ok(())
    }

    /// One step of this stage over the paged KV cache; see
    /// [`crate::LlamaShard::forward_paged`]. `collective` is the host
    /// collective of this stage's ranks (barriers, the logits' gather).
    pub fn forward_paged(
        &mut self,
        items: &[PagedItem<'_>],
        input: StageInput,
        collective: &dyn Collective,
    ) -> Result<StageOutput> {
        let c = self.config.clone();
        let shapes: Vec<_> = items
            .iter()
            .map(|i| (i.tokens, i.start, i.logits))
            .collect();
        let rows = model::step_rows(&c, &shapes)?;
        let n = rows.pos.len();
        model::check_tables(items, self.block_size, self.n_blocks)?;
        let d = self.dev.dev.clone();
        let t = self.opts.dtype;
        let (h, hd) = (c.hidden, c.head_dim());
        let (n_heads, n_kv) = (self.layout.heads.len(), self.layout.kv_heads.len());
        let (q_w, kv_w) = (n_heads * hd, n_kv * hd);
        let qkv_w = q_w + 2 * kv_w;
        let ffn = self.layout.ffn.len();

        // Step metadata.
        let mut tables = Vec::new();
        let mut table_start = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut tile_items = Vec::new();
        let mut row = 0u32;
        for item in items {
            let start = tables.len() as u32;
            tables.extend_from_slice(item.table);
            for k in 0..item.tokens.len() {
                let p = item.start + k;
                table_start.push(start);
                slots.push(
                    item.table[p / self.block_size] * self.block_size as u32
                        + (p % self.block_size) as u32,
                );
            }
            tile_items.push((row, item.tokens.len() as u32, start, item.start as u32));
            row += item.tokens.len() as u32;
        }
        let decode_only = items.iter().all(|i| i.tokens.len() == 1);
        let tiles = ops::tiles_as_u32(&ops::prefill_tiles(tile_items));
        let pos: Vec<u32> = rows.pos.iter().map(|&p| p as u32).collect();
        let up = |v: &[u32]| {
            DevBuf::from_slice(&d, if v.is_empty() { &[0u32][..] } else { v }).map_err(dev_err)
        };
        let (pos_b, slots_b, tables_b, tstart_b, tiles_b) = (
            up(&pos)?,
            up(&slots)?,
            up(&tables)?,
            up(&table_start)?,
            up(&tiles)?,
        );

        let f32b = |len: usize| DevBuf::zeroed(&d, len * 4).map_err(dev_err);
        let hb = |len: usize| DevBuf::zeroed(&d, len * 2).map_err(dev_err);
        // The same-GPU collective's sum, one per step (every all-reduce is n × h).
        let sum = match self.tp.as_deref() {
            Some(TpGroup::SameDevice(_)) if collective.world_size() > 1 => Some(f32b(n * h)?),
            _ => None,
        };
        let x = match input {
            StageInput::Tokens => {
                let table = self.embed.as_ref().ok_or_else(|| {
                    Error::Shard("only the first pipeline stage embeds tokens".into())
                })?;
                let x = f32b(n * h)?;
                let tok = up(&rows.tokens)?;
                // SAFETY: the table holds the local vocabulary × h; tok n
                // tokens; x n × h f32.
                unsafe {
                    ops::embed(
                        &*d,
                        t,
                        table.ptr(),
                        tok.ptr(),
                        x.ptr(),
                        n,
                        h,
                        self.layout.vocab.clone(),
                    )
                }
                .map_err(dev_err)?;
                self.all_reduce(&x, n * h, sum.as_ref(), collective)?;
                x
            }
            StageInput::Hidden(v) => {
                if v.len() != n * h {
                    return Err(Error::Shard(format!(
                        "stage input holds {} floats, expected {n} rows of {h}",
                        v.len()
                    )));
                }
                DevBuf::from_slice(&d, &v).map_err(dev_err)?
            }
        };
        let normed = hb(n * h)?;
        let qkv = hb(n * qkv_w)?;
        let attn = hb(n * q_w)?;
        let gu = hb(n * 2 * ffn)?;
        let act = hb(n * ffn)?;
        let delta = f32b(n * h)?;
        let mut pending = false;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, b) in self.blocks.iter().enumerate() {
            let delta_ptr = pending.then(|| delta.ptr());
            // SAFETY (this block): every buffer was sized above for n rows of
            // its width; the weights match the layout they were cut for.
            unsafe {
                ops::rms_norm(
                    &*d,
                    t,
                    x.ptr(),
                    delta_ptr,
                    b.attn_norm.ptr(),
                    normed.ptr(),
                    n,
                    h,
                    c.rms_eps,
                )
                .map_err(dev_err)?;
                self.linear(&b.qkv, normed.ptr(), h, qkv.ptr(), false, n, h)?;
                ops::rope(
                    &*d,
                    t,
                    qkv.ptr(),
                    pos_b.ptr(),
                    (self.cos.ptr(), self.sin.ptr()),
                    n,
                    qkv_w,
                    n_heads + n_kv,
                    hd,
                )
                .map_err(dev_err)?;
                let (kc, vc) = &self.kv[l];
                ops::kv_write(
                    &*d,
                    t,
                    qkv.ptr(),
                    (kc.ptr(), vc.ptr()),
                    slots_b.ptr(),
                    n,
                    qkv_w,
                    q_w,
                    kv_w,
                )
                .map_err(dev_err)?;
                let a = AttnArgs {
                    q: qkv.ptr(),
                    q_stride: qkv_w,
                    k_cache: kc.ptr(),
                    v_cache: vc.ptr(),
                    tables: tables_b.ptr(),
                    out: attn.ptr(),
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim: hd,
                    block_size: self.block_size,
                    scale,
                };
                if decode_only {
                    ops::attn_decode(&*d, t, &a, tstart_b.ptr(), pos_b.ptr(), n)
                        .map_err(dev_err)?;
                } else {
                    ops::attn_prefill(&*d, t, &a, tiles_b.ptr(), tiles.len() / 4)
                        .map_err(dev_err)?;
                }
                self.linear(&b.o, attn.ptr(), q_w, delta.ptr(), true, n, q_w)?;
            }
            self.all_reduce(&delta, n * h, sum.as_ref(), collective)?;
            // SAFETY: as above.
            unsafe {
                ops::rms_norm(
                    &*d,
                    t,
                    x.ptr(),
                    Some(delta.ptr()),
                    b.ffn_norm.ptr(),
                    normed.ptr(),
                    n,
                    h,
                    c.rms_eps,
                )
                .map_err(dev_err)?;
                self.linear(&b.gate_up, normed.ptr(), h, gu.ptr(), false, n, h)?;
                ops::silu_mul(&*d, t, gu.ptr(), act.ptr(), n, ffn).map_err(dev_err)?;
                self.linear(&b.down, act.ptr(), ffn, delta.ptr(), true, n, ffn)?;
            }
            self.all_reduce(&delta, n * h, sum.as_ref(), collective)?;
            pending = true;
        }
        if pending {
            // SAFETY: x and delta hold n × h f32.
            unsafe { ops::add_f32(&*d, x.ptr(), delta.ptr(), n * h) }.map_err(dev_err)?;
        }
        let Some((norm, lm)) = &self.head else {
            let mut out = vec![0f32; n * h];
            d.download(x.ptr(), kernels::cuda::device::as_bytes_mut(&mut out))
                .map_err(dev_err)?;
            return Ok(StageOutput::Hidden(out));
        };
        let (picked, item_rows) = model::picked_rows(&shapes);
        let p = picked.len();
        let local_vocab = lm.n();
        let mut local = vec![0f32; p * local_vocab];
        if p > 0 {
            let idx: Vec<u32> = picked.iter().map(|&r| r as u32).collect();
            let idx_b = up(&idx)?;
            let last = f32b(p * h)?;
            let last_n = hb(p * h)?;
            let logits = f32b(p * local_vocab)?;
            // SAFETY: idx holds p row indices < n; the buffers are sized for p rows.
            unsafe {
                ops::gather_rows_f32(&*d, x.ptr(), idx_b.ptr(), last.ptr(), p, h)
                    .map_err(dev_err)?;
                ops::rms_norm(
                    &*d,
                    t,
                    last.ptr(),
                    None,
                    norm.ptr(),
                    last_n.ptr(),
                    p,
                    h,
                    c.rms_eps,
                )
                .map_err(dev_err)?;
                self.linear(lm, last_n.ptr(), h, logits.ptr(), true, p, h)?;
            }
            d.download(
                logits.ptr(),
                kernels::cuda::device::as_bytes_mut(&mut local),
            )
            .map_err(dev_err)?;
        }
        let data = collective.all_gather_cols(&local, p, self.layout.vocab.start, c.vocab)?;
        Ok(StageOutput::Logits(Logits {
            vocab: c.vocab,
            data,
            item_rows,
        }))
    }

    /// `y = x · Wᵀ` for `m` rows of `x` (row stride `lda`); `y` f32 or the
    /// backend's type.
    ///
    /// # Safety
    /// `x` holds `m × lda` and `y` `m × n` values of their types.
    #[allow(clippy::too_many_arguments)]
    unsafe fn linear(
        &self,
        w: &DevLinear,
        x: DevPtr,
        lda: usize,
        y: DevPtr,
        y_f32: bool,
        m: usize,
        k_in: usize,
    ) -> Result<()> {
        let d = &*self.dev.dev;
        let t = self.opts.dtype;
        let gemm = |b: DevPtr, n: usize, k: usize| -> Result<()> {
            if k != k_in {
                return Err(Error::Shard(format!(
                    "a {n}×{k} weight met {k_in}-wide rows"
                )));
            }
            d.gemm(&Gemm {
                a: x,
                lda,
                b,
                c: y,
                m,
                n,
                k,
                dtype: t,
                c_f32: y_f32,
                accumulate: false,
            })
            .map_err(dev_err)
        };
        match w {
            DevLinear::Dense { w, n, k } => gemm(w.ptr(), *n, *k),
            DevLinear::Quant { w, f, n, k } => {
                if m <= ops::QMV_MAX_ROWS as usize {
                    // SAFETY: forwarded from the caller; w holds n × k/32 blocks.
                    unsafe { ops::qmv(d, t, *f, w.ptr(), x, lda, y, y_f32, (m, *n, *k)) }
                        .map_err(dev_err)
                } else {
                    let scratch = self
                        .scratch
                        .as_ref()
                        .ok_or_else(|| Error::Shard("a quantized shard without scratch".into()))?;
                    // SAFETY: the scratch holds the largest quantized matrix in `t`.
                    unsafe { ops::dequantize(d, t, *f, w.ptr(), scratch.ptr(), n * k / 32) }
                        .map_err(dev_err)?;
                    gemm(scratch.ptr(), *n, *k)
                }
            }
        }
    }

    /// Sums `len` f32 at `buf` over this stage's tensor-parallel ranks.
    /// `sum` is the step's scratch of at least `len` f32 (same-GPU groups).
    fn all_reduce(
        &self,
        buf: &DevBuf,
        len: usize,
        sum: Option<&DevBuf>,
        collective: &dyn Collective,
    ) -> Result<()> {
        let Some(tp) = &self.tp else { return Ok(()) };
        if collective.world_size() == 1 {
            return Ok(());
        }
        let d = &self.dev.dev;
        let rank = collective.rank();
        match &**tp {
            TpGroup::SameDevice(slots) => {
                // Our partial sum must be complete before peers read it.
                d.synchronize().map_err(dev_err)?;
                {
                    let mut s = slots
                        .slots
                        .lock()
                        .map_err(|_| Error::Collective("poisoned slots".into()))?;
                    s[rank] = buf.ptr();
                }
                collective.barrier()?;
                let peers: Vec<DevPtr> = slots
                    .slots
                    .lock()
                    .map_err(|_| Error::Collective("poisoned slots".into()))?
                    .clone();
                let sum = sum
                    .ok_or_else(|| Error::Cuda("same-GPU all-reduce without its scratch".into()))?;
                d.zero(sum.ptr(), len * 4).map_err(dev_err)?;
                for &p in &peers {
                    // SAFETY: every peer's buffer holds `len` f32 on this GPU
                    // and stays untouched until the barrier below.
                    unsafe { ops::add_f32(&**d, sum.ptr(), p, len) }.map_err(dev_err)?;
                }
                d.synchronize().map_err(dev_err)?;
                // Nobody may overwrite its buffer before every rank has read it.
                collective.barrier()?;
                d.copy(buf.ptr(), sum.ptr(), len * 4).map_err(dev_err)
            }
            TpGroup::Nccl(group) => {
                // Peers of a failed rank return here instead of waiting in NCCL.
                collective.barrier()?;
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
    let bits: Vec<u16> = data.iter().map(|&v| t.from_f32(v)).collect();
    let w = DevBuf::from_slice(d, &bits).map_err(dev_err)?;
    Ok(DevLinear::Dense { w, n, k })
}

#[cfg(test)]
mod tests {
    //! The backend on the host emulation of a GPU, against the CPU backend.
    use super::*;
    use crate::collective::{SingleCollective, ThreadCollective};
    use crate::kv::KvPool;
    use crate::model::LogitsWanted;
    use crate::{LlamaShard, WeightFormat};

    /// Small, with head_dim 32 (the CUDA attention's granularity) and GQA.
    fn config() -> LlamaConfig {
        let c = LlamaConfig::synthetic("tiny32").unwrap();
        assert_eq!(
            (c.head_dim(), c.n_heads, c.n_kv_heads, c.vocab),
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
        let c = config();
        CudaShard::load(
            CudaShardSpec {
                file: None,
                seed: 11,
                layers: 0..c.n_layers,
                config: c,
                spec,
                kv: (4, 16),
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

    /// The steps every comparison runs: two prompts in one prefill step
    /// (scattered block tables), then three decode steps of both.
    fn steps() -> Vec<Vec<(Vec<u32>, usize, Vec<u32>)>> {
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
        let c = config();
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
                    StageOutput::Hidden(_) => panic!("a whole model returns logits"),
                }
            })
            .collect()
    }

    fn run(shard: &mut CudaShard, collective: &dyn Collective) -> Vec<Logits> {
        steps()
            .iter()
            .map(|s| {
                match shard
                    .forward_paged(&items(s), StageInput::Tokens, collective)
                    .unwrap()
                {
                    StageOutput::Logits(l) => l,
                    StageOutput::Hidden(_) => panic!("a whole model returns logits"),
                }
            })
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
    fn emulated_tensor_parallel_ranks_on_one_device_match_one_rank() {
        let Some(dev) = emulated() else { return };
        let mut one = cuda_shard(dev, Dtype::F16, ShardSpec::SINGLE, None);
        let want = run(&mut one, &SingleCollective);
        let tp = 2;
        let group = Arc::new(TpGroup::SameDevice(SharedSlots::new(tp)));
        let collectives = ThreadCollective::group(tp);
        let results: Vec<Vec<Logits>> = std::thread::scope(|s| {
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
                        run(&mut shard, coll)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Every rank returns the same logits, bit for bit.
        for r in &results[1..] {
            for (a, b) in r.iter().zip(&results[0]) {
                assert_eq!(a.data, b.data);
            }
        }
        // Partial sums round differently in 16 bits; 2% of the scale.
        assert_close(&results[0], &want, 0.02);
    }

    #[test]
    fn copy_block_copies_every_layer() {
        let Some(dev) = emulated() else { return };
        let mut s = cuda_shard(dev, Dtype::F16, ShardSpec::SINGLE, None);
        run(&mut s, &SingleCollective);
        let row = s.block_size * s.kv_width() * 2;
        s.copy_block(9, 1).unwrap();
        for (k, v) in &s.kv {
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
