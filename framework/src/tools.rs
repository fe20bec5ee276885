//! OpenAI tool calling, the model side: the tools of a request, the
//! `tool_choice`, the text formats models write calls in, and the three
//! things done with them — parsing a finished output ([`parse`]), parsing a
//! streamed one ([`ToolStream`]), and forcing a call ([`guide`], a Lark
//! grammar for [`crate::guide`]). For chat templates that do not know tools,
//! [`system_prompt`] and [`fold_into_messages`] put the tools and earlier
//! calls into plain messages.
//!
//! The formats ([`ToolFormat`]):
//! - **Hermes** (Qwen, Hermes, the default): one block per call,
//!   `<tool_call>\n{"name": "f", "arguments": {…}}\n</tool_call>`; text may
//!   stand around the blocks.
//! - **Llama 3 JSON**: the whole output is `{"name": "f", "parameters": {…}}`
//!   (`"arguments"` also read), maybe after `<|python_tag|>`; several calls
//!   separated by `;`.
//! - **Mistral**: `[TOOL_CALLS]` then a JSON list `[{"name": "f",
//!   "arguments": {…}}, …]`, or (newer templates) `[TOOL_CALLS]f[ARGS]{…}`
//!   per call; text before the first marker is content.
//!
//! **What is true of it:**
//! - Parsing never fails: a call whose JSON does not parse, that names no
//!   defined tool, or whose arguments are not an object makes the whole
//!   output plain content with no calls (the `auto` rule: a call that does
//!   not parse is returned as text). Found calls' arguments are compact JSON
//!   (`serde_json::to_string` of the parsed object).
//! - [`Parsed::content`] is the text outside the call syntax, verbatim
//!   (whitespace between Hermes blocks included; callers show
//!   whitespace-only content as none); with no calls it is the whole text.
//! - An output the length limit cut is read by [`parse_cut`] (and a stream
//!   ended by [`ToolStream::finish_cut`]): a last call cut in its arguments
//!   is a call whose arguments are the text so far, not content.
//! - A stream agrees with [`parse`] of the whole text, in all three formats:
//!   the [`StreamOut::Content`] pieces concatenate to [`Parsed::content`],
//!   and the calls (each [`StreamOut::CallStart`]'s name and its
//!   [`StreamOut::Arguments`] fragments concatenated) are
//!   [`Parsed::calls`]. To keep that exact, a stream releases text as content
//!   as soon as it cannot begin a call marker, and holds everything from the
//!   first marker (Hermes `<tool_call>`, Mistral `[TOOL_CALLS]`; for Llama 3
//!   JSON, an output whose first non-space text is `{` or `<|python_tag|>`)
//!   to the end: a later block that fails to parse turns the whole output
//!   into content, and content already sent cannot be withdrawn. Calls
//!   therefore arrive when the output ends, which is when an OpenAI client
//!   can act on them anyway.
//! - A [`guide`] grammar admits only outputs that [`parse`] reads as calls:
//!   calls of the chosen functions, each one's arguments valid under its
//!   `parameters` schema, written as the models' templates write them
//!   (`", "` and `": "` separators, as Python's `json.dumps`), and nothing
//!   around them.
//! - Errors (a bad `tools` or `tool_choice`) are [`Error::InvalidRequest`]
//!   naming that field and what is wrong; nothing here panics on a request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::chat::{python_json, ChatMessage, ChatTurn};
use crate::error::{Error, Result};
use crate::guide::Guide;

/// Hermes' call opener.
const TOOL_CALL_OPEN: &str = "<tool_call>";
/// Hermes' call closer.
const TOOL_CALL_CLOSE: &str = "</tool_call>";
/// Llama 3's marker before a built-in or JSON tool call.
const PYTHON_TAG: &str = "<|python_tag|>";
/// Mistral's call marker.
const TOOL_CALLS: &str = "[TOOL_CALLS]";
/// Mistral's (newer templates') marker between a name and its arguments.
const ARGS: &str = "[ARGS]";
/// Mistral's (newer templates') marker before a call id.
const CALL_ID: &str = "[CALL_ID]";

/// One function a request offers the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// What the function does, for the model.
    pub description: Option<String>,
    /// A JSON schema of the arguments object (default
    /// `{"type": "object", "properties": {}}`; under `strict`, every object
    /// closed to properties it does not name): what guided decoding holds
    /// the arguments to.
    pub parameters: Value,
    /// The tool as the request gave it, which the model is shown.
    pub given: Value,
}

impl Tool {
    /// Validates one entry of OpenAI's `tools`: `{"type": "function",
    /// "function": {"name", "description"?, "parameters"?}}`.
    pub fn from_openai(value: &Value) -> Result<Tool> {
        Self::checked(value, "tool")
    }

    /// Validates OpenAI's whole `tools` list (an array; names must be
    /// distinct). An empty list is no tools.
    pub fn list_from_openai(value: &Value) -> Result<Vec<Tool>> {
        let items = value
            .as_array()
            .ok_or_else(|| bad_tools("must be an array of function tools".into()))?;
        let mut seen = HashSet::new();
        let mut tools = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let tool = Self::checked(item, &format!("tools[{i}]"))?;
            if !seen.insert(tool.name.clone()) {
                return Err(bad_tools(format!(
                    "names the function '{}' more than once (tools[{i}])",
                    tool.name
                )));
            }
            tools.push(tool);
        }
        Ok(tools)
    }

    fn checked(value: &Value, at: &str) -> Result<Tool> {
        let obj = value.as_object().ok_or_else(|| {
            bad_tools(format!(
                "`{at}` must be an object {{\"type\": \"function\", \"function\": {{…}}}}"
            ))
        })?;
        match obj.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(bad_tools(format!(
                    "`{at}.type` is '{other}'; only \"function\" tools are supported"
                )))
            }
            None => return Err(bad_tools(format!("`{at}.type` must be \"function\""))),
        }
        let function = obj
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| bad_tools(format!("`{at}.function` must be an object")))?;
        let name = match function.get("name") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(bad_tools(format!("`{at}.function.name` must be a string"))),
            None => return Err(bad_tools(format!("`{at}.function.name` is missing"))),
        };
        if !valid_name(&name) {
            return Err(bad_tools(format!(
                "`{at}.function.name` is '{name}'; a name is 1 to 64 of A-Z, a-z, 0-9, _ and -"
            )));
        }
        let description = match function.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(bad_tools(format!(
                    "`{at}.function.description` must be a string"
                )))
            }
        };
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(map)) => {
                match map.get("type") {
                    None => {}
                    Some(Value::String(t)) if t == "object" => {}
                    Some(other) => {
                        return Err(bad_tools(format!(
                            "`{at}.function.parameters` must be the JSON schema of an object, not of type {other}"
                        )))
                    }
                }
                p.clone()
            }
            Some(_) => {
                return Err(bad_tools(format!(
                    "`{at}.function.parameters` must be a JSON schema object"
                )))
            }
        };
        // OpenAI's strict functions allow no argument beyond those named.
        let parameters = match function.get("strict") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => parameters,
            Some(Value::Bool(true)) => crate::guide::closed_objects(parameters),
            Some(_) => {
                return Err(bad_tools(format!(
                    "`{at}.function.strict` must be true or false"
                )))
            }
        };
        Ok(Tool {
            name,
            description,
            parameters,
            given: value.clone(),
        })
    }

    /// OpenAI's form, as the request gave it (`{"type": "function",
    /// "function": {"name", "description", "parameters", …}}`, its keys in
    /// their order): what chat templates and the folded system prompt show
    /// the model, as transformers passes a request's tools to a template.
    pub fn to_openai(&self) -> Value {
        self.given.clone()
    }
}

fn bad_tools(reason: String) -> Error {
    Error::InvalidRequest {
        field: "tools",
        reason,
    }
}

/// Whether `name` is a function name OpenAI accepts: `[A-Za-z0-9_-]{1,64}`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model may answer or call tools.
    Auto,
    /// The model answers in text; its output is not parsed for calls.
    None,
    /// The model must call one or more tools.
    Required,
    /// The model must call this function.
    Named(String),
}

impl ToolChoice {
    /// Validates `tool_choice` (absent: `auto` when `tools` are given,
    /// `none` otherwise): `"auto"`, `"none"`, `"required"` or
    /// `{"type": "function", "function": {"name": …}}` naming one of `tools`.
    pub fn from_openai(value: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice> {
        let bad = |reason: String| Error::InvalidRequest {
            field: "tool_choice",
            reason,
        };
        let auto = if tools.is_empty() {
            ToolChoice::None
        } else {
            ToolChoice::Auto
        };
        let shapes = "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": …}}";
        match value {
            None | Some(Value::Null) => Ok(auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Ok(auto),
                "none" => Ok(ToolChoice::None),
                "required" if tools.is_empty() => Err(bad(
                    "is \"required\" but the request gives no `tools`".into(),
                )),
                "required" => Ok(ToolChoice::Required),
                other => Err(bad(format!("is '{other}'; {shapes}"))),
            },
            Some(Value::Object(obj)) => {
                if obj.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad(format!(
                        "is an object without \"type\": \"function\"; {shapes}"
                    )));
                }
                let name = obj
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("names no function; {shapes}")))?;
                if !tools.iter().any(|t| t.name == name) {
                    let known: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
                    return Err(bad(format!(
                        "names the function '{name}', which is not among `tools` ({})",
                        if known.is_empty() {
                            "none are given".to_string()
                        } else {
                            known.join(", ")
                        }
                    )));
                }
                Ok(ToolChoice::Named(name.to_string()))
            }
            Some(other) => Err(bad(format!("is {other}; {shapes}"))),
        }
    }
}

/// One call the model made (or an earlier assistant message holds).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// OpenAI's call id (`call_` and 24 letters and digits for calls made here).
    pub id: String,
    /// The function.
    pub name: String,
    /// The arguments: the JSON text of an object (compact for calls made
    /// here; a client's may be anything).
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's form: `{"id", "type": "function", "function": {"name",
    /// "arguments"}}`, `arguments` a string.
    pub fn to_openai(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// A call id like OpenAI's: `call_` and 24 letters and digits drawn from
/// `next` (each value gives ten of them).
pub fn call_id(next: &mut impl FnMut() -> u64) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(29);
    id.push_str("call_");
    let mut bits = 0u64;
    for i in 0..24 {
        if i % 10 == 0 {
            bits = next();
        }
        id.push(ALPHABET[(bits % 62) as usize] as char);
        bits /= 62;
    }
    id
}

/// A call id from the standard library's randomly keyed hasher (a process
/// counter and the clock hashed): unpredictable enough for an id, and needs
/// no random-number crate.
pub fn random_call_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = std::collections::hash_map::RandomState::new();
    let mut next = || {
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.write_u128(now);
        h.finish()
    };
    call_id(&mut next)
}

/// The text syntax a model writes tool calls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` per call
    /// (Qwen, Hermes; the default).
    Hermes,
    /// The output is `{"name": …, "parameters": …}` (Llama 3.1/3.2); calls
    /// separated by `;`.
    Llama3Json,
    /// `[TOOL_CALLS][{"name": …, "arguments": …}, …]` or
    /// `[TOOL_CALLS]name[ARGS]{…}` (Mistral).
    Mistral,
}

impl ToolFormat {
    /// The format a chat template writes calls in: `[TOOL_CALLS]` in it is
    /// Mistral; `<|python_tag|>`, `ipython`, or `"parameters"` with
    /// `<|eot_id|>` is Llama 3 JSON; anything else (no template, or one
    /// without tools) is Hermes.
    pub fn detect(template_source: Option<&str>) -> ToolFormat {
        let Some(src) = template_source else {
            return ToolFormat::Hermes;
        };
        if src.contains(TOOL_CALLS) {
            ToolFormat::Mistral
        } else if src.contains(PYTHON_TAG)
            || src.contains("ipython")
            || (src.contains("\"parameters\"") && src.contains("<|eot_id|>"))
        {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }

    /// A format named in configuration: `hermes`, `llama3_json` or
    /// `mistral`.
    pub fn from_name(name: &str) -> Result<ToolFormat> {
        match name {
            "hermes" => Ok(ToolFormat::Hermes),
            "llama3_json" => Ok(ToolFormat::Llama3Json),
            "mistral" => Ok(ToolFormat::Mistral),
            other => Err(Error::Setting {
                field: "tool_format",
                reason: format!("is '{other}'; must be hermes, llama3_json or mistral"),
            }),
        }
    }

    /// The configuration name ([`ToolFormat::from_name`]'s inverse).
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3Json => "llama3_json",
            ToolFormat::Mistral => "mistral",
        }
    }

    /// The key the format writes arguments under.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3Json => "parameters",
            ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
        }
    }
}

/// A model output split into text and tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The text outside the call syntax (the whole output when there are
    /// no calls).
    pub content: String,
    /// Each call's function name and arguments (compact JSON of an object).
    pub calls: Vec<(String, String)>,
}

impl Parsed {
    fn plain(text: &str) -> Parsed {
        Parsed {
            content: text.to_string(),
            calls: Vec::new(),
        }
    }

    /// The calls with fresh ids drawn from `next` ([`call_id`]).
    pub fn tool_calls(&self, next: &mut impl FnMut() -> u64) -> Vec<ToolCall> {
        self.calls
            .iter()
            .map(|(name, arguments)| ToolCall {
                id: call_id(next),
                name: name.clone(),
                arguments: arguments.clone(),
            })
            .collect()
    }
}

/// Splits the model output `text` into content and calls of `tools` in
/// `format`; never fails (see the module doc for the rule).
pub fn parse(format: ToolFormat, text: &str, tools: &[Tool]) -> Parsed {
    let found = match format {
        ToolFormat::Hermes => parse_hermes(text, tools),
        ToolFormat::Llama3Json => parse_llama3(text, tools),
        ToolFormat::Mistral => parse_mistral(text, tools),
    };
    match found {
        Some(p) if !p.calls.is_empty() => p,
        _ => Parsed::plain(text),
    }
}

/// Like [`parse`], for an output the length limit cut short: a last call
/// it cut in its arguments is a call too, whose arguments are the text it
/// got to (not valid JSON; as OpenAI returns such a call, with
/// `finish_reason: length` saying why), instead of content holding its
/// markup; one cut between its function's name and its arguments is a call
/// with empty arguments. A Hermes block cut before its function's name (or
/// whose name does not come first) is dropped: it is no content, and no
/// call yet. Hermes and Llama 3 JSON; a Mistral output is parsed as whole.
pub fn parse_cut(format: ToolFormat, text: &str, tools: &[Tool]) -> Parsed {
    let mut parsed = parse(format, text, tools);
    match format {
        ToolFormat::Hermes => {
            // What follows the last marker is the unclosed block (a closed
            // one would have been parsed, or made the whole text content).
            if let Some(at) = parsed.content.rfind(TOOL_CALL_OPEN) {
                let body = &parsed.content[at + TOOL_CALL_OPEN.len()..];
                if !body.contains(TOOL_CALL_CLOSE) {
                    let call = partial_call(body, tools);
                    parsed.content.truncate(at);
                    parsed.calls.extend(call);
                }
            }
        }
        // An output that began a call holds nothing else: the whole calls
        // (separated by `;`), then the one cut.
        ToolFormat::Llama3Json if parsed.calls.is_empty() => {
            let rest = parsed.content.trim_start();
            let mut body = rest.strip_prefix(PYTHON_TAG).unwrap_or(rest);
            let mut calls = Vec::new();
            while let Some((call, used)) =
                json_prefix(body).and_then(|(v, used)| Some((call_from_json(&v, tools)?, used)))
            {
                calls.push(call);
                let after = body[used..].trim_start();
                body = after.strip_prefix(';').unwrap_or(after);
            }
            let cut = match body.trim().is_empty() {
                true => None,
                false => partial_call(body, tools),
            };
            if !calls.is_empty() || cut.is_some() {
                parsed.content.clear();
                parsed.calls.extend(calls.into_iter().chain(cut));
            }
        }
        _ => {}
    }
    parsed
}

/// The function name and the arguments text so far of a call cut short:
/// `{"name": "f", "arguments": …` (or `"parameters"`), `f` one of `tools`;
/// the arguments are empty when the cut came before them. `None` unless the
/// name comes first and whole. A call whose JSON is whole (the cut came in
/// the markup after it, `\n</tool_ca`) is whole, its arguments compact JSON
/// as [`parse`] gives them.
fn partial_call(body: &str, tools: &[Tool]) -> Option<(String, String)> {
    if let Some(call) = json_prefix(body).and_then(|(v, _)| call_from_json(&v, tools)) {
        return Some(call);
    }
    let after = |s: &str, token: &str| s.trim_start().strip_prefix(token).map(str::to_string);
    let rest = after(body, "{")?;
    let rest = after(&rest, "\"name\"")?;
    let rest = after(&rest, ":")?;
    let rest = after(&rest, "\"")?;
    let end = rest.find('"')?;
    let name = &rest[..end];
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = after(&rest[end + 1..], ",")
        .and_then(|r| after(&r, "\"arguments\"").or_else(|| after(&r, "\"parameters\"")))
        .and_then(|r| after(&r, ":"))
        .map(|a| a.trim_start().to_string())
        .unwrap_or_default();
    Some((name.to_string(), arguments))
}

fn parse_hermes(text: &str, tools: &[Tool]) -> Option<Parsed> {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(TOOL_CALL_OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + TOOL_CALL_OPEN.len()..];
        // A last block may lack its closer (the output stopped there).
        let (body, next, closed) = match after.find(TOOL_CALL_CLOSE) {
            Some(end) => (&after[..end], &after[end + TOOL_CALL_CLOSE.len()..], true),
            None => (after, "", false),
        };
        let call = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| call_from_json(&v, tools));
        match call {
            Some(call) => calls.push(call),
            // An unclosed last block cut short (the length limit) stays
            // text; the calls before it stand.
            None if !closed => {
                content.push_str(&rest[start..]);
                rest = "";
                break;
            }
            None => return None,
        }
        rest = next;
    }
    content.push_str(rest);
    Some(Parsed { content, calls })
}

fn parse_llama3(text: &str, tools: &[Tool]) -> Option<Parsed> {
    let start = text.trim_start();
    let mut rest = match start.strip_prefix(PYTHON_TAG) {
        Some(r) => r,
        None if start.starts_with('{') => start,
        None => return None,
    };
    let mut calls = Vec::new();
    loop {
        let (value, used) = json_prefix(rest)?;
        calls.push(call_from_json(&value, tools)?);
        rest = rest[used..].trim_start();
        match rest.strip_prefix(';') {
            Some(r) if r.trim().is_empty() => break,
            Some(r) => rest = r,
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    Some(Parsed {
        content: String::new(),
        calls,
    })
}

fn parse_mistral(text: &str, tools: &[Tool]) -> Option<Parsed> {
    let start = text.find(TOOL_CALLS)?;
    let mut content = text[..start].to_string();
    let mut rest = &text[start + TOOL_CALLS.len()..];
    let mut calls = Vec::new();
    loop {
        let t = rest.trim_start();
        if t.starts_with('[') {
            let (value, used) = json_prefix(t)?;
            let items = value.as_array().filter(|a| !a.is_empty())?;
            for item in items {
                calls.push(call_from_json(item, tools)?);
            }
            rest = &t[used..];
        } else {
            let at = t.find(ARGS)?;
            let name = t[..at].split(CALL_ID).next().unwrap_or_default().trim();
            let (arguments, used) = json_prefix(&t[at + ARGS.len()..])?;
            calls.push(call_from_json(
                &json!({"name": name, "arguments": arguments}),
                tools,
            )?);
            rest = &t[at + ARGS.len() + used..];
        }
        match rest.trim_start().strip_prefix(TOOL_CALLS) {
            Some(r) => rest = r,
            None => {
                content.push_str(rest);
                break;
            }
        }
    }
    Some(Parsed { content, calls })
}

/// The JSON value at the start of `s` (after whitespace) and the bytes it
/// takes.
fn json_prefix(s: &str) -> Option<(Value, usize)> {
    let mut values = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, values.byte_offset()))
}

/// `{"name": …, "arguments" | "parameters": {…}}` as a call of one of
/// `tools` (arguments given as a JSON string are read too; absent ones are
/// `{}`).
fn call_from_json(value: &Value, tools: &[Tool]) -> Option<(String, String)> {
    let obj = value.as_object()?;
    let name = obj.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
    };
    if !arguments.is_object() {
        return None;
    }
    Some((name.to_string(), serde_json::to_string(&arguments).ok()?))
}

/// A Lark string literal (Lark's literals are JSON strings).
fn lark_literal(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// `tool`'s arguments schema as the guide embeds it: an object, written
/// with `", "` and `": "` and no other whitespace (llguidance's
/// `x-guidance` options), unless the schema sets its own.
fn embedded_schema(tool: &Tool) -> Value {
    let mut schema = tool.parameters.clone();
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("type").or_insert_with(|| json!("object"));
        obj.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// The grammar that forces calls for `choice`: for `Required` a call of
/// any of `tools` (with `parallel`, one or more calls), for `Named` one
/// call of that function, each call's arguments valid under its function's
/// schema. After the last call the model may end, or (Hermes) write the
/// line break its template puts after a call and then end. `None` for `Auto` and `None` (no guide), and where no tool is
/// chosen. The grammar is a [`Guide::ToolCalls`] (its errors name `tools`;
/// a parameters schema llguidance refuses is one).
pub fn guide(
    format: ToolFormat,
    tools: &[Tool],
    choice: &ToolChoice,
    parallel: bool,
) -> Option<Guide> {
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::Auto | ToolChoice::None => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
    };
    if chosen.is_empty() {
        return None;
    }
    // A named function is called once, as OpenAI's API does.
    let parallel = parallel && !matches!(choice, ToolChoice::Named(_));
    let mut lines: Vec<String> = Vec::new();
    lines.push(match (format, parallel) {
        (ToolFormat::Hermes, false) => format!("start: tool_call {}?", lark_literal("\n")),
        (ToolFormat::Hermes, true) => format!(
            "start: tool_call ({nl} tool_call)* {nl}?",
            nl = lark_literal("\n")
        ),
        (ToolFormat::Llama3Json, false) => "start: function".into(),
        (ToolFormat::Llama3Json, true) => {
            format!("start: function ({} function)*", lark_literal("; "))
        }
        (ToolFormat::Mistral, false) => format!(
            "start: {} {}? {} function {}",
            lark_literal(TOOL_CALLS),
            lark_literal(" "),
            lark_literal("["),
            lark_literal("]")
        ),
        (ToolFormat::Mistral, true) => format!(
            "start: {} {}? {} function ({} function)* {}",
            lark_literal(TOOL_CALLS),
            lark_literal(" "),
            lark_literal("["),
            lark_literal(", "),
            lark_literal("]")
        ),
    });
    if format == ToolFormat::Hermes {
        lines.push(format!(
            "tool_call: {} function {}",
            lark_literal(&format!("{TOOL_CALL_OPEN}\n")),
            lark_literal(&format!("\n{TOOL_CALL_CLOSE}"))
        ));
    }
    let alternatives: Vec<String> = (0..chosen.len()).map(|i| format!("function_{i}")).collect();
    lines.push(format!("function: {}", alternatives.join(" | ")));
    for (i, tool) in chosen.iter().enumerate() {
        let head = format!(
            "{{\"name\": {}, \"{}\": ",
            serde_json::to_string(&tool.name).unwrap_or_default(),
            format.arguments_key()
        );
        lines.push(format!(
            "function_{i}: {} arguments_{i} {}",
            lark_literal(&head),
            lark_literal("}")
        ));
        lines.push(format!(
            "arguments_{i}: %json {}",
            serde_json::to_string(&embedded_schema(tool)).unwrap_or_default()
        ));
    }
    Some(Guide::ToolCalls(lines.join("\n")))
}

/// One call as `format` writes it (arguments laid out as the templates'
/// `tojson` does; left as given where they are not JSON).
fn call_text(format: ToolFormat, call: &ToolCall) -> String {
    let arguments = serde_json::from_str::<Value>(&call.arguments)
        .map(|v| python_json(&v, None, None))
        .unwrap_or_else(|_| call.arguments.clone());
    format!(
        "{{\"name\": {}, \"{}\": {arguments}}}",
        serde_json::to_string(&call.name).unwrap_or_default(),
        format.arguments_key()
    )
}

/// The calls of one assistant message as `format` writes them.
fn calls_text(format: ToolFormat, calls: &[ToolCall]) -> String {
    let each = calls.iter().map(|c| call_text(format, c));
    match format {
        ToolFormat::Hermes => each
            .map(|c| format!("{TOOL_CALL_OPEN}\n{c}\n{TOOL_CALL_CLOSE}"))
            .collect::<Vec<_>>()
            .join("\n"),
        ToolFormat::Llama3Json => each.collect::<Vec<_>>().join("; "),
        ToolFormat::Mistral => format!("{TOOL_CALLS}[{}]", each.collect::<Vec<_>>().join(", ")),
    }
}

/// A system text for templates without tool support: the tools as JSON,
/// one OpenAI function object a line, and how to call them in `format`.
pub fn system_prompt(tools: &[Tool], format: ToolFormat) -> String {
    let list: Vec<String> = tools
        .iter()
        .map(|t| python_json(&t.to_openai(), None, None))
        .collect();
    let list = list.join("\n");
    match format {
        ToolFormat::Hermes => format!(
            "# Tools\n\nYou can call functions to help with the request. \
             The functions you may call are listed between <tools> and </tools>, one JSON object a line:\n\
             <tools>\n{list}\n</tools>\n\n\
             To call a function, write a JSON object with its name and its arguments between \
             <tool_call> and </tool_call> tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>\n\
             To call several functions, write one such block for each call."
        ),
        ToolFormat::Llama3Json => format!(
            "# Tools\n\nYou can call functions to help with the request. \
             The functions you may call are listed below, one JSON object a line:\n\
             {list}\n\n\
             To call a function, answer with nothing but a JSON object of the form \
             {{\"name\": <function-name>, \"parameters\": <args-json-object>}}. \
             To call several functions, separate their objects with \"; \"."
        ),
        ToolFormat::Mistral => format!(
            "# Tools\n\nYou can call functions to help with the request. \
             The functions you may call are listed below, one JSON object a line:\n\
             {list}\n\n\
             To call functions, answer with {TOOL_CALLS} followed by a JSON list of the calls: \
             {TOOL_CALLS}[{{\"name\": <function-name>, \"arguments\": <args-json-object>}}, …]"
        ),
    }
}

/// `messages` as plain messages for a template without tool support:
/// [`system_prompt`] of `tools` (when there are any) appended to the first
/// message if it is a system one, else in a new system message before it;
/// an assistant message's calls appended to its text in `format`'s syntax;
/// a `tool` message (role kept, as ChatML templates render any role) with
/// its text wrapped as `format` gives results back (Hermes
/// `<tool_response>\n…\n</tool_response>`, Mistral
/// `[TOOL_RESULTS]…[/TOOL_RESULTS]`, Llama 3 JSON as it is).
pub fn fold_into_messages(
    messages: &[ChatTurn],
    tools: &[Tool],
    format: ToolFormat,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| {
            let content = if !m.tool_calls.is_empty() {
                let calls = calls_text(format, &m.tool_calls);
                match (format, m.content.is_empty()) {
                    (_, true) => calls,
                    (ToolFormat::Mistral, false) => format!("{}{calls}", m.content),
                    (_, false) => format!("{}\n{calls}", m.content),
                }
            } else if m.role == "tool" {
                match format {
                    ToolFormat::Hermes => {
                        format!("<tool_response>\n{}\n</tool_response>", m.content)
                    }
                    ToolFormat::Llama3Json => m.content.clone(),
                    ToolFormat::Mistral => format!("[TOOL_RESULTS]{}[/TOOL_RESULTS]", m.content),
                }
            } else {
                m.content.clone()
            };
            ChatMessage::new(m.role.clone(), content)
        })
        .collect();
    if !tools.is_empty() {
        let prompt = system_prompt(tools, format);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                if first.content.is_empty() {
                    first.content = prompt;
                } else {
                    first.content = format!("{}\n\n{prompt}", first.content);
                }
            }
            _ => out.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    out
}

/// A call id as Mistral's templates take it, nine letters and digits (they
/// refuse any other): the id itself where it is one; else the last nine
/// letters and digits of it (OpenAI's `call_…` ids have 24); else, for an
/// id with fewer, nine drawn from its hash. The same id always gives the
/// same, so a call and its result still pair (two ids that end in the
/// same nine would pair wrongly; vLLM truncates the same way, and the
/// server's own ids end in 24 random ones).
pub fn mistral_call_id(id: &str) -> String {
    let alnum: Vec<char> = id.chars().filter(char::is_ascii_alphanumeric).collect();
    if alnum.len() >= 9 {
        return alnum[alnum.len() - 9..].iter().collect();
    }
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut next = || {
        let value = h;
        h = h.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
        value
    };
    call_id(&mut next)["call_".len().."call_".len() + 9].to_string()
}

/// `messages` with every call id (an assistant's calls, a tool result's
/// `tool_call_id`) made a Mistral one ([`mistral_call_id`]).
pub fn with_mistral_ids(messages: &[ChatTurn]) -> Vec<ChatTurn> {
    messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            for c in &mut m.tool_calls {
                c.id = mistral_call_id(&c.id);
            }
            if let Some(id) = &mut m.tool_call_id {
                *id = mistral_call_id(id);
            }
            m
        })
        .collect()
}

/// `messages` with a leading system message moved into the first user
/// message (its text, a blank line, then the user's), for a template that
/// takes no system role (Gemma's); `None` when there is no such pair.
pub fn system_into_first_user(mut messages: Vec<ChatMessage>) -> Option<Vec<ChatMessage>> {
    if messages.first()?.role != "system" {
        return None;
    }
    let system = messages.remove(0);
    let user = messages.iter_mut().find(|m| m.role == "user")?;
    user.content = format!("{}\n\n{}", system.content, user.content);
    Some(messages)
}

/// What a [`ToolStream`] gives out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOut {
    /// Text for the message's content.
    Content(String),
    /// Call `index` (from 0, in order) of function `name` begins.
    CallStart {
        /// The call's position among the output's calls.
        index: usize,
        /// The function.
        name: String,
    },
    /// More of call `index`'s arguments text.
    Arguments {
        /// The call's position among the output's calls.
        index: usize,
        /// The next piece of the arguments' compact JSON.
        fragment: String,
    },
}

/// Where a [`ToolStream`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Releasing text that cannot begin a call marker, holding what may.
    Scanning,
    /// No call can follow (a Llama 3 JSON output that began otherwise):
    /// everything is content.
    Passthrough,
    /// A call marker was seen: everything is held until [`ToolStream::finish`].
    Holding,
}

/// The incremental form of [`parse`] for streamed output: text goes in as
/// it is decoded, content and calls come out (the module doc says what
/// holds of them). For `tool_choice: none` there is nothing to parse: pass
/// the text through without a stream, as a held Llama 3 JSON answer would
/// only arrive at the end.
#[derive(Debug, Clone)]
pub struct ToolStream {
    format: ToolFormat,
    tools: Vec<Tool>,
    /// The whole output so far.
    text: String,
    /// How many bytes of `text` went out as content.
    released: usize,
    state: StreamState,
}

impl ToolStream {
    /// A stream parsing calls of `tools` in `format`.
    pub fn new(format: ToolFormat, tools: &[Tool]) -> Self {
        Self {
            format,
            tools: tools.to_vec(),
            text: String::new(),
            released: 0,
            state: StreamState::Scanning,
        }
    }

    /// Takes the next piece of output; gives the content that can no longer
    /// be part of a call.
    pub fn push(&mut self, piece: &str) -> Vec<StreamOut> {
        self.text.push_str(piece);
        match self.state {
            StreamState::Holding => Vec::new(),
            StreamState::Passthrough => self.release(self.text.len()),
            StreamState::Scanning => match self.format {
                ToolFormat::Hermes => self.scan_for(TOOL_CALL_OPEN),
                ToolFormat::Mistral => self.scan_for(TOOL_CALLS),
                ToolFormat::Llama3Json => self.scan_llama3(),
            },
        }
    }

    /// Ends the output: gives the held content and the calls.
    pub fn finish(self) -> Vec<StreamOut> {
        self.end(false)
    }

    /// Ends an output the length limit cut: as [`ToolStream::finish`], with
    /// a call cut short given as [`parse_cut`] gives it.
    pub fn finish_cut(self) -> Vec<StreamOut> {
        self.end(true)
    }

    fn end(mut self, cut: bool) -> Vec<StreamOut> {
        if self.state != StreamState::Holding && !cut {
            return self.release(self.text.len());
        }
        let parsed = match cut {
            true => parse_cut(self.format, &self.text, &self.tools),
            false => parse(self.format, &self.text, &self.tools),
        };
        let sent = &self.text[..self.released];
        let rest = match parsed.content.strip_prefix(sent) {
            // A cut output's content may have lost a dropped block.
            Some(rest) if !parsed.calls.is_empty() || cut => rest,
            // No calls (or, never expected, content that does not begin
            // with what was sent): the rest of the text is content.
            _ => return self.release(self.text.len()),
        };
        let mut out = Vec::new();
        // Whitespace alone around the calls is no content (a whole answer
        // has none then either).
        let only_whitespace =
            !parsed.calls.is_empty() && self.released == 0 && rest.trim().is_empty();
        if !rest.is_empty() && !only_whitespace {
            out.push(StreamOut::Content(rest.to_string()));
        }
        for (index, (name, arguments)) in parsed.calls.into_iter().enumerate() {
            out.push(StreamOut::CallStart { index, name });
            out.push(StreamOut::Arguments {
                index,
                fragment: arguments,
            });
        }
        out
    }

    /// Releases `text[released..end]` as content.
    fn release(&mut self, end: usize) -> Vec<StreamOut> {
        let piece = &self.text[self.released..end];
        self.released = end;
        if piece.is_empty() {
            Vec::new()
        } else {
            vec![StreamOut::Content(piece.to_string())]
        }
    }

    /// Hermes and Mistral: releases text up to `marker` (then holds) or up
    /// to a tail that may begin it. Trailing whitespace is held too, and
    /// whitespace alone before the first call never goes out: a call's
    /// output begins with no content, streamed or not.
    fn scan_for(&mut self, marker: &str) -> Vec<StreamOut> {
        let pending = &self.text[self.released..];
        if let Some(at) = pending.find(marker) {
            self.state = StreamState::Holding;
            if self.released == 0 && pending[..at].trim().is_empty() {
                return Vec::new();
            }
            let end = self.released + at;
            return self.release(end);
        }
        let keep_from = pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| marker.starts_with(&pending[i..]))
            .unwrap_or(pending.len());
        let end = self.released + pending[..keep_from].trim_end().len();
        self.release(end)
    }

    /// Llama 3 JSON: holds leading whitespace; then holds everything if the
    /// output begins a call, else lets everything through.
    fn scan_llama3(&mut self) -> Vec<StreamOut> {
        let start = self.text.trim_start();
        if start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG) {
            Vec::new()
        } else if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
            self.state = StreamState::Holding;
            Vec::new()
        } else {
            self.state = StreamState::Passthrough;
            self.release(self.text.len())
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chat::ChatTemplate;

    fn tools() -> Vec<Tool> {
        Tool::list_from_openai(&json!([
            {"type": "function", "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": {"type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                    "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}
        ]))
        .unwrap()
    }

    fn call(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    #[test]
    fn tools_are_validated() {
        let t = tools();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].parameters, json!({"type": "object", "properties": {}}));
        assert_eq!(t[0].description.as_deref(), Some("The weather in a city."));
        let err = |v: Value| match Tool::list_from_openai(&v) {
            Err(Error::InvalidRequest {
                field: "tools",
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(err(json!([{"type": "function", "function": {}}])).contains("name` is missing"));
        assert!(err(json!([{"type": "function", "function": {"name": "a b"}}])).contains("'a b'"));
        assert!(
            err(json!([{"type": "function", "function": {"name": "x".repeat(65)}}]))
                .contains("1 to 64")
        );
        assert!(
            err(json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]))
                .contains("parameters")
        );
        assert!(err(json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "string"}}}]))
        .contains("schema of an object"));
        assert!(err(json!([{"type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f"}}]))
        .contains("more than once"));
        assert!(err(json!([{"type": "code_interpreter"}])).contains("code_interpreter"));
        assert!(err(json!({"type": "function"})).contains("array"));
        assert!(
            Tool::from_openai(&json!({"type": "function", "function": {"name": "ok-1_x"}})).is_ok()
        );
        assert_eq!(t[0].to_openai()["function"]["name"], json!("get_weather"));
        // A strict function's arguments allow no property it does not name.
        let strict = |s: Value| {
            Tool::from_openai(&json!({"type": "function", "function": {"name": "f",
                "strict": s, "parameters": {"type": "object", "properties": {"a": {}}}}}))
        };
        assert_eq!(
            strict(json!(true)).unwrap().parameters["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            strict(json!(false))
                .unwrap()
                .parameters
                .get("additionalProperties"),
            None
        );
        assert!(matches!(
            strict(json!("yes")),
            Err(Error::InvalidRequest { field: "tools", .. })
        ));
    }

    #[test]
    fn tool_choice_is_validated() {
        let t = tools();
        assert_eq!(ToolChoice::from_openai(None, &t).unwrap(), ToolChoice::Auto);
        assert_eq!(
            ToolChoice::from_openai(None, &[]).unwrap(),
            ToolChoice::None
        );
        let parse = |v: Value, t: &[Tool]| ToolChoice::from_openai(Some(&v), t);
        assert_eq!(parse(json!("none"), &t).unwrap(), ToolChoice::None);
        assert_eq!(parse(json!("required"), &t).unwrap(), ToolChoice::Required);
        assert_eq!(
            parse(
                json!({"type": "function", "function": {"name": "get_time"}}),
                &t
            )
            .unwrap(),
            ToolChoice::Named("get_time".into())
        );
        let err = |r: Result<ToolChoice>| match r {
            Err(Error::InvalidRequest {
                field: "tool_choice",
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(err(parse(
            json!({"type": "function", "function": {"name": "nope"}}),
            &t
        ))
        .contains("'nope'"));
        assert!(err(parse(json!("sometimes"), &t)).contains("'sometimes'"));
        assert!(err(parse(json!("required"), &[])).contains("no `tools`"));
        assert!(err(parse(json!({"type": "function"}), &t)).contains("names no function"));
        assert!(err(parse(json!(3), &t)).contains("must be"));
    }

    #[test]
    fn call_ids_look_like_openais() {
        let mut n = 0u64;
        let mut next = || {
            n += 1;
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        };
        let a = call_id(&mut next);
        let b = call_id(&mut next);
        assert_ne!(a, b);
        for id in [a, b, random_call_id()] {
            assert_eq!(id.len(), 29, "{id}");
            assert!(id.starts_with("call_"));
            assert!(id[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        assert_ne!(random_call_id(), random_call_id());
    }

    #[test]
    fn formats_are_detected_and_named() {
        assert_eq!(ToolFormat::detect(None), ToolFormat::Hermes);
        assert_eq!(
            ToolFormat::detect(Some("{{ messages }}")),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::detect(Some("{{ '[TOOL_CALLS]' }}")),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::detect(Some("<|start_header_id|>ipython<|end_header_id|>")),
            ToolFormat::Llama3Json
        );
        assert_eq!(
            ToolFormat::detect(Some("'\"parameters\": ' <|eot_id|>")),
            ToolFormat::Llama3Json
        );
        for f in [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
        ] {
            assert_eq!(ToolFormat::from_name(f.name()).unwrap(), f);
        }
        let err = ToolFormat::from_name("json").unwrap_err().to_string();
        assert!(err.contains("'json'"), "{err}");
    }

    /// A text and what [`parse`] makes of it: (format, text, content, calls).
    type Case = (
        ToolFormat,
        &'static str,
        &'static str,
        Vec<(String, String)>,
    );

    /// Texts and what [`parse`] makes of them.
    fn cases() -> Vec<Case> {
        use ToolFormat::*;
        let paris = call("get_weather", r#"{"city":"Paris"}"#);
        let time = call("get_time", "{}");
        vec![
            // Hermes: one call, parallel calls, text around, unclosed last block.
            (Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>", "", vec![paris.clone()]),
            (Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>", "\n", vec![paris.clone(), time.clone()]),
            (Hermes, "Let me look. <tool_call>{\"name\": \"get_time\"}</tool_call> Done.", "Let me look.  Done.", vec![time.clone()]),
            (Hermes, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"{}\"}\n", "", vec![time.clone()]),
            // Cut short by the length limit: the complete calls stand, the
            // unfinished one stays text.
            (Hermes, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_wea", "\n<tool_call>\n{\"name\": \"get_wea", vec![time.clone()]),
            (Hermes, "Just text, with a < and a <tool and <tool_cal.", "Just text, with a < and a <tool and <tool_cal.", vec![]),
            // Malformed JSON, unknown tool, arguments not an object, a bad
            // second block: all plain content.
            (Hermes, "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\n</tool_call>", "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\n</tool_call>", vec![]),
            (Hermes, "<tool_call>\n{\"name\": \"launch\", \"arguments\": {}}\n</tool_call>", "<tool_call>\n{\"name\": \"launch\", \"arguments\": {}}\n</tool_call>", vec![]),
            (Hermes, "<tool_call>{\"name\": \"get_time\", \"arguments\": [1]}</tool_call>", "<tool_call>{\"name\": \"get_time\", \"arguments\": [1]}</tool_call>", vec![]),
            (Hermes, "<tool_call>{\"name\": \"get_time\"}</tool_call><tool_call>oops</tool_call>", "<tool_call>{\"name\": \"get_time\"}</tool_call><tool_call>oops</tool_call>", vec![]),
            (Hermes, "é<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}</tool_call>ü", "éü", vec![call("get_weather", r#"{"city":"Zürich"}"#)]),
            // Llama 3 JSON.
            (Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", "", vec![paris.clone()]),
            (Llama3Json, "  <|python_tag|>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", "", vec![paris.clone()]),
            (Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_time\", \"parameters\": {}};", "", vec![paris.clone(), time.clone()]),
            (Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}} and more", "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}} and more", vec![]),
            (Llama3Json, "{\"answer\": 42}", "{\"answer\": 42}", vec![]),
            (Llama3Json, "{\"name\": \"get_weather\", \"parameters\": {\"city\": ", "{\"name\": \"get_weather\", \"parameters\": {\"city\": ", vec![]),
            (Llama3Json, "<|python_tag|>brave_search.call(query=\"x\")", "<|python_tag|>brave_search.call(query=\"x\")", vec![]),
            (Llama3Json, "The answer is {1}.", "The answer is {1}.", vec![]),
            (Llama3Json, " <|python", " <|python", vec![]),
            // Mistral: list syntax, [ARGS] syntax, text before.
            (Mistral, "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {}}]", "", vec![paris.clone(), time.clone()]),
            (Mistral, "[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {}}]", "", vec![time.clone()]),
            (Mistral, "Sure. [TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}", "Sure. ", vec![paris.clone(), time.clone()]),
            (Mistral, "[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{}", "", vec![time.clone()]),
            (Mistral, "[TOOL_CALLS]launch[ARGS]{}", "[TOOL_CALLS]launch[ARGS]{}", vec![]),
            (Mistral, "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {]", "[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {]", vec![]),
            (Mistral, "No calls [TOOL", "No calls [TOOL", vec![]),
        ]
    }

    #[test]
    fn parses_each_format() {
        let t = tools();
        for (format, text, content, calls) in cases() {
            let p = parse(format, text, &t);
            assert_eq!(p.content, content, "{format:?} {text:?}");
            assert_eq!(p.calls, calls, "{format:?} {text:?}");
        }
    }

    /// Runs `text` through a stream in `pieces` and gives (content, calls).
    fn stream(
        format: ToolFormat,
        pieces: &[&str],
        tools: &[Tool],
    ) -> (String, Vec<(String, String)>) {
        let mut s = ToolStream::new(format, tools);
        let mut outs = Vec::new();
        for p in pieces {
            outs.extend(s.push(p));
        }
        outs.extend(s.finish());
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for o in outs {
            match o {
                StreamOut::Content(c) => {
                    assert!(!c.is_empty());
                    content.push_str(&c);
                }
                StreamOut::CallStart { index, name } => {
                    assert_eq!(index, calls.len());
                    calls.push((name, String::new()));
                }
                StreamOut::Arguments { index, fragment } => {
                    assert_eq!(index + 1, calls.len());
                    calls[index].1.push_str(&fragment);
                }
            }
        }
        (content, calls)
    }

    fn char_pieces(text: &str, sizes: &[usize]) -> Vec<String> {
        let chars: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        let mut k = 0;
        while i < chars.len() {
            let n = sizes[k % sizes.len()].min(chars.len() - i);
            out.push(chars[i..i + n].iter().collect());
            i += n;
            k += 1;
        }
        out
    }

    #[test]
    fn streams_agree_with_parse() {
        let t = tools();
        for (format, text, _, _) in cases() {
            let whole = parse(format, text, &t);
            // Whitespace alone beside calls is no content (the server
            // answers `content: null` then).
            let content = match whole.calls.is_empty() || !whole.content.trim().is_empty() {
                true => whole.content.clone(),
                false => String::new(),
            };
            let want = (content, whole.calls.clone());
            let mut splits: Vec<Vec<String>> = vec![vec![text.to_string()]];
            for sizes in [&[1][..], &[2], &[3], &[1, 3, 2]] {
                splits.push(char_pieces(text, sizes));
            }
            for (i, _) in text.char_indices().skip(1) {
                splits.push(vec![text[..i].to_string(), text[i..].to_string()]);
            }
            for pieces in splits {
                let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
                assert_eq!(stream(format, &refs, &t), want, "{format:?} {pieces:?}");
            }
        }
    }

    #[test]
    fn a_call_cut_by_the_length_limit_is_a_call_with_its_arguments_so_far() {
        let t = tools();
        let cut = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa";
        let p = parse_cut(ToolFormat::Hermes, cut, &t);
        assert_eq!(
            p.calls,
            vec![
                call("get_time", "{}"),
                call("get_weather", "{\"city\": \"Pa")
            ]
        );
        assert!(p.content.trim().is_empty(), "{:?}", p.content);
        // Not cut: the unclosed block stays content, as before.
        assert_eq!(
            parse(ToolFormat::Hermes, cut, &t).calls,
            vec![call("get_time", "{}")]
        );
        // A block cut before a tool's name is no call, and no content.
        for text in [
            "<tool_call>{\"name\": \"get_wea",
            "<tool_call>{\"name\": \"nope\", \"arguments\": {\"x",
        ] {
            let text = format!("Hi\n{text}");
            let p = parse_cut(ToolFormat::Hermes, &text, &t);
            assert!(p.calls.is_empty() && p.content == "Hi\n", "{p:?}");
            let mut s = ToolStream::new(ToolFormat::Hermes, &t);
            let mut outs = s.push(&text);
            outs.extend(s.finish_cut());
            assert_eq!(outs, vec![StreamOut::Content("Hi\n".into())]);
        }
        let named = "<tool_call>{\"name\": \"get_time\", \"argu";
        let p = parse_cut(ToolFormat::Hermes, named, &t);
        assert_eq!(p.calls, vec![call("get_time", "")]);
        let llama = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Pa";
        let p = parse_cut(ToolFormat::Llama3Json, llama, &t);
        assert_eq!(p.calls, vec![call("get_weather", "{\"city\": \"Pa")]);
        // Whole calls before the cut one stand, each once.
        let two = format!("{{\"name\": \"get_time\", \"parameters\": {{}}}}; {llama}");
        let p = parse_cut(ToolFormat::Llama3Json, &two, &t);
        assert_eq!(
            p.calls,
            vec![
                call("get_time", "{}"),
                call("get_weather", "{\"city\": \"Pa")
            ]
        );
        // A cut in the markup after a whole call leaves the call whole: its
        // arguments are its JSON, not the text up to the cut.
        for tail in ["\n", "\n</tool", "\n</tool_call"] {
            let text = format!(
                "<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{\"city\": \"Paris\"}}}}{tail}"
            );
            let p = parse_cut(ToolFormat::Hermes, &text, &t);
            assert_eq!(
                p.calls,
                vec![call("get_weather", "{\"city\":\"Paris\"}")],
                "{tail:?}"
            );
            assert!(p.content.is_empty(), "{p:?}");
        }
        // A stream ended as cut agrees, however the text was split.
        for (format, text) in [(ToolFormat::Hermes, cut), (ToolFormat::Llama3Json, llama)] {
            let whole = parse_cut(format, text, &t);
            for sizes in [&[1][..], &[3], &[1, 4, 2]] {
                let pieces = char_pieces(text, sizes);
                let mut s = ToolStream::new(format, &t);
                let mut outs = Vec::new();
                for p in &pieces {
                    outs.extend(s.push(p));
                }
                outs.extend(s.finish_cut());
                let calls: Vec<String> = outs
                    .iter()
                    .filter_map(|o| match o {
                        StreamOut::CallStart { name, .. } => Some(name.clone()),
                        _ => None,
                    })
                    .collect();
                let want: Vec<String> = whole.calls.iter().map(|c| c.0.clone()).collect();
                assert_eq!(calls, want, "{format:?} {pieces:?}");
                assert!(
                    outs.iter()
                        .all(|o| !matches!(o, StreamOut::Content(c) if c.contains('<'))),
                    "{outs:?}"
                );
            }
        }
    }

    #[test]
    fn streams_release_content_early() {
        let t = tools();
        let mut s = ToolStream::new(ToolFormat::Hermes, &t);
        // Trailing whitespace waits for what follows it.
        assert_eq!(
            s.push("Hello <to"),
            vec![StreamOut::Content("Hello".into())]
        );
        assert_eq!(s.push("ol"), vec![]);
        assert_eq!(
            s.push("box>"),
            vec![StreamOut::Content(" <toolbox>".into())]
        );
        assert_eq!(
            s.push(" <tool_call>{\"name\""),
            vec![StreamOut::Content(" ".into())]
        );
        assert_eq!(s.push(": \"get_time\"}</tool_call>"), vec![]);
        assert_eq!(
            s.finish(),
            vec![
                StreamOut::CallStart {
                    index: 0,
                    name: "get_time".into()
                },
                StreamOut::Arguments {
                    index: 0,
                    fragment: "{}".into()
                },
            ]
        );
        // A line break before a call is not content.
        let mut s = ToolStream::new(ToolFormat::Hermes, &t);
        assert_eq!(s.push("\n"), vec![]);
        assert_eq!(s.push("<tool_call>{\"name\": \"get_time\"}"), vec![]);
        assert_eq!(s.push("</tool_call>\n").len(), 0);
        assert!(s
            .finish()
            .iter()
            .all(|o| !matches!(o, StreamOut::Content(_))));
        let mut s = ToolStream::new(ToolFormat::Llama3Json, &t);
        assert_eq!(s.push("  "), vec![]);
        assert_eq!(s.push("Hi"), vec![StreamOut::Content("  Hi".into())]);
        assert_eq!(s.push(" {"), vec![StreamOut::Content(" {".into())]);
    }

    /// A byte-level vocabulary: the 256 bytes (GPT-2's printable spelling),
    /// one merge, and an end-of-text control token.
    fn byte_tokenizer() -> crate::Tokenizer {
        use candle_core::quantized::gguf_file;
        // GPT-2's byte ↔ printable-character map.
        let mut next = 256u32;
        let mut tokens: Vec<String> = (0..=255u32)
            .map(|b| {
                let printable = (0x21..=0x7e).contains(&b)
                    || (0xa1..=0xac).contains(&b)
                    || (0xae..=0xff).contains(&b);
                let c = if printable {
                    b
                } else {
                    next += 1;
                    next - 1
                };
                char::from_u32(c).unwrap().to_string()
            })
            .collect();
        tokens.push("Ġt".into());
        tokens.push("<|endoftext|>".into());
        let mut types = vec![1i32; 257];
        types.push(3);
        let strings = |v: Vec<String>| {
            gguf_file::Value::Array(v.into_iter().map(gguf_file::Value::String).collect())
        };
        let meta = [
            (
                "tokenizer.ggml.model",
                gguf_file::Value::String("gpt2".into()),
            ),
            ("tokenizer.ggml.tokens", strings(tokens)),
            (
                "tokenizer.ggml.token_type",
                gguf_file::Value::Array(types.into_iter().map(gguf_file::Value::I32).collect()),
            ),
            ("tokenizer.ggml.merges", strings(vec!["Ġ t".into()])),
            ("tokenizer.ggml.eos_token_id", gguf_file::Value::U32(257)),
        ];
        let entries: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut bytes, &entries, &[]).unwrap();
        let file = crate::GgufFile::from_bytes("bytes.gguf", bytes.into_inner()).unwrap();
        crate::Tokenizer::from_gguf(&file).unwrap()
    }

    /// Walks a guide byte by byte over a byte-level vocabulary (also
    /// [`crate::guide`]'s tests').
    pub(crate) struct Walker {
        env: crate::guide::GuideEnv,
        byte_token: Vec<u32>,
        eos: u32,
    }

    impl Walker {
        pub(crate) fn new() -> Self {
            let tok = byte_tokenizer();
            let mut byte_token = vec![0u32; 256];
            for id in 0..tok.vocab_size() as u32 {
                if let [b] = tok.token_bytes(id) {
                    byte_token[*b as usize] = id;
                }
            }
            let eos = tok.eos();
            let vocab = tok.vocab_size();
            let env = crate::guide::GuideEnv::new(std::sync::Arc::new(tok), vocab).unwrap();
            Self {
                env,
                byte_token,
                eos,
            }
        }

        /// Feeds `text` byte by byte; gives how many bytes the grammar
        /// allowed, whether end-of-sequence may follow them, and whether
        /// only it may.
        pub(crate) fn walk(&self, guide: &Guide, text: &str) -> (usize, bool, bool) {
            let c = self
                .env
                .constraint(guide)
                .unwrap_or_else(|e| panic!("{e}\n{guide:?}"));
            let allowed = |mask: &[u32], id: u32| {
                mask.get(id as usize / 32)
                    .is_some_and(|w| w >> (id % 32) & 1 == 1)
            };
            for (i, b) in text.bytes().enumerate() {
                let id = self.byte_token[b as usize];
                if !allowed(&c.mask(), id) {
                    return (i, false, false);
                }
                c.accept(id).unwrap();
            }
            let mask = c.mask();
            let only_eos = allowed(&mask, self.eos)
                && (0..self.byte_token.len() as u32 + 2)
                    .filter(|&id| id != self.eos)
                    .all(|id| !allowed(&mask, id));
            (text.len(), allowed(&mask, self.eos), only_eos)
        }
    }

    #[test]
    fn mistral_call_ids_are_nine_letters_and_digits_and_stable() {
        assert_eq!(
            mistral_call_id("call_0123456789abcdefghijklmn"),
            "fghijklmn"
        );
        assert_eq!(mistral_call_id("abcDEF123"), "abcDEF123");
        assert_eq!(mistral_call_id("toolu-01_x.y-z9876543"), "xyz9876543"[1..]);
        for short in ["1", "call-7", ""] {
            let id = mistral_call_id(short);
            assert_eq!(id.len(), 9, "{short:?} -> {id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
            assert_eq!(id, mistral_call_id(short));
        }
        assert_ne!(mistral_call_id("1"), mistral_call_id("2"));
        // Both ends of a call get the same id, and the Nemo template
        // (which refuses any other) renders them.
        let id = "call_0123456789abcdefghijklmn".to_string();
        let turns = [
            ChatTurn::new("user", "Weather?"),
            ChatTurn::new("assistant", "").with_tool_calls(vec![ToolCall {
                id: id.clone(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            }]),
            ChatTurn::tool_result(id, "sunny"),
        ];
        let nemo = crate::chat::ChatTemplate::new(
            include_str!("../../tests/data/chat/mistral-nemo-instruct.jinja"),
            "<s>",
            "</s>",
        )
        .unwrap();
        let render = |t: &[ChatTurn]| {
            nemo.render_turns(t, Some(&tools()), &crate::chat::RenderOptions::default())
        };
        let err = render(&turns).expect_err("OpenAI's ids are refused");
        assert!(err.to_string().contains("length 9"), "{err}");
        let text = render(&with_mistral_ids(&turns)).unwrap();
        assert_eq!(text.matches("fghijklmn").count(), 2, "{text}");
    }

    #[test]
    fn guides_force_calls_that_parse() {
        let t = tools();
        let w = Walker::new();
        let weather = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
        let time = r#"{"name": "get_time", "arguments": {}}"#;
        let l_weather = r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}"#;
        let l_time = r#"{"name": "get_time", "parameters": {}}"#;
        let hermes = |c: &str| format!("<tool_call>\n{c}\n</tool_call>");
        let named = ToolChoice::Named("get_weather".into());
        use ToolChoice::Required;
        use ToolFormat::*;
        // (format, choice, parallel, text, None where all of it is
        // allowed, else the part that is).
        let head = "<tool_call>\n{\"name\": \"";
        let cases: Vec<(ToolFormat, &ToolChoice, bool, String, Option<String>)> = vec![
            (Hermes, &Required, false, hermes(weather), None),
            (Hermes, &Required, false, hermes(time), None),
            (Hermes, &named, false, hermes(weather), None),
            (
                Hermes,
                &Required,
                true,
                format!("{}\n{}", hermes(weather), hermes(time)),
                None,
            ),
            // The line break after the last call, then the end.
            (
                Hermes,
                &Required,
                true,
                format!("{}\n{}\n", hermes(weather), hermes(time)),
                None,
            ),
            // A named function is called once, `parallel` or not.
            (
                Hermes,
                &named,
                true,
                format!("{}\n{}", hermes(weather), hermes(weather)),
                Some(format!("{}\n", hermes(weather))),
            ),
            // A second call is not allowed without `parallel`.
            (
                Hermes,
                &Required,
                false,
                format!("{}\n{}", hermes(weather), hermes(time)),
                Some(format!("{}\n", hermes(weather))),
            ),
            // Not a function of the tools, or not the named one: refused
            // where the name diverges.
            (
                Hermes,
                &Required,
                false,
                hermes(r#"{"name": "launch", "arguments": {}}"#),
                Some(head.into()),
            ),
            (
                Hermes,
                &named,
                false,
                hermes(time),
                Some(format!("{head}get_")),
            ),
            // The schema holds: `city` is required, `unit` is C or F, and
            // JSON is written with ", " and ": " only.
            (
                Hermes,
                &Required,
                false,
                hermes(r#"{"name": "get_weather", "arguments": {}}"#),
                Some(format!(r#"{head}get_weather", "arguments": {{"#)),
            ),
            (
                Hermes,
                &Required,
                false,
                hermes(r#"{"name": "get_weather", "arguments": {"city":"Paris"}}"#),
                Some(format!(r#"{head}get_weather", "arguments": {{"city":"#)),
            ),
            (Llama3Json, &Required, false, l_weather.to_string(), None),
            (
                Llama3Json,
                &Required,
                true,
                format!("{l_weather}; {l_time}"),
                None,
            ),
            (
                Llama3Json,
                &named,
                false,
                l_weather.replace("\"C\"", "\"K\""),
                Some(r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": ""#.into()),
            ),
            (
                Mistral,
                &Required,
                false,
                format!("[TOOL_CALLS][{weather}]"),
                None,
            ),
            (
                Mistral,
                &Required,
                false,
                format!("[TOOL_CALLS] [{time}]"),
                None,
            ),
            (
                Mistral,
                &Required,
                true,
                format!("[TOOL_CALLS][{weather}, {time}]"),
                None,
            ),
            (
                Mistral,
                &named,
                false,
                format!("[TOOL_CALLS][{time}]"),
                Some(r#"[TOOL_CALLS][{"name": "get_"#.into()),
            ),
        ];
        for (format, choice, parallel, text, stop) in cases {
            let g = guide(format, &t, choice, parallel).unwrap();
            let (n, eos, only_eos) = w.walk(&g, &text);
            match stop {
                None => {
                    assert_eq!(
                        n,
                        text.len(),
                        "{format:?} {choice:?} refused byte {n} of {text}"
                    );
                    assert!(eos, "{format:?} {choice:?}: cannot end after {text}");
                    // Only a parallel call list goes on (Mistral's ends at
                    // `]`, a named function is called once), and Hermes
                    // allows a line break after its last call.
                    let goes_on = parallel && !matches!(choice, ToolChoice::Named(_));
                    let expected = match format {
                        Mistral => true,
                        Hermes => text.ends_with('\n') && !goes_on,
                        Llama3Json => !goes_on,
                    };
                    assert_eq!(
                        only_eos, expected,
                        "{format:?} {choice:?} {parallel}: after {text}"
                    );
                    // What the grammar allowed, parse reads back.
                    assert!(!parse(format, &text, &t).calls.is_empty(), "{text}");
                }
                Some(allowed) => {
                    assert!(text.starts_with(&allowed));
                    assert_eq!(&text[..n], allowed, "{format:?} {choice:?} {text}");
                }
            }
        }
        assert_eq!(guide(Hermes, &t, &ToolChoice::Auto, true), None);
        assert_eq!(guide(Hermes, &t, &ToolChoice::None, true), None);
        assert_eq!(
            guide(Hermes, &t, &ToolChoice::Named("nope".into()), true),
            None
        );
    }

    #[test]
    fn guides_are_lark_with_embedded_schemas() {
        let t = tools();
        let Some(Guide::ToolCalls(g)) = guide(ToolFormat::Hermes, &t, &ToolChoice::Required, true)
        else {
            panic!("no grammar")
        };
        assert!(
            g.starts_with("start: tool_call (\"\\n\" tool_call)* \"\\n\"?\n"),
            "{g}"
        );
        assert!(g.contains("function: function_0 | function_1"), "{g}");
        assert!(
            g.contains(
                r#"function_0: "{\"name\": \"get_weather\", \"arguments\": " arguments_0 "}""#
            ),
            "{g}"
        );
        assert!(g.contains(r#"arguments_0: %json {"type":"object""#), "{g}");
        assert!(
            g.contains(r#""x-guidance":{"whitespace_flexible":false"#),
            "{g}"
        );
    }

    #[test]
    fn system_prompts_list_tools_and_syntax() {
        let t = tools();
        let p = system_prompt(&t, ToolFormat::Hermes);
        assert!(p.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"The weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"unit\": {\"enum\": [\"C\", \"F\"]}}, \"required\": [\"city\"]}}}\n{\"type\": \"function\", \"function\": {\"name\": \"get_time\"}}\n</tools>"), "{p}");
        // The model is shown a tool as the request gave it: its keys in
        // their order, and a strict schema as written (the closing is the
        // grammar's business).
        let strict = Tool::from_openai(&json!({"type": "function", "function": {
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            "name": "search", "strict": true}}))
        .unwrap();
        assert_eq!(
            python_json(&strict.to_openai(), None, None),
            "{\"type\": \"function\", \"function\": {\"parameters\": {\"type\": \"object\", \"properties\": {\"q\": {\"type\": \"string\"}}}, \"name\": \"search\", \"strict\": true}}"
        );
        assert_eq!(strict.parameters["additionalProperties"], json!(false));
        assert!(p.contains("<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>"), "{p}");
        assert!(system_prompt(&t, ToolFormat::Llama3Json)
            .contains("\"parameters\": <args-json-object>"));
        assert!(system_prompt(&t, ToolFormat::Mistral).contains("[TOOL_CALLS][{\"name\""));
    }

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn conversation() -> Vec<ChatTurn> {
        vec![
            ChatTurn::new("user", "Weather in Paris?"),
            ChatTurn::new("assistant", "").with_tool_calls(vec![ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            }]),
            ChatTurn::tool_result("call_1", "{\"temp\": 21}").with_name("get_weather"),
        ]
    }

    #[test]
    fn folds_tools_into_a_chatml_template() {
        let t = tools();
        let tmpl = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        assert!(!tmpl.mentions_tools());
        let folded = fold_into_messages(&conversation(), &t, ToolFormat::Hermes);
        assert_eq!(folded.len(), 4);
        assert_eq!(folded[0].role, "system");
        assert_eq!(folded[0].content, system_prompt(&t, ToolFormat::Hermes));
        let out = tmpl.render(&folded, true).unwrap();
        let want_tail = "<|im_start|>user\nWeather in Paris?<|im_end|>\n\
            <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
            <|im_start|>tool\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n\
            <|im_start|>assistant\n";
        assert!(out.ends_with(want_tail), "{out}");

        // An existing system message takes the tools after its text.
        let mut with_system = vec![ChatTurn::new("system", "Be brief.")];
        with_system.extend(conversation());
        let folded = fold_into_messages(&with_system, &t, ToolFormat::Mistral);
        assert_eq!(folded.len(), 4);
        assert!(folded[0].content.starts_with("Be brief.\n\n# Tools"));
        assert_eq!(
            folded[2].content,
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"
        );
        assert_eq!(
            folded[3].content,
            "[TOOL_RESULTS]{\"temp\": 21}[/TOOL_RESULTS]"
        );
        let folded = fold_into_messages(&conversation(), &[], ToolFormat::Llama3Json);
        assert_eq!(folded.len(), 3);
        assert_eq!(
            folded[1].content,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"
        );
    }
}
