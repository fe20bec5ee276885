//! parallm: actor-based parallel task processing for LLM inference.
//!
//! This package is the public facade and the `parallm` binary. The model side
//! lives in the [`framework`] crate, re-exported here whole; this package adds
//! what a program embedding parallm needs around it: fetching the reference
//! model ([`fetch`]), loading a model with its tokenizer ([`load`]) and the
//! latency benchmark ([`bench`]).

pub mod bench;
pub mod fetch;
pub mod load;

pub use framework;
pub use framework::{Error, Result};
