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
//! **Prefix caching** ([`KvManager::with_prefix_cache`]): a full block whose
//! keys and values have been computed is registered under a hash chained over
//! its tokens and its parent's hash, with its tokens and its parent block kept
//! to verify a match (a hash collision is a miss, never wrong keys and values).
//! A new sequence starts with the longest chain of cached blocks its tokens
//! match ([`KvManager::lookup`]), shared by reference count like a fork's. A
//! cached block no sequence uses stays cached, *idle*, until an allocation
//! finds the free list empty and evicts the least recently used idle block,
//! with its cached descendants (which are idle too: a table holding a block
//! holds its parent). So a cached block's parent is always the block its
//! contents were computed after.
//!
//! **Invariant:** a block is on the free list or idle exactly when its reference
//! count is zero; [`KvManager::release`] frees a sequence's blocks exactly once
//! (a second call finds no table and frees nothing).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

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
/// counts, each sequence's block table, and (with prefix caching) the cached
/// blocks.
#[derive(Debug, Clone)]
pub struct KvManager {
    block_size: usize,
    refs: Vec<u32>,
    free: Vec<u32>,
    tables: HashMap<SeqKey, Table>,
    cache: Option<PrefixCache>,
}

#[derive(Debug, Clone)]
struct Table {
    blocks: Vec<u32>,
    /// Positions whose KV has been (or is being) written.
    len: usize,
    /// Leading blocks whose hashes are known (matched or registered).
    hashed: usize,
    /// The chained hash of block `hashed - 1` (0 before the first).
    chain: u64,
    /// Whether blocks past `hashed` may still be registered: false once one
    /// could not be (its contents were cached in another block already), since
    /// a cached block's parent must be cached.
    chain_ok: bool,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            blocks: Vec::new(),
            len: 0,
            hashed: 0,
            chain: 0,
            chain_ok: true,
        }
    }
}

/// Counters of a replica's prefix cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Tokens of the sequences looked up.
    pub queried_tokens: u64,
    /// Of those, tokens whose keys and values came from the cache.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

/// What a cached block holds.
#[derive(Debug, Clone)]
struct Cached {
    hash: u64,
    parent: Option<u32>,
    tokens: Box<[u32]>,
    /// Its key in `idle` while no sequence uses it.
    tick: u64,
    children: Vec<u32>,
}

#[derive(Debug, Clone)]
struct PrefixCache {
    by_hash: HashMap<u64, u32>,
    blocks: HashMap<u32, Cached>,
    /// Cached blocks no sequence uses, by last use (least recent first).
    idle: BTreeMap<u64, u32>,
    tick: u64,
    hasher: std::collections::hash_map::RandomState,
    stats: PrefixStats,
}

impl PrefixCache {
    fn new() -> Self {
        PrefixCache {
            by_hash: HashMap::new(),
            blocks: HashMap::new(),
            idle: BTreeMap::new(),
            tick: 0,
            hasher: std::collections::hash_map::RandomState::new(),
            stats: PrefixStats::default(),
        }
    }

    /// The chained hash of a block of `tokens` after a block hashed `parent`.
    fn hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
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
            cache: None,
        }
    }

    /// [`KvManager::new`] with prefix caching (see the module docs).
    pub fn with_prefix_cache(block_size: usize, total: usize) -> Self {
        Self {
            cache: Some(PrefixCache::new()),
            ..Self::new(block_size, total)
        }
    }

    /// The prefix cache's counters (zeros without one).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.cache
            .as_ref()
            .map_or_else(PrefixStats::default, |c| c.stats)
    }

    /// Counts a sequence admitted with `tokens` tokens of which `hit` came
    /// from the cache (a [`KvManager::lookup`] that was kept; one undone by
    /// [`KvManager::release`] because the sequence did not fit is not counted).
    pub fn count_admission(&mut self, tokens: usize, hit: usize) {
        if let Some(c) = self.cache.as_mut() {
            c.stats.queried_tokens += tokens as u64;
            c.stats.hit_tokens += hit as u64;
        }
    }

    /// Cached blocks, idle or in use.
    pub fn cached_blocks(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.blocks.len())
    }

    /// The chained hashes of the full blocks of `tokens` that `seq`'s
    /// positions `..upto` complete beyond those already hashed (from the
    /// start if `seq` has no table): what registering them would key them
    /// by. Empty without a prefix cache, or once `seq` registers no more.
    pub fn next_hashes(&self, seq: SeqKey, tokens: &[u32], upto: usize) -> Vec<u64> {
        let bs = self.block_size;
        let Some(cache) = self.cache.as_ref() else {
            return Vec::new();
        };
        let (mut j, mut chain) = match self.tables.get(&seq) {
            Some(t) if !t.chain_ok => return Vec::new(),
            Some(t) => (t.hashed, t.chain),
            None => (0, 0),
        };
        let mut out = Vec::new();
        while (j + 1) * bs <= upto.min(tokens.len()) {
            chain = cache.hash(chain, &tokens[j * bs..(j + 1) * bs]);
            out.push(chain);
            j += 1;
        }
        out
    }

    /// Positions a [`KvManager::lookup`] of `tokens` would reuse now, without
    /// taking anything (for routing a request to the replica that has them).
    pub fn cached_prefix(&self, tokens: &[u32]) -> usize {
        self.matching_chain(tokens).0.len() * self.block_size
    }

    /// The cached blocks `tokens` match, in order (verified: each holds its
    /// block of `tokens` and follows the one before), leaving the last token
    /// out, and the chained hash of the last of them (0 for none).
    fn matching_chain(&self, tokens: &[u32]) -> (Vec<u32>, u64) {
        let (mut blocks, mut chain) = (Vec::new(), 0);
        let Some(cache) = self.cache.as_ref() else {
            return (blocks, chain);
        };
        let Some(head) = tokens.len().checked_sub(1) else {
            return (blocks, chain);
        };
        for block in tokens[..head].chunks_exact(self.block_size) {
            let h = cache.hash(chain, block);
            match cache.by_hash.get(&h).map(|b| (*b, &cache.blocks[b])) {
                Some((b, c)) if c.parent == blocks.last().copied() && *c.tokens == *block => {
                    blocks.push(b);
                    chain = h;
                }
                _ => break,
            }
        }
        (blocks, chain)
    }

    /// Starts `seq`, which must have no table yet, with the longest chain of
    /// cached blocks that its `tokens` match, leaving at least the last token
    /// to compute. Returns the positions reused (a multiple of the block size;
    /// 0 without a prefix cache or a match).
    pub fn lookup(&mut self, seq: SeqKey, tokens: &[u32]) -> usize {
        if self.tables.contains_key(&seq) {
            return 0;
        }
        let (blocks, chain) = self.matching_chain(tokens);
        let n = blocks.len();
        let Some(cache) = self.cache.as_mut().filter(|_| n > 0) else {
            return 0;
        };
        // Take them, touching the chain from its end so that a parent is
        // never less recently used than its child.
        for &b in blocks.iter().rev() {
            let t = cache.next_tick();
            let c = cache.blocks.get_mut(&b).expect("a matched block is cached");
            if self.refs[b as usize] == 0 {
                cache.idle.remove(&c.tick);
            }
            c.tick = t;
            self.refs[b as usize] += 1;
        }
        let len = n * self.block_size;
        self.tables.insert(
            seq,
            Table {
                blocks,
                len,
                hashed: n,
                chain,
                chain_ok: true,
            },
        );
        len
    }

    /// Registers the full blocks of `seq` whose keys and values are computed:
    /// `tokens` are its tokens at positions `0..tokens.len()`, all computed.
    /// A block whose contents are cached already (in another block) ends the
    /// registering for this table. Does nothing without a prefix cache.
    pub fn register(&mut self, seq: SeqKey, tokens: &[u32]) {
        let bs = self.block_size;
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        let full = table
            .blocks
            .len()
            .min(tokens.len() / bs)
            .min(table.len / bs);
        while table.chain_ok && table.hashed < full {
            let j = table.hashed;
            let b = table.blocks[j];
            let block = &tokens[j * bs..(j + 1) * bs];
            let h = cache.hash(table.chain, block);
            let parent = j.checked_sub(1).map(|p| table.blocks[p]);
            if let Some(c) = cache.blocks.get(&b) {
                // Matched or registered through another table (a fork).
                if c.hash != h {
                    table.chain_ok = false;
                    break;
                }
            } else if cache.by_hash.contains_key(&h) {
                table.chain_ok = false;
                break;
            } else {
                let tick = cache.next_tick();
                cache.by_hash.insert(h, b);
                cache.blocks.insert(
                    b,
                    Cached {
                        hash: h,
                        parent,
                        tokens: block.into(),
                        tick,
                        children: Vec::new(),
                    },
                );
                if let Some(p) = parent.and_then(|p| cache.blocks.get_mut(&p)) {
                    p.children.push(b);
                }
            }
            table.hashed = j + 1;
            table.chain = h;
        }
    }

    /// Forgets every cached block (the nodes' contents were lost): idle ones
    /// return to the free list; tables keep their blocks but register no more.
    pub fn clear_cache(&mut self) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        self.free.extend(cache.idle.values().copied());
        cache.idle.clear();
        cache.blocks.clear();
        cache.by_hash.clear();
        for t in self.tables.values_mut() {
            t.chain_ok = false;
        }
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Current usage.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            used: self.refs.len() - self.free_blocks(),
            total: self.refs.len(),
        }
    }

    /// Blocks an allocation may take: free ones and idle cached ones.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.cache.as_ref().map_or(0, |c| c.idle.len())
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
        if needed > self.free_blocks() {
            return Err(OutOfBlocks {
                needed,
                free: self.free_blocks(),
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
        if self.free.is_empty() {
            self.evict_one();
        }
        let b = self.free.pop().expect("checked against the free count");
        self.refs[b as usize] = 1;
        b
    }

    /// Evicts the least recently used idle cached block and its cached
    /// descendants (idle too) to the free list.
    fn evict_one(&mut self) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let Some((_, first)) = cache.idle.pop_first() else {
            return;
        };
        let mut stack = vec![first];
        while let Some(b) = stack.pop() {
            let Some(c) = cache.blocks.remove(&b) else {
                continue;
            };
            cache.by_hash.remove(&c.hash);
            if b != first {
                cache.idle.remove(&c.tick);
            }
            if let Some(p) = c.parent.and_then(|p| cache.blocks.get_mut(&p)) {
                p.children.retain(|&x| x != b);
            }
            debug_assert_eq!(self.refs[b as usize], 0, "an evicted block is idle");
            self.free.push(b);
            cache.stats.evictions += 1;
            stack.extend(c.children);
        }
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
        // Last block first: an idle child is then less recently used than
        // its parent, so eviction takes the tails of chains before what they
        // share.
        table
            .blocks
            .into_iter()
            .rev()
            .filter(|&b| self.unref(b))
            .count()
    }

    /// Drops one reference to block `b`; `true` when that was the last (the
    /// block is then idle in the cache, or free).
    fn unref(&mut self, b: u32) -> bool {
        let r = &mut self.refs[b as usize];
        *r -= 1;
        if *r > 0 {
            return false;
        }
        match self.cache.as_mut() {
            Some(c) if c.blocks.contains_key(&b) => {
                let tick = c.next_tick();
                c.blocks.get_mut(&b).expect("checked").tick = tick;
                c.idle.insert(tick, b);
            }
            _ => self.free.push(b),
        }
        true
    }

    /// Forgets the positions of `seq` from `len` on (speculative tokens that
    /// were rejected): blocks past those holding `0..len` are given back.
    /// Never shortens below its registered (cached) blocks.
    pub fn truncate(&mut self, seq: SeqKey, len: usize) {
        let keep = self.blocks_for(len);
        let Some(table) = self.tables.get_mut(&seq) else {
            return;
        };
        if len >= table.len {
            return;
        }
        let keep = keep.max(table.hashed);
        table.len = len.max(table.hashed * self.block_size);
        let tail = table.blocks.split_off(keep.min(table.blocks.len()));
        for b in tail.into_iter().rev() {
            self.unref(b);
        }
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

/// The element types a KV pool stores: plain numbers, for which every bit
/// pattern is a value and all-zero bits are +0.
trait KvElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
}

impl KvElem for f32 {
    const ZERO: Self = 0.0;
}

impl KvElem for f16 {
    const ZERO: Self = f16::ZERO;
}

impl KvElem for bf16 {
    const ZERO: Self = bf16::ZERO;
}

/// `len` zeroed elements in an anonymous memory mapping of their own, so
/// the OS provides each page when it is first written. A pool then holds
/// memory for the blocks written, not for every block it could hold. From
/// the allocator, `vec![0.0; n]` is `calloc`, which `memset`s memory it
/// takes from its own heap: glibc does so for any buffer under its
/// mmap threshold, which grows up to 32 MiB as large buffers are freed.
/// That touched the whole pool at start-up: about 0.4 s and 350 MB
/// resident for the reference model's default 1 GiB.
enum Zeroed<T> {
    Mapped {
        map: memmap2::MmapMut,
        len: usize,
        _elem: std::marker::PhantomData<T>,
    },
    /// Where no mapping could be made (or none is needed: no elements).
    Heap(Vec<T>),
}

impl<T: KvElem> Zeroed<T> {
    fn new(len: usize) -> Self {
        let bytes = len.checked_mul(std::mem::size_of::<T>());
        match bytes.filter(|&b| b > 0).map(memmap2::MmapMut::map_anon) {
            Some(Ok(map)) => Zeroed::Mapped {
                map,
                len,
                _elem: std::marker::PhantomData,
            },
            Some(Err(e)) => {
                tracing::warn!("no mapping for {len} KV elements ({e}); allocating them");
                Zeroed::Heap(vec![T::ZERO; len])
            }
            None => Zeroed::Heap(vec![T::ZERO; len]),
        }
    }
}

impl<T: KvElem> std::ops::Deref for Zeroed<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            // SAFETY: the mapping is page-aligned (more than any `KvElem`'s
            // alignment) and holds `len * size_of::<T>()` bytes (`new`),
            // which the OS zero-fills; every bit pattern is a `KvElem`
            // value; the slice borrows `self`, which owns the mapping.
            Zeroed::Mapped { map, len, .. } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().cast::<T>(), *len)
            },
            Zeroed::Heap(v) => v,
        }
    }
}

impl<T: KvElem> std::ops::DerefMut for Zeroed<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            // SAFETY: as in `deref`; the mutable borrow of `self` makes this
            // the mapping's only reference.
            Zeroed::Mapped { map, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<T>(), *len)
            },
            Zeroed::Heap(v) => v,
        }
    }
}

impl<T> std::fmt::Debug for Zeroed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Zeroed::Mapped { len, .. } => write!(f, "Zeroed::Mapped({len} elements)"),
            Zeroed::Heap(v) => write!(f, "Zeroed::Heap({} elements)", v.len()),
        }
    }
}

/// One layer's keys (or values), in the pool's element type.
#[derive(Debug)]
enum KvBuf {
    F32(Zeroed<f32>),
    F16(Zeroed<f16>),
    Bf16(Zeroed<bf16>),
}

impl KvBuf {
    fn zeroed(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(Zeroed::new(n)),
            KvDtype::F16 => KvBuf::F16(Zeroed::new(n)),
            KvDtype::Bf16 => KvBuf::Bf16(Zeroed::new(n)),
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
    /// A zeroed f32 pool. The memory is provided by the OS as blocks are
    /// first written (see `Zeroed`).
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
    fn the_prefix_cache_shares_verified_chains_of_full_blocks() {
        let mut m = KvManager::with_prefix_cache(4, 8);
        let mut copies = Vec::new();
        let a: Vec<u32> = (0..10).collect();
        m.grow(1, 10, &mut copies).unwrap();
        assert_eq!(m.lookup(2, &a), 0, "nothing is cached before a register");
        m.register(1, &a);
        assert_eq!(m.cached_blocks(), 2, "the two full blocks");
        // The same first 9 tokens: both blocks, shared.
        let b: Vec<u32> = (0..9).chain([99]).collect();
        assert_eq!(m.lookup(2, &b), 8);
        assert_eq!(m.table(2), &m.table(1)[..2]);
        assert_eq!(m.usage().used, 3);
        // Exactly 8 tokens: the last must be computed, so one block.
        assert_eq!(m.lookup(3, &a[..8]), 4);
        // Another first block: the same second block does not match.
        let c: Vec<u32> = [5, 1, 2, 3].into_iter().chain(4..10).collect();
        assert_eq!(m.lookup(4, &c), 0);
        assert!(!m.contains(4));
        for s in [1, 2, 3] {
            m.release(s);
        }
        assert_eq!(m.usage().used, 0);
        assert_eq!(m.free_blocks(), 8, "idle cached blocks count as free");
        assert_eq!(m.lookup(5, &a), 8, "idle blocks stay cached");
        m.release(5);
        m.clear_cache();
        assert_eq!((m.cached_blocks(), m.free_blocks()), (0, 8));
        assert_eq!(m.lookup(6, &a), 0);
    }

    #[test]
    fn idle_cached_blocks_are_evicted_least_recently_used_first() {
        let mut m = KvManager::with_prefix_cache(2, 4);
        let mut copies = Vec::new();
        let a = [1, 2, 3, 4, 5];
        m.grow(1, 5, &mut copies).unwrap();
        m.register(1, &a);
        m.release(1); // [3, 4] idle, then [1, 2] (used more recently)
        let b = [7, 8, 9];
        m.grow(2, 3, &mut copies).unwrap();
        m.register(2, &b);
        m.release(2); // [7, 8] idle, most recent
        assert_eq!((m.cached_blocks(), m.free_blocks()), (3, 4));
        // Two blocks: the one free block, then the least recently used idle one.
        m.grow(3, 4, &mut copies).unwrap();
        assert_eq!(m.prefix_stats().evictions, 1);
        assert_eq!(m.lookup(4, &a), 2, "[1, 2] stayed, [3, 4] went");
        assert_eq!(m.lookup(5, &b), 2, "[7, 8] stayed");
        assert_eq!(m.free_blocks(), 0);
        assert!(m.grow(6, 1, &mut copies).is_err(), "every block in use");
    }

    #[test]
    fn zeroed_buffers_start_at_zero_and_keep_what_is_written() {
        for n in [0, 1, 1000, 1 << 20] {
            let mut a = Zeroed::<f32>::new(n);
            let mut b = Zeroed::<f16>::new(n);
            let mut c = Zeroed::<bf16>::new(n);
            assert_eq!((a.len(), b.len(), c.len()), (n, n, n));
            assert!(a.iter().all(|&x| x.to_bits() == 0));
            assert!(b.iter().all(|&x| x.to_bits() == 0));
            assert!(c.iter().all(|&x| x.to_bits() == 0));
            if let Some(last) = n.checked_sub(1) {
                a[last] = 1.5;
                b[last] = f16::from_f32(-2.0);
                c[0] = bf16::from_f32(3.0);
                assert_eq!((a[last], b[last].to_f32(), c[0].to_f32()), (1.5, -2.0, 3.0));
            }
        }
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
