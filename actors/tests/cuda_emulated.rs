//! The engine with CUDA compute nodes, run on the host emulation of a GPU
//! (the same kernel text, compiled by the host C++ compiler): concurrent
//! requests through queue → scheduler → CUDA nodes → merger, in tensor- and
//! pipeline-parallel layouts, against the same engine on the CPU backend.
//!
//! The `tiny32` preset has head_dim 32 (the CUDA attention's granularity),
//! which `tiny` has not. Everything here is deterministic: the emulation runs
//! each launch's threads in a fixed reduction order, so the comparison of
//! greedy tokens is a fixed outcome, not a lucky one.

mod common;

use std::time::Duration;

use actors::llm::{Compute, Engine};
use common::run_all;
use framework::cuda::{CudaOptions, Dtype};
use framework::WeightFormat;

/// 64 prompts of 3 to 129 tokens: prefills of different lengths share steps
/// with the others' decodes.
fn prompts() -> Vec<Vec<u32>> {
    (0..64u32)
        .map(|i| {
            (0..(3 + i * 2))
                .map(|k| (k * 31 + i * 7 + 1) % 384)
                .collect()
        })
        .collect()
}

fn engine(compute: Compute, tp: usize, pp: usize) -> Engine {
    Engine::builder()
        .synthetic("tiny32", 5)
        .weights(WeightFormat::F32)
        .compute(compute)
        .tp(tp)
        .pp(pp)
        .block_size(4)
        .kv_blocks(2560)
        .build()
        .unwrap_or_else(|e| panic!("tp={tp} pp={pp}: {e}"))
}

#[test]
fn concurrent_requests_on_emulated_cuda_nodes_match_the_cpu_engine() {
    // No C++ compiler fails the test, unless PARALLM_SKIP_EMULATION=1.
    if !kernels::cuda::emu::available_for_tests() {
        return;
    }
    let cpu = engine(Compute::CPU, 1, 1);
    let want = run_all(&cpu, prompts(), 8);
    assert!(cpu.shutdown_timeout(Duration::from_secs(10)));
    let f16 = Compute::CudaEmulated {
        options: CudaOptions {
            dtype: Dtype::F16,
            quantized: false,
        },
    };
    for (tp, pp) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
        let e = engine(f16.clone(), tp, pp);
        let got = run_all(&e, prompts(), 8);
        assert_eq!(got, want, "tp={tp} pp={pp}");
        let s = common::idle_stats(&e);
        assert_eq!(s.scheduler.policy.kv_used, 0, "all blocks freed");
        assert_eq!(s.nodes.len(), tp * pp, "one node per rank and stage");
        assert!(e.shutdown_timeout(Duration::from_secs(10)));
    }
}
