//! [`Shard`]: what a compute node holds — one tensor-parallel rank of a
//! pipeline stage on any backend, with its paged KV cache and a workspace
//! sized for the engine's largest step — and [`BackendKind`], the choice of
//! backend a configuration carries.
//!
//! The node drives a `Shard` without knowing its backend: block copies, then
//! one [`Shard::forward_paged`] per micro-batch. Construction (which device,
//! which tensor-parallel group) lives here, so the actors never name a backend.
//!
//! Tensor-parallel sums of CUDA ranks go through the stage's [`StageGroup`]:
//! NCCL between GPUs, or a device-memory sum where the ranks share one GPU.
//! NCCL is called without a host barrier before each all-reduce; instead one
//! host barrier before each forward lets the peers of a rank that failed
//! before the step return (a rank failing inside a forward leaves its peers
//! to NCCL's own abort or timeout).

use std::ops::Range;
use std::sync::Arc;

use crate::activations::ActivationStats;
use crate::collective::Collective;
use crate::config::ModelConfig;
use crate::cuda::{CudaOptions, CudaShard, DeviceHandle, TpGroup};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::kv::KvDtype;
use crate::model::{self, PagedItem, ShardMats, StageInput, StageOutput, WeightSource};
use crate::shard::ShardSpec;
use crate::weights::WeightFormat;

use super::cpu::CpuBackend;
use super::transformer::Transformer;
use super::{Backend, PagedKv, Workspace};

/// Where the compute nodes run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU backend, storing its KV cache in `kv_dtype`.
    Cpu {
        /// The KV cache's element type.
        kv_dtype: KvDtype,
    },
    /// The CUDA backend: node `g` of the engine (replicas in order, each
    /// replica's nodes in order) on GPU `devices[g % devices.len()]`.
    Cuda {
        /// GPU ordinals.
        devices: Vec<usize>,
        /// Weight type and storage.
        options: CudaOptions,
    },
    /// The CUDA backend on the host emulation of a GPU (tests; slow).
    CudaEmulated {
        /// Weight type and storage.
        options: CudaOptions,
    },
}

impl Default for BackendKind {
    fn default() -> Self {
        Self::CPU
    }
}

impl BackendKind {
    /// Checks the choice itself; errors name the field.
    pub fn validate(&self) -> Result<()> {
        match self {
            BackendKind::Cuda { devices, .. } if devices.is_empty() => Err(Error::Setting {
                field: "devices",
                reason: "the CUDA backend needs at least one GPU ordinal".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The CPU backend with an f32 KV cache.
    pub const CPU: BackendKind = BackendKind::Cpu {
        kv_dtype: KvDtype::F32,
    };

    /// Bytes of one stored key (or value) element: the CPU's `kv_dtype`, 16
    /// bits on CUDA.
    pub fn kv_elem_bytes(&self) -> usize {
        match self {
            BackendKind::Cpu { kv_dtype } => kv_dtype.bytes(),
            BackendKind::Cuda { .. } | BackendKind::CudaEmulated { .. } => 2,
        }
    }

    /// The GPU of engine node `node`.
    fn gpu_of(&self, node: usize) -> Option<usize> {
        match self {
            BackendKind::Cuda { devices, .. } if !devices.is_empty() => {
                Some(devices[node % devices.len()])
            }
            _ => None,
        }
    }

    /// The tensor-parallel group of the stage whose ranks are the engine
    /// nodes `nodes` (rank r is node `nodes[r]`); one value is shared by them.
    pub fn stage_group(&self, nodes: &[usize]) -> Result<StageGroup> {
        if matches!(self, BackendKind::Cpu { .. }) || nodes.len() < 2 {
            return Ok(StageGroup(None));
        }
        let devices: Vec<usize> = nodes.iter().map(|&g| self.gpu_of(g).unwrap_or(0)).collect();
        Ok(StageGroup(Some(Arc::new(TpGroup::for_devices(&devices)?))))
    }
}

/// How the ranks of one stage sum on their devices (nothing on the CPU,
/// whose ranks sum through the step's host collective).
#[derive(Debug, Clone, Default)]
pub struct StageGroup(Option<Arc<TpGroup>>);

/// What a node's shard is cut from and how large its buffers are.
#[derive(Debug, Clone)]
pub struct ShardSource<'a> {
    /// The model file, or `None` for seeded synthetic weights.
    pub file: Option<&'a GgufFile>,
    /// The model's shape (from the file, or the synthetic shape).
    pub config: ModelConfig,
    /// Seed of synthetic weights.
    pub seed: u64,
    /// The tensor-parallel rank.
    pub spec: ShardSpec,
    /// The pipeline stage's layers.
    pub layers: Range<usize>,
    /// Format of the CPU backend's matmuls.
    pub format: WeightFormat,
    /// KV cache: positions per block and blocks.
    pub kv: (usize, usize),
    /// Rows of the largest step (the workspace is sized for it).
    pub max_batch_tokens: usize,
    /// The node's index in the engine (replicas in order), for its device.
    pub node: usize,
}

/// One node's shard on its backend, with its KV cache and workspace.
pub struct Shard(Box<dyn StageModel>);

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.describe())
    }
}

impl ShardSource<'_> {
    /// The validated shape and this shard's cut of the weights.
    pub(crate) fn mats(&self) -> Result<(ModelConfig, ShardMats)> {
        self.config.validate()?;
        let weights = match self.file {
            Some(f) => WeightSource::Gguf(f),
            None => WeightSource::Synthetic { seed: self.seed },
        };
        let mats = ShardMats::build(&self.config, &weights, self.spec, self.layers.clone())?;
        Ok((self.config.clone(), mats))
    }
}

impl Shard {
    /// Loads the shard `src` describes onto `backend`; `group` is its stage's
    /// (from [`BackendKind::stage_group`]).
    pub fn load(src: ShardSource<'_>, backend: &BackendKind, group: &StageGroup) -> Result<Self> {
        let model: Box<dyn StageModel> = match backend {
            BackendKind::Cpu { kv_dtype } => {
                let (config, mats) = src.mats()?;
                let be =
                    CpuBackend::new(&config, &mats.layout, src.format).with_kv_dtype(*kv_dtype);
                Box::new(StageShard::new(
                    Transformer::new(be, config, mats, src.layers.clone())?,
                    src.kv,
                    src.max_batch_tokens,
                )?)
            }
            BackendKind::Cuda { options, .. } | BackendKind::CudaEmulated { options } => {
                let dev = match backend.gpu_of(src.node) {
                    Some(gpu) => DeviceHandle::gpu(gpu)?,
                    None => DeviceHandle::emulated()?,
                };
                Box::new(CudaShard::load(src, dev, *options, group.0.clone())?)
            }
        };
        Ok(Self(model))
    }

    /// Copies KV block `src` into `dst` in every layer (copy-on-write forks).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        self.0.copy_block(src, dst)
    }

    /// Records the inputs of this shard's matrices in every following step
    /// into `stats` ([`crate::activations`]).
    pub fn collect_activations(&mut self, stats: Arc<ActivationStats>) {
        self.0.collect_activations(stats)
    }

    /// One step of this stage over its paged KV cache; see
    /// [`crate::LlamaShard::forward_paged`]. `collective` is the step's host
    /// collective of this stage's ranks.
    pub fn forward_paged(
        &mut self,
        items: &[PagedItem<'_>],
        input: StageInput,
        collective: &dyn Collective,
    ) -> Result<StageOutput> {
        self.0.forward_paged(items, input, collective)
    }
}

/// The operations a node uses, over any backend.
trait StageModel: Send {
    fn forward_paged(
        &mut self,
        items: &[PagedItem<'_>],
        input: StageInput,
        collective: &dyn Collective,
    ) -> Result<StageOutput>;
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<()>;
    fn collect_activations(&mut self, stats: Arc<ActivationStats>);
    fn describe(&self) -> String;
}

/// A stage's shard on backend `B` with its paged KV cache and workspace.
pub struct StageShard<B: Backend> {
    pub(crate) model: Transformer<B>,
    pub(crate) kv: B::Kv,
    pub(crate) ws: Workspace<B>,
}

impl<B: Backend> std::fmt::Debug for StageShard<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spec = self.model.layout().spec;
        write!(
            f,
            "StageShard(rank {}/{}, layers {:?}, {}-byte KV elements)",
            spec.rank,
            spec.world_size,
            self.model.layers(),
            self.kv.elem_bytes()
        )
    }
}

impl<B: Backend> StageShard<B> {
    /// `model` with a KV cache of `(block_size, n_blocks)` and a workspace
    /// for steps of up to `rows` rows.
    pub(crate) fn new(
        model: Transformer<B>,
        (block_size, n_blocks): (usize, usize),
        rows: usize,
    ) -> Result<Self> {
        Ok(Self {
            kv: model.new_kv(block_size, n_blocks)?,
            ws: model.workspace(rows)?,
            model,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// This shard's layers.
    pub fn layers(&self) -> Range<usize> {
        self.model.layers()
    }

    /// Sizes the workspace for steps of up to `rows` rows, so that such
    /// steps allocate no device memory.
    pub fn reserve(&mut self, rows: usize) -> Result<()> {
        // Free the old buffers before taking the new ones.
        self.ws = self.model.workspace(0)?;
        self.ws = self.model.workspace(rows)?;
        Ok(())
    }

    /// One step of this stage over its paged KV cache; see
    /// [`crate::LlamaShard::forward_paged`]. `collective` is the step's host
    /// collective of this stage's ranks.
    pub fn forward_paged(
        &mut self,
        items: &[PagedItem<'_>],
        input: StageInput,
        collective: &dyn Collective,
    ) -> Result<StageOutput> {
        model::paged_step(
            &self.model,
            &mut self.ws,
            items,
            input,
            &mut self.kv,
            collective,
        )
    }

    /// Copies KV block `src` into `dst` in every layer (copy-on-write forks).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        self.kv.copy_block(self.model.backend(), src, dst)
    }

    /// Turns the timing of every op of the following steps on or off
    /// ([`crate::profile`]).
    pub fn set_profiling(&self, on: bool) {
        self.model.set_profiling(on);
    }

    /// The op times recorded since the last call (and clears them).
    pub fn take_profile(&self) -> crate::profile::StepProfile {
        self.model.take_profile()
    }
}

impl<B: Backend> StageModel for StageShard<B> {
    fn forward_paged(
        &mut self,
        items: &[PagedItem<'_>],
        input: StageInput,
        collective: &dyn Collective,
    ) -> Result<StageOutput> {
        StageShard::forward_paged(self, items, input, collective)
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        StageShard::copy_block(self, src, dst)
    }

    fn collect_activations(&mut self, stats: Arc<ActivationStats>) {
        self.model.collect_activations(stats)
    }

    fn describe(&self) -> String {
        format!("{self:?}")
    }
}
