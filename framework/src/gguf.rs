//! GGUF model files: opening, validating and reading metadata and tensors.
//!
//! [`GgufFile`] owns the open file and candle-core's parsed header. Opening checks
//! everything that can be checked without reading the weights: the magic and
//! version (v2 or v3), that every tensor's data lies inside the file (a truncated
//! download is caught here, before any weight is read), and that each tensor's
//! element count is a whole number of its type's blocks. Every error names the
//! file. Nothing here knows about Llama; [`crate::config`] reads the keys.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};

/// An open, validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
    file_size: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file_err = |reason: String| Error::ModelFile {
            path: path.clone(),
            reason,
        };
        if !path.exists() {
            return Err(file_err("no such file".into()));
        }
        if path.is_dir() {
            return Err(file_err("is a directory, expected a .gguf file".into()));
        }
        let file = File::open(&path).map_err(|e| file_err(format!("cannot open: {e}")))?;
        let file_size = file
            .metadata()
            .map_err(|e| file_err(format!("cannot stat: {e}")))?
            .len();
        if file_size < 24 {
            return Err(file_err(format!(
                "only {file_size} bytes: too short to be a GGUF file (truncated or not a model)"
            )));
        }
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            file_err(format!(
                "not a readable GGUF file ({e}); is it truncated or of another format?"
            ))
        })?;
        if matches!(content.magic, VersionedMagic::GgufV1) {
            return Err(Error::Unsupported {
                path,
                what: "GGUF version",
                found: "1".into(),
                supported: "GGUF v2 and v3",
            });
        }
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::Tensor {
                    path,
                    name: name.clone(),
                    reason: format!(
                        "has {elems} elements, not a whole number of {:?} blocks of {block}",
                        info.ggml_dtype
                    ),
                });
            }
            let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(file_err(format!(
                    "truncated: tensor '{name}' needs bytes up to {end} but the file has {file_size}"
                )));
            }
        }
        Ok(Self {
            path,
            content,
            reader: Mutex::new(reader),
            file_size,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// The raw metadata value under `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.metadata(key)
            .ok_or_else(|| self.meta_err(key, "is missing"))
    }

    /// An unsigned integer value (any integer width), required.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        value_as_u64(self.required(key)?)
            .map(|v| v as usize)
            .ok_or_else(|| self.meta_err(key, "is not a non-negative integer"))
    }

    /// An unsigned integer value, if present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(_) => self.get_usize(key).map(Some),
        }
    }

    /// A float value (f32 or f64), if present.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(Value::F64(v)) => Ok(Some(*v as f32)),
            Some(_) => Err(self.meta_err(key, "is not a float")),
        }
    }

    /// A boolean value, if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => value_as_u64(v)
                .map(|n| Some(n != 0))
                .ok_or_else(|| self.meta_err(key, "is not a boolean")),
        }
    }

    /// A string value, required.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.required(key)? {
            Value::String(s) => Ok(s),
            _ => Err(self.meta_err(key, "is not a string")),
        }
    }

    /// A string value, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(_) => self.get_str(key).map(Some),
        }
    }

    /// An array of strings, required.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let Value::Array(items) = self.required(key)? else {
            return Err(self.meta_err(key, "is not an array"));
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.meta_err(key, "holds a non-string element")),
            })
            .collect()
    }

    /// An array of integers, if present.
    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(value) = self.metadata(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.meta_err(key, "is not an array"));
        };
        items
            .iter()
            .map(|v| value_as_i64(v).ok_or_else(|| self.meta_err(key, "holds a non-integer")))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Whether a tensor of this name exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor's dtype and dims (GGUF order reversed, so `[rows, cols]` for matrices).
    pub fn tensor_info(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.tensor_err(name, "is missing"))?;
        Ok((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    /// Reads a tensor, checking it has `dims`.
    pub fn tensor(&self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let (_, found) = self.tensor_info(name)?;
        if found != dims {
            return Err(self.tensor_err(name, format!("has shape {found:?}, expected {dims:?}")));
        }
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| self.tensor_err(name, "reader poisoned by an earlier failure"))?;
        reader
            .rewind()
            .map_err(|e| self.tensor_err(name, format!("cannot read: {e}")))?;
        self.content
            .tensor(&mut *reader, name, &Device::Cpu)
            .map_err(|e| self.tensor_err(name, format!("cannot read: {e}")))
    }

    pub(crate) fn tensor_err(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            name: name.into(),
            reason: reason.into(),
        }
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match *v {
        Value::I8(x) => Some(x as i64),
        Value::I16(x) => Some(x as i64),
        Value::I32(x) => Some(x as i64),
        Value::I64(x) => Some(x),
        Value::U8(x) => Some(x as i64),
        Value::U16(x) => Some(x as i64),
        Value::U32(x) => Some(x as i64),
        Value::U64(x) => i64::try_from(x).ok(),
        _ => None,
    }
}
