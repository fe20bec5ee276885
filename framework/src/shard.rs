//! Shard specs: which slice of each weight a tensor-parallel rank owns.
//!
//! Megatron-style tensor parallelism cuts a Llama block in two places per
//! sub-layer: column-parallel projections (q/k/v, gate/up) keep whole output
//! features, row-parallel ones (o, down) keep the matching input features, and
//! one all-reduce sums the partial outputs. [`ShardLayout`] turns a
//! [`ShardSpec`] (rank, world size) into the ranges each rank owns:
//!
//! * attention: whole KV groups (one KV head and its `group_size` query heads),
//!   so no rank ever needs another rank's keys;
//! * FFN: contiguous columns, in units aligned to quantization blocks so that
//!   row-parallel `down` slices stay in the file's format;
//! * vocabulary: contiguous token ranges for the embedding and the LM head.
//!
//! Splits need not be even: a degree that does not divide the KV head count
//! (tp=2 over 3 KV heads) gives shards of unequal size, larger ranks first.
//! World size 1 gives every range whole; it is the ordinary case, not a special one.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// A tensor-parallel rank within its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ShardSpec {
    /// This shard's index, `0..world_size`.
    pub rank: usize,
    /// Number of shards in the group.
    pub world_size: usize,
}

impl ShardSpec {
    /// The one shard of an unsharded model.
    pub const SINGLE: ShardSpec = ShardSpec {
        rank: 0,
        world_size: 1,
    };

    /// A checked spec.
    pub fn new(rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::Shard(format!(
                "rank {rank} is outside a world of size {world_size}"
            )));
        }
        Ok(Self { rank, world_size })
    }

    /// Every rank of a group of `world_size`.
    pub fn group(world_size: usize) -> Vec<ShardSpec> {
        (0..world_size)
            .map(|rank| ShardSpec { rank, world_size })
            .collect()
    }
}

/// Splits `units` into `parts` contiguous ranges whose sizes differ by at most
/// one (the first `units % parts` ranges get the extra unit); returns range `index`.
pub fn split_even(units: usize, parts: usize, index: usize) -> Range<usize> {
    let base = units / parts;
    let extra = units % parts;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    start..start + len
}

/// The layer ranges of `pp` pipeline stages of a model shaped `config`:
/// contiguous, at least one layer each, in order, covering every layer once,
/// and balanced by weights read per token, counting the LM head (vocab ×
/// hidden, on the last stage) against the layers (the embedding, a row
/// lookup, counts for nothing). The stage a step waits for longest sets a
/// pipeline's pace, so the split with the smallest largest stage is chosen;
/// on the reference model (30 layers; the head weighs about 8 of them) two
/// stages get 19 and 11 layers, not 15 and 15.
///
/// `pp` must be at least 1 and at most the layer count (checked where a
/// configuration is validated); outside that, the layers are split evenly.
pub fn stage_layers(config: &ModelConfig, pp: usize) -> Vec<Range<usize>> {
    let n = config.n_layers;
    if pp == 0 || pp > n {
        return (0..pp).map(|s| split_even(n, pp.max(1), s)).collect();
    }
    let (h, d) = (config.hidden as u64, config.head_dim as u64);
    let attn = h * d * (2 * config.n_heads as u64 + 2 * config.n_kv_heads as u64);
    let layer = attn + 3 * h * config.ffn as u64;
    let head = config.vocab as u64 * h;
    let cost = |r: Range<usize>, last: bool| r.len() as u64 * layer + if last { head } else { 0 };
    // best[s][i]: the smallest largest cost of the first s stages over layers
    // 0..i, and where stage s - 1 starts.
    let mut best = vec![vec![(u64::MAX, 0usize); n + 1]; pp + 1];
    best[0][0] = (0, 0);
    for s in 1..=pp {
        for i in s..=n {
            for j in (s - 1)..i {
                let (before, _) = best[s - 1][j];
                if before == u64::MAX {
                    continue;
                }
                let worst = before.max(cost(j..i, s == pp && i == n));
                if worst < best[s][i].0 {
                    best[s][i] = (worst, j);
                }
            }
        }
    }
    let mut ranges = vec![0..0; pp];
    let mut end = n;
    for s in (1..=pp).rev() {
        let start = best[s][end].1;
        ranges[s - 1] = start..end;
        end = start;
    }
    ranges
}

/// The ranges of the model that one shard owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// The spec this layout was made for.
    pub spec: ShardSpec,
    /// Local KV heads (global indices).
    pub kv_heads: Range<usize>,
    /// Local query heads (global indices): the query heads of the local KV groups.
    pub heads: Range<usize>,
    /// Local FFN columns.
    pub ffn: Range<usize>,
    /// Local vocabulary rows (embedding and LM head).
    pub vocab: Range<usize>,
}

/// FFN split granularity: the largest quantization block size that divides the
/// FFN width and still leaves every rank at least one unit.
fn ffn_unit(ffn: usize, world: usize) -> usize {
    [256, 32, 1]
        .into_iter()
        .find(|&u| ffn.is_multiple_of(u) && ffn / u >= world)
        .unwrap_or(1)
}

impl ShardLayout {
    /// The layout of `spec` over `config`. Fails when a rank would own no KV group.
    pub fn new(config: &ModelConfig, spec: ShardSpec) -> Result<Self> {
        let world = spec.world_size;
        if world > config.n_kv_heads {
            return Err(Error::Shard(format!(
                "tensor-parallel degree {world} exceeds the model's {} KV heads; \
                 each shard needs at least one whole KV group",
                config.n_kv_heads
            )));
        }
        if world > config.ffn || world > config.vocab {
            return Err(Error::Shard(format!(
                "tensor-parallel degree {world} is larger than the FFN width or vocabulary"
            )));
        }
        let kv_heads = split_even(config.n_kv_heads, world, spec.rank);
        let g = config.group_size();
        let heads = kv_heads.start * g..kv_heads.end * g;
        let unit = ffn_unit(config.ffn, world);
        let units = split_even(config.ffn / unit, world, spec.rank);
        let ffn = units.start * unit..units.end * unit;
        let vocab = split_even(config.vocab, world, spec.rank);
        Ok(Self {
            spec,
            kv_heads,
            heads,
            ffn,
            vocab,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_everything_once() {
        for units in 0..40 {
            for parts in 1..7 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split_even(units, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, units);
            }
        }
    }

    #[test]
    fn stages_are_contiguous_and_balanced_counting_the_head() {
        let c = ModelConfig::synthetic("135m").unwrap();
        assert_eq!(stage_layers(&c, 1), vec![0..30]);
        assert_eq!(stage_layers(&c, 2), vec![0..19, 19..30]);
        for name in ["tiny", "135m", "1b", "8b"] {
            let c = ModelConfig::synthetic(name).unwrap();
            for pp in 1..=c.n_layers.min(6) {
                let r = stage_layers(&c, pp);
                assert_eq!(r.len(), pp);
                assert_eq!(r[0].start, 0, "{name} pp={pp}");
                assert_eq!(r[pp - 1].end, c.n_layers, "{name} pp={pp}");
                for w in r.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{name} pp={pp}");
                }
                assert!(r.iter().all(|s| !s.is_empty()), "{name} pp={pp}: {r:?}");
                // No stage but the last is lighter than the last by a whole
                // layer more than it needs: moving one layer would not help.
                let even = stage_layers(
                    &ModelConfig {
                        vocab: 0,
                        ..c.clone()
                    },
                    pp,
                );
                let lens: Vec<usize> = even.iter().map(|r| r.len()).collect();
                let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(max - min <= 1, "{name} pp={pp} without a head: {even:?}");
            }
        }
    }

    #[test]
    fn uneven_tp2_on_reference_shape() {
        let c = ModelConfig::synthetic("135m").unwrap();
        let a = ShardLayout::new(&c, ShardSpec::new(0, 2).unwrap()).unwrap();
        let b = ShardLayout::new(&c, ShardSpec::new(1, 2).unwrap()).unwrap();
        assert_eq!((a.kv_heads.clone(), b.kv_heads.clone()), (0..2, 2..3));
        assert_eq!((a.heads.clone(), b.heads.clone()), (0..6, 6..9));
        assert_eq!(a.ffn.end, b.ffn.start);
        assert_eq!(b.ffn.end, 1536);
        assert_eq!(a.ffn.len() % 256, 0);
    }

    #[test]
    fn too_many_shards_is_an_error() {
        let c = ModelConfig::synthetic("135m").unwrap();
        let err = ShardLayout::new(&c, ShardSpec::new(0, 4).unwrap()).unwrap_err();
        assert!(err.to_string().contains("3 KV heads"), "{err}");
        assert!(ShardSpec::new(2, 2).is_err());
    }
}
