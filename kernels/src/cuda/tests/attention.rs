use super::*;

use crate::cuda::device::Dtype;
use crate::cuda::ops::{self, AttnArgs};

// Tolerance (every test): a kernel output o against the f64 reference r,
// computed from the same rounded 16-bit q, k and v, must satisfy
// |o − r| ≤ 1 ulp of the 16-bit type at |r| + 1e-4 · max|v|: the output is
// rounded once (½ ulp) and the f32 arithmetic adds ~1e-6 · max|v|. Decode and
// prefill outputs for the same rows must agree within the same bound.
use crate::test_rng::Rng;

#[derive(Debug, Clone, Copy)]
struct Cfg {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl Cfg {
    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// A fused q|k|v row, wider than the queries.
    fn q_stride(&self) -> usize {
        self.q_width() + 2 * self.kv_width()
    }
}

const CONFIGS: [Cfg; 4] = [
    Cfg {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        block_size: 4,
    },
    Cfg {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 128,
        block_size: 16,
    },
    Cfg {
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 32,
        block_size: 16,
    },
    Cfg {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 256,
        block_size: 4,
    },
];

fn nan_bits(t: Dtype) -> u16 {
    t.from_f32(f32::NAN)
}

/// Sequences in a paged cache: each one's blocks are taken from a shuffled
/// pool (not contiguous, not sorted); unused slots hold NaN.
struct Cache {
    t: Dtype,
    cfg: Cfg,
    k: Vec<u16>,
    v: Vec<u16>,
    tables: Vec<u32>,
    starts: Vec<u32>,
    vmax: f64,
}

impl Cache {
    fn new(rng: &mut Rng, t: Dtype, cfg: Cfg, lens: &[usize]) -> Self {
        let bs = cfg.block_size;
        let need: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
        let n_blocks = need.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.range(0, i));
        }
        let (mut tables, mut starts) = (Vec::new(), Vec::new());
        let mut next = ids.into_iter();
        for &n in &need {
            starts.push(tables.len() as u32);
            tables.extend(next.by_ref().take(n));
        }
        let w = cfg.kv_width();
        let mut c = Cache {
            t,
            cfg,
            k: vec![nan_bits(t); n_blocks * bs * w],
            v: vec![nan_bits(t); n_blocks * bs * w],
            tables,
            starts,
            vmax: 0.0,
        };
        for (s, &len) in lens.iter().enumerate() {
            for p in 0..len {
                let at = c.slot(s, p) * w;
                for i in 0..w {
                    c.k[at + i] = t.from_f32(rng.f32());
                    c.v[at + i] = t.from_f32(rng.f32() * 2.0);
                    c.vmax = c.vmax.max(t.to_f32(c.v[at + i]).abs() as f64);
                }
            }
        }
        c
    }

    fn slot(&self, seq: usize, p: usize) -> usize {
        let bs = self.cfg.block_size;
        self.tables[self.starts[seq] as usize + p / bs] as usize * bs + p % bs
    }

    fn row(&self, cache: &[u16], seq: usize, p: usize, kvh: usize) -> Vec<f64> {
        let d = self.cfg.head_dim;
        let at = self.slot(seq, p) * self.cfg.kv_width() + kvh * d;
        cache[at..at + d]
            .iter()
            .map(|&b| self.t.to_f32(b) as f64)
            .collect()
    }
}

/// Query rows (`rows × q_stride`), the part past the queries NaN.
fn queries(rng: &mut Rng, t: Dtype, cfg: Cfg, rows: usize) -> Vec<u16> {
    let mut q = vec![nan_bits(t); rows * cfg.q_stride()];
    for r in 0..rows {
        for i in 0..cfg.q_width() {
            q[r * cfg.q_stride() + i] = t.from_f32(rng.f32() * 3.0);
        }
    }
    q
}

/// The f64 reference: row `r` of `q` is sequence `rows[r].0` at position
/// `rows[r].1`.
fn reference(c: &Cache, q: &[u16], rows: &[(usize, usize)]) -> Vec<f64> {
    let cfg = c.cfg;
    let d = cfg.head_dim;
    let group = cfg.n_heads / cfg.n_kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; rows.len() * cfg.q_width()];
    for (r, &(seq, pos)) in rows.iter().enumerate() {
        for h in 0..cfg.n_heads {
            let qh: Vec<f64> = q[r * cfg.q_stride() + h * d..][..d]
                .iter()
                .map(|&b| c.t.to_f32(b) as f64)
                .collect();
            let kvh = h / group;
            let scores: Vec<f64> = (0..=pos)
                .map(|p| {
                    scale
                        * c.row(&c.k, seq, p, kvh)
                            .iter()
                            .zip(&qh)
                            .map(|(k, q)| k * q)
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(r * cfg.n_heads + h) * d..][..d];
            for (p, wp) in w.iter().enumerate() {
                for (oi, vi) in o.iter_mut().zip(c.row(&c.v, seq, p, kvh)) {
                    *oi += wp / sum * vi;
                }
            }
        }
    }
    out
}

fn ulp(t: Dtype, x: f64) -> f64 {
    let (mant, min_normal) = match t {
        Dtype::F16 => (10, 2f64.powi(-14)),
        Dtype::Bf16 => (7, 2f64.powi(-126)),
    };
    2f64.powf(x.abs().max(min_normal).log2().floor() - mant as f64)
}

fn close(c: &Cache, got: &[u16], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = c.t.to_f32(g) as f64;
        let tol = ulp(c.t, w) + 1e-4 * c.vmax;
        assert!(
            (g - w).abs() <= tol,
            "{what} {:?} {:?}: element {i} (row {}, head {}): got {g}, want {w} (tol {tol})",
            c.t,
            c.cfg,
            i / c.cfg.q_width(),
            i % c.cfg.q_width() / c.cfg.head_dim
        );
    }
}

/// Device copies of a cache and queries, an output with one spare NaN row.
struct Dev {
    dev: Arc<dyn Device>,
    q: DevBuf,
    k: DevBuf,
    v: DevBuf,
    tables: DevBuf,
    out: DevBuf,
    rows: usize,
}

impl Dev {
    fn new(dev: &Arc<dyn Device>, c: &Cache, q: &[u16], rows: usize) -> Self {
        let out = vec![nan_bits(c.t); (rows + 1) * c.cfg.q_width()];
        Dev {
            dev: dev.clone(),
            q: buf(dev, q),
            k: buf(dev, &c.k),
            v: buf(dev, &c.v),
            tables: buf(dev, &c.tables),
            out: buf(dev, &out),
            rows,
        }
    }

    fn args(&self, c: &Cache) -> AttnArgs {
        AttnArgs {
            q: self.q.ptr(),
            q_stride: c.cfg.q_stride(),
            k_cache: self.k.ptr(),
            v_cache: self.v.ptr(),
            tables: self.tables.ptr(),
            out: self.out.ptr(),
            n_heads: c.cfg.n_heads,
            n_kv_heads: c.cfg.n_kv_heads,
            head_dim: c.cfg.head_dim,
            block_size: c.cfg.block_size,
            scale: 1.0 / (c.cfg.head_dim as f32).sqrt(),
        }
    }

    /// The output rows; checks that the spare row was not written.
    fn output(&self, c: &Cache) -> Vec<u16> {
        let w = c.cfg.q_width();
        let mut all: Vec<u16> = self.out.read((self.rows + 1) * w).unwrap();
        assert!(
            all[self.rows * w..].iter().all(|&b| b == nan_bits(c.t)),
            "written past the rows"
        );
        all.truncate(self.rows * w);
        all
    }

    /// Decode of every row: `rows[r]` = (sequence, position).
    fn decode(&self, c: &Cache, rows: &[(usize, usize)]) -> Vec<u16> {
        assert_eq!(rows.len(), self.rows);
        let starts: Vec<u32> = rows.iter().map(|&(s, _)| c.starts[s]).collect();
        let pos: Vec<u32> = rows.iter().map(|&(_, p)| p as u32).collect();
        let (starts, pos) = (buf(&self.dev, &starts), buf(&self.dev, &pos));
        // SAFETY: q holds `rows` rows of q_stride, the caches every slot the
        // tables name, the tables every block of positions 0..=pos, out
        // `rows` rows of n_heads·head_dim (plus a spare), starts and pos one
        // u32 per row.
        unsafe {
            ops::attn_decode(
                &*self.dev,
                c.t,
                &self.args(c),
                starts.ptr(),
                pos.ptr(),
                rows.len(),
            )
        }
        .unwrap();
        self.output(c)
    }

    /// Prefill: `items` = (sequence, first row, rows, first position).
    fn prefill(&self, c: &Cache, items: &[(usize, u32, u32, u32)]) -> Vec<u16> {
        let tiles =
            ops::prefill_tiles(items.iter().map(|&(s, row, n, p)| (row, n, c.starts[s], p)));
        let tiles_dev = buf(&self.dev, &ops::tiles_as_u32(&tiles));
        // SAFETY: as for decode; every tile's rows are below `rows` and its
        // positions are in its sequence's table; tiles_dev holds 4 u32 per
        // tile.
        unsafe { ops::attn_prefill(&*self.dev, c.t, &self.args(c), tiles_dev.ptr(), tiles.len()) }
            .unwrap();
        self.output(c)
    }
}

#[test]
fn attn_decode_matches_reference() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(11);
    let lens = [1, 5, 37];
    // One row at the end of each sequence, in shuffled order.
    let rows = [(1, 4), (0, 0), (2, 36)];
    for t in [Dtype::F16, Dtype::Bf16] {
        for cfg in CONFIGS {
            decode_against_reference(&dev, &mut rng, (t, cfg), &lens, &rows, "decode");
        }
    }
}

/// Decodes `rows` (sequence, position) over a random cache of sequences of
/// `lens` and compares with the reference.
fn decode_against_reference(
    dev: &Arc<dyn Device>,
    rng: &mut Rng,
    (t, cfg): (Dtype, Cfg),
    lens: &[usize],
    rows: &[(usize, usize)],
    what: &str,
) {
    let c = Cache::new(rng, t, cfg, lens);
    let q = queries(rng, t, cfg, rows.len());
    let d = Dev::new(dev, &c, &q, rows.len());
    close(&c, &d.decode(&c, rows), &reference(&c, &q, rows), what);
}

#[test]
fn attn_decode_of_many_rows_runs_four_warps_a_block_and_matches_reference() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(13);
    let cfg = CONFIGS[0];
    // Enough rows that heads × rows reaches DECODE_FEW_BLOCKS: the launch
    // takes 4 warps a block instead of 16.
    let n = ops::DECODE_FEW_BLOCKS.div_ceil(cfg.n_heads);
    let lens: Vec<usize> = (0..n).map(|i| i % 9 + 1).collect();
    let rows: Vec<(usize, usize)> = lens.iter().enumerate().map(|(s, &l)| (s, l - 1)).collect();
    decode_against_reference(
        &dev,
        &mut rng,
        (Dtype::F16, cfg),
        &lens,
        &rows,
        "decode, 4 warps a block",
    );
}

#[test]
fn attn_prefill_matches_reference_and_decode() {
    let Some(dev) = emu() else { return };
    let mut rng = Rng::new(12);
    // (cached positions, new rows) per sequence: a one-token prompt, a short
    // prompt, 37 rows after 3 cached positions (tiles of 16, 16, 5), and 4
    // rows crossing the 32-position chunk boundary.
    let seqs = [(0usize, 1usize), (0, 5), (3, 37), (30, 4)];
    let lens: Vec<usize> = seqs.iter().map(|&(c, n)| c + n).collect();
    // Query rows in a different order from the sequences.
    let order = [2, 0, 3, 1];
    let mut items = Vec::new();
    let mut rows = Vec::new();
    for &s in &order {
        let (cached, n) = seqs[s];
        items.push((s, rows.len() as u32, n as u32, cached as u32));
        rows.extend((cached..cached + n).map(|p| (s, p)));
    }
    for t in [Dtype::F16, Dtype::Bf16] {
        for (i, cfg) in CONFIGS.into_iter().enumerate() {
            let c = Cache::new(&mut rng, t, cfg, &lens);
            let q = queries(&mut rng, t, cfg, rows.len());
            let d = Dev::new(&dev, &c, &q, rows.len());
            let pre = d.prefill(&c, &items);
            close(&c, &pre, &reference(&c, &q, &rows), "prefill");
            // Decode of the same rows, in one configuration per type (47
            // decode rows are slow on the emulation).
            if i == usize::from(t == Dtype::F16) {
                let d2 = Dev::new(&dev, &c, &q, rows.len());
                let dec = d2.decode(&c, &rows);
                let as_f64: Vec<f64> = dec.iter().map(|&b| t.to_f32(b) as f64).collect();
                close(&c, &pre, &as_f64, "prefill against decode");
            }
        }
    }
}
