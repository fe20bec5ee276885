//! Software prefetch of the weight stream, a fixed distance ahead of the
//! row being read.
//!
//! Owns: the prefetch distance (`PARALLM_PREFETCH`, bytes, `0` turns it
//! off; [`DEFAULT_DISTANCE`] otherwise) and [`ahead`], which the batch-1
//! weight sweeps call once per weight row.
//!
//! Why: a decode step at batch 1 reads every weight once, so its speed is
//! the memory bandwidth one core can draw. The hardware prefetchers follow a
//! stream only within a 4 KiB page and only as far as they have learned it;
//! the small matrices of a decode step (rows of a few hundred bytes, a few
//! hundred KiB per matrix) give them little to learn from. On the 2-vCPU
//! Xeon, asking for the lines 2 KiB ahead raised one Q4_1 matrix's read rate
//! from DRAM from 12 to 19–20 GB/s on two threads, and batch-1 decode of the
//! reference model from 125–133 to 228 tok/s (docs/benchmarks.md).
//!
//! What is true: a prefetch never faults and never changes a result; it only
//! asks for cache lines, so [`ahead`] may name lines past the end of a matrix
//! (the next matrix's, or none at all).

use std::sync::OnceLock;

/// Environment variable: the prefetch distance in bytes (`0`: off).
pub const ENV: &str = "PARALLM_PREFETCH";

/// The distance used unless `PARALLM_PREFETCH` says otherwise: measured
/// best of 512–4096 on the Xeon (1536 to 3072 were within noise of it).
pub const DEFAULT_DISTANCE: usize = 2048;

/// The largest distance accepted: further than this the lines are evicted
/// again before they are read.
pub const MAX_DISTANCE: usize = 1 << 20;

/// The distance a `PARALLM_PREFETCH` value gives (unset: the default).
///
/// # Errors
/// A value that is not a number of bytes up to [`MAX_DISTANCE`], naming the
/// variable.
pub fn parse(value: Option<&str>) -> Result<usize, String> {
    let Some(v) = value else {
        return Ok(DEFAULT_DISTANCE);
    };
    match v.trim().parse::<usize>() {
        Ok(d) if d <= MAX_DISTANCE => Ok(d),
        _ => Err(format!(
            "{ENV}: '{v}' is not a prefetch distance in bytes (0 turns prefetching off, at most {MAX_DISTANCE})"
        )),
    }
}

/// Checks `PARALLM_PREFETCH`, for programs to refuse a bad value.
pub fn check_env() -> Result<(), String> {
    parse(std::env::var(ENV).ok().as_deref()).map(|_| ())
}

/// The prefetch distance in bytes (`0`: off). A bad value gives the default
/// here; the command line refuses it first, through [`check_env`].
pub fn distance() -> usize {
    static D: OnceLock<usize> = OnceLock::new();
    *D.get_or_init(|| parse(std::env::var(ENV).ok().as_deref()).unwrap_or(DEFAULT_DISTANCE))
}

/// Asks for the cache lines of `[p + dist, p + dist + len)` (into L1), one
/// prefetch per 64-byte line. `dist == 0` asks for nothing.
#[inline(always)]
pub fn ahead(p: *const u8, len: usize, dist: usize) {
    if dist != 0 {
        lines::<L1>(p.wrapping_add(dist), len);
    }
}

/// Into every cache level ([`lines`]).
pub const L1: i32 = 3;
/// Into L2 and the levels beyond, not L1 ([`lines`]).
pub const L2: i32 = 2;

/// Asks for the cache lines of `[p, p + len)` into cache level `LEVEL`
/// ([`L1`] or [`L2`]), one prefetch per 64-byte line.
#[inline(always)]
pub fn lines<const LEVEL: i32>(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let mut o = 0;
        while o < len {
            let at = p.wrapping_add(o).cast::<i8>();
            // SAFETY: SSE is part of x86_64; a prefetch reads nothing and
            // never faults, whatever the address.
            unsafe {
                if LEVEL == L1 {
                    _mm_prefetch::<_MM_HINT_T0>(at)
                } else {
                    _mm_prefetch::<_MM_HINT_T1>(at)
                }
            };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_gives_a_distance_in_bytes() {
        assert_eq!(parse(None), Ok(DEFAULT_DISTANCE));
        assert_eq!(parse(Some(" 4096 ")), Ok(4096));
        assert_eq!(parse(Some("0")), Ok(0));
        for bad in ["-1", "2k", "", "99999999"] {
            let err = parse(Some(bad)).unwrap_err();
            assert!(err.starts_with("PARALLM_PREFETCH: "), "{err}");
        }
    }

    #[test]
    fn prefetching_past_the_end_of_a_buffer_is_harmless() {
        let v = [1u8; 100];
        ahead(v.as_ptr(), v.len(), 1 << 20);
        ahead(v.as_ptr(), 1 << 16, 64);
        ahead(std::ptr::null(), 256, 0);
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 100);
    }
}
