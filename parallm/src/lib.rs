//! parallm: actor-based parallel task processing for LLM inference.
//!
//! This package is the public facade. The model side lives in the
//! [`framework`] crate, re-exported here whole; this package adds what a
//! program embedding parallm needs around it: fetching the reference model
//! ([`fetch`]), loading a model with its tokenizer ([`load`]), the launcher's
//! layered configuration ([`config`]) and the OpenAI-compatible HTTP server
//! ([`serve`]). The general kit (queue, scheduler, compute nodes, merger; the
//! one-shot short path) is the [`kit`] crate, and the LLM engine built on it,
//! with its [`Engine`], the `actors` crate; both are re-exported whole.
//!
//! The `parallm` binary and its benchmarks are not here: they are the root
//! package of the workspace (`parallm-cli`), so the benchmarks' plotting and
//! HTTP-client dependencies never reach a program that embeds this library.

pub mod config;
pub mod fetch;
pub mod load;
pub mod serve;

pub use actors;
pub use actors::kit;
pub use actors::llm::{
    BeamParams, Engine, EngineBuilder, EngineConfig, EngineError, Event, EventStream, Prompt,
    Request, Usage,
};
pub use framework;
pub use framework::{Error, Result};
