//! Output files that appear whole or not at all, checked before the work
//! that fills them: a path that cannot be written, or that names one of the
//! command's inputs, is refused at once.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::CliResult;

/// A file written under a temporary name and renamed into place by
/// [`AtomicFile::commit`]; dropped uncommitted, it is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    path: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates `path`'s temporary sibling.
    pub fn create(path: &Path) -> CliResult<Self> {
        let mut name = path
            .file_name()
            .ok_or_else(|| format!("{} is not a file name", path.display()))?
            .to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let tmp = path.with_file_name(name);
        let file =
            File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(Self {
            tmp,
            path: path.to_path_buf(),
            file: Some(BufWriter::new(file)),
        })
    }

    /// The open file.
    pub fn file(&mut self) -> &mut BufWriter<File> {
        self.file.as_mut().expect("open until committed")
    }

    /// Flushes, closes and renames the file into place; on failure the
    /// temporary file is removed.
    pub fn commit(mut self) -> CliResult {
        let written = match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        };
        // Closed before the rename (and `Drop` then leaves the temporary
        // file to this function, which removes it on failure).
        drop(self.file.take());
        let renamed = written.and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(format!("cannot write {}: {e}", self.path.display()).into());
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Refuses, before any work, an output `path` that cannot be written: a
/// directory, something other than a regular file (a device such as
/// `/dev/null`, a pipe, a socket: the output is written beside it and
/// renamed over it, which would replace it), one in a directory that does
/// not exist, or the same file as one of `inputs` (which writing it would
/// destroy). An existing regular file is replaced, as `cp` would. `what`
/// names the output in the error (`"the output"`, `"--json"`).
pub fn check_output(path: &Path, what: &str, inputs: &[&Path]) -> CliResult {
    if path.as_os_str() == "-" {
        return Ok(());
    }
    if path.is_dir() {
        return Err(format!(
            "cannot write {what} to {}: it is a directory",
            path.display()
        )
        .into());
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(format!(
                "cannot write {what} to {}: it is not a regular file (a device, pipe or socket), which the written file would replace",
                path.display()
            )
            .into());
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "cannot write {what} to {}: the directory {} does not exist",
            path.display(),
            dir.display()
        )
        .into());
    }
    for input in inputs {
        if same_file(path, input) {
            return Err(format!(
                "{what} {} is the input {}; writing it would destroy the input, so name another file",
                path.display(),
                input.display()
            )
            .into());
        }
    }
    Ok(())
}

/// Whether `a` and `b` are one existing file (links and other spellings
/// of a path included).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Writes `text` to `path` (`what` names it in the error).
pub fn write_text(path: &Path, what: &str, text: &str) -> CliResult {
    let mut f = AtomicFile::create(path)
        .map_err(|e| format!("cannot write {what} to {}: {e}", path.display()))?;
    f.file().write_all(text.as_bytes())?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_file_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("parallm-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.bin");
        {
            let mut f = AtomicFile::create(&path).unwrap();
            f.file().write_all(b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let mut f = AtomicFile::create(&path).unwrap();
        f.file().write_all(b"whole").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        // A rename that fails (onto a directory) leaves no temporary file.
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let mut f = AtomicFile::create(&sub).unwrap();
        f.file().write_all(b"x").unwrap();
        assert!(f.commit().is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outputs_that_cannot_be_written_or_are_inputs_are_refused() {
        let dir = std::env::temp_dir().join(format!("parallm-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.gguf");
        std::fs::write(&input, b"x").unwrap();
        let err = |p: &Path| {
            check_output(p, "the output", &[&input])
                .unwrap_err()
                .to_string()
        };
        assert!(err(&dir).contains("is a directory"));
        assert!(err(&dir.join("no/such/out")).contains("does not exist"));
        assert!(err(&input).contains("is the input"));
        // Another spelling of the same file.
        assert!(err(&dir.join(".").join("in.gguf")).contains("is the input"));
        assert!(check_output(&dir.join("out.gguf"), "the output", &[&input]).is_ok());
        assert!(check_output(Path::new("-"), "--json", &[&input]).is_ok());
        // A device would be replaced by the renamed file.
        assert!(err(Path::new("/dev/null")).contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
