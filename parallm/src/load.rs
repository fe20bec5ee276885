//! Loading a model and its tokenizer from a path, or the reference model.

use std::path::{Path, PathBuf};

use framework::{GgufFile, LlamaShard, ShardSpec, Tokenizer, WeightFormat};

/// A loaded single-shard model with its tokenizer.
pub struct LoadedModel {
    /// Where it came from.
    pub path: PathBuf,
    /// The model (world size 1).
    pub model: LlamaShard,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
}

/// Where to find the model: a path, or the reference model (fetched if needed).
pub fn resolve_model_path(
    model: Option<&Path>,
    progress: bool,
) -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => Ok(crate::fetch::reference_model(progress)?),
    }
}

/// Opens `path` and loads the whole model in `format` with its tokenizer.
pub fn load_model(path: &Path, format: WeightFormat) -> framework::Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    // The architecture check and the tokenizer first: they are cheap, and a
    // file of another architecture should be named as such.
    framework::ModelConfig::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = LlamaShard::load(&file, ShardSpec::SINGLE, format)?;
    Ok(LoadedModel {
        path: path.to_path_buf(),
        model,
        tokenizer,
    })
}
