//! [`EmuDevice`]: the kernels run on the host, for tests without a GPU.
//!
//! The program's sources are compiled as C++20 by the host compiler (`c++`,
//! or `$CXX`) with `PARALLM_EMU` defined, so `cu/emu.h` supplies the CUDA
//! built-ins, into a shared library under the system's temporary directory
//! (named by a hash of the sources, built once and reused). A launch runs the
//! grid's blocks one after another on the calling thread, each CUDA thread a
//! fiber with its own stack, switched round-robin at barriers (a few lines of
//! assembly on x86-64, `ucontext` elsewhere),
//! and launches of the whole process run one at a time (`__shared__`
//! variables are function statics). Threads of a block that wait at
//! different barriers fail the launch as a deadlock instead of hanging.
//! Memory is host memory: a [`DevPtr`] is a host address. GEMMs widen the
//! 16-bit inputs to f32 and run the CPU backend's f32 GEMM (f32 accumulation,
//! like cuBLAS with `CUBLAS_COMPUTE_32F`).
//!
//! This is a test device: slow, but it runs the same kernel text as the GPU,
//! with real barriers and warp exchanges, so indexing, synchronization and
//! numerics are checked here. What it cannot check is timing-dependent
//! behaviour of a real GPU (it runs one block at a time).

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::device::{DevPtr, Device, Gemm, LaunchCfg};
use super::{nvrtc, Error, Result};

type LaunchFn = unsafe extern "C" fn(
    name: *const c_char,
    cfg: *const u32,
    params: *mut *mut c_void,
    err: *mut c_char,
    err_len: usize,
) -> i32;

/// The compiled emulation library, shared by every `EmuDevice` of the process.
struct EmuLib {
    _lib: libloading::Library,
    launch: LaunchFn,
}

/// A host-memory device running the emulated kernels.
pub struct EmuDevice {
    lib: Arc<EmuLib>,
    /// Live allocations: address → the allocation (8-byte aligned words).
    mem: Mutex<HashMap<DevPtr, Box<[u64]>>>,
}

impl std::fmt::Debug for EmuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmuDevice")
    }
}

impl EmuDevice {
    /// An emulated device, building the emulation library first if needed.
    /// Fails (with the compiler's output) where no C++20 compiler is found.
    pub fn new() -> Result<Self> {
        static LIB: OnceLock<std::result::Result<Arc<EmuLib>, String>> = OnceLock::new();
        let lib = LIB
            .get_or_init(|| build().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Emulation)?;
        Ok(Self {
            lib,
            mem: Mutex::new(HashMap::new()),
        })
    }

    fn check_range(&self, ptr: DevPtr, bytes: usize) -> Result<()> {
        let mem = self
            .mem
            .lock()
            .map_err(|_| Error::Emulation("poisoned".into()))?;
        let ok = mem.iter().any(|(&base, words)| {
            ptr >= base && ptr + bytes as u64 <= base + (words.len() * 8) as u64
        });
        if ok {
            Ok(())
        } else {
            Err(Error::Emulation(format!(
                "{bytes} bytes at {ptr:#x} are outside every allocation"
            )))
        }
    }
}

/// `Ok` if the host C++ compiler (`$CXX`, else `c++`) runs, else why not.
/// A compiler that rejects the kernels is a failure, not a skip.
pub fn compiler_available() -> std::result::Result<(), String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    match std::process::Command::new(&cxx).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("`{cxx} --version` exited with {}", o.status)),
        Err(e) => Err(format!("`{cxx}`: {e}")),
    }
}

/// The environment variable that lets tests on the emulation skip where no
/// C++ compiler exists: `PARALLM_SKIP_EMULATION=1`.
pub const SKIP_EMULATION_VAR: &str = "PARALLM_SKIP_EMULATION";

/// For a test that runs on the emulation: `true` if it can run. Where no C++
/// compiler exists it panics with the reason and the fix, unless
/// [`SKIP_EMULATION_VAR`] is `1`: then it prints `SKIPPED` with the reason
/// and returns `false`. A test on the emulation thus never passes without
/// running unless someone asked for that.
pub fn available_for_tests() -> bool {
    let Err(why) = compiler_available() else {
        return true;
    };
    if std::env::var(SKIP_EMULATION_VAR).as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: no C++ compiler for the CUDA emulation ({why}); {SKIP_EMULATION_VAR}=1"
        );
        return false;
    }
    panic!(
        "this test runs CUDA kernels on the host emulation, which needs a C++20 compiler: {why}. \
         Install one (`c++`, or name it in $CXX), or set {SKIP_EMULATION_VAR}=1 to skip this test"
    );
}

/// The C++ translation unit: the program, then the launch table.
fn translation_unit() -> String {
    let mut s = String::from("#define PARALLM_EMU 1\n");
    s.push_str(&nvrtc::program_source());
    s.push_str(EMU_RUNNER);
    s.push_str("static const EmuEntry EMU_TABLE[] = {\n");
    for name in nvrtc::kernel_names().iter().chain(&[SELFTEST_DEADLOCK]) {
        s.push_str(&format!("    {{\"{name}\", make_invoker({name})}},\n"));
    }
    s.push_str("};\n");
    s.push_str(EMU_LAUNCH);
    s
}

/// An emulation-only kernel for the launcher's own tests (not part of the
/// GPU program): with `waiters` below the block size, only that many threads
/// reach `__syncthreads`, a deadlock the launch must report; with `waiters`
/// equal to the block size it is a plain barrier, and every thread writes
/// its index.
pub(crate) const SELFTEST_DEADLOCK: &str = "parallm_emu_selftest_barrier";

const EMU_RUNNER: &str = r#"
#include <functional>
#include <string>
#include <tuple>
#include <utility>

__global__ void parallm_emu_selftest_barrier(u32 waiters, u32* out) {
    if (threadIdx.x < waiters) {
        for (int i = 0; i < 3; ++i) __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = threadIdx.x;
}

typedef void (*EmuInvoker)(void** params);
struct EmuEntry { const char* name; std::function<void(void**)> call; };

template <class... A, size_t... I>
static void emu_call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}
template <class... A>
static std::function<void(void**)> make_invoker(void (*f)(A...)) {
    return [f](void** p) { emu_call(f, p, std::index_sequence_for<A...>{}); };
}
"#;

const EMU_LAUNCH: &str = r#"
#include <mutex>
#include <string>

namespace {
// One block's CUDA thread: a fiber run by the launcher.
struct EmuFiber {
    EmuContext ctx;
    bool done = false;
};
// Stack of every fiber. Allocated without zeroing, so only the pages a
// kernel touches become memory.
constexpr size_t EMU_STACK = 256 * 1024;
// The launch in progress (launches are serialized), read by every fiber.
const EmuEntry* emu_entry = nullptr;
void** emu_params = nullptr;
u64 emu_blocks = 0;
EmuFiber* emu_fiber = nullptr;

// A fiber: every block of the grid in turn, leaving each one together with
// the block's other threads.
void emu_fiber_main() {
    for (u64 b = 0; b < emu_blocks; ++b) {
        blockIdx = dim3{(u32)(b % gridDim.x), (u32)((b / gridDim.x) % gridDim.y),
                        (u32)(b / ((u64)gridDim.x * gridDim.y))};
        emu_entry->call(emu_params);
        emu_block->bar->arrive_and_wait();
    }
}

// A fiber's first frame: the grid, then back to the launcher for good.
void emu_fiber_entry() {
    emu_fiber_main();
    emu_fiber->done = true;
    ++emu_progress;
    emu_yield();
}
}  // namespace

extern "C" int parallm_emu_launch(const char* name, const u32* cfg, void** params, char* err, size_t err_len) {
    // __shared__ variables are function statics and the fibers share global
    // state: one launch at a time in the whole process, as one block at a
    // time within a launch.
    static std::mutex one_launch;
    std::lock_guard<std::mutex> guard(one_launch);
    static std::vector<std::unique_ptr<char[]>> stacks;
    const EmuEntry* e = nullptr;
    for (const auto& t : EMU_TABLE) if (std::strcmp(t.name, name) == 0) e = &t;
    auto fail = [&](const std::string& m) { std::snprintf(err, err_len, "%s", m.c_str()); return 1; };
    if (!e) return fail(std::string("no kernel named ") + name);
    dim3 grid{cfg[0], cfg[1], cfg[2]}, block{cfg[3], cfg[4], cfg[5]};
    const u32 threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || threads % 32 != 0 || block.y != 1 || block.z != 1)
        return fail("the emulation runs 1-D blocks of whole warps, at most 1024 threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return fail("empty grid");
    EmuBlock shared_state;
    shared_state.bar = std::make_unique<EmuBarrier>(threads);
    for (u32 w = 0; w < threads / 32; ++w) shared_state.warps.push_back(std::make_unique<EmuWarp>());
    shared_state.dynamic_shared.assign(cfg[6] + 16, 0);
    emu_block = &shared_state;
    emu_entry = e;
    emu_params = params;
    emu_blocks = (u64)grid.x * grid.y * grid.z;
    blockDim = block;
    gridDim = grid;
    while (stacks.size() < threads) stacks.emplace_back(new char[EMU_STACK]);
    std::vector<EmuFiber> fibers(threads);
    for (u32 t = 0; t < threads; ++t) emu_context_init(fibers[t].ctx, stacks[t].get(), EMU_STACK, emu_fiber_entry);
    // Round-robin sweeps: each fiber runs until it waits at a barrier or
    // finishes the grid.
    u32 live = threads;
    while (live > 0) {
        const u64 before = emu_progress;
        for (u32 t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            threadIdx = dim3{t, 0, 0};
            emu_fiber = &fibers[t];
            emu_current = &fibers[t].ctx;
            emu_context_switch(emu_launcher, fibers[t].ctx);
            if (fibers[t].done) --live;
        }
        if (live > 0 && emu_progress == before) {
            emu_block = nullptr;
            return fail(std::string(name) + ": deadlock: the block's threads wait at different barriers");
        }
    }
    emu_block = nullptr;
    return 0;
}
"#;

fn build() -> Result<EmuLib> {
    let unit = translation_unit();
    let header = include_str!("cu/emu.h");
    let hash = fnv1a(unit.as_bytes()) ^ fnv1a(header.as_bytes()).rotate_left(1);
    let dir = std::env::temp_dir().join(format!("parallm-cuda-emu-{hash:016x}"));
    let lib_path = dir.join("libparallm_emu.so");
    if !lib_path.exists() {
        compile(&dir, &unit, header, &lib_path)?;
    }
    // SAFETY: the library was built from our own sources; loading it runs no
    // initializers beyond C++ statics.
    let lib = unsafe { libloading::Library::new(&lib_path) }
        .map_err(|e| Error::Emulation(format!("loading {}: {e}", lib_path.display())))?;
    // SAFETY: the symbol is defined with exactly this signature in EMU_LAUNCH.
    let launch = unsafe { lib.get::<LaunchFn>(b"parallm_emu_launch\0") }
        .map(|s| *s)
        .map_err(|e| Error::Emulation(format!("parallm_emu_launch: {e}")))?;
    Ok(EmuLib { _lib: lib, launch })
}

fn compile(dir: &Path, unit: &str, header: &str, lib_path: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::Emulation(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("emu.h"), header).map_err(io)?;
    let src = dir.join("kernels.cpp");
    std::fs::write(&src, unit).map_err(io)?;
    // Build under a unique name, then rename: concurrent test processes may
    // race to build the same library.
    let tmp: PathBuf = dir.join(format!("lib.{}.so", std::process::id()));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-w"])
        .arg("-I")
        .arg(dir)
        .arg(&src)
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| Error::Emulation(format!("running the C++ compiler `{cxx}`: {e}")))?;
    if !out.status.success() {
        return Err(Error::Emulation(format!(
            "`{cxx}` could not build the emulated kernels:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    std::fs::rename(&tmp, lib_path).map_err(io)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl Device for EmuDevice {
    fn name(&self) -> String {
        "emulated CUDA device (host)".into()
    }

    fn alloc_raw(&self, bytes: usize) -> Result<DevPtr> {
        let words = vec![0u64; bytes.div_ceil(8).max(1)].into_boxed_slice();
        let ptr = words.as_ptr() as DevPtr;
        self.mem
            .lock()
            .map_err(|_| Error::Emulation("poisoned".into()))?
            .insert(ptr, words);
        Ok(ptr)
    }

    unsafe fn free_raw(&self, ptr: DevPtr) {
        if let Ok(mut mem) = self.mem.lock() {
            mem.remove(&ptr);
        }
    }

    fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.check_range(dst, src.len())?;
        // SAFETY: the range lies inside a live allocation (checked).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn download(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len())?;
        // SAFETY: the range lies inside a live allocation (checked).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        // Device memory of other EmuDevices (same process) is addressable too,
        // as on a GPU shared by several streams; only check our own.
        if self.check_range(dst, bytes).is_ok() || self.check_range(src, bytes).is_ok() {
            // SAFETY: both ranges are live host allocations of an emulated
            // device (the caller's contract); `copy` allows overlap.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            Ok(())
        } else {
            Err(Error::Emulation(format!(
                "copy of {bytes} bytes outside every allocation"
            )))
        }
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.check_range(dst, bytes)?;
        // SAFETY: inside a live allocation (checked).
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        Ok(())
    }

    unsafe fn launch(&self, name: &str, cfg: LaunchCfg, params: &mut [*mut c_void]) -> Result<()> {
        let cname = CString::new(name).map_err(|e| Error::Emulation(e.to_string()))?;
        let dims = [
            cfg.grid.0,
            cfg.grid.1,
            cfg.grid.2,
            cfg.block.0,
            cfg.block.1,
            cfg.block.2,
            cfg.shared,
        ];
        let mut err = [0 as c_char; 256];
        // SAFETY: the caller guarantees the parameters match the kernel; the
        // other pointers are valid for the call.
        let rc = unsafe {
            (self.lib.launch)(
                cname.as_ptr(),
                dims.as_ptr(),
                params.as_mut_ptr(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let msg: Vec<u8> = err
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            Err(Error::Emulation(format!(
                "{name}: {}",
                String::from_utf8_lossy(&msg)
            )))
        }
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        g.check()?;
        let a_rows = (g.m - 1) * g.lda + g.k;
        self.check_range(g.a, a_rows * 2)?;
        self.check_range(g.b, g.n * g.k * 2)?;
        let c_elem = if g.c_f32 { 4 } else { 2 };
        self.check_range(g.c, g.m * g.n * c_elem)?;
        // SAFETY: every range was checked to lie in a live allocation.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(g.a as *const u16, a_rows),
                std::slice::from_raw_parts(g.b as *const u16, g.n * g.k),
            )
        };
        let to = |v: u16| g.dtype.to_f32(v);
        let bf: Vec<f32> = b.iter().map(|&v| to(v)).collect();
        let af: Vec<f32> = (0..g.m)
            .flat_map(|i| a[i * g.lda..i * g.lda + g.k].iter().map(|&v| to(v)))
            .collect();
        let mut y = vec![0f32; g.m * g.n];
        crate::cpu::skinny::matmul_xwt(&af, g.m, &bf, g.n, g.k, &mut y);
        for (idx, acc) in y.into_iter().enumerate() {
            // SAFETY: idx < m·n, inside the checked C range.
            unsafe {
                if g.c_f32 {
                    let c = (g.c as *mut f32).add(idx);
                    *c = if g.accumulate { *c + acc } else { acc };
                } else {
                    let c = (g.c as *mut u16).add(idx);
                    let prev = if g.accumulate { to(*c) } else { 0.0 };
                    *c = g.dtype.from_f32(prev + acc);
                }
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
