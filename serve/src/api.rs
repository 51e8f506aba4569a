//! The OpenAI request bodies the server accepts, checked once into a [`Generate`]: what the
//! engine decodes. Every sampling field of the OpenAI API that recontrol supports works; the
//! others are refused by name (never ignored), and fields the API does not have are refused as
//! unknown. Type errors name the field (`serde_path_to_error`).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most stop sequences a request may give (the OpenAI API's limit).
pub const MAX_STOP: usize = 4;

/// A field of the OpenAI API that recontrol does not implement, set to something other than the
/// value that means "off" (accepted, since clients may send it explicitly): refused by name.
fn unsupported(name: &str, value: &Value) -> Option<ApiError> {
    let off = match name {
        "frequency_penalty" | "presence_penalty" => value.as_f64() == Some(0.0),
        "logprobs" => matches!(value, Value::Bool(false)),
        "best_of" => value.as_u64() == Some(1),
        "echo" => matches!(value, Value::Bool(false)),
        "parallel_tool_calls" => true,
        "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
        "logit_bias" | "top_logprobs" | "tools" | "tool_choice" | "functions" | "function_call"
        | "suffix" | "metadata" | "store" | "service_tier" | "modalities" | "audio"
        | "prediction" | "reasoning_effort" | "web_search_options" => false,
        _ => return None,
    };
    (!off && !value.is_null()).then(|| {
        ApiError::bad_request(
            format!("`{name}` is not supported by this server (recontrol)"),
            Some(name),
        )
        .with_code("unsupported_parameter")
    })
}

/// Per-request RE-Control: which value head, how strongly, how many steps.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// A value head's name (`--value NAME=ARTIFACT`).
    pub value: String,
    /// Step size of `h <- h + alpha * dV/dh`.
    pub alpha: f64,
    /// Gradient steps per token.
    pub steps: usize,
    /// Bound on each row's total edit `||h' - h||_2`.
    #[serde(default)]
    pub max_edit_norm: Option<f64>,
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share, as the body has them.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// An extension (as in vLLM): sample from the k most likely tokens only.
    top_k: Option<u64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    control: Option<ControlRequest>,
    #[serde(default)]
    control_trace: bool,
    /// End-user id: accepted (OpenAI clients send it) and not used.
    #[allow(dead_code)]
    user: Option<String>,
}

/// A chat message's content: a string, or text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Option<Content>,
    #[allow(dead_code)]
    name: Option<String>,
}

/// `prompt` of `/v1/completions`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

/// A prompt as the model gets it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, tokenised with the tokenizer's special tokens (as `recontrol generate` without
    /// `--chat`), or without them for a chat rendering (which carries its own).
    Text {
        text: String,
        special_tokens: bool,
    },
    Ids(Vec<i64>),
}

/// Renders chat turns `(role, text)` with the model's chat template.
pub type Render<'a> = dyn Fn(&[(String, String)]) -> Result<String, ApiError> + 'a;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A checked request: what to decode and how to answer.
#[derive(Debug, Clone)]
pub struct Generate {
    pub endpoint: Endpoint,
    /// Chat: one rendering; completions: one per prompt. Each gets `n` choices.
    pub prompts: Vec<Prompt>,
    pub n: usize,
    /// `None`: as many as the model's positions allow, up to the server's default.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// Choice `j` of prompt `p` samples from stream `p * n + j` of this seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub control: Option<ControlRequest>,
    pub control_trace: bool,
}

/// Limits the server puts on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The served model's name; requests must name it.
    pub model_name: String,
    /// Most choices per request.
    pub max_n: usize,
    /// Most gradient steps per token a request may ask for.
    pub max_steps: usize,
    /// Largest |alpha| a request may ask for.
    pub max_alpha: f64,
}

impl Generate {
    /// Parses and checks a body for `endpoint`. `render` turns chat messages `(role, text)` into
    /// the model's chat template text.
    pub fn parse(
        body: &[u8],
        endpoint: Endpoint,
        limits: &Limits,
        render: &Render<'_>,
    ) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"), None)
        })?;
        let Value::Object(mut map) = value else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object".to_owned(),
                None,
            ));
        };
        let own = match endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        };
        let mut specific = Map::new();
        for (key, value) in map.iter() {
            if let Some(refused) = unsupported(key, value) {
                return Err(refused);
            }
        }
        for name in [
            "frequency_penalty",
            "presence_penalty",
            "logprobs",
            "best_of",
            "echo",
            "parallel_tool_calls",
            "response_format",
        ] {
            map.remove(name);
        }
        if let Some(v) = map.remove(own) {
            specific.insert(own.to_owned(), v);
        }
        const KNOWN: &[&str] = &[
            "model",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
            "control",
            "control_trace",
            "user",
        ];
        if let Some(unknown) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            let other = match endpoint {
                Endpoint::Chat => "prompt",
                Endpoint::Completions => "messages",
            };
            let hint = if unknown == other {
                format!(" (this endpoint takes `{own}`)")
            } else {
                String::new()
            };
            return Err(ApiError::bad_request(
                format!("unknown parameter `{unknown}`{hint}"),
                Some(unknown),
            )
            .with_code("unknown_parameter"));
        }
        let common: Common = typed(Value::Object(map))?;
        if common.model != limits.model_name {
            return Err(ApiError::model_not_found(&common.model));
        }
        let prompts = match endpoint {
            Endpoint::Chat => {
                let messages: Vec<Message> = typed_field(&mut specific, "messages")?;
                vec![Prompt::Text {
                    text: render(&chat_turns(messages)?)?,
                    special_tokens: false,
                }]
            }
            Endpoint::Completions => completion_prompts(typed_field(&mut specific, "prompt")?)?,
        };
        build(endpoint, common, prompts, limits)
    }
}

/// Deserialises `value`, naming the field whose type is wrong (under `field`, if given).
fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    typed_at(value, None)
}

fn typed_at<T: serde::de::DeserializeOwned>(
    value: Value,
    field: Option<&str>,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let path = match (field, inner.as_str()) {
            (None, ".") => None,
            (None, p) => Some(p.to_owned()),
            (Some(f), ".") => Some(f.to_owned()),
            (Some(f), p) if p.starts_with('[') => Some(format!("{f}{p}")),
            (Some(f), p) => Some(format!("{f}.{p}")),
        };
        let mut message = e.inner().to_string();
        if message.contains("untagged enum") {
            message = match path.as_deref() {
                Some("prompt") => "must be a string, a list of strings, a list of token ids or a \
                    list of lists of token ids"
                    .to_owned(),
                Some("stop") => "must be a string or a list of strings".to_owned(),
                _ => "has the wrong type".to_owned(),
            };
        }
        match path {
            Some(p) => ApiError::bad_request(format!("`{p}`: {message}"), Some(&p)),
            None => ApiError::bad_request(message, None),
        }
    })
}

/// The required field `name` of `map`, deserialised.
fn typed_field<T: serde::de::DeserializeOwned>(
    map: &mut Map<String, Value>,
    name: &str,
) -> Result<T, ApiError> {
    let value = map.remove(name).ok_or_else(|| {
        ApiError::bad_request(format!("missing required parameter `{name}`"), Some(name))
    })?;
    typed_at(value, Some(name))
}

/// Chat messages as `(role, text)` turns.
fn chat_turns(messages: Vec<Message>) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "`messages` must hold at least one message".to_owned(),
            Some("messages"),
        ));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let param = format!("messages[{i}]");
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(ApiError::bad_request(
                format!(
                    "`{param}.role` is {:?}; this server takes system, developer, user and assistant messages",
                    m.role
                ),
                Some(&format!("{param}.role")),
            ));
        }
        let text = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        _ => {
                            return Err(ApiError::bad_request(
                                format!("`{param}.content[{j}]`: only text parts are supported"),
                                Some(&format!("{param}.content[{j}]")),
                            ))
                        }
                    }
                }
                text
            }
        };
        // The developer role is the system role of models that predate it.
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        turns.push((role, text));
    }
    Ok(turns)
}

fn completion_prompts(field: PromptField) -> Result<Vec<Prompt>, ApiError> {
    let text = |text: String| Prompt::Text {
        text,
        special_tokens: true,
    };
    let prompts: Vec<Prompt> = match field {
        PromptField::Text(t) => vec![text(t)],
        PromptField::Texts(ts) => ts.into_iter().map(text).collect(),
        PromptField::Ids(ids) => vec![Prompt::Ids(ids)],
        PromptField::IdLists(lists) => lists.into_iter().map(Prompt::Ids).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request(
            "`prompt` must hold at least one prompt".to_owned(),
            Some("prompt"),
        ));
    }
    Ok(prompts)
}

fn build(
    endpoint: Endpoint,
    c: Common,
    prompts: Vec<Prompt>,
    limits: &Limits,
) -> Result<Generate, ApiError> {
    let range = |name: &str, ok: bool, expected: &str, got: String| {
        if ok {
            Ok(())
        } else {
            Err(ApiError::bad_request(
                format!("`{name}` must be {expected}, got {got}"),
                Some(name),
            ))
        }
    };
    let (max_name, max_tokens) = match (c.max_tokens, c.max_completion_tokens) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give `max_tokens` or `max_completion_tokens`, not both".to_owned(),
                Some("max_completion_tokens"),
            ))
        }
        (Some(m), None) => ("max_tokens", Some(m)),
        (None, m) => ("max_completion_tokens", m),
    };
    if let Some(m) = max_tokens {
        range(max_name, m >= 1, "at least 1", m.to_string())?;
    }
    let temperature = c.temperature.unwrap_or(1.0);
    range(
        "temperature",
        temperature.is_finite() && (0.0..=2.0).contains(&temperature),
        "between 0 and 2",
        temperature.to_string(),
    )?;
    if let Some(p) = c.top_p {
        range(
            "top_p",
            p.is_finite() && p > 0.0 && p <= 1.0,
            "in (0, 1]",
            p.to_string(),
        )?;
    }
    if let Some(k) = c.top_k {
        range("top_k", k >= 1, "at least 1", k.to_string())?;
    }
    let n = c.n.unwrap_or(1);
    range(
        "n",
        n >= 1 && n <= limits.max_n as u64,
        &format!("between 1 and {}", limits.max_n),
        n.to_string(),
    )?;
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    range(
        "stop",
        stop.len() <= MAX_STOP,
        &format!("at most {MAX_STOP} sequences"),
        format!("{}", stop.len()),
    )?;
    range(
        "stop",
        stop.iter().all(|s| !s.is_empty()),
        "non-empty strings",
        "an empty string".to_owned(),
    )?;
    if c.stream_options.is_some() && !c.stream {
        return Err(ApiError::bad_request(
            "`stream_options` is only allowed with `stream: true`".to_owned(),
            Some("stream_options"),
        ));
    }
    if let Some(control) = &c.control {
        range(
            "control.alpha",
            control.alpha.is_finite() && control.alpha.abs() <= limits.max_alpha,
            &format!("a finite number with |alpha| <= {}", limits.max_alpha),
            control.alpha.to_string(),
        )?;
        range(
            "control.steps",
            control.steps >= 1 && control.steps <= limits.max_steps,
            &format!("between 1 and {}", limits.max_steps),
            control.steps.to_string(),
        )?;
        if let Some(bound) = control.max_edit_norm {
            range(
                "control.max_edit_norm",
                bound.is_finite() && bound > 0.0,
                "a positive number or null",
                bound.to_string(),
            )?;
        }
    } else if c.control_trace {
        return Err(ApiError::bad_request(
            "`control_trace` needs `control`".to_owned(),
            Some("control_trace"),
        ));
    }
    Ok(Generate {
        endpoint,
        prompts,
        n: n as usize,
        max_tokens: max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        temperature,
        top_p: c.top_p,
        top_k: c.top_k.map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
        // OpenAI seeds are signed; the bits are the stream's seed.
        seed: c.seed.map(|s| s as u64),
        stop,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
        control: c.control,
        control_trace: c.control_trace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_name: "m".to_owned(),
            max_n: 4,
            max_steps: 100,
            max_alpha: 100.0,
        }
    }

    fn render(turns: &[(String, String)]) -> Result<String, ApiError> {
        Ok(turns
            .iter()
            .map(|(r, t)| format!("<{r}>{t}"))
            .collect::<String>())
    }

    fn parse(body: &str, endpoint: Endpoint) -> Result<Generate, ApiError> {
        Generate::parse(body.as_bytes(), endpoint, &limits(), &render)
    }

    #[test]
    fn a_chat_request_with_control_is_checked_into_what_the_engine_decodes() {
        let g = parse(
            r#"{"model":"m","messages":[{"role":"system","content":"be kind"},
                {"role":"user","content":[{"type":"text","text":"hi"}]}],
                "max_tokens":5,"temperature":0,"seed":-1,"stop":"x","n":2,
                "control":{"value":"v","alpha":0.5,"steps":3},"control_trace":true,
                "frequency_penalty":0,"logprobs":false}"#,
            Endpoint::Chat,
        )
        .expect("valid");
        assert_eq!(
            g.prompts,
            vec![Prompt::Text {
                text: "<system>be kind<user>hi".to_owned(),
                special_tokens: false
            }]
        );
        assert_eq!((g.n, g.max_tokens, g.temperature), (2, Some(5), 0.0));
        assert_eq!(g.seed, Some(u64::MAX));
        assert_eq!(g.stop, vec!["x".to_owned()]);
        assert_eq!(g.control.as_ref().map(|c| c.steps), Some(3));
        assert!(g.control_trace);
    }

    #[test]
    fn completions_take_texts_and_token_ids() {
        let g = parse(r#"{"model":"m","prompt":["a","b"]}"#, Endpoint::Completions).expect("valid");
        assert_eq!(g.prompts.len(), 2);
        assert_eq!(g.temperature, 1.0);
        let g = parse(
            r#"{"model":"m","prompt":[[1,2],[3]]}"#,
            Endpoint::Completions,
        )
        .expect("valid");
        assert_eq!(g.prompts[1], Prompt::Ids(vec![3]));
    }

    #[test]
    fn bad_requests_name_the_field_and_what_was_expected() {
        let cases: &[(&str, Endpoint, &str, u16)] = &[
            ("{", Endpoint::Chat, "not valid JSON", 400),
            ("[1]", Endpoint::Chat, "JSON object", 400),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
                Endpoint::Chat,
                "`temperature`",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Endpoint::Chat,
                "between 0 and 2",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"1":2}}"#,
                Endpoint::Chat,
                "`logit_bias` is not supported",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"presence_penalty":1}"#,
                Endpoint::Chat,
                "`presence_penalty` is not supported",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"bogus":1}"#,
                Endpoint::Chat,
                "unknown parameter `bogus`",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x"}"#,
                Endpoint::Chat,
                "takes `messages`",
                400,
            ),
            (
                r#"{"model":"other","prompt":"x"}"#,
                Endpoint::Completions,
                "does not exist",
                404,
            ),
            (
                r#"{"model":"m","prompt":"x","control":{"value":"v","alpha":1,"steps":0}}"#,
                Endpoint::Completions,
                "`control.steps` must be between 1 and 100",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","control":{"value":"v","alpha":1e9,"steps":1}}"#,
                Endpoint::Completions,
                "`control.alpha`",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","control":{"value":"v","alpha":1,"steps":1,"max_edit_norm":-1}}"#,
                Endpoint::Completions,
                "max_edit_norm",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","control":{"value":"v","alpha":1,"steps":1,"extra":1}}"#,
                Endpoint::Completions,
                "unknown field `extra`",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","control_trace":true}"#,
                Endpoint::Completions,
                "needs `control`",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","n":9}"#,
                Endpoint::Completions,
                "`n` must be between 1 and 4",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","max_tokens":0}"#,
                Endpoint::Completions,
                "`max_tokens` must be at least 1",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","stop":["a","b","c","d","e"]}"#,
                Endpoint::Completions,
                "at most 4",
                400,
            ),
            (
                r#"{"model":"m","prompt":[]}"#,
                Endpoint::Completions,
                "at least one prompt",
                400,
            ),
            (
                r#"{"model":"m","messages":[]}"#,
                Endpoint::Chat,
                "at least one message",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#,
                Endpoint::Chat,
                "messages[0].role",
                400,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Endpoint::Chat,
                "only text parts",
                400,
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Endpoint::Chat,
                "model",
                400,
            ),
            (
                r#"{"model":"m","prompt":"x","stream_options":{"include_usage":true}}"#,
                Endpoint::Completions,
                "only allowed with `stream: true`",
                400,
            ),
        ];
        for (body, endpoint, needle, status) in cases {
            let err = parse(body, *endpoint).expect_err(body);
            assert!(err.message.contains(needle), "{body}: {}", err.message);
            assert_eq!(err.status.as_u16(), *status, "{body}");
        }
    }
}
