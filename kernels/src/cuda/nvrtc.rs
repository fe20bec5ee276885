//! The kernel sources and their run-time compilation.
//!
//! All `cu/*.cu` files form one NVRTC program, prefixed by `cu/common.cuh`
//! (types, f16/bf16 conversions, warp reductions). The program is compiled to
//! PTX for one virtual architecture (`compute_90` for an H100) the first time
//! a device of that architecture asks, and the PTX is kept for the rest of the
//! process. The sources include no headers, so NVRTC needs no CUDA toolkit
//! beside it.
//!
//! Exported kernels are written `extern "C" __global__ void name(` literally;
//! [`kernel_names`] finds them that way, and the host emulation registers them
//! from the same list.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use super::probe::Lib;
use super::{Error, Result};

/// The shared prelude, first in the program.
pub const COMMON: &str = include_str!("cu/common.cuh");

/// The kernel files, in program order: `(file name, text)`.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("cu/elementwise.cu")),
    ("attention.cu", include_str!("cu/attention.cu")),
    ("sampling.cu", include_str!("cu/sampling.cu")),
    ("quant.cu", include_str!("cu/quant.cu")),
];

/// The whole program's text: the prelude, then every kernel file.
pub fn program_source() -> String {
    let mut s = String::from(COMMON);
    for (name, text) in SOURCES {
        s.push_str(&format!("\n// ---- {name} ----\n"));
        s.push_str(text);
    }
    s
}

/// Every exported kernel's name, in source order.
pub fn kernel_names() -> Vec<&'static str> {
    const MARK: &str = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    for (_, text) in SOURCES {
        let mut rest = *text;
        while let Some(at) = rest.find(MARK) {
            rest = &rest[at + MARK.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(&rest[..end]);
        }
    }
    names
}

/// The NVRTC options for `arch` (`"compute_90"`, `"sm_90"`, …).
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--device-as-default-execution-space".into(),
        "-lineinfo".into(),
    ]
}

/// The virtual architecture for a device of compute capability `major.minor`.
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// The program compiled to PTX for `arch`, compiled once per process and
/// architecture.
pub fn ptx(arch: &str) -> Result<Arc<String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().map_err(poisoned)?.get(arch) {
        return Ok(p.clone());
    }
    let compiled = Arc::new(compile(arch)?);
    cache
        .lock()
        .map_err(poisoned)?
        .insert(arch.to_string(), compiled.clone());
    Ok(compiled)
}

fn poisoned<T>(_: T) -> Error {
    Error::Emulation("the PTX cache's lock was poisoned by a panic".into())
}

/// Compiles the program for `arch` with NVRTC (no caching): the PTX text.
pub fn compile(arch: &str) -> Result<String> {
    use cudarc::nvrtc::result as nv;
    Lib::Nvrtc.require()?;
    let src = CString::new(program_source()).map_err(|e| Error::Compile {
        arch: arch.into(),
        log: e.to_string(),
    })?;
    let name = CString::new("parallm_kernels.cu").expect("no NUL in a literal");
    let prog = nv::create_program(&src, Some(&name))
        .map_err(|e| super::call_err("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` was just created and is destroyed once, below.
    let outcome = unsafe {
        match nv::compile_program(prog, &options(arch)) {
            Ok(()) => nv::get_ptx(prog).map_err(|e| super::call_err("nvrtcGetPTX", e)),
            Err(_) => {
                let log = nv::get_program_log(prog)
                    .map(|l| c_chars_to_string(&l))
                    .unwrap_or_else(|e| format!("(no log: {e:?})"));
                Err(Error::Compile {
                    arch: arch.into(),
                    log,
                })
            }
        }
    };
    // SAFETY: created above, not used after this.
    let _ = unsafe { nv::destroy_program(prog) };
    outcome.map(|p| c_chars_to_string(&p))
}

fn c_chars_to_string(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The NVRTC library's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32)> {
    Lib::Nvrtc.require()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is present (probed); the out-pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| super::call_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_found_and_unique() {
        let names = kernel_names();
        assert!(names.len() >= 20, "{names:?}");
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            names.len(),
            "duplicate kernel names: {names:?}"
        );
        for n in &names {
            assert!(!n.is_empty());
        }
    }

    /// Every kernel compiles to PTX for sm_90 with NVRTC. Needs libnvrtc on
    /// the library path, so it is ignored by default; CI runs the same check
    /// through the binary (`tests/cuda.rs`, NVRTC from pip).
    #[test]
    #[ignore = "needs NVRTC (libnvrtc) on the library path: `cargo test --release -p parallm-kernels -- --ignored` where it is; CI checks the same in tests/cuda.rs"]
    fn kernels_compile_to_ptx_for_sm_90() {
        if let Err(e) = Lib::Nvrtc.require() {
            panic!("{e}");
        }
        let ptx = match compile("compute_90") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        for name in kernel_names() {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "kernel {name} is missing from the PTX"
            );
        }
        eprintln!(
            "compiled {} kernels with NVRTC {:?}: {} bytes of PTX",
            kernel_names().len(),
            version().ok(),
            ptx.len()
        );
    }
}
