//! Tensor-parallel layers, named after how their weight is split across the
//! ranks of a stage (mistral.rs's `distributed/layers.rs`; Megatron-LM,
//! Shoeybi et al. 2019). Each holds its shard's part of the weight on a
//! [`Backend`] and runs the same steps on every backend.

use std::ops::Range;

use crate::collective::Collective;
use crate::error::Result;

use super::{Backend, Elem};

/// `Y_r = X · W_rᵀ + b_r`: rank `r` holds a block of W's rows (output
/// features) and the same block of the bias, so its output is its own
/// columns of `Y`; no communication.
pub struct ColumnParallelLinear<B: Backend> {
    w: B::Weight,
    bias: Option<B::Vector>,
}

impl<B: Backend> ColumnParallelLinear<B> {
    /// Wraps this rank's rows of the weight and of its bias.
    pub fn new(w: B::Weight, bias: Option<B::Vector>) -> Self {
        Self { w, bias }
    }

    /// `out = x · W_rᵀ + b_r` (Act) for `rows` rows.
    pub fn forward(&self, be: &B, x: &B::Buf, out: &mut B::Buf, rows: usize) -> Result<()> {
        be.linear(&self.w, x, out, Elem::Act, rows)?;
        match &self.bias {
            Some(b) => be.add_bias(out, b, rows, B::out_features(&self.w), Elem::Act),
            None => Ok(()),
        }
    }
}

/// `Y = Σ_r X_r · W_rᵀ + b`: rank `r` holds a block of W's columns (input
/// features) and reads its own columns `X_r` of the input; the partial
/// products are summed over ranks, and every rank adds the whole bias to
/// the sum (so it is added once).
pub struct RowParallelLinear<B: Backend> {
    w: B::Weight,
    bias: Option<B::Vector>,
}

impl<B: Backend> RowParallelLinear<B> {
    /// Wraps this rank's columns of the weight, and the whole bias.
    pub fn new(w: B::Weight, bias: Option<B::Vector>) -> Self {
        Self { w, bias }
    }

    /// Local matmul into `out` (f32), the all-reduce, then the bias.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        out: &mut B::Buf,
        rows: usize,
        host: &dyn Collective,
    ) -> Result<()> {
        let width = B::out_features(&self.w);
        be.linear(&self.w, x, out, Elem::F32, rows)?;
        be.all_reduce(out, rows * width, host)?;
        match &self.bias {
            Some(b) => be.add_bias(out, b, rows, width, Elem::F32),
            None => Ok(()),
        }
    }
}

/// A norm over the hidden width, the same on every rank: RMSNorm, or
/// LayerNorm with its bias.
pub enum Norm<B: Backend> {
    /// `x / rms(x) · w`.
    Rms(B::Vector),
    /// `(x − mean) / std · w + b`.
    Layer(B::Vector, B::Vector),
}

impl<B: Backend> Norm<B> {
    /// `x += residual` (if given), then `out` (Act) = the norm of `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: &B,
        x: &mut B::Buf,
        residual: Option<&B::Buf>,
        eps: f32,
        out: &mut B::Buf,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        match self {
            Norm::Rms(w) => be.rms_norm(x, residual, w, eps, out, rows, width),
            Norm::Layer(w, b) => be.layer_norm(x, residual, w, b, eps, out, rows, width),
        }
    }
}

/// `E[t] = Σ_r [t ∈ V_r] · E_r[t − start_r]`: rank `r` holds the rows `V_r`
/// of the vocabulary; each looks up its own tokens (zero rows elsewhere) and
/// the rows are summed over ranks.
pub struct VocabParallelEmbedding<B: Backend> {
    table: B::Table,
    hidden: usize,
}

impl<B: Backend> VocabParallelEmbedding<B> {
    /// Wraps this rank's rows of the table.
    pub fn new(table: B::Table, hidden: usize) -> Self {
        Self { table, hidden }
    }

    /// Lookup of the step's tokens into `out` (f32), then the all-reduce.
    pub fn forward(
        &self,
        be: &B,
        meta: &B::Meta,
        out: &mut B::Buf,
        rows: usize,
        host: &dyn Collective,
    ) -> Result<()> {
        be.embed(&self.table, meta, out, rows)?;
        be.all_reduce(out, rows * self.hidden, host)
    }
}

/// `logits = [norm(x) · H_0ᵀ | … | norm(x) · H_{R−1}ᵀ]`: rank `r`
/// holds the vocabulary rows `V_r` of the head and computes those logits of
/// the picked rows; the column blocks are gathered over ranks on the host.
pub struct VocabParallelLmHead<B: Backend> {
    norm: Norm<B>,
    w: B::Weight,
    vocab: Range<usize>,
    total_vocab: usize,
    /// Soft-cap of the logits (0: none), applied per rank before the gather.
    softcap: f32,
}

/// The buffers the LM head runs in.
pub struct HeadBuffers<'a, B: Backend> {
    /// The hidden rows of the whole step (f32).
    pub x: &'a B::Buf,
    /// The picked rows (f32).
    pub last: &'a mut B::Buf,
    /// The picked rows, normed (Act).
    pub last_normed: &'a mut B::Buf,
    /// Their local logits (f32).
    pub logits: &'a mut B::Buf,
    /// The step's bookkeeping (which rows are picked).
    pub meta: &'a B::Meta,
}

impl<B: Backend> VocabParallelLmHead<B> {
    /// The final norm and this rank's rows `vocab` of the head, whose
    /// logits are soft-capped at `softcap` (0: not capped).
    pub fn new(
        norm: Norm<B>,
        w: B::Weight,
        vocab: Range<usize>,
        total_vocab: usize,
        softcap: f32,
    ) -> Self {
        Self {
            norm,
            w,
            vocab,
            total_vocab,
            softcap,
        }
    }

    /// Rows of the head this rank holds.
    pub fn local_vocab(&self) -> usize {
        B::out_features(&self.w)
    }

    /// Gather of the `picked` rows and the final norm, without the head:
    /// `picked × hidden` (the same on every rank).
    pub fn normed_rows(
        &self,
        be: &B,
        b: HeadBuffers<'_, B>,
        picked: usize,
        (hidden, eps): (usize, f32),
    ) -> Result<Vec<f32>> {
        if picked == 0 {
            return Ok(Vec::new());
        }
        be.gather_rows(b.x, b.meta, b.last, hidden)?;
        self.norm
            .forward(be, b.last, None, eps, b.last_normed, picked, hidden)?;
        be.download(b.last_normed, picked * hidden)
    }

    /// Gather of the `picked` rows, final norm, local logits, then the
    /// host gather of every rank's columns: `picked × total_vocab`, on every
    /// rank, or with `to_root` on rank 0 only (the others get `None`).
    pub fn forward(
        &self,
        be: &B,
        b: HeadBuffers<'_, B>,
        picked: usize,
        (hidden, eps): (usize, f32),
        host: &dyn Collective,
        to_root: bool,
    ) -> Result<Option<Vec<f32>>> {
        let local = if picked > 0 {
            be.gather_rows(b.x, b.meta, b.last, hidden)?;
            self.norm
                .forward(be, b.last, None, eps, b.last_normed, picked, hidden)?;
            let bad = be.non_finite_rows(b.last_normed, picked, hidden)?;
            be.linear(&self.w, b.last_normed, b.logits, Elem::F32, picked)?;
            if self.softcap > 0.0 {
                be.softcap(b.logits, self.softcap, picked * self.local_vocab())?;
            }
            let mut logits = be.download(b.logits, picked * self.local_vocab())?;
            // A row whose hidden state is not finite (a damaged weight, an
            // overflow) gets NaN logits, for the draw to refuse, where the
            // head's matmul would have hidden it.
            let width = self.local_vocab();
            for row in bad {
                logits[row * width..(row + 1) * width].fill(f32::NAN);
            }
            logits
        } else {
            Vec::new()
        };
        if host.world_size() == 1 && self.local_vocab() == self.total_vocab {
            // One rank holds every column: nothing to gather or copy.
            return Ok(Some(local));
        }
        if to_root {
            host.gather_cols_to_root(&local, picked, self.vocab.start, self.total_vocab)
        } else {
            host.all_gather_cols(&local, picked, self.vocab.start, self.total_vocab)
                .map(Some)
        }
    }
}
