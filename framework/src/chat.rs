//! Chat templates: the model's Jinja template (`tokenizer.chat_template`)
//! rendered with minijinja, with Python string methods (`.strip()`, …) available
//! as Hugging Face templates expect.
//!
//! Two kinds of message: [`ChatMessage`] (a role and a text) for plain
//! chats, and [`ChatTurn`], the same with OpenAI's tool fields (an
//! assistant's `tool_calls`, a `tool` message's `tool_call_id` and `name`),
//! for [`ChatTemplate::render_with_tools`]. A template that does not know
//! tools ([`ChatTemplate::mentions_tools`] is false) gets them folded into
//! plain messages by [`crate::tools::fold_into_messages`] instead.
//!
//! **What is true of it:** maps reach the template in the order they were
//! built (an OpenAI tool keeps `type` before `function`, a schema its
//! properties' order), and `tojson` writes JSON as Hugging Face's does
//! (Python's `json.dumps`: `", "` and `": "` separators, non-ASCII kept,
//! nothing HTML-escaped), so a prompt reads as the ones the model was
//! trained on.

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object};
use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value as JinjaValue};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::tools::{Tool, ToolCall};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// One chat message with OpenAI's tool fields: what
/// [`ChatTemplate::render_with_tools`] and
/// [`crate::tools::fold_into_messages`] take.
///
/// A separate type rather than more fields of [`ChatMessage`], so that code
/// building a `ChatMessage { role, content }` literal keeps compiling;
/// `From<ChatMessage>` converts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text (empty for an assistant message that only calls tools).
    #[serde(default)]
    pub content: String,
    /// The tools an assistant message called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a `tool` message: the function that gave the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For an assistant message: the thought before its answer, as the
    /// server answered it (`reasoning_content`); templates that keep the
    /// last turns' thoughts (Qwen3's) read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatTurn {
    /// A message from `role`, without tool fields.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    /// The same message carrying the tool calls `calls`.
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }

    /// A `tool` message: the result `content` of the call `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: "tool".into(),
            content: content.into(),
            tool_call_id: Some(tool_call_id.into()),
            ..Self::default()
        }
    }

    /// The same message carrying the thought `reasoning` (of an assistant
    /// message).
    pub fn with_reasoning(mut self, reasoning: Option<String>) -> Self {
        self.reasoning_content = reasoning;
        self
    }

    /// The same message naming the function `name` (of a `tool` message).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The message as the template sees it: `role`, `content`, then
    /// `tool_calls` (OpenAI's objects, `arguments` parsed), `tool_call_id`,
    /// `name` and `reasoning_content` where set.
    fn to_jinja(&self) -> JinjaValue {
        let mut fields = vec![
            ("role".to_string(), JinjaValue::from(self.role.as_str())),
            (
                "content".to_string(),
                JinjaValue::from(self.content.as_str()),
            ),
        ];
        if !self.tool_calls.is_empty() {
            let calls: Vec<JinjaValue> = self.tool_calls.iter().map(call_to_jinja).collect();
            fields.push(("tool_calls".into(), JinjaValue::from(calls)));
        }
        if let Some(id) = &self.tool_call_id {
            fields.push(("tool_call_id".into(), JinjaValue::from(id.as_str())));
        }
        if let Some(name) = &self.name {
            fields.push(("name".into(), JinjaValue::from(name.as_str())));
        }
        if let Some(r) = &self.reasoning_content {
            fields.push(("reasoning_content".into(), JinjaValue::from(r.as_str())));
        }
        JinjaValue::from_object(OrderedMap(fields))
    }
}

impl From<ChatMessage> for ChatTurn {
    fn from(m: ChatMessage) -> Self {
        Self::new(m.role, m.content)
    }
}

impl From<&ChatMessage> for ChatTurn {
    fn from(m: &ChatMessage) -> Self {
        Self::new(m.role.clone(), m.content.clone())
    }
}

/// A call as HF templates read it: `{"id", "type": "function", "function":
/// {"name", "arguments"}}`, `arguments` the parsed object (or the text
/// itself where it is not JSON).
fn call_to_jinja(call: &ToolCall) -> JinjaValue {
    let arguments = serde_json::from_str::<Value>(&call.arguments)
        .unwrap_or_else(|_| Value::String(call.arguments.clone()));
    let function = OrderedMap(vec![
        ("name".into(), JinjaValue::from(call.name.as_str())),
        ("arguments".into(), json_to_jinja(&arguments)),
    ]);
    JinjaValue::from_object(OrderedMap(vec![
        ("id".into(), JinjaValue::from(call.id.as_str())),
        ("type".into(), JinjaValue::from("function")),
        ("function".into(), JinjaValue::from_object(function)),
    ]))
}

/// A JSON value for a template, its objects keeping their keys' order.
fn json_to_jinja(v: &Value) -> JinjaValue {
    match v {
        Value::Object(map) => JinjaValue::from_object(OrderedMap(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_jinja(v)))
                .collect(),
        )),
        Value::Array(items) => {
            JinjaValue::from(items.iter().map(json_to_jinja).collect::<Vec<_>>())
        }
        other => JinjaValue::from_serialize(other),
    }
}

/// A template map whose keys keep the order they were inserted in
/// (minijinja's own maps sort them).
#[derive(Debug)]
struct OrderedMap(Vec<(String, JinjaValue)>);

impl Object for OrderedMap {
    fn get_value(self: &Arc<Self>, key: &JinjaValue) -> Option<JinjaValue> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .iter()
                .map(|(k, _)| JinjaValue::from(k.as_str()))
                .collect(),
        )
    }
}

/// JSON text as Python's `json.dumps(value, ensure_ascii=False, indent=…,
/// separators=…)` writes it (Hugging Face's `tojson`): by default `", "`
/// between items and `": "` after keys, with `indent` a newline and that
/// many spaces per level (and `","` between items).
pub(crate) fn python_json(
    value: &Value,
    indent: Option<usize>,
    separators: Option<(&str, &str)>,
) -> String {
    let (item, key) = separators.unwrap_or(match indent {
        Some(_) => (",", ": "),
        None => (", ", ": "),
    });
    let mut out = String::new();
    write_python_json(value, &Layout { indent, item, key }, 0, &mut out);
    out
}

/// How [`python_json`] lays JSON out.
struct Layout<'a> {
    indent: Option<usize>,
    item: &'a str,
    key: &'a str,
}

fn write_python_json(value: &Value, layout: &Layout<'_>, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = layout.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(layout.item);
                }
                newline(out, level + 1);
                write_python_json(item, layout, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(layout.item);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(layout.key);
                write_python_json(v, layout, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars, `[]` and `{}`: serde_json writes them as Python does
        // (strings escaped the same way with `ensure_ascii=False`).
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// Sorts every object's keys (`tojson(sort_keys=true)`).
fn sort_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// Hugging Face's `tojson` filter: `value | tojson(indent=None,
/// separators=None, sort_keys=False, ensure_ascii=False)`.
fn tojson_filter(
    value: JinjaValue,
    indent: Option<JinjaValue>,
    kwargs: Kwargs,
) -> std::result::Result<JinjaValue, JinjaError> {
    let bad = |m: String| JinjaError::new(ErrorKind::InvalidOperation, m);
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JinjaValue>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v).map_err(|e| bad(format!("tojson: indent {e}")))?),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let separators = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.clone(), key.clone())),
        Some(_) => return Err(bad("tojson: separators must be two strings".into())),
    };
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| bad(format!("tojson: cannot write {value} as JSON: {e}")))?;
    let json = if sort == Some(true) {
        sort_keys(json)
    } else {
        json
    };
    let seps = separators.as_ref().map(|(i, k)| (i.as_str(), k.as_str()));
    let text = python_json(&json, indent, seps);
    Ok(JinjaValue::from(match ensure_ascii {
        Some(true) => ascii_escaped(&text),
        _ => text,
    }))
}

/// JSON text with every character past ASCII (and DEL) written as Python's
/// `ensure_ascii=True` writes it: `\uXXXX`, a UTF-16 surrogate pair past
/// the Basic Multilingual Plane (such characters stand only in strings,
/// where the escape means the same).
fn ascii_escaped(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        // (DEL too: Python escapes all but space to `~`.)
        if c < '\x7f' {
            out.push(c);
            continue;
        }
        let mut units = [0u16; 2];
        for u in c.encode_utf16(&mut units) {
            out.push_str(&format!("\\u{u:04x}"));
        }
    }
    out
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    mentions_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// Template variables by name, as JSON values (`chat_template_kwargs`).
pub type TemplateKwargs = serde_json::Map<String, Value>;

/// How a conversation is rendered beyond its messages: the arguments of
/// Hugging Face's `apply_chat_template` that OpenAI-compatible servers take
/// per request. [`RenderOptions::default`] is a plain chat turn: the
/// assistant's turn opener at the end, nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// End with the assistant's turn opener (default true).
    pub add_generation_prompt: bool,
    /// Leave the final message open, without what the template writes after
    /// its text, so the model continues it (an assistant reply begun by
    /// the caller). Cannot go with `add_generation_prompt`.
    pub continue_final_message: bool,
    /// More template variables by name (`enable_thinking`, …), as
    /// `chat_template_kwargs` gives them; none may be one the renderer sets
    /// itself ([`RenderOptions::RESERVED`]).
    pub kwargs: TemplateKwargs,
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self::opening(true)
    }
}

impl RenderOptions {
    /// The template variables the renderer sets itself.
    pub const RESERVED: [&'static str; 5] = [
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
    ];

    /// The default, with the turn opener only if `add_generation_prompt`.
    pub fn opening(add_generation_prompt: bool) -> Self {
        Self {
            add_generation_prompt,
            continue_final_message: false,
            kwargs: TemplateKwargs::new(),
        }
    }

    /// Refuses what cannot be rendered, naming the field: both
    /// `continue_final_message` and `add_generation_prompt`, or a
    /// `kwargs` name the renderer sets itself.
    pub fn check(&self) -> Result<()> {
        if self.continue_final_message && self.add_generation_prompt {
            return Err(Error::invalid(
                "continue_final_message",
                "cannot go with `add_generation_prompt`: continue the final message, \
                 or open a new assistant turn after it (set `add_generation_prompt` to false)",
            ));
        }
        if let Some(name) = self
            .kwargs
            .keys()
            .find(|k| Self::RESERVED.contains(&k.as_str()))
        {
            return Err(Error::invalid(
                "chat_template_kwargs",
                format!(
                    "may not hold `{name}`: the renderer sets it (reserved: {})",
                    Self::RESERVED.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// `rendered` cut just after the final message's text `last`, as
/// `apply_chat_template(continue_final_message=True)` cuts it: at the last
/// place that text (stripped) appears, keeping its trailing whitespace
/// where the template kept it and the text has none in front (transformers
/// compares the unstripped text there).
fn continue_final(mut rendered: String, last: &str) -> Result<String> {
    let stripped = last.trim();
    if stripped.is_empty() {
        return Err(Error::invalid(
            "continue_final_message",
            "is set, but the final message has no text to continue",
        ));
    }
    let Some(at) = rendered.rfind(stripped) else {
        return Err(Error::invalid(
            "continue_final_message",
            "is set, but the final message's text does not appear in the rendered prompt (the \
             chat template changes it or leaves it out), so it cannot be continued",
        ));
    };
    let leads = last.len() != last.trim_start().len();
    let end = match !leads && rendered[at..].starts_with(last) {
        true => at + last.len(),
        false => at + stripped.len(),
    };
    rendered.truncate(end);
    Ok(rendered)
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the texts of the model's special tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face's environment: a block tag's own line leaves no
        // newline or indentation behind.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        // Lists and objects print as Python writes them (`{'city': 'Paris'}`),
        // in `{{ … }}` and through `string`.
        env.set_formatter(|out, state, value| match python_str(value) {
            Some(text) => std::fmt::Write::write_str(out, &text)
                .map_err(|_| JinjaError::new(ErrorKind::WriteFailure, "cannot write")),
            None => minijinja::escape_formatter(out, state, value),
        });
        env.add_filter("string", |value: JinjaValue| {
            python_str(&value).unwrap_or_else(|| value.to_string())
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson_filter);
        // Jinja2's `iterable`: none is not (minijinja iterates it as empty),
        // so `tools is iterable and tools | length > 0` holds for no tools.
        env.add_test("iterable", |value: JinjaValue| {
            !value.is_none() && value.try_iter().is_ok()
        });
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned("chat", without_generation_tags(source))
            .map_err(|e| Error::Template(format!("cannot compile: {e}")))?;
        let mentions_tools = env
            .get_template("chat")
            .map(|t| t.undeclared_variables(false).contains("tools"))
            .unwrap_or(false);
        Ok(Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
            mentions_tools,
        })
    }

    /// Whether the template reads the `tools` variable at all (if not,
    /// tools reach the model through [`crate::tools::fold_into_messages`]).
    pub fn mentions_tools(&self) -> bool {
        self.mentions_tools
    }

    /// Renders `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt` is set.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, &RenderOptions::opening(add_generation_prompt))
    }

    /// Renders `messages` as `options` say: [`ChatTemplate::render`] with
    /// every argument of Hugging Face's `apply_chat_template` that a
    /// request can give.
    pub fn render_with(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<String> {
        let last = messages.last().map(|m| m.content.as_str());
        self.render_conversation(JinjaValue::from_serialize(messages), last, None, options)
    }

    /// Renders `messages` with their tool fields and, when given, `tools`
    /// as the template variable `tools`: OpenAI's list `[{"type":
    /// "function", "function": {"name", "description", "parameters"}}]`,
    /// which HF templates iterate over. Each message's `tool_calls` are
    /// OpenAI's `[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]` with `arguments` the parsed JSON object; without
    /// `tools` the variable is undefined, as in [`ChatTemplate::render`].
    pub fn render_with_tools(
        &self,
        messages: &[ChatTurn],
        tools: Option<&[Tool]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_turns(
            messages,
            tools,
            &RenderOptions::opening(add_generation_prompt),
        )
    }

    /// [`ChatTemplate::render_with_tools`] as `options` say.
    pub fn render_turns(
        &self,
        messages: &[ChatTurn],
        tools: Option<&[Tool]>,
        options: &RenderOptions,
    ) -> Result<String> {
        let last = messages.last().map(|m| m.content.as_str());
        let messages: Vec<JinjaValue> = messages.iter().map(ChatTurn::to_jinja).collect();
        let tools = tools.map(|tools| {
            tools
                .iter()
                .map(|t| json_to_jinja(&t.to_openai()))
                .collect::<Vec<JinjaValue>>()
        });
        self.render_conversation(JinjaValue::from(messages), last, tools, options)
    }

    /// Renders a conversation whose final message's text is `last` (`None`:
    /// no message), with `tools` none when not given, as transformers
    /// renders it (and `documents` none).
    fn render_conversation(
        &self,
        messages: JinjaValue,
        last: Option<&str>,
        tools: Option<Vec<JinjaValue>>,
        options: &RenderOptions,
    ) -> Result<String> {
        let Some(last) = last else {
            return Err(Error::invalid("messages", "must hold at least one message"));
        };
        options.check()?;
        let extra = JinjaValue::from_object(OrderedMap(
            options
                .kwargs
                .iter()
                .map(|(k, v)| (k.clone(), json_to_jinja(v)))
                .collect(),
        ));
        let base = context! {
            messages => messages,
            add_generation_prompt => options.add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
            ..extra
        };
        let ctx = context! {
            tools => tools,
            // (A `documents` variable of the request's own stays.)
            documents => options.kwargs.get("documents").map(json_to_jinja),
            ..base
        };
        let text = self.render_context(ctx)?;
        match options.continue_final_message {
            true => continue_final(text, last),
            false => Ok(text),
        }
    }

    fn render_context(&self, ctx: JinjaValue) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut out = Capped::default();
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|e| Error::Template(format!("cannot render: {e}"))),
            Err(_) if out.full => Err(Error::Template(format!(
                "cannot render: it writes more than {} MiB",
                RENDER_MAX_BYTES >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::Template(format!(
                "cannot render: it runs more than {RENDER_FUEL} instructions (a runaway loop?)"
            ))),
            Err(e) => Err(Error::Template(format!("cannot render: {e}"))),
        }
    }
}

/// Python's `str` of a list or object (`None` for any other value, which
/// prints as minijinja prints it).
fn python_str(value: &JinjaValue) -> Option<String> {
    use minijinja::value::ValueKind;
    matches!(value.kind(), ValueKind::Map | ValueKind::Seq).then(|| {
        let mut text = String::new();
        python_repr(value, &mut text);
        text
    })
}

/// `value` as Python's `repr` writes it (the `str` of a list or dict, what
/// Hugging Face templates print): strings quoted, `True`/`False`/`None`.
fn python_repr(value: &JinjaValue, out: &mut String) {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, k) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&k, out);
                    out.push_str(": ");
                    python_repr(&value.get_item(&k).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, v) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&v, out);
                }
            }
            out.push(']');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// A string as Python's `repr` quotes it: in single quotes, unless it holds
/// one and no double quote; backslashes, the quote and unprintable
/// characters escaped.
fn python_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            // What Python counts unprintable: other spaces, format and
            // private-use characters.
            '\u{1680}'
            | '\u{2000}'..='\u{200f}'
            | '\u{2028}'..='\u{202f}'
            | '\u{205f}'..='\u{2064}'
            | '\u{3000}'
            | '\u{feff}'
            | '\u{e000}'..='\u{f8ff}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `source` with transformers' `{% generation %}` … `{% endgeneration %}`
/// (which only marks the assistant's text for training masks) made an
/// `{% if true %}` … `{% endif %}`, their whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open} if true {close}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open} endif {close}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `strftime_now(format)`: the time now (UTC) in Python's
/// `strftime` format, for the codes templates use (`%d %b %Y`, `%Y-%m-%d`,
/// `%B %d, %Y`, …); another code is written as it stands.
fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    strftime(format, secs)
}

/// `secs` after the Unix epoch (UTC) in `format` ([`strftime_now`]).
fn strftime(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (secs / 86_400) as i64;
    let (h, mi, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(m - 1) as usize];
    let yday = before + d + i64::from(leap && m > 2);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let wday = (days + 3).rem_euclid(7) as usize;
    let month = MONTHS[(m - 1) as usize];
    let hour12 = if h % 12 == 0 { 12 } else { h % 12 };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[wday]),
            Some('a') => out.push_str(&DAYS[wday][..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{hour12:02}")),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Instructions one render may run (minijinja's fuel): a conversation of
/// thousands of messages with tools takes a few million; a runaway loop in
/// a model file's template stops here instead of holding a thread.
const RENDER_FUEL: u64 = 100_000_000;

/// Bytes one render may write.
const RENDER_MAX_BYTES: usize = 256 << 20;

/// A render's output, refusing to grow beyond [`RENDER_MAX_BYTES`].
#[derive(Default)]
struct Capped {
    bytes: Vec<u8>,
    full: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > RENDER_MAX_BYTES {
            self.full = true;
            return Err(std::io::Error::other("the render's output is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runaway_templates_are_stopped() {
        let user = [ChatMessage::new("user", "x")];
        let looping = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(looping, "", "")
            .unwrap()
            .render(&user, true)
            .unwrap_err();
        assert!(e.to_string().contains("instructions"), "{e}");
        let huge = "{% for a in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}";
        let e = ChatTemplate::new(huge, "", "")
            .unwrap()
            .render(&user, true)
            .unwrap_err();
        assert!(e.to_string().contains("MiB"), "{e}");
        // A long conversation with a real template stays well inside.
        let t = ChatTemplate::new(QWEN25, "", "").unwrap();
        let long: Vec<ChatMessage> = (0..20_000)
            .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello"))
            .collect();
        assert!(t.render(&long, true).is_ok());
    }

    #[test]
    fn chatml_renders() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", " hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(t.render(&[], true).is_err());
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "").unwrap();
        let err = t
            .render(&[ChatMessage::new("user", "x")], true)
            .unwrap_err();
        assert!(err.to_string().contains("no system role"));
    }

    /// Gemma's template (as its GGUF conversions ship it): no system role,
    /// alternating turns, `model` for the assistant.
    const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

    #[test]
    fn gemmas_template_renders_and_refuses_a_system_role() {
        let t = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
        let out = t
            .render(
                &[
                    ChatMessage::new("user", " Hi "),
                    ChatMessage::new("assistant", "Hello"),
                    ChatMessage::new("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let err = t
            .render(
                &[
                    ChatMessage::new("system", "s"),
                    ChatMessage::new("user", "u"),
                ],
                true,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("System role not supported"), "{err}");
        // Tools folded for a template that does not read them go into the
        // first user turn when it takes no system role.
        let folded = crate::tools::fold_into_messages(
            &[ChatTurn::new("user", "Weather?")],
            &[weather_tool()],
            crate::tools::ToolFormat::Hermes,
        );
        assert!(t.render(&folded, true).is_err());
        let moved = crate::tools::system_into_first_user(folded).unwrap();
        let out = t.render(&moved, true).unwrap();
        assert!(
            out.starts_with("<bos><start_of_turn>user\n# Tools")
                && out.contains("\n\nWeather?<end_of_turn>"),
            "{out}"
        );
    }

    /// Qwen2.5-Instruct's and Qwen3's templates as their model repositories
    /// ship them (copies kept in `tests/data/chat/`): a default system
    /// prompt, ChatML turns; Qwen3's walks the messages backwards with a
    /// `namespace`, slices, and splits `<think>` reasoning out of assistant
    /// turns with Python string methods.
    const QWEN25: &str = include_str!("../../tests/data/chat/qwen2.5-instruct.jinja");
    const QWEN3: &str = include_str!("../../tests/data/chat/qwen3.jinja");

    #[test]
    fn qwens_templates_render() {
        let turns = [
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
            ChatMessage::new("user", "Bye"),
        ];
        let t = ChatTemplate::new(QWEN25.trim_end(), "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&turns, true).unwrap(),
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n\
             <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );

        let t = ChatTemplate::new(QWEN3.trim_end(), "", "<|im_end|>").unwrap();
        let earlier_thought = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Q1"),
            ChatMessage::new("assistant", "<think>\nreasoning\n</think>\n\nAnswer"),
            ChatMessage::new("user", "Q2"),
        ];
        // Reasoning before the last question is dropped.
        assert_eq!(
            t.render(&earlier_thought, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n\
             <|im_start|>assistant\nAnswer<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // ... and kept after it.
        let last_thought = [
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", "<think>\nr\n</think>\n\nA"),
        ];
        assert_eq!(
            t.render(&last_thought, false).unwrap(),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n"
        );
        // A thought sent back as the server answered it, apart from the
        // content, reaches the template as `reasoning_content`.
        let sent_back = [
            ChatTurn::new("user", "Q"),
            ChatTurn::new("assistant", "A").with_reasoning(Some("r".into())),
        ];
        assert_eq!(
            t.render_with_tools(&sent_back, None, false).unwrap(),
            t.render(&last_thought, false).unwrap()
        );
    }

    #[test]
    fn render_options_give_template_variables_and_continue_the_final_message() {
        // Qwen3's `enable_thinking = false` writes an empty thought.
        let t = ChatTemplate::new(QWEN3.trim_end(), "", "<|im_end|>").unwrap();
        let q = [ChatMessage::new("user", "Q")];
        let mut no_thinking = RenderOptions::default();
        no_thinking
            .kwargs
            .insert("enable_thinking".into(), false.into());
        assert_eq!(
            t.render_with(&q, &no_thinking).unwrap(),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        assert_eq!(
            t.render_with(&q, &RenderOptions::default()).unwrap(),
            t.render(&q, true).unwrap()
        );

        // Continuing: cut after the final message's text, its trailing
        // space kept where the template keeps it (HF's rule).
        let begun = [
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", "The answer is "),
        ];
        let cont = RenderOptions {
            add_generation_prompt: false,
            continue_final_message: true,
            ..RenderOptions::default()
        };
        let keeps = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}";
        let keeps = ChatTemplate::new(keeps, "", "</s>").unwrap();
        assert_eq!(
            keeps.render_with(&begun, &cont).unwrap(),
            "<user>Q</s><assistant>The answer is "
        );
        // Space in front too: cut at the stripped text, as transformers does.
        let both_ends = [
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", " The answer is "),
        ];
        assert_eq!(
            keeps.render_with(&both_ends, &cont).unwrap(),
            "<user>Q</s><assistant> The answer is"
        );
        let strips = ChatTemplate::new(GEMMA, "<bos>", "<eos>").unwrap();
        assert_eq!(
            strips.render_with(&begun, &cont).unwrap(),
            "<bos><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nThe answer is"
        );
        let turns: Vec<ChatTurn> = begun.iter().map(ChatTurn::from).collect();
        assert_eq!(
            strips.render_turns(&turns, None, &cont).unwrap(),
            strips.render_with(&begun, &cont).unwrap()
        );

        // What cannot be rendered names its field.
        let field = |r: Result<String>| match r {
            Err(Error::InvalidRequest { field, reason }) => format!("{field}: {reason}"),
            other => panic!("not refused: {other:?}"),
        };
        let both = RenderOptions {
            add_generation_prompt: true,
            ..cont.clone()
        };
        let err = field(keeps.render_with(&begun, &both));
        assert!(
            err.starts_with("continue_final_message: cannot go with `add_generation_prompt`"),
            "{err}"
        );
        for name in RenderOptions::RESERVED {
            let mut opts = RenderOptions::default();
            opts.kwargs.insert(name.into(), 1.into());
            let err = field(keeps.render_with(&q, &opts));
            assert!(
                err.starts_with(&format!("chat_template_kwargs: may not hold `{name}`")),
                "{err}"
            );
        }
        let empty = [
            ChatMessage::new("user", "Q"),
            ChatMessage::new("assistant", " "),
        ];
        let err = field(keeps.render_with(&empty, &cont));
        assert!(err.contains("no text to continue"), "{err}");
        let drops =
            ChatTemplate::new("{% for m in messages %}[{{ m.role }}]{% endfor %}", "", "").unwrap();
        let err = field(drops.render_with(&begun, &cont));
        assert!(
            err.contains("does not appear in the rendered prompt"),
            "{err}"
        );
    }

    fn weather_tool() -> Tool {
        Tool::from_openai(&serde_json::json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}}}))
        .unwrap()
    }

    fn tool_conversation() -> Vec<ChatTurn> {
        vec![
            ChatTurn::new("user", "Weather in Zürich?"),
            ChatTurn::new("assistant", "").with_tool_calls(vec![ToolCall {
                id: "call_7".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Zürich"}"#.into(),
            }]),
            ChatTurn::tool_result("call_7", "{\"temp\": 21}").with_name("get_weather"),
        ]
    }

    /// A short template of our own in Qwen2.5's manner: tools listed with
    /// `tojson`, calls read from `tool_call.function`, tool messages with
    /// their id and name.
    const TOOLY: &str = "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}\
        {%- for m in messages %}<|im_start|>{{ m.role }}\n\
        {% if m.role == 'tool' %}[{{ m.tool_call_id }} {{ m.name }}] {% endif %}{{ m.content }}\
        {% for c in m.tool_calls %}<call id={{ c.id }} type={{ c.type }}>{{ c.function.name }} {{ c.function.arguments | tojson }} {{ c.function.arguments.city }}</call>{% endfor %}<|im_end|>\n\
        {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_as_hugging_faces_environment_does() {
        let render = |src: &str| {
            ChatTemplate::new(src, "", "")
                .unwrap()
                .render(&[ChatMessage::new("user", "hi")], false)
                .unwrap()
        };
        // trim_blocks and lstrip_blocks, as transformers sets them.
        assert_eq!(
            render("A  {%- if true %}  B  {% endif -%}  C\n  {% if true %}\n  D\n  {% endif %}\nE"),
            "A  B  C\n  D\nE"
        );
        // Objects a template builds keep their keys' order.
        assert_eq!(
            render("{{ {'name': 'f', 'arguments': {'b': 1, 'a': 2}} | tojson }}"),
            "{\"name\": \"f\", \"arguments\": {\"b\": 1, \"a\": 2}}"
        );
        // Lists and objects as Python prints them (`str`), in `{{ }}` and
        // through `string`; strings as they are.
        assert_eq!(
            render("{{ {'city': 'Zürich', 'unit': 'c'} }}|{{ [1, 2.5, true, none] | string }}|{{ {'a': [1, {'b': none}]} }}|{{ 'plain' }}"),
            "{'city': 'Zürich', 'unit': 'c'}|[1, 2.5, True, None]|{'a': [1, {'b': None}]}|plain"
        );
        assert_eq!(
            render(
                r#"{{ ['a', "it's", 'say "x"', "both ' \"", 'a\nb\\c\t', '\u200bz\u00a0\u3000\ue000'] }}"#
            ),
            r#"['a', "it's", 'say "x"', 'both \' "', 'a\nb\\c\t', '\u200bz\xa0\u3000\ue000']"#
        );
        // transformers' training tag marks text and renders it.
        assert_eq!(
            render("{% for m in messages %}{%- generation -%} [{{ m.content }}] {% endgeneration %}{% endfor %}"),
            "[hi] "
        );
        // Llama 3.1's date line.
        let today = render("{{ strftime_now('%d %b %Y') }}");
        assert_eq!(today.len(), 11, "{today}");
        for (secs, want) in [
            (
                0,
                "01 Jan 1970|1970-01-01 00:00:00|Thursday Thu January 001 12 AM 70  1",
            ),
            (
                1_721_955_723,
                "26 Jul 2024|2024-07-26 01:02:03|Friday Fri July 208 01 AM 24 26",
            ),
            (
                951_868_799,
                "29 Feb 2000|2000-02-29 23:59:59|Tuesday Tue February 060 11 PM 00 29",
            ),
            (
                4_107_542_400,
                "01 Mar 2100|2100-03-01 00:00:00|Monday Mon March 060 12 AM 00  1",
            ),
        ] {
            // (Python's `datetime.strftime` on the same instants, UTC.)
            let got = strftime("%d %b %Y|%Y-%m-%d %H:%M:%S|%A %a %B %j %I %p %y %e", secs);
            assert_eq!(got, want, "{secs}");
        }
    }

    #[test]
    fn renders_tools_and_tool_messages() {
        let t = ChatTemplate::new(TOOLY, "", "<|im_end|>").unwrap();
        assert!(t.mentions_tools());
        let out = t
            .render_with_tools(&tool_conversation(), Some(&[weather_tool()]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nTools:{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}<|im_end|>\n\
             <|im_start|>user\nWeather in Zürich?<|im_end|>\n\
             <|im_start|>assistant\n<call id=call_7 type=function>get_weather {\"city\": \"Zürich\"} Zürich</call><|im_end|>\n\
             <|im_start|>tool\n[call_7 get_weather] {\"temp\": 21}<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without tools the variable is undefined, as in `render`.
        let out = t
            .render_with_tools(&[ChatTurn::new("user", "hi")], None, false)
            .unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n");
        assert!(t.render_with_tools(&[], None, true).is_err());
    }

    #[test]
    fn qwens_template_renders_tools_as_hf_does() {
        let t = ChatTemplate::new(QWEN25.trim_end(), "", "<|im_end|>").unwrap();
        assert!(t.mentions_tools());
        let out = t
            .render_with_tools(&tool_conversation(), Some(&[weather_tool()]), true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n\
             # Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n\
             {\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather in a city.\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n\
             </tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n\
             <|im_start|>user\nWeather in Zürich?<|im_end|>\n\
             <|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}\n</tool_call><|im_end|>\n\
             <|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn tojson_writes_as_python_does() {
        let t = ChatTemplate::new(
            "{{ tools[0] | tojson(indent=2) }}|{{ tools[0].function.parameters | tojson(sort_keys=true, separators=[',', ':']) }}|{{ '<a&b>' | tojson }}",
            "",
            "",
        )
        .unwrap();
        let tool = Tool::from_openai(&serde_json::json!({"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}))
        .unwrap();
        let out = t
            .render_with_tools(&[ChatTurn::new("user", "x")], Some(&[tool]), false)
            .unwrap();
        assert_eq!(
            out,
            "{\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"f\",\n    \"parameters\": {\n      \"type\": \"object\",\n      \"properties\": {}\n    }\n  }\n}\
             |{\"properties\":{},\"type\":\"object\"}|\"<a&b>\""
        );
        // Python's `ensure_ascii=True`: \u escapes, surrogate pairs past
        // the BMP; off by default.
        let t = ChatTemplate::new(
            "{{ {'k': 'Zürich 😀\x7f'} | tojson(ensure_ascii=true) }}|{{ 'é' | tojson }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false).unwrap(),
            "{\"k\": \"Z\\u00fcrich \\ud83d\\ude00\\u007f\"}|\"é\""
        );
        let t = ChatTemplate::new(CHATML_TOOLLESS, "", "").unwrap();
        assert!(!t.mentions_tools());
    }

    /// As transformers renders: `tools` and `documents` are none when not
    /// given, so a template may test `tools is not none` (or, as Jinja2
    /// has it, `tools is iterable`) before their length; a request's own
    /// `documents` stay.
    #[test]
    fn tools_and_documents_are_none_when_not_given() {
        let t = ChatTemplate::new(
            "{{ tools is none }} {{ tools is not none and tools | length > 0 }} {{ documents }}",
            "",
            "",
        )
        .unwrap();
        let user = [ChatTurn::new("user", "x")];
        let render = |options: &RenderOptions| t.render_turns(&user, None, options).unwrap();
        assert_eq!(render(&RenderOptions::default()), "True False None");
        let t = ChatTemplate::new(
            "{{ tools is iterable and tools | length > 0 }} {{ [1] is iterable }} \
             {{ 'ab' is iterable }} {{ {} is iterable }} {{ 1 is iterable }} {{ nothing is iterable }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render_turns(&user, None, &RenderOptions::default())
                .unwrap(),
            "False True True True False True"
        );
        let mut docs = RenderOptions::default();
        docs.kwargs
            .insert("documents".into(), serde_json::json!([{"text": "d"}]));
        assert_eq!(render(&docs), "True False [{'text': 'd'}]");
    }

    /// DeepSeek-R1's template (as its distillations ship it) opens the
    /// thought for the model; Qwen3's leaves it to the model; both imply
    /// reading thoughts.
    #[test]
    fn reasoning_templates_imply_thoughts_and_say_who_opens_them() {
        use crate::reasoning::ReasoningFormat;
        let q = [ChatMessage::new("user", "Q")];
        for (src, opened) in [(DEEPSEEK_R1, true), (QWEN3, false)] {
            let format = ReasoningFormat::detect(Some(src));
            assert_eq!(format, ReasoningFormat::Think);
            let prompt = ChatTemplate::new(src.trim_end(), "<s>", "</s>")
                .unwrap()
                .render(&q, true)
                .unwrap();
            assert_eq!(format.opened_by(&prompt), opened, "{prompt:?}");
        }
        assert_eq!(ReasoningFormat::detect(Some(QWEN25)), ReasoningFormat::None);
    }

    /// Templates of several families as their model repositories ship them
    /// (copies in `tests/data/chat/`) render a plain conversation and one
    /// with a call and its result, without tools too: they test `tools`
    /// against none, `is iterable`, `tojson` of the tools, `namespace`s,
    /// Python string methods and `strftime_now`.
    #[test]
    fn real_templates_render_plain_and_tool_conversations() {
        let tool = Tool::from_openai(&serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "The city"}}, "required": ["city"]}}}))
        .unwrap();
        let plain = [
            ChatTurn::new("system", "Be brief."),
            ChatTurn::new("user", "Hi"),
            ChatTurn::new("assistant", "Hello").with_reasoning(Some("greet".into())),
            ChatTurn::new("user", "Bye now"),
        ];
        let calls = [
            ChatTurn::new("user", "Weather in Paris?"),
            ChatTurn::new("assistant", "").with_tool_calls(vec![ToolCall {
                id: "call_abc123def".into(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            }]),
            ChatTurn::tool_result("call_abc123def", "sunny, 21 C").with_name("get_weather"),
        ];
        let d = |f: &str| {
            std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/data/chat")
                    .join(f),
            )
            .unwrap()
        };
        for file in [
            "qwen3-coder.jinja",
            "gpt-oss.jinja",
            "granite-4.0.jinja",
            "smollm3.jinja",
            "apriel-1.5.jinja",
            "deepseek-r1-distill-llama.jinja",
            "mistral-nemo-instruct.jinja",
        ] {
            let t = ChatTemplate::new(&d(file), "<s>", "</s>").unwrap();
            let options = RenderOptions::default();
            let text = t
                .render_turns(&plain, None, &options)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(text.contains("Bye now"), "{file}: {text}");
            for tools in [Some(std::slice::from_ref(&tool)), None] {
                let calls = crate::tools::with_mistral_ids(&calls);
                let text = t
                    .render_turns(&calls, tools, &options)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
                assert!(text.contains("sunny, 21 C"), "{file}: {text}");
                // (SmolLM3's knows no `tools`: the server folds them.)
                assert_eq!(
                    text.contains("The weather in a city"),
                    tools.is_some() && t.mentions_tools(),
                    "{file}: {text}"
                );
            }
        }
    }

    /// DeepSeek-R1-Distill-Llama-8B's template (a copy in `tests/data/chat/`).
    const DEEPSEEK_R1: &str = include_str!("../../tests/data/chat/deepseek-r1-distill-llama.jinja");

    const CHATML_TOOLLESS: &str =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
}
