//! The paged KV cache: a block allocator with per-sequence block tables on the
//! scheduler's side, and the physical block pool on each compute node's side.
//!
//! Keys and values live in fixed-size blocks of `block_size` positions (vLLM's
//! PagedAttention layout). The scheduler owns one [`KvManager`] per model
//! replica: it decides which block ids each sequence uses and hands the block
//! tables to the nodes with every step. Each node of that replica owns a
//! [`KvPool`] with the same block ids for its own layers and KV heads, so a block
//! id means the same positions on every node.
//!
//! Blocks are reference-counted so that sequences can share a prefix (beam
//! search forks): a write into a shared, partly filled last block first copies
//! it (copy-on-write); the copies are listed in the step plan and applied by the
//! nodes before they compute.
//!
//! **Invariant:** a block is on the free list exactly when its reference count is
//! zero; [`KvManager::release`] frees a sequence's blocks exactly once (a second
//! call finds no table and frees nothing).

use std::collections::HashMap;

use half::{bf16, f16};

/// Identifies one sequence's block table.
pub type SeqKey = u64;

/// Not enough free blocks for the requested growth; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache exhausted: need {needed} more blocks, {free} free")]
pub struct OutOfBlocks {
    /// Blocks the request needed.
    pub needed: usize,
    /// Blocks that were free.
    pub free: usize,
}

/// Block usage of one replica's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvUsage {
    /// Blocks in use (reference count above zero).
    pub used: usize,
    /// Blocks in all.
    pub total: usize,
}

impl KvUsage {
    /// `used / total`, 0 when there are no blocks.
    pub fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.used as f64 / self.total as f64
        }
    }
}

/// The scheduler's view of one replica's KV cache: free blocks, reference
/// counts, and each sequence's block table.
#[derive(Debug, Clone)]
pub struct KvManager {
    block_size: usize,
    refs: Vec<u32>,
    free: Vec<u32>,
    tables: HashMap<SeqKey, Table>,
}

#[derive(Debug, Clone, Default)]
struct Table {
    blocks: Vec<u32>,
    /// Positions whose KV has been (or is being) written.
    len: usize,
}

impl KvManager {
    /// `total` blocks of `block_size` positions, all free.
    pub fn new(block_size: usize, total: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            block_size,
            refs: vec![0; total],
            // Pop from the end: low ids are handed out first.
            free: (0..total as u32).rev().collect(),
            tables: HashMap::new(),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Current usage.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            used: self.refs.len() - self.free.len(),
            total: self.refs.len(),
        }
    }

    /// Free blocks.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// `seq`'s block table (empty if it has none).
    pub fn table(&self, seq: SeqKey) -> &[u32] {
        self.tables.get(&seq).map_or(&[], |t| &t.blocks)
    }

    /// Positions reserved for `seq`.
    pub fn len(&self, seq: SeqKey) -> usize {
        self.tables.get(&seq).map_or(0, |t| t.len)
    }

    /// Whether `seq` has a table.
    pub fn contains(&self, seq: SeqKey) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Blocks that growing `seq` to `new_len` positions would take from the free
    /// list (new blocks plus a copy-on-write of a shared last block).
    pub fn blocks_needed(&self, seq: SeqKey, new_len: usize) -> usize {
        let (have, len, shared_tail) = match self.tables.get(&seq) {
            Some(t) => (t.blocks.len(), t.len, self.shared_partial_tail(t)),
            None => (0, 0, false),
        };
        let grow = self.blocks_for(new_len).saturating_sub(have);
        grow + usize::from(shared_tail && new_len > len)
    }

    fn shared_partial_tail(&self, t: &Table) -> bool {
        !t.len.is_multiple_of(self.block_size)
            && t.blocks.last().is_some_and(|&b| self.refs[b as usize] > 1)
    }

    /// Reserves positions up to `new_len` for `seq` (creating its table if
    /// needed). A shared, partly filled last block is replaced by a private copy
    /// and the `(src, dst)` pair pushed to `copies`. All or nothing.
    pub fn grow(
        &mut self,
        seq: SeqKey,
        new_len: usize,
        copies: &mut Vec<(u32, u32)>,
    ) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(seq, new_len);
        if needed > self.free.len() {
            return Err(OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        let mut table = self.tables.remove(&seq).unwrap_or_default();
        if new_len > table.len && self.shared_partial_tail(&table) {
            let old = table.blocks.pop().expect("a shared tail exists");
            let new = self.take();
            self.refs[old as usize] -= 1;
            copies.push((old, new));
            table.blocks.push(new);
        }
        while table.blocks.len() < self.blocks_for(new_len) {
            let b = self.take();
            table.blocks.push(b);
        }
        table.len = table.len.max(new_len);
        self.tables.insert(seq, table);
        Ok(())
    }

    fn take(&mut self) -> u32 {
        let b = self.free.pop().expect("checked against the free count");
        self.refs[b as usize] = 1;
        b
    }

    /// Gives `child` the same blocks as `parent` (shared, reference-counted).
    /// Replaces any table `child` had.
    pub fn fork(&mut self, parent: SeqKey, child: SeqKey) {
        self.release(child);
        let table = self.tables.get(&parent).cloned().unwrap_or_default();
        for &b in &table.blocks {
            self.refs[b as usize] += 1;
        }
        self.tables.insert(child, table);
    }

    /// Drops `seq`'s table; blocks no other sequence shares return to the free
    /// list. Returns how many blocks became free.
    pub fn release(&mut self, seq: SeqKey) -> usize {
        let Some(table) = self.tables.remove(&seq) else {
            return 0;
        };
        let mut freed = 0;
        for b in table.blocks {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r == 0 {
                self.free.push(b);
                freed += 1;
            }
        }
        freed
    }

    /// Sequences holding tables.
    pub fn sequences(&self) -> usize {
        self.tables.len()
    }
}

/// The element type a CPU node stores keys and values in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// f32: exactly what the layer computed.
    #[default]
    F32,
    /// IEEE f16 (rounded to nearest): half the memory.
    F16,
    /// bfloat16 (rounded to nearest): half the memory, f32's range.
    Bf16,
}

impl KvDtype {
    /// The names accepted by [`std::str::FromStr`].
    pub const NAMES: &'static str = "f32, f16, bf16";

    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            other => Err(format!(
                "unknown KV element type '{other}' (choose {})",
                Self::NAMES
            )),
        }
    }
}

/// One layer's keys (or values), in the pool's element type.
#[derive(Debug)]
enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl KvBuf {
    fn zeroed(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(vec![0f32; n]),
            KvDtype::F16 => KvBuf::F16(vec![f16::ZERO; n]),
            KvDtype::Bf16 => KvBuf::Bf16(vec![bf16::ZERO; n]),
        }
    }

    /// Writes `src` at `at`, rounded to the element type.
    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(d) => d[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = f16::from_f32(s)),
            KvBuf::Bf16(d) => d[at..at + src.len()]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &s)| *d = bf16::from_f32(s)),
        }
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            KvBuf::F32(d) => d.copy_within(src, dst),
            KvBuf::F16(d) => d.copy_within(src, dst),
            KvBuf::Bf16(d) => d.copy_within(src, dst),
        }
    }
}

/// One layer's keys and values as stored.
#[derive(Debug, Clone, Copy)]
pub enum KvLayer<'a> {
    /// f32 elements.
    F32(&'a [f32], &'a [f32]),
    /// f16 elements.
    F16(&'a [f16], &'a [f16]),
    /// bf16 elements.
    Bf16(&'a [bf16], &'a [bf16]),
}

/// One node's physical KV storage: for each of its layers, keys and values of
/// `n_blocks × block_size` positions of `kv_width` elements of one
/// [`KvDtype`] (rounded to it as they are written).
#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    kv_width: usize,
    n_blocks: usize,
    dtype: KvDtype,
    layers: Vec<(KvBuf, KvBuf)>,
}

impl KvPool {
    /// A zeroed f32 pool. The memory is reserved lazily by the OS as blocks are written.
    pub fn new(layers: usize, kv_width: usize, block_size: usize, n_blocks: usize) -> Self {
        Self::with_dtype(layers, kv_width, block_size, n_blocks, KvDtype::F32)
    }

    /// A zeroed pool of `dtype` elements.
    pub fn with_dtype(
        layers: usize,
        kv_width: usize,
        block_size: usize,
        n_blocks: usize,
        dtype: KvDtype,
    ) -> Self {
        let n = n_blocks * block_size * kv_width;
        Self {
            block_size,
            kv_width,
            n_blocks,
            dtype,
            layers: (0..layers)
                .map(|_| (KvBuf::zeroed(dtype, n), KvBuf::zeroed(dtype, n)))
                .collect(),
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Elements per position (local KV heads × head dim).
    pub fn kv_width(&self) -> usize {
        self.kv_width
    }

    /// Blocks in the pool.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// Layers in the pool.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Bytes reserved.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.n_blocks * self.block_size * self.kv_width * self.dtype.bytes()
    }

    /// Copies block `src` into block `dst` in every layer.
    pub fn copy_block(&mut self, src: u32, dst: u32) {
        let w = self.block_size * self.kv_width;
        let (s, d) = (src as usize * w, dst as usize * w);
        for (k, v) in &mut self.layers {
            k.copy_within(s..s + w, d);
            v.copy_within(s..s + w, d);
        }
    }

    /// The element offset of position `pos` of a sequence with block table `table`.
    #[inline]
    pub fn offset(&self, table: &[u32], pos: usize) -> usize {
        (table[pos / self.block_size] as usize * self.block_size + pos % self.block_size)
            * self.kv_width
    }

    /// Writes one position's key and value in `layer`, rounded to the pool's
    /// element type.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(table, pos);
        let (kl, vl) = &mut self.layers[layer];
        kl.write(o, &k[..self.kv_width]);
        vl.write(o, &v[..self.kv_width]);
    }

    /// Layer `layer`'s key and value storage.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.layers[layer] {
            (KvBuf::F32(k), KvBuf::F32(v)) => KvLayer::F32(k, v),
            (KvBuf::F16(k), KvBuf::F16(v)) => KvLayer::F16(k, v),
            (KvBuf::Bf16(k), KvBuf::Bf16(v)) => KvLayer::Bf16(k, v),
            _ => unreachable!("a pool's keys and values share its element type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_return_every_block() {
        let mut m = KvManager::new(4, 10);
        let mut copies = Vec::new();
        m.grow(1, 5, &mut copies).unwrap();
        assert_eq!(m.table(1).len(), 2);
        m.grow(1, 8, &mut copies).unwrap();
        assert_eq!(m.table(1).len(), 2);
        m.grow(2, 13, &mut copies).unwrap();
        assert_eq!(m.usage().used, 6);
        assert_eq!(m.release(1), 2);
        assert_eq!(m.release(1), 0, "a second release frees nothing");
        m.release(2);
        assert_eq!(m.usage(), KvUsage { used: 0, total: 10 });
        assert!(copies.is_empty());
    }

    #[test]
    fn exhaustion_changes_nothing() {
        let mut m = KvManager::new(4, 3);
        let mut copies = Vec::new();
        m.grow(1, 8, &mut copies).unwrap();
        let err = m.grow(2, 8, &mut copies).unwrap_err();
        assert_eq!(err, OutOfBlocks { needed: 2, free: 1 });
        assert!(!m.contains(2));
        assert_eq!(m.usage().used, 2);
    }

    #[test]
    fn forks_share_until_a_partial_tail_is_written() {
        let mut m = KvManager::new(4, 10);
        let mut copies = Vec::new();
        m.grow(1, 6, &mut copies).unwrap(); // blocks [0, 1], tail half full
        m.fork(1, 2);
        assert_eq!(m.usage().used, 2);
        assert_eq!(m.blocks_needed(2, 7), 1);
        m.grow(2, 7, &mut copies).unwrap();
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(m.table(2), &[0, 2]);
        assert_eq!(m.table(1), &[0, 1]);
        // The parent's tail is now private again: no copy.
        m.grow(1, 7, &mut copies).unwrap();
        assert_eq!(copies.len(), 1);
        m.release(1);
        m.release(2);
        assert_eq!(m.usage().used, 0);
    }

    #[test]
    fn pool_copies_blocks_in_every_layer() {
        let mut p = KvPool::new(2, 3, 2, 4);
        p.write(1, &[3], 1, &[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        p.copy_block(3, 0);
        let KvLayer::F32(k, v) = p.layer(1) else {
            panic!("an f32 pool")
        };
        assert_eq!(&k[3..6], &[1.0, 2.0, 3.0]);
        assert_eq!(&v[3..6], &[4.0, 5.0, 6.0]);
        assert_eq!(p.offset(&[3, 0], 3), 3);
    }

    #[test]
    fn half_pools_round_what_they_store_and_take_half_the_bytes() {
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            let mut p = KvPool::with_dtype(1, 2, 2, 2, dtype);
            assert_eq!(p.bytes(), KvPool::new(1, 2, 2, 2).bytes() / 2);
            p.write(0, &[1], 0, &[1.0, 1.0 / 3.0], &[-2.5, 1e-3]);
            p.copy_block(1, 0);
            let got: Vec<f32> = match p.layer(0) {
                KvLayer::F16(k, v) => k[..2].iter().chain(&v[..2]).map(|x| x.to_f32()).collect(),
                KvLayer::Bf16(k, v) => k[..2].iter().chain(&v[..2]).map(|x| x.to_f32()).collect(),
                KvLayer::F32(..) => panic!("a {dtype:?} pool"),
            };
            for (g, want) in got.iter().zip([1.0f32, 1.0 / 3.0, -2.5, 1e-3]) {
                assert!(
                    (g - want).abs() <= want.abs() * 2f32.powi(-8),
                    "{dtype:?}: {g} vs {want}"
                );
            }
            assert_eq!("BF16".parse::<KvDtype>().unwrap(), KvDtype::Bf16);
            assert!("f8"
                .parse::<KvDtype>()
                .unwrap_err()
                .contains("f32, f16, bf16"));
        }
    }
}
