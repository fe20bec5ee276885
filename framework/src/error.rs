//! The framework's one error type.
//!
//! Variants are grouped by where the problem comes from: the model file, the
//! tokenizer and template, a request, sharding, and the compute backend. Each
//! carries enough structure (the file, the field, the allowed range) for the
//! outer layers to print a message a user can act on. Backend errors (candle)
//! are wrapped here at the boundary and never leak past it as another type.

use std::path::PathBuf;

/// Result alias used across the framework.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the framework.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- model files -------------------------------------------------------
    /// The model file could not be opened or read.
    #[error("model file {path}: {reason}")]
    ModelFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file parsed but describes a model this build does not run.
    #[error("model file {path}: unsupported {what} '{found}' (supported: {supported})")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported ("architecture", "tensor type", …).
        what: &'static str,
        /// The value found in the file.
        found: String,
        /// What this build accepts.
        supported: &'static str,
    },
    /// A metadata key the model needs is absent or has the wrong type.
    #[error("model file {path}: metadata key '{key}' {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The GGUF key.
        key: String,
        /// What is wrong ("is missing", "is not an integer", …).
        reason: String,
    },
    /// A tensor is absent or has an unexpected shape or type.
    #[error("model file {path}: tensor '{name}' {reason}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The model configuration is inconsistent (head counts, sizes).
    #[error("model config: {0}")]
    Config(String),
    /// A runtime setting (parallelism, batching, queue) is invalid.
    #[error("invalid setting `{field}`: {reason}")]
    Setting {
        /// The setting's name.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },

    // ---- tokenizer and chat template ---------------------------------------
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    Template(String),

    // ---- requests ----------------------------------------------------------
    /// A request field is out of range; names the field and what is allowed.
    #[error("invalid request: `{field}` {reason}")]
    InvalidRequest {
        /// The request field.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The prompt plus the requested tokens do not fit the context window.
    #[error(
        "prompt is {prompt_tokens} tokens; with {max_tokens} new token{} it exceeds \
         the model's context of {context} tokens",
        if *max_tokens == 1 { "" } else { "s" }
    )]
    ContextOverflow {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens requested beyond the prompt.
        max_tokens: usize,
        /// The context window.
        context: usize,
    },
    /// A prompt too long for the context, refused before it was tokenized
    /// in full.
    #[error(
        "prompt is {bytes} bytes, at least {at_least} tokens, but the model's context is {context} tokens"
    )]
    PromptTooLong {
        /// The prompt's length in bytes (the rendered chat for messages).
        bytes: usize,
        /// Tokens it has at least.
        at_least: usize,
        /// The context window.
        context: usize,
    },

    // ---- parallelism and compute -------------------------------------------
    /// A shard spec or partition plan cannot be applied to this model.
    #[error("sharding: {0}")]
    Shard(String),
    /// A collective operation failed (a peer vanished, sizes disagree).
    #[error("collective: {0}")]
    Collective(String),
    /// The step was aborted because a peer failed; this rank is healthy.
    #[error("aborted: {0}")]
    Aborted(String),
    /// The compute backend failed.
    #[error("backend: {0}")]
    Backend(#[from] candle_core::Error),
    /// The CUDA backend failed, or CUDA is not available here (the message
    /// names the missing library or device).
    #[error("cuda: {0}")]
    Cuda(String),
    /// Plain I/O outside a model file.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short, stable name for the kind of error, usable as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ModelFile { .. }
            | Error::Unsupported { .. }
            | Error::Metadata { .. }
            | Error::Tensor { .. } => "model_file",
            Error::Config(_) | Error::Setting { .. } => "config",
            Error::Tokenizer(_) => "tokenizer",
            Error::Template(_) => "template",
            Error::InvalidRequest { .. }
            | Error::ContextOverflow { .. }
            | Error::PromptTooLong { .. } => "invalid_request",
            Error::Shard(_) => "shard",
            Error::Collective(_) => "collective",
            Error::Aborted(_) => "aborted",
            Error::Backend(_) => "backend",
            Error::Cuda(_) => "cuda",
            Error::Io(_) => "io",
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }
}
