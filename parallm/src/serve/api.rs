//! The OpenAI-compatible wire types and their validation.
//!
//! Raw request bodies ([`CompletionRequest`], [`ChatRequest`]) are parsed with
//! the field path kept for errors, then checked against the server's limits
//! into [`ValidGeneration`]: the engine requests to submit and how to answer.
//! Nothing unvalidated reaches the engine. Response types are plain serde
//! structs in the shapes OpenAI's clients read.

use serde::{Deserialize, Serialize};

use actors::llm::{BeamParams, Prompt, Request, Traffic};
use framework::chat::{ChatMessage, ChatTurn, RenderOptions};
use framework::guide::Guide;
use framework::scoring::PromptScoring;
use framework::speculative::{SpecMethod, Speculation};
use framework::tools::{Tool, ToolCall, ToolChoice, ToolFormat};
use framework::SamplingParams;

use crate::config::LimitsSection;
use crate::serve::error::ApiError;

/// Parses a JSON body, naming the field at fault on a type error.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json stops at 128 levels of nesting: valid JSON, refused.
        if e.to_string().starts_with("recursion limit exceeded") {
            ApiError::InvalidParam {
                param: None,
                message: format!(
                    "the request body nests arrays and objects more than 128 levels deep (at line {} column {}), deeper than this server reads",
                    e.line(),
                    e.column()
                ),
            }
        } else {
            ApiError::MalformedJson(e.to_string())
        }
    })?;
    if !value.is_object() {
        return Err(ApiError::InvalidParam {
            param: None,
            message: "the request body must be a JSON object".into(),
        });
    }
    serde_path_to_error::deserialize::<_, T>(value.clone()).map_err(|e| {
        let mut path = e.path().to_string();
        let mut inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            // Flattened fields lose their path; find it among the shared
            // ones, then the chat template's.
            if let Err(e) = serde_path_to_error::deserialize::<_, CommonFields>(value.clone()) {
                path = e.path().to_string();
                inner = e.into_inner().to_string();
            } else if let Err(e) = serde_path_to_error::deserialize::<_, TemplateFields>(value) {
                path = e.path().to_string();
                inner = e.into_inner().to_string();
            }
        }
        let inner = plain_expectation(&inner);
        if path.is_empty() || path == "." {
            ApiError::InvalidParam {
                param: None,
                message: inner,
            }
        } else {
            let param = path.split(['.', '[']).next().unwrap_or(&path).to_string();
            ApiError::param(param, format!("`{path}`: {inner}"))
        }
    })
}

/// Serde's expectations in JSON's words: `u64` is a non-negative
/// integer, `struct X` an object.
fn plain_expectation(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, json) in [
        ("expected u64", "expected a non-negative integer"),
        ("expected u32", "expected a non-negative integer"),
        ("expected usize", "expected a non-negative integer"),
        ("expected i64", "expected an integer"),
        ("expected i32", "expected an integer"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ] {
        out = out.replace(rust, json);
    }
    if let Some(at) = out.find("expected struct ") {
        out.truncate(at);
        out.push_str("expected an object");
    }
    out
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The `prompt` of a completion: text, texts, token ids, or lists of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids, or a list of such lists"
)]
pub enum PromptInput {
    /// One text.
    Text(String),
    /// Several texts (one completion each).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by completions and chat.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    /// The model id.
    pub model: Option<String>,
    /// Tokens to generate at most.
    pub max_tokens: Option<u64>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Top-k (0 or -1: off).
    pub top_k: Option<i64>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// Choices per prompt.
    pub n: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Seed.
    pub seed: Option<u64>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty (extension).
    pub repetition_penalty: Option<f32>,
    /// Stream with server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Keep going past end-of-sequence (extension).
    pub ignore_eos: Option<bool>,
    /// Beam search width (extension).
    pub beam_width: Option<u64>,
    /// Beam search length penalty (extension).
    pub length_penalty: Option<f32>,
    /// Token id (as a string) → bias added to its logit, in [-100, 100].
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    /// Candidates to rank per choice; only `n` itself (or 1 with `n` 1),
    /// which is what is generated anyway, is accepted.
    pub best_of: Option<u64>,
    /// Tools, functions and response formats (refused until they exist;
    /// `response_format` of type `text` is the default and accepted).
    pub tools: Option<serde_json::Value>,
    /// See `tools`.
    pub tool_choice: Option<serde_json::Value>,
    /// See `tools`.
    pub functions: Option<serde_json::Value>,
    /// See `tools`.
    pub function_call: Option<serde_json::Value>,
    /// Whether the model may call several tools in one answer (default
    /// true; chat only).
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text"}` (the default), `{"type": "json_object"}`, or
    /// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…},
    /// "strict": …}}`: the output is held to it.
    pub response_format: Option<serde_json::Value>,
    /// The output matches this regular expression (extension, vLLM's name).
    pub guided_regex: Option<String>,
    /// The output is one of these strings (extension, vLLM's name).
    pub guided_choice: Option<Vec<String>>,
    /// The output follows this Lark grammar (extension, vLLM's name).
    pub guided_grammar: Option<String>,
    /// The output is JSON valid under this schema (extension, vLLM's name).
    pub guided_json: Option<serde_json::Value>,
    /// Speculative decoding for this request (extension); keys left out
    /// take the server's `[speculative]` values.
    pub speculative: Option<SpeculativeInput>,
}

/// The guide a request's fields ask for: at most one of a forced tool call
/// (`tool_choice` `required` or a named function), `response_format` (other
/// than `text`), `guided_json`, `guided_regex`, `guided_choice` and
/// `guided_grammar`.
fn guide(c: &CommonFields, tool_guide: Option<Guide>) -> Result<Option<Guide>, ApiError> {
    let mut found: Vec<(&str, Guide)> = Vec::new();
    if let Some(g) = tool_guide {
        found.push(("tool_choice", g));
    }
    if let Some(f) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        let kind = f.get("type").and_then(|t| t.as_str());
        match kind {
            Some("text") => {}
            Some("json_object") => found.push(("response_format", Guide::JsonObject)),
            Some("json_schema") => {
                let strict = match f.get("json_schema").and_then(|j| j.get("strict")) {
                    None | Some(serde_json::Value::Null) => false,
                    Some(serde_json::Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(ApiError::param(
                            "response_format",
                            "`response_format.json_schema.strict` must be true or false",
                        ))
                    }
                };
                let schema = f
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        ApiError::param(
                            "response_format",
                            "`response_format` of type `json_schema` needs `json_schema.schema`, a JSON schema object",
                        )
                    })?;
                // Strict: no property beyond those a schema names, as
                // OpenAI's strict mode.
                let schema = match strict {
                    true => framework::guide::closed_objects(schema.clone()),
                    false => schema.clone(),
                };
                found.push(("response_format", Guide::JsonSchema(schema)));
            }
            _ => {
                return Err(ApiError::param(
                    "response_format",
                    "`response_format.type` must be `text`, `json_object` or `json_schema`",
                ))
            }
        }
    }
    if let Some(schema) = &c.guided_json {
        found.push(("guided_json", Guide::GuidedJson(schema.clone())));
    }
    if let Some(rx) = &c.guided_regex {
        found.push(("guided_regex", Guide::Regex(rx.clone())));
    }
    if let Some(choices) = &c.guided_choice {
        found.push(("guided_choice", Guide::Choice(choices.clone())));
    }
    if let Some(g) = &c.guided_grammar {
        found.push(("guided_grammar", Guide::Lark(g.clone())));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, g)| g)),
        _ => Err(ApiError::param(
            found[1].0,
            format!(
                "`{}` and `{}` both constrain the output; give one",
                found[0].0, found[1].0
            ),
        )),
    }
}

/// The `speculative` object of a request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeInput {
    /// `none` or `ngram` (default: the server's, or `ngram` where the
    /// server does not speculate).
    pub method: Option<String>,
    /// Drafted tokens per step, at most.
    pub num_speculative_tokens: Option<u64>,
    /// Shortest n-gram matched.
    pub ngram_min: Option<u64>,
    /// Longest n-gram matched.
    pub ngram_max: Option<u64>,
}

impl SpeculativeInput {
    /// The request's settings over the server's `defaults`.
    fn resolve(&self, defaults: &Speculation) -> Result<Speculation, ApiError> {
        let method = match self.method.as_deref() {
            Some(m) => m.parse().map_err(api_error)?,
            None if defaults.enabled() => defaults.method,
            None => SpecMethod::Ngram,
        };
        let size =
            |v: Option<u64>, d: usize| v.map_or(d, |v| usize::try_from(v).unwrap_or(usize::MAX));
        let s = Speculation {
            method,
            num_speculative_tokens: size(
                self.num_speculative_tokens,
                defaults.num_speculative_tokens,
            ),
            ngram_min: size(self.ngram_min, defaults.ngram_min),
            ngram_max: size(self.ngram_max, defaults.ngram_max),
        };
        if s.enabled() {
            s.validate().map_err(api_error)?;
        }
        Ok(s)
    }
}

/// An engine's refusal of a field as the API's error naming it.
pub fn api_error(e: framework::Error) -> ApiError {
    match e {
        framework::Error::InvalidRequest { field, reason } => {
            ApiError::param(field, format!("`{field}` {reason}"))
        }
        other => ApiError::InvalidParam {
            param: None,
            message: other.to_string(),
        },
    }
}

/// The bias map of `logit_bias` as token ids, or the key at fault.
fn logit_bias(
    map: Option<&std::collections::BTreeMap<String, f32>>,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(k, &b)| {
            k.trim().parse::<u32>().map(|t| (t, b)).map_err(|_| {
                ApiError::param(
                    "logit_bias",
                    format!("`logit_bias` key '{k}' is not a token id"),
                )
            })
        })
        .collect()
}

/// Refuses the OpenAI fields this server does not implement, by name.
fn refuse_unsupported(c: &CommonFields, n: usize) -> Result<(), ApiError> {
    if let Some(b) = c.best_of {
        if b as usize != n {
            return Err(ApiError::param(
                "best_of",
                format!("`best_of` is {b}; only `best_of` equal to `n` ({n}) is supported (use `n`, or `beam_width` for beam search)"),
            ));
        }
    }
    for (name, v) in [
        ("functions", &c.functions),
        ("function_call", &c.function_call),
    ] {
        if given(v) {
            return Err(ApiError::param(
                name,
                format!("`{name}` is not supported (the older form of `tools`; send `tools` and `tool_choice`)"),
            ));
        }
    }
    Ok(())
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The prompt(s).
    pub prompt: Option<PromptInput>,
    /// Log-probabilities of this many alternatives per token.
    pub logprobs: Option<u64>,
    /// Answer with the prompt in front of the completion (with `logprobs`,
    /// each prompt token's, the first `null`); `max_tokens` may then be 0.
    pub echo: Option<bool>,
    /// Text after the completion (unsupported).
    pub suffix: Option<String>,
}

/// A chat message's content: text or parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string, or a list of content parts")]
pub enum ContentInput {
    /// Plain text.
    Text(String),
    /// Parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its text, for `text` parts.
    pub text: Option<String>,
}

/// A chat message as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct MessageInput {
    /// `system`, `user`, `assistant` (or `developer`, read as `system`), or
    /// `tool` (a call's result).
    pub role: String,
    /// The content.
    pub content: Option<ContentInput>,
    /// An assistant message's calls.
    pub tool_calls: Option<Vec<ToolCallInput>>,
    /// A `tool` message's call id.
    pub tool_call_id: Option<String>,
    /// A `tool` message's function name.
    pub name: Option<String>,
    /// An assistant message's thought, as the server answered it.
    pub reasoning_content: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Shared fields.
    #[serde(flatten)]
    pub common: CommonFields,
    /// The conversation.
    pub messages: Option<Vec<MessageInput>>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per token with `logprobs`.
    pub top_logprobs: Option<u64>,
    /// Newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// Answer the model's thought as `reasoning_content` (default: true);
    /// false leaves it out (the answer is split all the same).
    pub include_reasoning: Option<bool>,
    /// How the chat template renders `messages`.
    #[serde(flatten)]
    pub template: TemplateFields,
}

/// What a chat or tokenize request may say of how its messages are rendered
/// (vLLM's and SGLang's names for Hugging Face's `apply_chat_template`
/// arguments).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TemplateFields {
    /// End the prompt with the assistant's turn opener (default: true,
    /// unless `continue_final_message`).
    pub add_generation_prompt: Option<bool>,
    /// Leave the final message open for the model to continue.
    pub continue_final_message: Option<bool>,
    /// More template variables (`{"enable_thinking": false}`), over the
    /// server's `model.chat_template_kwargs`.
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// A template for this request alone (vLLM's): refused, naming the
    /// server's setting instead.
    pub chat_template: Option<serde_json::Value>,
}

impl TemplateFields {
    /// The first field given, by name (for a request without `messages`,
    /// which they do not go with).
    pub fn first_given(&self) -> Option<&'static str> {
        [
            (
                "add_generation_prompt",
                self.add_generation_prompt.is_some(),
            ),
            (
                "continue_final_message",
                self.continue_final_message.is_some(),
            ),
            ("chat_template_kwargs", given(&self.chat_template_kwargs)),
            ("chat_template", given(&self.chat_template)),
        ]
        .into_iter()
        .find_map(|(name, given)| given.then_some(name))
    }

    /// The render options these fields ask for, checked.
    pub fn render(&self) -> Result<RenderOptions, ApiError> {
        if given(&self.chat_template) {
            return Err(ApiError::param(
                "chat_template",
                "`chat_template` per request is not supported: the server renders with the model's \
                 template, or the one `model.chat_template_file` gives",
            ));
        }
        let continue_final_message = self.continue_final_message.unwrap_or(false);
        let kwargs = match &self.chat_template_kwargs {
            None | Some(serde_json::Value::Null) => Default::default(),
            Some(serde_json::Value::Object(map)) => map.clone(),
            Some(other) => {
                return Err(ApiError::param(
                    "chat_template_kwargs",
                    format!(
                        "`chat_template_kwargs` must be an object of template variables, not {}",
                        json_kind(other)
                    ),
                ))
            }
        };
        let render = RenderOptions {
            add_generation_prompt: self
                .add_generation_prompt
                .unwrap_or(!continue_final_message),
            continue_final_message,
            kwargs,
        };
        render.check().map_err(api_error)?;
        Ok(render)
    }
}

/// Whether an optional field was sent with a value (JSON `null` is not one).
fn given(v: &Option<serde_json::Value>) -> bool {
    v.as_ref().is_some_and(|v| !v.is_null())
}

/// A JSON value's kind, as an error names it.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `POST /tokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// The model id.
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Or a conversation, rendered with the chat template.
    pub messages: Option<Vec<MessageInput>>,
    /// The tools offered with `messages`, as a chat request gives them (they
    /// are part of the rendered prompt).
    pub tools: Option<serde_json::Value>,
    /// The chat request's `tool_choice`: with `none`, the tools are not
    /// rendered, as the chat endpoint does not show them to the model.
    pub tool_choice: Option<serde_json::Value>,
    /// Add BOS/EOS as the model does (default true; Hugging Face's name).
    pub add_special_tokens: Option<bool>,
    /// How the chat template renders `messages`, as the chat endpoint takes it.
    #[serde(flatten)]
    pub template: TemplateFields,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    /// The model id.
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// What the server will do for a validated generation request.
#[derive(Debug, Clone)]
pub struct ValidGeneration {
    /// Engine requests in choice order (`prompt_index * n + choice`).
    pub requests: Vec<Request>,
    /// Choices per prompt.
    pub n: usize,
    /// Beam search: one engine request per prompt, its best `n` beams are the choices.
    pub beam: bool,
    /// Stream the answer.
    pub stream: bool,
    /// Send usage in the last streamed chunk.
    pub include_usage: bool,
    /// Log-probabilities wanted (alternatives per token).
    pub logprobs: Option<usize>,
    /// Answer with the prompt in front (completions' `echo`).
    pub echo: bool,
    /// The tools whose calls the answer is read for (chat with `tools` and a
    /// `tool_choice` other than `none`).
    pub tools: Option<ToolUse>,
    /// Whether a chat answer's thought is answered (`include_reasoning`),
    /// where the model's answers are read for one.
    pub include_reasoning: bool,
    /// The request's own names of the fields the engine names.
    pub names: ParamNames,
}

/// The names a request gave the fields the engine refuses by its own
/// names (`prompt`, `max_tokens`): a chat's prompt is its `messages`, and
/// its limit may be `max_completion_tokens`; with several prompts, the
/// refused one is named by its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamNames {
    /// The prompt's field: `prompt` or `messages`.
    pub prompt: &'static str,
    /// The limit's field: `max_tokens` or `max_completion_tokens`.
    pub max_tokens: &'static str,
    /// Prompts in the request.
    pub prompts: usize,
    /// Engine requests per prompt (`n`, or 1 for a beam search).
    pub per_prompt: usize,
}

impl ParamNames {
    /// `e`, an engine or tokenizer refusal of engine request `request`, in
    /// the request's own names.
    pub fn rename(&self, e: ApiError, request: usize) -> ApiError {
        let at = match self.prompts {
            1 => String::new(),
            _ => format!("[{}]", request / self.per_prompt.max(1)),
        };
        let map = |p: &str| -> String {
            match p {
                "prompt" => format!("{}{at}", self.prompt),
                "max_tokens" => self.max_tokens.to_string(),
                other => other.to_string(),
            }
        };
        match e {
            ApiError::InvalidParam {
                param: Some(p),
                message,
            } => {
                let to = map(&p);
                let message = message.replacen(&format!("`{p}`"), &format!("`{to}`"), 1);
                ApiError::InvalidParam {
                    param: Some(to),
                    message,
                }
            }
            ApiError::ContextLength { param, message } => {
                let message = match (param, at.is_empty()) {
                    ("prompt", false) => format!("`prompt{at}`: {message}"),
                    _ => message,
                };
                ApiError::ContextLength {
                    param: match param {
                        "prompt" => self.prompt,
                        "max_tokens" => self.max_tokens,
                        other => other,
                    },
                    message,
                }
            }
            other => other,
        }
    }
}

/// The tools a chat answer may call, and the format the model writes calls in.
#[derive(Debug, Clone)]
pub struct ToolUse {
    /// The tools offered.
    pub tools: Vec<Tool>,
    /// The model's call format.
    pub format: ToolFormat,
}

fn cap(param: &str, value: u64, min: u64, max: usize) -> Result<usize, ApiError> {
    if value < min || value > max as u64 {
        return Err(ApiError::param(
            param,
            format!("`{param}` is {value}, must be in [{min}, {max}]"),
        ));
    }
    Ok(value as usize)
}

/// Validates the shared fields into sampling parameters for `prompts`.
fn validate(
    c: &CommonFields,
    prompts: Vec<Prompt>,
    (max_tokens, max_tokens_param): (Option<u64>, &str),
    (logprobs, logprobs_param): (Option<u64>, &str),
    (limits, speculation): (&LimitsSection, &Speculation),
    tools: Option<(ToolUse, Option<Guide>)>,
) -> Result<ValidGeneration, ApiError> {
    let (tools, tool_guide) = match tools {
        Some((t, g)) => (Some(t), g),
        None => (None, None),
    };
    let max_tokens_given = max_tokens;
    let max_tokens = match max_tokens {
        Some(v) => cap(max_tokens_param, v, 1, limits.max_tokens)?,
        None => limits.default_max_tokens,
    };
    let n = cap("n", c.n.unwrap_or(1), 1, limits.max_n)?;
    refuse_unsupported(c, n)?;
    let logit_bias = logit_bias(c.logit_bias.as_ref())?;
    let stop = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > limits.max_stop {
        return Err(ApiError::param(
            "stop",
            format!(
                "`stop` has {} sequences, at most {} are allowed",
                stop.len(),
                limits.max_stop
            ),
        ));
    }
    let logprobs = match logprobs {
        Some(v) => Some(cap(logprobs_param, v, 0, limits.max_logprobs)?),
        None => None,
    };
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("`top_k` is {k}, must be -1 (off), 0 (off) or positive"),
            ))
        }
    };
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let beam = match c.beam_width {
        None => None,
        Some(w) => {
            let width = cap("beam_width", w, 1, limits.max_beam_width)?;
            if stream {
                return Err(ApiError::param(
                    "stream",
                    "beam search (`beam_width`) cannot stream; set `stream` to false",
                ));
            }
            if n > width {
                return Err(ApiError::param(
                    "n",
                    format!("`n` is {n}, must not exceed `beam_width` ({width})"),
                ));
            }
            if !logit_bias.is_empty() {
                return Err(ApiError::param(
                    "logit_bias",
                    "`logit_bias` does not apply to beam search (`beam_width`)",
                ));
            }
            if logprobs.is_some() {
                return Err(ApiError::param(
                    "logprobs",
                    "`logprobs` does not apply to beam search (`beam_width`)",
                ));
            }
            Some(BeamParams {
                width,
                length_penalty: c.length_penalty.unwrap_or(1.0),
            })
        }
    };
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        seed: c.seed,
        max_tokens,
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        logprobs,
        logit_bias,
    };
    params.validate().map_err(api_error)?;
    let speculative = match &c.speculative {
        None => None,
        Some(s) => Some(s.resolve(speculation)?),
    };
    if beam.is_some() && speculative.is_some_and(|s| s.enabled()) {
        return Err(ApiError::param(
            "speculative",
            "`speculative` does not combine with beam search (`beam_width`)",
        ));
    }
    let guide = guide(c, tool_guide)?;
    if let Some(g) = &guide {
        if beam.is_some() {
            return Err(ApiError::param(
                g.field(),
                format!(
                    "`{}` does not combine with beam search (`beam_width`)",
                    g.field()
                ),
            ));
        }
        if speculative.is_some_and(|s| s.enabled()) {
            return Err(ApiError::param(
                "speculative",
                "`speculative` does not combine with guided decoding",
            ));
        }
    }
    let names = ParamNames {
        prompt: match prompts.first() {
            Some(Prompt::Chat(_) | Prompt::ChatTools { .. }) => "messages",
            _ => "prompt",
        },
        max_tokens: match max_tokens_param {
            "max_completion_tokens" => "max_completion_tokens",
            _ => "max_tokens",
        },
        prompts: prompts.len(),
        per_prompt: if beam.is_some() { 1 } else { n },
    };
    let mut requests = Vec::new();
    for prompt in prompts {
        let copies = if beam.is_some() { 1 } else { n };
        // A prompt's choices count as one request, with their outcome.
        let choices = (copies > 1).then(|| actors::llm::Choices::new(copies));
        for j in 0..copies {
            let mut p = params.clone();
            // Distinct draws per choice, reproducible when a seed is given.
            p.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            requests.push(Request {
                prompt: prompt.clone(),
                params: p,
                beam,
                priority: 0,
                speculative,
                prompt_logprobs: None,
                guide: guide.clone(),
                fit_max_tokens: max_tokens_given.is_none(),
                // A prompt's further choices are not requests of their own
                // to the metrics.
                traffic: if j == 0 {
                    Traffic::Request
                } else {
                    Traffic::FurtherChoice
                },
                choices: choices.clone(),
            });
        }
    }
    Ok(ValidGeneration {
        requests,
        n,
        beam: beam.is_some(),
        stream,
        include_usage: stream && c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        echo: false,
        tools,
        include_reasoning: true,
        names,
    })
}

impl CompletionRequest {
    /// Checks the request against `limits`, with `speculation` the server's
    /// speculative decoding.
    pub fn validate(
        &self,
        limits: &LimitsSection,
        speculation: &Speculation,
    ) -> Result<ValidGeneration, ApiError> {
        let echo = self.echo == Some(true);
        if echo && self.common.stream == Some(true) {
            return Err(ApiError::param(
                "echo",
                "`echo` with `stream` is not supported; set `stream` to false",
            ));
        }
        if echo && self.common.beam_width.is_some() {
            return Err(ApiError::param(
                "echo",
                "`echo` does not combine with beam search (`beam_width`)",
            ));
        }
        for (name, v) in [
            ("tools", &self.common.tools),
            ("tool_choice", &self.common.tool_choice),
        ] {
            if given(v) {
                return Err(ApiError::param(
                    name,
                    format!("`{name}` is for /v1/chat/completions; completions take no tools"),
                ));
            }
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::param("suffix", "`suffix` is not supported"));
        }
        let prompts = match self.prompt.clone() {
            None => return Err(ApiError::param("prompt", "`prompt` is required")),
            Some(PromptInput::Text(s)) => vec![Prompt::Text(s)],
            Some(PromptInput::Texts(v)) => v.into_iter().map(Prompt::Text).collect(),
            Some(PromptInput::Tokens(t)) => vec![Prompt::Tokens(t)],
            Some(PromptInput::TokenLists(v)) => v.into_iter().map(Prompt::Tokens).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::param(
                "prompt",
                "`prompt` must not be an empty list",
            ));
        }
        if prompts.len() > 64 {
            return Err(ApiError::param(
                "prompt",
                format!(
                    "`prompt` has {} prompts, at most 64 are allowed",
                    prompts.len()
                ),
            ));
        }
        // Echoing a prompt may generate nothing: it is then only scored.
        let nothing = echo && self.common.max_tokens == Some(0);
        let mut v = validate(
            &self.common,
            prompts,
            (
                if nothing {
                    Some(1)
                } else {
                    self.common.max_tokens
                },
                "max_tokens",
            ),
            (self.logprobs, "logprobs"),
            (limits, speculation),
            None,
        )?;
        if echo {
            v.echo = true;
            for r in &mut v.requests {
                if nothing {
                    r.params.max_tokens = 0;
                }
                if nothing || v.logprobs.is_some() {
                    r.prompt_logprobs = Some(PromptScoring {
                        first: 1,
                        top: v.logprobs.unwrap_or(0),
                        rows: false,
                    });
                }
            }
        }
        if v.requests.len() > limits.max_n * 8 {
            return Err(ApiError::param(
                "n",
                format!(
                    "{} prompts × n = {} choices; at most {} are allowed",
                    v.requests.len() / v.n.max(1),
                    v.requests.len(),
                    limits.max_n * 8
                ),
            ));
        }
        Ok(v)
    }
}

/// The prompt of a conversation as sent, with the tools `offered` to the
/// model, rendered as `render` says: plain turns, or turns with tool calls
/// and results and the render options (when tools are offered, the history
/// holds calls, or `render` is not the default).
pub fn chat_prompt(
    input: &[MessageInput],
    offered: &[Tool],
    render: RenderOptions,
) -> Result<Prompt, ApiError> {
    // Turns with more than a role and text need the template's full form.
    let with_calls = input.iter().any(|m| {
        m.role == "tool"
            || m.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
            || m.reasoning_content.is_some()
    });
    Ok(
        if offered.is_empty() && !with_calls && render == RenderOptions::default() {
            Prompt::Chat(chat_messages(input)?)
        } else {
            Prompt::ChatTools {
                messages: chat_turns(input, true)?,
                tools: offered.to_vec(),
                render,
            }
        },
    )
}

/// Converts messages as sent into the template's form.
pub fn chat_messages(messages: &[MessageInput]) -> Result<Vec<ChatMessage>, ApiError> {
    Ok(chat_turns(messages, false)?
        .into_iter()
        .map(|t| ChatMessage::new(t.role, t.content))
        .collect())
}

/// Converts messages as sent into turns; with `tools`, `tool` messages and
/// an assistant's `tool_calls` are read too.
pub fn chat_turns(messages: &[MessageInput], tools: bool) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" if tools => "tool",
                other => {
                    return Err(ApiError::param(
                        "messages",
                        format!(
                            "`messages[{i}].role` is '{other}', must be system, developer, user, assistant or tool"
                        ),
                    ))
                }
            };
            let content = match &m.content {
                // Only an assistant's turn may come without content (its
                // calls stand in for it).
                None if role == "assistant" => String::new(),
                None => {
                    return Err(ApiError::param(
                        "messages",
                        format!("`messages[{i}].content` is missing: a {role} message needs content"),
                    ))
                }
                Some(ContentInput::Text(s)) => s.clone(),
                Some(ContentInput::Parts(parts)) => {
                    // The parts' texts one per line, as vLLM joins them.
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => {
                                if j > 0 {
                                    text.push('\n');
                                }
                                text.push_str(t)
                            }
                            (kind, _) => {
                                return Err(ApiError::param(
                                    "messages",
                                    format!(
                                        "`messages[{i}].content[{j}]` is a '{kind}' part; only text parts are supported"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            if role == "tool" {
                let id = m.tool_call_id.clone().ok_or_else(|| {
                    ApiError::param(
                        "messages",
                        format!("`messages[{i}]` has role 'tool' but no `tool_call_id`"),
                    )
                })?;
                let turn = ChatTurn::tool_result(id, content);
                return Ok(match &m.name {
                    Some(n) => turn.with_name(n.clone()),
                    None => turn,
                });
            }
            let calls = match (&m.tool_calls, tools) {
                (Some(calls), true) if role == "assistant" => calls
                    .iter()
                    .enumerate()
                    .map(|(k, c)| c.to_call(i, k))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            let reasoning = match &m.reasoning_content {
                Some(_) if role != "assistant" => {
                    return Err(ApiError::param(
                        "messages",
                        format!("`messages[{i}].reasoning_content` goes with an assistant message, not a {role} one"),
                    ))
                }
                r => r.clone(),
            };
            Ok(ChatTurn::new(role, content)
                .with_tool_calls(calls)
                .with_reasoning(reasoning))
        })
        .collect()
}

/// One call of an assistant message as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolCallInput {
    /// The call's id.
    pub id: Option<String>,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The function called.
    pub function: Option<FunctionCallInput>,
}

/// The function of a call as sent.
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionCallInput {
    /// Its name.
    pub name: Option<String>,
    /// Its arguments: JSON text (or, leniently, a JSON object).
    pub arguments: Option<serde_json::Value>,
}

impl ToolCallInput {
    /// The call, message `i`'s `k`-th; an error naming what is missing.
    fn to_call(&self, i: usize, k: usize) -> Result<ToolCall, ApiError> {
        let at = format!("`messages[{i}].tool_calls[{k}]`");
        let bad = |what: &str| ApiError::param("messages", format!("{at} {what}"));
        if self.kind.as_deref().is_some_and(|t| t != "function") {
            return Err(bad("has a type other than `function`"));
        }
        let f = self
            .function
            .as_ref()
            .ok_or_else(|| bad("has no `function`"))?;
        let name = f
            .name
            .clone()
            .ok_or_else(|| bad("has no `function.name`"))?;
        let arguments = match &f.arguments {
            None => "{}".to_string(),
            Some(serde_json::Value::String(text)) => {
                let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                    bad(&format!("has `function.arguments` that are not JSON: {e}"))
                })?;
                v.to_string()
            }
            Some(v) => v.to_string(),
        };
        Ok(ToolCall {
            id: self
                .id
                .clone()
                .unwrap_or_else(framework::tools::random_call_id),
            name,
            arguments,
        })
    }
}

impl ChatRequest {
    /// Checks the request against `limits`, with `speculation` the server's
    /// speculative decoding and `format` the model's tool-call format.
    pub fn validate(
        &self,
        limits: &LimitsSection,
        speculation: &Speculation,
        format: ToolFormat,
    ) -> Result<ValidGeneration, ApiError> {
        let Some(input) = &self.messages else {
            return Err(ApiError::param("messages", "`messages` is required"));
        };
        let tools = match self.common.tools.as_ref().filter(|v| !v.is_null()) {
            Some(v) => Tool::list_from_openai(v).map_err(api_error)?,
            None => Vec::new(),
        };
        let choice = ToolChoice::from_openai(
            self.common.tool_choice.as_ref().filter(|v| !v.is_null()),
            &tools,
        )
        .map_err(api_error)?;
        // With `none` the model is not shown the tools, and nothing is parsed.
        let offered = if matches!(choice, ToolChoice::None) {
            Vec::new()
        } else {
            tools
        };
        let prompt = chat_prompt(input, &offered, self.template.render()?)?;
        let parallel = self.common.parallel_tool_calls.unwrap_or(true);
        let tool_use = (!offered.is_empty()).then(|| {
            let forced = framework::tools::guide(format, &offered, &choice, parallel);
            (
                ToolUse {
                    tools: offered,
                    format,
                },
                forced,
            )
        });
        let (max_tokens, param) = match (self.max_completion_tokens, self.common.max_tokens) {
            (Some(v), _) => (Some(v), "max_completion_tokens"),
            (None, v) => (v, "max_tokens"),
        };
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, Some(_)) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs` set to true",
                ))
            }
            (false, None) => None,
        };
        let mut v = validate(
            &self.common,
            vec![prompt],
            (max_tokens, param),
            (logprobs, "top_logprobs"),
            (limits, speculation),
            tool_use,
        )?;
        v.include_reasoning = self.include_reasoning.unwrap_or(true);
        Ok(v)
    }
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct UsageOut {
    /// Tokens in the prompt(s).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// What the prompt tokens were made of.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

impl UsageOut {
    /// Adds one request's counts (a prompt counts once however many choices
    /// it has: pass 0 for the others' `prompt` and `cached`).
    pub fn add(&mut self, (prompt, cached): (usize, usize), completion: usize) {
        self.prompt_tokens += prompt;
        self.prompt_tokens_details.cached_tokens += cached;
        self.completion_tokens += completion;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

/// Legacy completions log-probabilities of one choice.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for an echoed prompt's first token).
    pub token_logprobs: Vec<Option<f32>>,
    /// The best alternatives per token, text → log-probability (`null` for
    /// an echoed prompt's first token).
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    /// Character offset of each token in the text.
    pub text_offset: Vec<usize>,
}

/// One alternative of a chat log-probability.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// A chat token's log-probability.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The best alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat log-probabilities of one choice.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsSection {
        LimitsSection::default()
    }

    #[test]
    fn type_errors_name_the_field_and_syntax_errors_are_malformed_json() {
        let e = parse_body::<CompletionRequest>(br#"{"prompt":"x","temperature":"hot"}"#)
            .expect_err("type error");
        assert_eq!(e.param_name().as_deref(), Some("temperature"), "{e}");
        let e = parse_body::<CompletionRequest>(br#"{"prompt":"x","#).expect_err("syntax");
        assert!(matches!(e, ApiError::MalformedJson(_)), "{e:?}");
        // Valid JSON nested past serde_json's limit is not called malformed.
        let deep = format!(
            r#"{{"prompt":"x","guided_json":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let e = parse_body::<CompletionRequest>(deep.as_bytes()).expect_err("too deep");
        assert!(e.to_string().contains("more than 128 levels"), "{e}");
    }

    #[test]
    fn dimensions_equal_to_the_models_are_no_truncation() {
        let req = |d: usize| {
            parse_body::<EmbeddingRequest>(
                format!(r#"{{"input":"x","dimensions":{d}}}"#).as_bytes(),
            )
            .expect("parses")
        };
        let v = req(64).validate(64, false).expect("the model's own width");
        assert_eq!(v.dimensions, None);
        let e = req(32).validate(64, false).expect_err("no Matryoshka");
        assert_eq!(e.param_name().as_deref(), Some("dimensions"));
        assert_eq!(
            req(32).validate(64, true).expect("Matryoshka").dimensions,
            Some(32)
        );
    }

    #[test]
    fn limits_and_ranges_name_the_param() {
        let cases = [
            (r#"{"prompt":"x","n":99}"#, "n"),
            (r#"{"prompt":"x","max_tokens":0}"#, "max_tokens"),
            (r#"{"prompt":"x","max_tokens":100000}"#, "max_tokens"),
            (r#"{"prompt":"x","temperature":-1}"#, "temperature"),
            (r#"{"prompt":"x","top_p":0}"#, "top_p"),
            (r#"{"prompt":"x","logprobs":50}"#, "logprobs"),
            (r#"{"prompt":"x","stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"prompt":"x","top_k":-5}"#, "top_k"),
            (r#"{"prompt":[]}"#, "prompt"),
            (r#"{"n":1}"#, "prompt"),
            (r#"{"prompt":"x","beam_width":2,"stream":true}"#, "stream"),
        ];
        for (body, param) in cases {
            let req: CompletionRequest = parse_body(body.as_bytes()).expect(body);
            let e = req
                .validate(&limits(), &Speculation::default())
                .expect_err(body);
            assert_eq!(e.param_name().as_deref(), Some(param), "{body}: {e}");
        }
    }

    #[test]
    fn prompts_times_n_become_requests_with_distinct_seeds() {
        let req: CompletionRequest =
            parse_body(br#"{"prompt":["a","b"],"n":3,"seed":7,"max_tokens":4}"#).expect("parse");
        let v = req
            .validate(&limits(), &Speculation::default())
            .expect("valid");
        assert_eq!(v.requests.len(), 6);
        assert_eq!(v.requests[4].prompt, Prompt::Text("b".into()));
        assert_eq!(v.requests[4].params.seed, Some(8));
        let req: CompletionRequest = parse_body(br#"{"prompt":[1,2,3]}"#).expect("tokens");
        let v = req
            .validate(&limits(), &Speculation::default())
            .expect("valid");
        assert_eq!(v.requests[0].prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!(v.requests[0].params.max_tokens, limits().default_max_tokens);
    }

    #[test]
    fn chat_reads_parts_and_logprob_flags() {
        let req: ChatRequest = parse_body(
            br#"{"messages":[{"role":"developer","content":[{"type":"text","text":"hi"},{"type":"text","text":"there"}]},{"role":"user","content":"x"}],
                "logprobs":true,"top_logprobs":2,"max_completion_tokens":5,"stream":true,
                "stream_options":{"include_usage":true}}"#,
        )
        .expect("parse");
        let v = req
            .validate(&limits(), &Speculation::default(), ToolFormat::Hermes)
            .expect("valid");
        assert_eq!(v.logprobs, Some(2));
        assert!(v.stream && v.include_usage);
        assert_eq!(v.requests[0].params.max_tokens, 5);
        match &v.requests[0].prompt {
            // Text parts one per line, as vLLM joins them.
            Prompt::Chat(m) => assert_eq!(
                (m[0].role.as_str(), m[0].content.as_str()),
                ("system", "hi\nthere")
            ),
            other => panic!("{other:?}"),
        }
        let req: ChatRequest =
            parse_body(br#"{"messages":[{"role":"tool","content":"x"}]}"#).expect("parse");
        assert_eq!(
            req.validate(&limits(), &Speculation::default(), ToolFormat::Hermes)
                .expect_err("role")
                .param_name()
                .as_deref(),
            Some("messages")
        );
    }
}

/// `POST /v1/embeddings`'s `input`: a string, strings, token ids, or lists
/// of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids, or a list of such lists"
)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
    /// One input as token ids.
    Tokens(Vec<u32>),
    /// Several inputs as token ids.
    TokenLists(Vec<Vec<u32>>),
}

/// One input, as given.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedItem {
    /// Text, to tokenize.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    /// The embedding model's id (optional when the server has one).
    pub model: Option<String>,
    /// What to embed.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Keep only the first this many dimensions (renormalized), where the
    /// model allows it.
    pub dimensions: Option<usize>,
    /// The caller's id (accepted and ignored, as OpenAI's clients send it).
    pub user: Option<String>,
}

/// A validated embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEmbedding {
    /// The inputs in order.
    pub items: Vec<EmbedItem>,
    /// Answer in base64.
    pub base64: bool,
    /// Truncate to this many dimensions.
    pub dimensions: Option<usize>,
}

impl EmbeddingRequest {
    /// Checks the request against the model: `width` dimensions, which may
    /// be truncated only if `matryoshka`; errors name the field.
    pub fn validate(self, width: usize, matryoshka: bool) -> Result<ValidEmbedding, ApiError> {
        let items: Vec<EmbedItem> = match self.input {
            EmbeddingInput::One(s) => vec![EmbedItem::Text(s)],
            EmbeddingInput::Many(v) => v.into_iter().map(EmbedItem::Text).collect(),
            EmbeddingInput::Tokens(t) => vec![EmbedItem::Tokens(t)],
            EmbeddingInput::TokenLists(v) => v.into_iter().map(EmbedItem::Tokens).collect(),
        };
        if items.is_empty() {
            return Err(ApiError::param(
                "input",
                "`input` is empty: give a string, a list of strings, or token ids",
            ));
        }
        for (i, item) in items.iter().enumerate() {
            let empty = match item {
                EmbedItem::Text(s) => s.is_empty(),
                EmbedItem::Tokens(t) => t.is_empty(),
            };
            if empty {
                return Err(ApiError::param(
                    "input",
                    format!("`input` item {i} is empty"),
                ));
            }
        }
        let base64 = match self.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::param(
                    "encoding_format",
                    format!("`encoding_format` is '{other}'; it must be float or base64"),
                ))
            }
        };
        if let Some(d) = self.dimensions {
            // The model's own width is no truncation: any model gives it.
            if !matryoshka && d != width {
                return Err(ApiError::param(
                    "dimensions",
                    format!("`dimensions`: this model's {width} dimensions cannot be truncated (it is not configured as a Matryoshka model: [[models]] matryoshka = true)"),
                ));
            }
            if d == 0 || d > width {
                return Err(ApiError::param(
                    "dimensions",
                    format!("`dimensions` is {d}; this model gives 1 to {width}"),
                ));
            }
        }
        Ok(ValidEmbedding {
            items,
            base64,
            dimensions: self.dimensions.filter(|&d| d != width),
        })
    }
}
