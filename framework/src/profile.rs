//! Where a step's time goes: the wall time of each kind of op in the layer
//! loop, summed over layers and steps.
//!
//! A [`crate::backend::transformer::Transformer`] with profiling on times
//! every op of its steps with [`std::time::Instant`] and adds them to a
//! [`StepProfile`]; with it off (the default) the loop does one branch per
//! op. The times are host wall times: on an asynchronous backend (CUDA) the
//! profiled step waits for the device before and after each op
//! ([`crate::backend::Backend::fence`]), so an op's time is its kernels' run
//! with its launches, and the overlap between ops is lost. Time inside an
//! op's parallel region — the workers' hand-off and waiting included —
//! counts to that op; the time in the collectives (all-reduces, the logits
//! gather) is taken out of the op that called them and counted as
//! [`Op::Collective`]. Each op also records
//! the thread-time its parallel kernels' tasks were busy
//! ([`kernels::cpu::busy`]): busy ÷ wall is how many threads worked on
//! average, and the rest of the pool's threads × wall went to handing work
//! out and waiting.

use std::time::Duration;

/// A kind of op in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Looking up (and all-reducing) the token embeddings.
    Embed,
    /// RMSNorms, with the residual adds fused into them.
    Norm,
    /// The fused q|k|v matmul.
    QkvMatmul,
    /// Rotary embeddings.
    Rope,
    /// Attention over the KV cache, the KV write included.
    Attention,
    /// The attention output matmul.
    OMatmul,
    /// The fused gate|up matmul.
    GateUpMatmul,
    /// SiLU(gate) · up.
    SiluMul,
    /// The FFN down matmul.
    DownMatmul,
    /// Final norm and LM head.
    Head,
    /// All-reduces, gathers and barriers between ranks.
    Collective,
    /// Step bookkeeping: the step's metadata, the workspace, the last residual add.
    Bookkeeping,
}

impl Op {
    /// Every kind, in the order of a step.
    pub const ALL: [Op; 12] = [
        Op::Embed,
        Op::Norm,
        Op::QkvMatmul,
        Op::Rope,
        Op::Attention,
        Op::OMatmul,
        Op::GateUpMatmul,
        Op::SiluMul,
        Op::DownMatmul,
        Op::Head,
        Op::Collective,
        Op::Bookkeeping,
    ];

    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Op::Embed => "embedding",
            Op::Norm => "RMSNorm (+ residual add)",
            Op::QkvMatmul => "matmul qkv (fused)",
            Op::Rope => "RoPE",
            Op::Attention => "attention (+ KV write)",
            Op::OMatmul => "matmul o",
            Op::GateUpMatmul => "matmul gate+up (fused)",
            Op::SiluMul => "SiLU · up",
            Op::DownMatmul => "matmul down",
            Op::Head => "final norm + LM head",
            Op::Collective => "collectives (all-reduce, gather)",
            Op::Bookkeeping => "step bookkeeping",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Time per kind of op over some steps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepProfile {
    nanos: [u64; Op::ALL.len()],
    busy_nanos: [u64; Op::ALL.len()],
    /// Steps added.
    pub steps: u64,
}

impl StepProfile {
    /// Adds `d` to `op`.
    pub fn add(&mut self, op: Op, d: Duration) {
        let n = &mut self.nanos[op.index()];
        *n = n.saturating_add(d.as_nanos() as u64);
    }

    /// Adds `d` of thread-time busy in `op`'s parallel tasks.
    pub fn add_busy(&mut self, op: Op, d: Duration) {
        let n = &mut self.busy_nanos[op.index()];
        *n = n.saturating_add(d.as_nanos() as u64);
    }

    /// Adds another profile's times and steps.
    pub fn merge(&mut self, other: &StepProfile) {
        for (a, b) in self.nanos.iter_mut().zip(other.nanos) {
            *a = a.saturating_add(b);
        }
        for (a, b) in self.busy_nanos.iter_mut().zip(other.busy_nanos) {
            *a = a.saturating_add(b);
        }
        self.steps += other.steps;
    }

    /// Total time in `op`.
    pub fn total(&self, op: Op) -> Duration {
        Duration::from_nanos(self.nanos[op.index()])
    }

    /// Mean time per step in `op`.
    pub fn per_step(&self, op: Op) -> Duration {
        self.total(op) / self.steps.max(1) as u32
    }

    /// Thread-time per step that `op`'s parallel tasks were busy (zero for
    /// an op without parallel kernels).
    pub fn busy_per_step(&self, op: Op) -> Duration {
        Duration::from_nanos(self.busy_nanos[op.index()]) / self.steps.max(1) as u32
    }

    /// Mean time per step over every op.
    pub fn per_step_sum(&self) -> Duration {
        Op::ALL.iter().map(|&op| self.per_step(op)).sum()
    }
}

/// A step's timer: adds each op's time to a profile when profiling is on.
pub(crate) struct Timer<'a> {
    profile: Option<StepProfile>,
    /// Waits for the device before each reading of the clock (an
    /// asynchronous backend's queued work), when recording.
    fence: Option<&'a dyn Fn()>,
}

impl<'a> Timer<'a> {
    /// A timer that records (`on`) or does nothing.
    pub(crate) fn new(on: bool) -> Self {
        Self {
            profile: on.then(|| StepProfile {
                steps: 1,
                ..StepProfile::default()
            }),
            fence: None,
        }
    }

    /// Calls `fence` before each reading of the clock, so that an op's time
    /// on an asynchronous device is the time until its work is done.
    pub(crate) fn with_fence(mut self, fence: &'a dyn Fn()) -> Self {
        self.fence = Some(fence);
        self
    }

    /// Runs `f` as an `op`; `spent` reads the time the step's collectives
    /// have taken so far, which is moved from `op` to [`Op::Collective`].
    pub(crate) fn time<T>(
        &mut self,
        op: Op,
        spent: impl Fn() -> Duration,
        f: impl FnOnce() -> T,
    ) -> T {
        let Some(p) = self.profile.as_mut() else {
            return f();
        };
        if let Some(fence) = self.fence {
            fence();
        }
        let before = spent();
        let busy = kernels::cpu::busy::busy();
        let t = std::time::Instant::now();
        let out = f();
        if let Some(fence) = self.fence {
            fence();
        }
        let elapsed = t.elapsed();
        p.add_busy(op, kernels::cpu::busy::busy().saturating_sub(busy));
        let in_collective = spent().saturating_sub(before);
        p.add(op, elapsed.saturating_sub(in_collective));
        p.add(Op::Collective, in_collective);
        out
    }

    /// The step's profile, if it recorded.
    pub(crate) fn finish(self) -> Option<StepProfile> {
        self.profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_add_up_and_collectives_are_moved_out_of_their_op() {
        let mut t = Timer::new(true);
        let spent = std::cell::Cell::new(Duration::ZERO);
        t.time(
            Op::OMatmul,
            || spent.get(),
            || {
                std::thread::sleep(Duration::from_millis(4));
                spent.set(Duration::from_millis(3));
            },
        );
        let p = t.finish().expect("recording");
        assert_eq!(p.total(Op::Collective), Duration::from_millis(3));
        assert!(p.total(Op::OMatmul) >= Duration::from_millis(1));
        // A busy machine can stretch the 4 ms sleep, never shrink it.
        assert!(p.total(Op::OMatmul) < Duration::from_secs(5));
        let mut sum = StepProfile::default();
        sum.merge(&p);
        sum.merge(&p);
        assert_eq!(sum.steps, 2);
        assert_eq!(sum.per_step(Op::Collective), Duration::from_millis(3));
        let mut off = Timer::new(false);
        assert_eq!(off.time(Op::Norm, || Duration::ZERO, || 7), 7);
        assert!(off.finish().is_none());
    }
}
