//! Which instruction sets the CPU kernels may use: what the CPU reports, less
//! what `PARALLM_CPU_FEATURES` turns off.
//!
//! Every kernel's run-time dispatch asks [`enabled`], never the CPU directly,
//! so one variable turns a path off everywhere: for comparisons, and as an
//! escape hatch when a path misbehaves on some CPU. The value is a
//! comma-separated list of features to turn off, each written `-name`
//! (`PARALLM_CPU_FEATURES=-avx512,-vnni`), or `scalar` for no SIMD at all.
//! Turning AVX2 off turns every SIMD path off, since all of them build on it.
//! [`report`] says what was detected, what is on, and the path each kernel
//! family runs.

use std::sync::OnceLock;

/// The environment variable that turns features off.
pub const ENV: &str = "PARALLM_CPU_FEATURES";

/// An instruction-set feature the kernels dispatch on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// AVX2 with FMA and F16C: the base of every SIMD path.
    Avx2,
    /// AVX-512 F, VL and BW.
    Avx512,
    /// AVX-512 VNNI (int8 dot products).
    Vnni,
    /// AMX tiles for int8 (the quantized kernels' prefill and large-batch
    /// products; used only where Linux also grants the tile data).
    Amx,
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 4] = [Feature::Avx2, Feature::Avx512, Feature::Vnni, Feature::Amx];

    /// Its name in `PARALLM_CPU_FEATURES` and reports.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Avx2 => "avx2",
            Feature::Avx512 => "avx512",
            Feature::Vnni => "vnni",
            Feature::Amx => "amx",
        }
    }

    /// Whether this CPU reports it.
    pub fn detected(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Feature::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                Feature::Avx512 => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512bw")
                }
                Feature::Vnni => is_x86_feature_detected!("avx512vnni"),
                Feature::Amx => cpuinfo_flag("amx_int8"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// Whether `/proc/cpuinfo` lists `flag`.
#[cfg(target_arch = "x86_64")]
fn cpuinfo_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .map(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// The features a `PARALLM_CPU_FEATURES` value turns off, or what is wrong
/// with it.
pub fn parse_off(value: &str) -> Result<Vec<Feature>, String> {
    let mut off = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item.eq_ignore_ascii_case("scalar") {
            off.extend(Feature::ALL);
            continue;
        }
        let name = item.strip_prefix('-').ok_or_else(|| {
            format!("{ENV}: '{item}' must be written -name (turn a feature off) or scalar")
        })?;
        let f = Feature::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!("{ENV}: unknown feature '{name}' (known: avx2, avx512, vnni, amx)")
            })?;
        off.push(f);
    }
    Ok(off)
}

/// What the environment turns off; a bad value turns nothing off here (the
/// command line refuses it first, through [`check_env`]).
fn turned_off() -> &'static [Feature] {
    static OFF: OnceLock<Vec<Feature>> = OnceLock::new();
    OFF.get_or_init(|| {
        std::env::var(ENV)
            .ok()
            .and_then(|v| parse_off(&v).ok())
            .unwrap_or_default()
    })
}

/// Checks `PARALLM_CPU_FEATURES`, for programs to refuse a bad value.
pub fn check_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(v) => parse_off(&v).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Whether the kernels may use `f`: detected, not turned off, and (for the
/// wider paths) AVX2 usable too.
pub fn enabled(f: Feature) -> bool {
    static ON: OnceLock<[bool; 4]> = OnceLock::new();
    let on = ON.get_or_init(|| {
        let raw = |f: Feature| f.detected() && !turned_off().contains(&f);
        let avx2 = raw(Feature::Avx2);
        Feature::ALL.map(|f| raw(f) && (f == Feature::Avx2 || avx2))
    });
    on[Feature::ALL.iter().position(|&g| g == f).unwrap_or(0)]
}

/// What was detected, what is on, and the path of each kernel family, in
/// one line: `cpu: avx2 avx512 vnni (off: -avx512); kernels: quantized
/// avx2-vnni, f32 matmul avx2, attention avx2, elementwise avx2, weight
/// prefetch 2048 B ahead`.
pub fn report() -> String {
    let detected: Vec<&str> = Feature::ALL
        .iter()
        .filter(|f| f.detected())
        .map(|f| f.name())
        .collect();
    let off: Vec<String> = turned_off()
        .iter()
        .filter(|f| f.detected())
        .map(|f| format!("-{}", f.name()))
        .collect();
    format!(
        "cpu: {}{}; kernels: quantized {}, f32 matmul {}, attention {}, elementwise {}, weight prefetch {}",
        if detected.is_empty() {
            "no SIMD feature".to_string()
        } else {
            detected.join(" ")
        },
        if off.is_empty() {
            String::new()
        } else {
            format!(" (turned off by {ENV}: {})", off.join(","))
        },
        super::quant::kernel_path(),
        super::skinny::kernel_path(),
        super::attn::kernel_path(),
        if enabled(Feature::Avx2) {
            "avx2"
        } else {
            "scalar"
        },
        match super::prefetch::distance() {
            0 => "off".to_string(),
            d => format!("{d} B ahead"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_turns_features_off_by_name() {
        assert_eq!(parse_off(""), Ok(vec![]));
        assert_eq!(
            parse_off("-avx512, -VNNI"),
            Ok(vec![Feature::Avx512, Feature::Vnni])
        );
        assert_eq!(parse_off("scalar"), Ok(Feature::ALL.to_vec()));
        let err = parse_off("-sse9").unwrap_err();
        assert!(err.contains("unknown feature 'sse9'"), "{err}");
        let err = parse_off("avx2").unwrap_err();
        assert!(err.contains("-name"), "{err}");
    }

    #[test]
    fn enabled_features_are_detected_ones() {
        for f in Feature::ALL {
            assert!(!enabled(f) || f.detected(), "{f:?}");
        }
        assert!(report().contains("kernels: quantized"));
    }
}
