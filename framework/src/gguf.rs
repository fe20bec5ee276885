//! GGUF model files: opening, validating and reading metadata and tensors.
//!
//! [`GgufFile`] owns the open file (or, for tests and fuzzing, its bytes) and
//! candle-core's parsed header. Opening checks everything that can be checked
//! without reading the weights, and refuses a file before anything sized by it
//! is allocated:
//! - a regular file (after symlinks): a FIFO, socket or device is named,
//!   not opened (a FIFO would block the open until something wrote to it);
//! - the magic and version (v2 or v3), and a header whose lengths and counts
//!   fit the file (candle's reader bounds them; a panic inside it would
//!   become an error);
//! - no metadata key repeated (candle's reader would keep the last), and
//!   `general.alignment` a power of two, both found by a scan of the header
//!   before candle's reader runs (it divides by the alignment);
//! - the tensor table: no repeated name, one to four dimensions, none zero,
//!   an element count that is a whole number of the type's blocks and whose
//!   byte size fits in 64 bits, every offset aligned, every tensor's data
//!   inside the data section (a truncated download is caught here), no two
//!   tensors overlapping, and no gap between neighbours as wide as the
//!   alignment, which is what a type that disagrees with the data it was
//!   written with leaves behind.
//!
//! IQ4_NL and IQ4_XS tensors, which candle's reader does not know, are found
//! by the same scan (their type ids hidden from it), checked like the rest,
//! and read here as Q8_0 blocks (`kernels::cpu::quant::iq4`: IQ4_NL exactly,
//! IQ4_XS with its sub-block scales rounded to f16).
//!
//! A block count (`llama.block_count`, …) smaller than the blocks the tensor
//! table holds is refused by [`GgufFile::check_block_count`], which the
//! config readers call.
//!
//! A Hugging Face model directory opens as the same type: [`crate::hf`] maps
//! its `config.json` to GGUF metadata keys and its safetensors tensors to
//! GGUF names, so everything downstream reads one vocabulary.
//!
//! Every error names the file. Nothing here knows about Llama; [`crate::config`]
//! reads the keys.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::hf::HfModel;

/// The alignment of tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// How many chunks of a file [`GgufFile::fingerprint`] reads.
pub const SAMPLES: usize = 64;
/// The size of each chunk [`GgufFile::fingerprint`] reads.
const SAMPLE_BYTES: usize = 64 << 10;

/// The `(offset, length)` chunks of a file of `len` bytes that
/// [`GgufFile::fingerprint`] reads: the whole file if it is no larger than
/// [`SAMPLES`] chunks, else [`SAMPLES`] chunks from its first byte to its
/// last, evenly spaced.
fn sample_ranges(len: u64) -> Vec<(u64, usize)> {
    let chunk = SAMPLE_BYTES as u64;
    if len <= chunk * SAMPLES as u64 {
        return (0..len.div_ceil(chunk))
            .map(|i| (i * chunk, chunk.min(len - i * chunk) as usize))
            .collect();
    }
    let last = SAMPLES as u64 - 1;
    (0..SAMPLES as u64)
        .map(|i| (i * (len - chunk) / last, SAMPLE_BYTES))
        .collect()
}

/// Where a [`GgufFile`]'s bytes come from.
trait Source: Read + Seek + Send {}
impl<T: Read + Seek + Send> Source for T {}

/// A buffered file reader that knows its position without asking the OS
/// and seeks within its buffer where it can. A GGUF header is read in
/// small pieces (a vocabulary of 49 152 strings is 98 304 reads), skipped
/// and read again: `BufReader`'s `seek` drops its buffer, and its
/// `stream_position` is a system call, so through it alone opening the
/// reference model took a million `lseek`s and 400 000 8 KiB `read`s.
struct Tracked<R> {
    inner: BufReader<R>,
    /// The position of the next byte [`Read::read`] gives.
    pos: u64,
}

impl<R: Read + Seek> Tracked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner: BufReader::new(inner),
            pos: 0,
        }
    }
}

impl<R: Read + Seek> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read + Seek> Seek for Tracked<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(at) => i128::from(at),
            SeekFrom::Current(by) => i128::from(self.pos) + i128::from(by),
            SeekFrom::End(_) => {
                self.pos = self.inner.seek(to)?;
                return Ok(self.pos);
            }
        };
        let by = i64::try_from(target - i128::from(self.pos))
            .ok()
            .filter(|_| target >= 0)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("cannot seek to byte {target}"),
                )
            })?;
        // Within the buffer, it stays.
        if let Err(e) = self.inner.seek_relative(by) {
            if let Ok(at) = self.inner.stream_position() {
                self.pos = at;
            }
            return Err(e);
        }
        self.pos = target as u64;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

/// Where an open model's tensor bytes are.
enum Data {
    /// A GGUF file, read at the offsets of its tensor table.
    Gguf(Mutex<Box<dyn Source>>),
    /// A Hugging Face directory's mapped safetensors files.
    Hf(Box<HfModel>),
}

/// An open, validated GGUF file, or a Hugging Face model directory read as one.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    /// The IQ4 tensors' types (their dims and offsets are `content`'s, which
    /// holds them under a stand-in type).
    iq: HashMap<String, IqType>,
    data: Data,
    file_size: u64,
}

/// The GGML block types read here rather than by candle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IqType {
    Iq4Nl,
    Iq4Xs,
}

impl IqType {
    fn from_id(id: u32) -> Option<Self> {
        match id {
            20 => Some(Self::Iq4Nl),
            23 => Some(Self::Iq4Xs),
            _ => None,
        }
    }

    fn block_size(self) -> u64 {
        match self {
            Self::Iq4Nl => 32,
            Self::Iq4Xs => 256,
        }
    }

    fn type_size(self) -> u64 {
        match self {
            Self::Iq4Nl => 18,
            Self::Iq4Xs => 136,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Iq4Nl => "IQ4_NL",
            Self::Iq4Xs => "IQ4_XS",
        }
    }
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
    /// Opens and validates `path`: a GGUF file, or a Hugging Face model
    /// directory ([`crate::hf`]).
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
            let (content, hf) = crate::hf::open(&path)?;
            return Ok(Self {
                path,
                content,
                iq: HashMap::new(),
                file_size: hf.bytes(),
                data: Data::Hf(Box::new(hf)),
            });
        }
        regular_file(&path)?;
        let file = File::open(&path).map_err(|e| file_err(format!("cannot open: {e}")))?;
        let file_size = file
            .metadata()
            .map_err(|e| file_err(format!("cannot stat: {e}")))?
            .len();
        Self::read(path, Box::new(Tracked::new(file)), file_size)
    }

    /// Validates a GGUF file held in memory; `name` stands for its path in
    /// errors. The same checks as [`GgufFile::open`].
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let size = bytes.len() as u64;
        Self::read(name.into(), Box::new(Cursor::new(bytes)), size)
    }

    fn read(path: PathBuf, mut reader: Box<dyn Source>, file_size: u64) -> Result<Self> {
        let file_err = |reason: String| Error::ModelFile {
            path: path.clone(),
            reason,
        };
        if file_size < 24 {
            return Err(file_err(format!(
                "only {file_size} bytes: too short to be a GGUF file (truncated or not a model)"
            )));
        }
        let mut head = [0u8; 24];
        reader
            .read_exact(&mut head)
            .and_then(|_| reader.rewind())
            .map_err(|e| file_err(format!("cannot read: {e}")))?;
        // The IQ4 tensors' type ids, hidden from candle's reader (which
        // refuses types it does not know) behind F32's; the scan gives up
        // quietly on a malformed header, which candle's reader then names.
        let mut scan = HeaderScan::default();
        let _ = scan_header(&mut reader, file_size, &mut scan);
        let HeaderScan {
            patches,
            iq: iq_types,
            bad_alignment,
            repeated_key,
        } = scan;
        reader
            .rewind()
            .map_err(|e| file_err(format!("cannot read: {e}")))?;
        // candle's reader keeps the last of a repeated key, and divides by
        // the alignment unchecked (an alignment of 0 panics in it): both are
        // refused before it runs.
        if let Some(key) = repeated_key {
            return Err(file_err(format!(
                "metadata key '{key}' is repeated: which value is meant is unknown"
            )));
        }
        if let Some(v) = bad_alignment {
            return Err(file_err(format!(
                "general.alignment is {v}, must be a power of two"
            )));
        }
        // candle's reader bounds every length by the file; a panic in it
        // would still be this file's fault, not ours.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Content::read(&mut Patched {
                inner: &mut reader,
                patches: &patches,
            })
        }));
        let content = match read {
            Ok(Ok(content)) => content,
            Ok(Err(e)) => {
                // The first line: with RUST_BACKTRACE set, candle appends a
                // backtrace to its errors' text.
                let full = e.to_string();
                let text = full.lines().next().unwrap_or_default();
                // candle names a tensor type it cannot read by its number.
                if let Some(id) = text
                    .strip_prefix("unknown dtype for tensor ")
                    .and_then(|n| n.trim().parse::<u32>().ok())
                {
                    return Err(Error::Unsupported {
                        path,
                        what: "tensor type",
                        found: format!("{id} ({})", ggml_type_name(id)),
                        supported: "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL, IQ4_XS",
                    });
                }
                return Err(file_err(format!(
                    "not a readable GGUF file ({text}); is it truncated or of another format?"
                )));
            }
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                return Err(file_err(format!("the GGUF header is malformed ({what})")));
            }
        };
        if matches!(content.magic, VersionedMagic::GgufV1) {
            return Err(Error::Unsupported {
                path,
                what: "GGUF version",
                found: "1".into(),
                supported: "GGUF v2 and v3",
            });
        }
        // v2 and v3 store the tensor count as a u64 after the magic and version.
        let declared = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
        if declared != content.tensor_infos.len() as u64 {
            return Err(file_err(format!(
                "the header declares {declared} tensors but only {} names are distinct: a tensor name is repeated",
                content.tensor_infos.len()
            )));
        }
        // And its metadata count after it: a repeated key the scan above
        // gave up before is caught here.
        let declared = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        if declared != content.metadata.len() as u64 {
            return Err(file_err(format!(
                "the header declares {declared} metadata keys but only {} are distinct: a key is repeated",
                content.metadata.len()
            )));
        }
        let iq: HashMap<String, IqType> = iq_types
            .into_iter()
            .filter(|(name, _)| content.tensor_infos.contains_key(name))
            .collect();
        check_tensor_table(&content, &iq, file_size).map_err(|(name, reason)| match name {
            Some(name) => Error::Tensor {
                path: path.clone(),
                name,
                reason,
            },
            None => file_err(reason),
        })?;
        Ok(Self {
            path,
            content,
            iq,
            data: Data::Gguf(Mutex::new(reader)),
            file_size,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every metadata entry, by key.
    pub fn metadata_entries(&self) -> Vec<(&str, &Value)> {
        let mut all: Vec<(&str, &Value)> = self
            .content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    /// Every tensor's name, in the order of the file's data.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut all: Vec<(&str, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(k, t)| (k.as_str(), t.offset))
            .collect();
        all.sort_by_key(|&(k, o)| (o, k));
        all.into_iter().map(|(k, _)| k).collect()
    }

    /// The Hugging Face directory this was opened from, if it was.
    pub fn hf(&self) -> Option<&HfModel> {
        match &self.data {
            Data::Hf(hf) => Some(hf),
            Data::Gguf(_) => None,
        }
    }

    /// The file's size in bytes (a directory's: its weight files').
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// A short text that tells this model's contents from another's, cheap
    /// enough to compute at every start: its size and a SHA-256 over its
    /// metadata, its tensor table and [`SAMPLES`] spread chunks of its
    /// bytes (all of them for a file no larger than that). Two copies of
    /// one file, or of one directory, give the same text wherever they
    /// are; another quantization, revision or fine-tune of a model gives
    /// another in practice (a file that differs only between the chunks
    /// would not be told apart).
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.file_size.to_le_bytes());
        for (k, v) in self.metadata_entries() {
            hash.update(format!("{k}={v:?}\n").as_bytes());
        }
        for name in self.tensor_names() {
            let info = &self.content.tensor_infos[name];
            let kind = self.stored_type(name).unwrap_or_default();
            hash.update(
                format!("{name}:{kind}:{:?}:{}\n", info.shape.dims(), info.offset).as_bytes(),
            );
        }
        match &self.data {
            Data::Gguf(reader) => {
                let mut reader = reader
                    .lock()
                    .map_err(|_| self.file_err("reader poisoned by an earlier failure"))?;
                let mut chunk = vec![0u8; SAMPLE_BYTES];
                for (at, len) in sample_ranges(self.file_size) {
                    let chunk = &mut chunk[..len];
                    reader
                        .seek(SeekFrom::Start(at))
                        .and_then(|_| reader.read_exact(chunk))
                        .map_err(|e| self.file_err(format!("cannot read: {e}")))?;
                    hash.update(&*chunk);
                }
            }
            Data::Hf(hf) => {
                for (name, bytes) in hf.shard_bytes() {
                    hash.update(format!("{name}:{}\n", bytes.len()).as_bytes());
                    for (at, len) in sample_ranges(bytes.len() as u64) {
                        hash.update(&bytes[at as usize..at as usize + len]);
                    }
                }
            }
        }
        let digest = hash.finalize();
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!("{} bytes, sampled SHA-256 {hex}", self.file_size))
    }

    fn file_err(&self, reason: impl Into<String>) -> Error {
        Error::ModelFile {
            path: self.path.clone(),
            reason: reason.into(),
        }
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

    /// The items of an optional array, each converted by `item` (which
    /// names what it expected when it returns `None`).
    fn opt_array<T>(
        &self,
        key: &str,
        expected: &str,
        item: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(value) = self.metadata(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.meta_err(key, "is not an array"));
        };
        items
            .iter()
            .map(|v| item(v).ok_or_else(|| self.meta_err(key, format!("holds a non-{expected}"))))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// An array of integers, if present.
    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.opt_array(key, "integer", value_as_i64)
    }

    /// An optional array of floats (f32 or f64 items; SentencePiece scores).
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.opt_array(key, "float", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    /// Refuses a file whose tensors hold more blocks than its block count:
    /// a tensor `blk.N.*` with `N` at or past `n_blocks`, the value of
    /// metadata key `key` (llama.cpp refuses such a file, whose extra
    /// blocks would otherwise be left out without a word). The error names
    /// the key and the first such tensor.
    pub fn check_block_count(&self, key: &str, n_blocks: usize) -> Result<()> {
        match first_block_beyond(self.content.tensor_infos.keys(), n_blocks) {
            None => Ok(()),
            Some((block, name)) => Err(self.meta_err(
                key,
                format!(
                    "is {n_blocks}, but the file holds tensors of block {block} too (first '{}'): the block count disagrees with the tensors",
                    match &self.data {
                        Data::Gguf(_) => name.to_string(),
                        Data::Hf(hf) => hf.describe(name),
                    }
                ),
            )),
        }
    }

    /// Whether a tensor of this name exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The tensor's dtype as [`GgufFile::tensor`] reads it (IQ4 tensors as
    /// Q8_0) and dims (GGUF order reversed, so `[rows, cols]` for matrices).
    pub fn tensor_info(&self, name: &str) -> Result<(GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.tensor_err(name, "is missing"))?;
        let dtype = match self.iq.get(name) {
            Some(_) => GgmlDType::Q8_0,
            None => info.ggml_dtype,
        };
        Ok((dtype, info.shape.dims().to_vec()))
    }

    /// The stored type of tensor `name` as GGML names it (`IQ4_XS`, `Q4_K`, …).
    pub fn stored_type(&self, name: &str) -> Option<String> {
        match self.iq.get(name) {
            Some(t) => Some(t.name().to_string()),
            None => self
                .content
                .tensor_infos
                .get(name)
                .map(|i| format!("{:?}", i.ggml_dtype)),
        }
    }

    /// Reads IQ4 tensor `name` (`elems` weights) and re-blocks it as Q8_0.
    fn iq_tensor(
        &self,
        name: &str,
        kind: IqType,
        dims: Vec<usize>,
        reader: &Mutex<Box<dyn Source>>,
    ) -> Result<QTensor> {
        let info = &self.content.tensor_infos[name];
        let elems: u64 = dims.iter().map(|&d| d as u64).product();
        // The table check bounded this by the file.
        let mut bytes = vec![0u8; (elems / kind.block_size() * kind.type_size()) as usize];
        {
            let mut reader = reader
                .lock()
                .map_err(|_| self.tensor_err(name, "reader poisoned by an earlier failure"))?;
            reader
                .seek(SeekFrom::Start(
                    self.content.tensor_data_offset + info.offset,
                ))
                .and_then(|_| reader.read_exact(&mut bytes))
                .map_err(|e| self.tensor_err(name, format!("cannot read: {e}")))?;
        }
        use kernels::cpu::quant::iq4;
        let q8 = match kind {
            IqType::Iq4Nl => iq4::iq4_nl_to_q8_0(&bytes),
            IqType::Iq4Xs => iq4::iq4_xs_to_q8_0(&bytes).ok_or_else(|| {
                self.tensor_err(name, "has an IQ4_XS block scale too large for f16")
            })?,
        };
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &q8,
            dims,
            &Device::Cpu,
        )
        .map_err(|e| self.tensor_err(name, format!("cannot read: {e}")))
    }

    /// Reads a tensor, checking it has `dims`.
    pub fn tensor(&self, name: &str, dims: &[usize]) -> Result<QTensor> {
        let (dtype, found) = self.tensor_info(name)?;
        if found != dims {
            return Err(self.tensor_err(name, format!("has shape {found:?}, expected {dims:?}")));
        }
        let reader = match &self.data {
            Data::Gguf(reader) if self.iq.contains_key(name) => {
                return self.iq_tensor(name, self.iq[name], found, reader);
            }
            Data::Gguf(reader) => reader,
            Data::Hf(hf) => {
                let bytes = hf.raw(name).ok_or_else(|| {
                    self.tensor_err(name, "has rows that do not split into rotary heads")
                })?;
                return candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &bytes,
                    found,
                    &Device::Cpu,
                )
                .map_err(|e| {
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or_default();
                    self.tensor_err(name, format!("cannot read: {first}"))
                });
            }
        };
        let mut reader = reader
            .lock()
            .map_err(|_| self.tensor_err(name, "reader poisoned by an earlier failure"))?;
        reader
            .rewind()
            .map_err(|e| self.tensor_err(name, format!("cannot read: {e}")))?;
        self.content
            .tensor(&mut *reader, name, &Device::Cpu)
            .map_err(|e| {
                // Without the backtrace candle appends under RUST_BACKTRACE.
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                self.tensor_err(name, format!("cannot read: {first}"))
            })
    }

    pub(crate) fn tensor_err(&self, name: &str, reason: impl Into<String>) -> Error {
        Error::Tensor {
            path: self.path.clone(),
            name: match &self.data {
                Data::Gguf(_) => name.into(),
                Data::Hf(hf) => hf.describe(name),
            },
            reason: reason.into(),
        }
    }
}

/// Refuses `path` unless it is a regular file once symlinks are followed:
/// opening a FIFO blocks until something writes to it, and a device or
/// socket never reads as a model, so each is named rather than waited on.
/// Every model file (a GGUF, and a directory's JSON, safetensors and
/// tokenizer files) passes here before it is opened.
pub(crate) fn regular_file(path: &Path) -> Result<()> {
    let err = |reason: String| Error::ModelFile {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot stat: {e}")))?;
    if meta.is_file() {
        return Ok(());
    }
    let kind = meta.file_type();
    let what = if kind.is_dir() {
        "a directory"
    } else {
        special_kind(&kind)
    };
    Err(err(format!(
        "is {what}, not a regular file: a model is read from a file (or a Hugging Face directory of files)"
    )))
}

/// What a file that is neither regular nor a directory is.
#[cfg(unix)]
fn special_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// What a file that is neither regular nor a directory is.
#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "a special file"
}

/// GGML's name for tensor type `id` (llama.cpp's `ggml_type`), for errors.
fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2 (removed)",
        "Q4_3 (removed)",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4 (removed)",
        "Q4_0_4_8 (removed)",
        "Q4_0_8_8 (removed)",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4 (removed)",
        "IQ4_NL_4_8 (removed)",
        "IQ4_NL_8_8 (removed)",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("not a GGML type")
}

/// Checks the alignment and the tensor table against each other and the file
/// size: the error names the tensor when one is at fault.
fn check_tensor_table(
    content: &Content,
    iq: &HashMap<String, IqType>,
    file_size: u64,
) -> std::result::Result<(), (Option<String>, String)> {
    let alignment = match content.metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match value_as_u64(v) {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err((
                    None,
                    format!("general.alignment is {v:?}, must be a power of two"),
                ))
            }
        },
    };
    let data_start = content.tensor_data_offset;
    if content.tensor_infos.is_empty() {
        return Ok(());
    }
    if data_start > file_size {
        return Err((
            None,
            format!("truncated: the tensor data would start at byte {data_start} of {file_size}"),
        ));
    }
    let data_len = file_size - data_start;
    let mut spans = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let fault = |reason: String| (Some(name.clone()), reason);
        let dims = info.shape.dims();
        if dims.is_empty() {
            return Err(fault("has no dimensions (a tensor has 1 to 4)".into()));
        }
        if dims.contains(&0) {
            return Err(fault(format!("has a zero dimension in {dims:?}")));
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| fault(format!("has dimensions {dims:?} whose product overflows")))?;
        let (dtype, block, type_size) = match iq.get(name) {
            Some(t) => (t.name().to_string(), t.block_size(), t.type_size()),
            None => (
                format!("{:?}", info.ggml_dtype),
                info.ggml_dtype.block_size() as u64,
                info.ggml_dtype.type_size() as u64,
            ),
        };
        if elems % block != 0 {
            return Err(fault(format!(
                "has {elems} elements, not a whole number of {dtype} blocks of {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(type_size)
            .filter(|&b| b <= data_len)
            .ok_or_else(|| {
                fault(format!(
                    "truncated: {elems} {dtype} elements need more than the {data_len} bytes of tensor data in the file"
                ))
            })?;
        if info.offset % alignment != 0 {
            return Err(fault(format!(
                "starts at offset {}, not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        let end = info.offset.checked_add(bytes).filter(|&e| e <= data_len);
        let Some(end) = end else {
            return Err(fault(format!(
                "truncated: its {bytes} bytes at offset {} run past the {data_len} bytes of tensor data in the file",
                info.offset
            )));
        };
        spans.push((info.offset, end, name, dtype));
    }
    spans.sort_unstable_by_key(|s| (s.0, s.1));
    for pair in spans.windows(2) {
        let ((_, end, name, dtype), (next, _, next_name, _)) = (&pair[0], &pair[1]);
        let (end, next) = (*end, *next);
        if end > next {
            return Err((
                Some((*name).clone()),
                format!("overlaps tensor '{next_name}': its {dtype} data ends at offset {end}, past where '{next_name}' starts ({next})"),
            ));
        }
        if next - end >= alignment {
            return Err((
                Some((*name).clone()),
                format!(
                    "is followed by {} unexplained bytes before tensor '{next_name}': its type {dtype} disagrees with the size of the data written for it",
                    next - end
                ),
            ));
        }
    }
    Ok(())
}

/// The block index and name of the first tensor (by block, then name)
/// named `blk.N.…` with `N` at least `n_blocks`, among GGUF names `names`.
pub(crate) fn first_block_beyond<'a>(
    names: impl IntoIterator<Item = &'a String>,
    n_blocks: usize,
) -> Option<(usize, &'a str)> {
    names
        .into_iter()
        .filter_map(|name| {
            let (n, _) = name.strip_prefix("blk.")?.split_once('.')?;
            let n: usize = n.parse().ok()?;
            (n >= n_blocks).then_some((n, name.as_str()))
        })
        .min()
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

/// A reader that shows `patches` (absolute position, 4 bytes) in place of
/// the bytes there: the IQ4 type ids, as F32's, for candle's reader.
struct Patched<'a> {
    inner: &'a mut Box<dyn Source>,
    patches: &'a [u64],
}

impl Read for Patched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = self.inner.stream_position()?;
        let n = self.inner.read(buf)?;
        for &at in self.patches {
            // The 4 bytes of a little-endian 0 (F32) over the type id.
            for k in 0..4u64 {
                let p = at + k;
                if p >= start && p < start + n as u64 {
                    buf[(p - start) as usize] = 0;
                }
            }
        }
        Ok(n)
    }
}

impl Seek for Patched<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// What [`scan_header`] finds in a header before candle's reader reads it.
#[derive(Default)]
struct HeaderScan {
    /// The positions of the IQ4 tensors' type ids (set only when the whole
    /// header was walked).
    patches: Vec<u64>,
    /// The IQ4 tensors' names and types (likewise).
    iq: Vec<(String, IqType)>,
    /// An integer `general.alignment` that is not a power of two (candle's
    /// reader divides by it), as the header holds it.
    bad_alignment: Option<i128>,
    /// The first metadata key met a second time.
    repeated_key: Option<String>,
}

/// Walks a GGUF v2/v3 header: its metadata keys (noting a key met twice,
/// and an integer `general.alignment` that is not a power of two) and its
/// tensor table (the positions of the type ids of IQ4 tensors, and their
/// names and types). Gives up quietly where the header does not parse
/// (candle's reader then names the fault) or is v1, keeping what it found
/// in the metadata up to there.
fn scan_header(r: &mut Box<dyn Source>, file_size: u64, found: &mut HeaderScan) -> Option<()> {
    fn bytes<const N: usize>(r: &mut Box<dyn Source>) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok().map(|_| b)
    }
    fn u32_(r: &mut Box<dyn Source>) -> Option<u32> {
        bytes::<4>(r).map(u32::from_le_bytes)
    }
    fn u64_(r: &mut Box<dyn Source>) -> Option<u64> {
        bytes::<8>(r).map(u64::from_le_bytes)
    }
    fn skip(r: &mut Box<dyn Source>, n: u64, file_size: u64) -> Option<()> {
        let at = r.stream_position().ok()?;
        (at.checked_add(n)? <= file_size).then_some(())?;
        r.seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()
            .map(|_| ())
    }
    /// A name (a key's or a tensor's): names are short, so a longer one is
    /// a malformed header, which candle's reader names (and nothing sized
    /// by it is allocated here).
    fn name(r: &mut Box<dyn Source>, file_size: u64) -> Option<Vec<u8>> {
        let len = u64_(r)?;
        (len <= (1 << 16).min(file_size)).then_some(())?;
        let mut name = vec![0u8; len as usize];
        r.read_exact(&mut name).ok()?;
        Some(name)
    }
    /// An integer value of type `ty` (GGUF's 0–5, 10, 11), read.
    fn integer(r: &mut Box<dyn Source>, ty: u32) -> Option<i128> {
        Some(match ty {
            0 => bytes::<1>(r)?[0] as i128,
            1 => bytes::<1>(r)?[0] as i8 as i128,
            2 => u16::from_le_bytes(bytes::<2>(r)?) as i128,
            3 => i16::from_le_bytes(bytes::<2>(r)?) as i128,
            4 => u32_(r)? as i128,
            5 => u32_(r)? as i32 as i128,
            10 => u64_(r)? as i128,
            11 => u64_(r)? as i64 as i128,
            _ => return None,
        })
    }
    fn skip_value(r: &mut Box<dyn Source>, ty: u32, depth: u32, file_size: u64) -> Option<()> {
        match ty {
            0 | 1 | 7 => skip(r, 1, file_size),
            2 | 3 => skip(r, 2, file_size),
            4..=6 => skip(r, 4, file_size),
            10..=12 => skip(r, 8, file_size),
            8 => {
                let len = u64_(r)?;
                skip(r, len, file_size)
            }
            9 if depth < 4 => {
                let (elem, n) = (u32_(r)?, u64_(r)?);
                match elem {
                    0 | 1 | 7 => skip(r, n, file_size),
                    2 | 3 => skip(r, n.checked_mul(2)?, file_size),
                    4..=6 => skip(r, n.checked_mul(4)?, file_size),
                    10..=12 => skip(r, n.checked_mul(8)?, file_size),
                    _ => {
                        // Each element takes at least 8 bytes (a length).
                        let left = file_size.saturating_sub(r.stream_position().ok()?);
                        (n <= left / 8).then_some(())?;
                        (0..n).try_for_each(|_| skip_value(r, elem, depth + 1, file_size))
                    }
                }
            }
            _ => None,
        }
    }
    let head = bytes::<8>(r)?;
    if &head[..4] != b"GGUF" || !matches!(u32::from_le_bytes(head[4..8].try_into().ok()?), 2 | 3) {
        return None;
    }
    let (tensors, kvs) = (u64_(r)?, u64_(r)?);
    let mut keys = std::collections::HashSet::new();
    for _ in 0..kvs {
        let key = name(r, file_size)?;
        let ty = u32_(r)?;
        if key == b"general.alignment" && matches!(ty, 0..=5 | 10 | 11) {
            let v = integer(r, ty)?;
            if !(v > 0 && (v as u128).is_power_of_two()) {
                found.bad_alignment.get_or_insert(v);
            }
        } else {
            skip_value(r, ty, 0, file_size)?;
        }
        if !keys.insert(key.clone()) && found.repeated_key.is_none() {
            found.repeated_key = Some(String::from_utf8_lossy(&key).into_owned());
        }
    }
    let (mut patches, mut iq) = (Vec::new(), Vec::new());
    for _ in 0..tensors {
        let name = name(r, file_size)?;
        let dims = u32_(r)?;
        (dims <= 4).then_some(())?;
        skip(r, 8 * dims as u64, file_size)?;
        let at = r.stream_position().ok()?;
        if let Some(kind) = IqType::from_id(u32_(r)?) {
            patches.push(at);
            iq.push((String::from_utf8_lossy(&name).into_owned(), kind));
        }
        skip(r, 8, file_size)?;
    }
    (found.patches, found.iq) = (patches, iq);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads and seeks of every kind through [`Tracked`] give the bytes
    /// and positions a plain cursor gives, seeks before the start fail,
    /// and a seek within the buffer keeps it (no read of the source).
    #[test]
    fn tracked_reads_and_seeks_as_its_source_does() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut plain = Cursor::new(data.clone());
        let mut tracked = Tracked::new(Cursor::new(data.clone()));
        let mut x = 12345u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) as i64;
            let to = match r % 4 {
                0 => SeekFrom::Start((r % 52_000) as u64),
                1 => SeekFrom::Current(r % 600 - 300),
                2 => SeekFrom::End(-(r % 1000)),
                _ => SeekFrom::Current(r % 20_000),
            };
            let (a, b) = (plain.seek(to), tracked.seek(to));
            match (&a, &b) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{to:?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{to:?}: {a:?} against {b:?}"),
            }
            let mut want = vec![0u8; (r % 700) as usize];
            let mut got = want.clone();
            let (n, m) = (plain.read(&mut want).ok(), tracked.read(&mut got).ok());
            // A buffered read may stop early at its buffer's end: compare
            // what both gave, then catch the plain one up.
            let m = m.expect("read");
            assert!(m <= n.expect("read"));
            assert_eq!(got[..m], want[..m]);
            plain
                .seek(SeekFrom::Start(tracked.stream_position().expect("pos")))
                .expect("seek");
            assert_eq!(plain.stream_position().ok(), tracked.stream_position().ok());
        }
        assert!(tracked.seek(SeekFrom::Current(-1_000_000)).is_err());

        /// Counts the reads of its source.
        struct Counted(Cursor<Vec<u8>>, usize);
        impl Read for Counted {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 += 1;
                self.0.read(buf)
            }
        }
        impl Seek for Counted {
            fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
                self.0.seek(to)
            }
        }
        let mut t = Tracked::new(Counted(Cursor::new(data), 0));
        let mut b = [0u8; 8];
        for i in 0..100u64 {
            t.seek(SeekFrom::Start(i * 40)).expect("seek");
            t.read_exact(&mut b).expect("read");
            t.seek(SeekFrom::Current(16)).expect("skip");
        }
        assert_eq!(t.inner.get_ref().1, 1, "4 KB read in one 8 KiB fill");
    }

    /// A small file is read whole, in order and once; a large one in
    /// [`SAMPLES`] chunks from its first byte to its last.
    #[test]
    fn samples_cover_a_small_file_and_span_a_large_one() {
        let chunk = SAMPLE_BYTES as u64;
        for len in [0, 1, chunk - 1, chunk, chunk + 1, chunk * SAMPLES as u64] {
            let mut end = 0;
            for (at, n) in sample_ranges(len) {
                assert_eq!(at, end, "{len}");
                end = at + n as u64;
            }
            assert_eq!(end, len);
        }
        for len in [chunk * SAMPLES as u64 + 1, 7 << 30] {
            let r = sample_ranges(len);
            assert_eq!(r.len(), SAMPLES);
            assert_eq!(r[0].0, 0);
            let (at, n) = r[SAMPLES - 1];
            assert_eq!(at + n as u64, len);
            assert!(r.windows(2).all(|w| w[0].0 + chunk <= w[1].0), "{len}");
        }
    }
}
