//! The HTTP side: routes, authentication, request checks, and the answers (JSON or a stream of
//! server-sent events in the OpenAI chunk format) assembled from the engine's row events.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use recontrol_lm::sampling::Sampling;
use recontrol_lm::{ChatMessage, FinishReason, LmTokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::unbounded_channel;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{Endpoint, Generate, Limits, Prompt};
use crate::engine::{RowControl, RowEvent, RowJob, Shared, TraceStep};
use crate::error::ApiError;
use crate::text::ChoiceText;

/// What the server knows about its model and value heads.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub identity: String,
    pub max_positions: Option<usize>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Name, artifact path and what runs it, in `--value` order.
    pub heads: Vec<(String, String, String)>,
}

/// The server's settings that requests see.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub api_key: Option<String>,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// `max_tokens` of a request that gives none (capped by the model's positions).
    pub default_max_tokens: usize,
    pub limits: Limits,
}

/// Shared by every handler.
#[derive(Debug)]
pub struct AppState {
    pub info: ModelInfo,
    pub tokenizer: Arc<LmTokenizer>,
    pub settings: HttpSettings,
    pub shared: Arc<Shared>,
    /// Taken (dropped) on shutdown, so that the engine sees the channel close.
    pub jobs: Mutex<Option<std::sync::mpsc::Sender<RowJob>>>,
    /// Set on shutdown: new requests get 503.
    pub draining: AtomicBool,
    pub created: u64,
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.settings.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { ApiError::no_route(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Seconds since the Unix epoch (the API's `created`).
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn authorised(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.settings.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare every byte, so the time taken does not tell how much of a guess was right.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics.encode(),
    )
        .into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let answer = authorised(&state, &headers).map(|()| {
        let info = &state.info;
        let heads: Vec<Value> = info
            .heads
            .iter()
            .map(
                |(name, path, backend)| json!({"name": name, "artifact": path, "backend": backend}),
            )
            .collect();
        Json(json!({
            "object": "list",
            "data": [{
                "id": info.name,
                "object": "model",
                "created": state.created,
                "owned_by": "recontrol",
                "identity": info.identity,
                "max_positions": info.max_positions,
                "hidden_size": info.hidden_size,
                "value_heads": heads,
            }],
        }))
        .into_response()
    });
    let response = answer.unwrap_or_else(IntoResponse::into_response);
    state
        .shared
        .metrics
        .answered("/v1/models", response.status().as_u16());
    response
}

async fn chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(state, headers, body, Endpoint::Chat).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(state, headers, body, Endpoint::Completions).await
}

async fn answer(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let path = match endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    };
    let response = match generate(&state, &headers, body, endpoint).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    state
        .shared
        .metrics
        .answered(path, response.status().as_u16());
    response
}

/// A request's rows, submitted, with what is needed to answer.
struct Submitted {
    request: Generate,
    /// Prompt tokens per prompt.
    prompt_tokens: Vec<usize>,
    /// One receiver per choice, in choice order (prompt-major).
    events: Vec<tokio::sync::mpsc::UnboundedReceiver<RowEvent>>,
    cancels: Vec<Arc<AtomicBool>>,
}

async fn generate(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    authorised(state, headers)?;
    if state.draining.load(Ordering::SeqCst) {
        return Err(ApiError::shutting_down());
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.settings.max_body_bytes)
        } else {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"), None)
        }
    })?;
    let render = |turns: &[(String, String)]| -> Result<String, ApiError> {
        if !state.tokenizer.has_chat_template() {
            return Err(ApiError::bad_request(
                "this model has no chat template; use /v1/completions".to_owned(),
                Some("messages"),
            ));
        }
        let messages: Vec<ChatMessage> = turns
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.clone(),
                content: content.clone(),
            })
            .collect();
        state
            .tokenizer
            .apply_chat_template(&messages, true)
            .map_err(|e| ApiError::bad_request(format!("chat template: {e}"), Some("messages")))
    };
    let request = Generate::parse(&body, endpoint, &state.settings.limits, &render)?;
    let submitted = submit(state, request)?;
    let id = format!(
        "{}-{:x}",
        match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        },
        now_nanos()
    );
    let assembler = Assembler::new(state, &submitted, id);
    if submitted.request.stream {
        Ok(stream_response(submitted, assembler).into_response())
    } else {
        complete_response(submitted, assembler).await
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Tokenises the prompts, checks them against the model, and hands the rows to the engine.
fn submit(state: &AppState, request: Generate) -> Result<Submitted, ApiError> {
    let info = &state.info;
    let mut prompts = Vec::with_capacity(request.prompts.len());
    for (p, prompt) in request.prompts.iter().enumerate() {
        let ids = match prompt {
            Prompt::Text {
                text,
                special_tokens,
            } => state.tokenizer.encode(text, *special_tokens).map_err(|e| {
                ApiError::bad_request(format!("cannot tokenise the prompt: {e}"), None)
            })?,
            Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= info.vocab_size as i64) {
                    return Err(ApiError::bad_request(
                        format!(
                            "`prompt`: token id {bad} is outside the model's vocabulary of {}",
                            info.vocab_size
                        ),
                        Some("prompt"),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(ApiError::bad_request(
                format!("prompt {p} is empty after tokenisation"),
                Some("prompt"),
            ));
        }
        prompts.push(ids);
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_tokens = match (info.max_positions, request.max_tokens) {
        (Some(max), asked) => {
            let room = max.saturating_sub(longest);
            let param = if asked.is_some() {
                Some("max_tokens")
            } else {
                Some("messages")
            };
            let wanted = asked.unwrap_or(state.settings.default_max_tokens.min(room));
            if room == 0 || wanted > room {
                return Err(ApiError::bad_request(
                    format!(
                        "the prompt has {longest} tokens and {wanted} new tokens were asked for: more \
                         than the model's {max} positions"
                    ),
                    param,
                )
                .with_code("context_length_exceeded"));
            }
            wanted
        }
        (None, asked) => asked.unwrap_or(state.settings.default_max_tokens),
    };
    let control = match &request.control {
        None => None,
        Some(c) => {
            let head = info.heads.iter().position(|(name, _, _)| *name == c.value);
            let Some(head) = head else {
                let names: Vec<&str> = info.heads.iter().map(|(n, _, _)| n.as_str()).collect();
                return Err(ApiError::bad_request(
                    format!(
                        "`control.value`: no value head {:?} on this server (it has: {})",
                        c.value,
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                    Some("control.value"),
                )
                .with_code("unknown_value_head"));
            };
            Some(RowControl {
                head,
                alpha: c.alpha,
                steps: c.steps,
                max_edit_norm: c.max_edit_norm,
            })
        }
    };
    let seed = request.seed.unwrap_or(now_nanos() as u64);
    let sampling = Sampling::new(request.temperature, request.top_k, request.top_p, seed)
        .map_err(|e| ApiError::bad_request(e.to_string(), None))?;
    let rows = prompts.len() * request.n;
    let limit = state.settings.max_queue;
    let before = state.shared.queued.fetch_add(rows, Ordering::SeqCst);
    if before + rows > limit {
        state.shared.queued.fetch_sub(rows, Ordering::SeqCst);
        return Err(ApiError::queue_full(before, limit));
    }
    let sender = state
        .jobs
        .lock()
        .map_err(|_| ApiError::internal("the job queue is poisoned".to_owned()))?
        .clone();
    let Some(sender) = sender else {
        state.shared.queued.fetch_sub(rows, Ordering::SeqCst);
        return Err(ApiError::shutting_down());
    };
    let arrived = Instant::now();
    let mut events = Vec::with_capacity(rows);
    let mut cancels = Vec::with_capacity(rows);
    for (p, prompt) in prompts.iter().enumerate() {
        for j in 0..request.n {
            let (tx, rx) = unbounded_channel();
            let cancel = Arc::new(AtomicBool::new(false));
            let job = RowJob {
                prompt: prompt.clone(),
                max_tokens,
                sampling: sampling.clone(),
                stream: (p * request.n + j) as u64,
                control,
                trace: request.control_trace,
                arrived,
                cancel: cancel.clone(),
                events: tx,
            };
            if sender.send(job).is_err() {
                // The engine is gone: the rows not sent are not queued.
                let unsent = rows - events.len();
                state.shared.queued.fetch_sub(unsent, Ordering::SeqCst);
                return Err(ApiError::internal("the decoding engine stopped".to_owned()));
            }
            events.push(rx);
            cancels.push(cancel);
        }
    }
    state
        .shared
        .metrics
        .queue_depth
        .set(state.shared.queued.load(Ordering::SeqCst) as i64);
    Ok(Submitted {
        prompt_tokens: prompts.iter().map(Vec::len).collect(),
        request,
        events,
        cancels,
    })
}

/// One choice's progress.
#[derive(Debug)]
struct Choice {
    tokens: Vec<i64>,
    text: ChoiceText,
    trace: Vec<(i64, TraceStep)>,
    finish: Option<&'static str>,
    /// The role delta was sent (chat streams).
    started: bool,
}

/// Turns row events into choices, chunks and the final answer.
struct Assembler {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<LmTokenizer>,
    choices: Vec<Choice>,
    cancels: Vec<Arc<AtomicBool>>,
    trace: bool,
    prompt_tokens: usize,
}

impl Assembler {
    fn new(state: &AppState, submitted: &Submitted, id: String) -> Self {
        let choices = (0..submitted.events.len())
            .map(|_| Choice {
                tokens: Vec::new(),
                text: ChoiceText::new(submitted.request.stop.clone()),
                trace: Vec::new(),
                finish: None,
                started: false,
            })
            .collect();
        Self {
            endpoint: submitted.request.endpoint,
            id,
            created: now(),
            model: state.info.name.clone(),
            tokenizer: state.tokenizer.clone(),
            choices,
            cancels: submitted.cancels.clone(),
            trace: submitted.request.control_trace,
            prompt_tokens: submitted.prompt_tokens.iter().sum(),
        }
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Applies one event of choice `index`; returns the stream chunks it makes.
    fn apply(&mut self, index: usize, event: RowEvent) -> Result<Vec<Value>, ApiError> {
        let choice = &mut self.choices[index];
        if choice.finish.is_some() {
            return Ok(Vec::new());
        }
        let mut chunks = Vec::new();
        if self.endpoint == Endpoint::Chat && !choice.started {
            choice.started = true;
            chunks.push(self.chunk_choice(index, Some(""), None, &[]));
        }
        let choice = &mut self.choices[index];
        match event {
            RowEvent::Failed(message) => return Err(ApiError::internal(message)),
            RowEvent::Token { id, trace } => {
                choice.tokens.push(id);
                if let Some(t) = trace {
                    choice.trace.push((id, t));
                }
                let decoded = self
                    .tokenizer
                    .decode(&choice.tokens, true)
                    .map_err(|e| ApiError::internal(format!("cannot decode tokens: {e}")))?;
                let delta = choice.text.update(decoded);
                let new_trace: Vec<(i64, TraceStep)> =
                    trace.map(|t| vec![(id, t)]).unwrap_or_default();
                if choice.text.stopped() {
                    choice.finish = Some("stop");
                    self.cancels[index].store(true, Ordering::SeqCst);
                    chunks.push(self.chunk_choice(index, Some(&delta), None, &new_trace));
                    chunks.push(self.chunk_choice(index, None, Some("stop"), &[]));
                } else if !delta.is_empty() || !new_trace.is_empty() {
                    chunks.push(self.chunk_choice(index, Some(&delta), None, &new_trace));
                }
            }
            RowEvent::Finished(reason) => {
                let rest = choice.text.flush();
                let finish = match reason {
                    FinishReason::Eos => "stop",
                    FinishReason::Length => "length",
                };
                choice.finish = Some(finish);
                if !rest.is_empty() {
                    chunks.push(self.chunk_choice(index, Some(&rest), None, &[]));
                }
                chunks.push(self.chunk_choice(index, None, Some(finish), &[]));
            }
        }
        Ok(chunks)
    }

    fn trace_json(trace: &[(i64, TraceStep)]) -> Value {
        Value::Array(
            trace
                .iter()
                .map(|(id, t)| {
                    json!({"token": id, "edit_norm": t.edit_norm,
                           "value_before": t.value_before, "value_after": t.value_after})
                })
                .collect(),
        )
    }

    /// A stream chunk for one choice: a text delta and/or a finish reason.
    fn chunk_choice(
        &self,
        index: usize,
        text: Option<&str>,
        finish: Option<&str>,
        trace: &[(i64, TraceStep)],
    ) -> Value {
        let mut choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (text, self.choices[index].tokens.is_empty()) {
                    (Some(""), true) => json!({"role": "assistant", "content": ""}),
                    (Some(t), _) => json!({"content": t}),
                    (None, _) => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => json!({"index": index, "text": text.unwrap_or(""),
                "logprobs": null, "finish_reason": finish}),
        };
        if self.trace && !trace.is_empty() {
            choice["control_trace"] = Self::trace_json(trace);
        }
        self.chunk(vec![choice], None)
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut chunk = json!({"id": self.id, "object": object, "created": self.created,
            "model": self.model, "choices": choices});
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }

    fn usage(&self) -> Value {
        let completion: usize = self.choices.iter().map(|c| c.tokens.len()).sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion})
    }

    /// The non-streamed answer.
    fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let mut choice = match self.endpoint {
                    Endpoint::Chat => json!({"index": index,
                        "message": {"role": "assistant", "content": c.text.text()},
                        "logprobs": null, "finish_reason": c.finish}),
                    Endpoint::Completions => json!({"index": index, "text": c.text.text(),
                        "logprobs": null, "finish_reason": c.finish}),
                };
                if self.trace {
                    choice["control_trace"] = Self::trace_json(&c.trace);
                }
                choice
            })
            .collect();
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": choices, "usage": self.usage()})
    }
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, RowEvent)> + Send>>;

fn merged(events: Vec<tokio::sync::mpsc::UnboundedReceiver<RowEvent>>) -> EventStream {
    Box::pin(stream::select_all(events.into_iter().enumerate().map(
        |(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e)),
    )))
}

async fn complete_response(
    submitted: Submitted,
    mut assembler: Assembler,
) -> Result<Response, ApiError> {
    let mut events = merged(submitted.events);
    while !assembler.done() {
        let Some((index, event)) = events.next().await else {
            return Err(ApiError::internal(
                "the decoding engine dropped the request".to_owned(),
            ));
        };
        assembler.apply(index, event)?;
    }
    Ok(Json(assembler.response()).into_response())
}

fn stream_response(
    submitted: Submitted,
    assembler: Assembler,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let include_usage = submitted.request.include_usage;
    let events = merged(submitted.events);
    // States: decoding, then the usage chunk (if asked) and [DONE], then the end.
    let body = stream::unfold(
        (events, assembler, false),
        move |(mut events, mut assembler, ended)| async move {
            if ended {
                return None;
            }
            if assembler.done() {
                let mut tail = Vec::new();
                if include_usage {
                    let usage = assembler.chunk(Vec::new(), Some(assembler.usage()));
                    tail.push(Event::default().data(usage.to_string()));
                }
                tail.push(Event::default().data("[DONE]"));
                return Some((tail, (events, assembler, true)));
            }
            let error = |e: ApiError| vec![Event::default().data(e.body().to_string())];
            let (out, ended) = match events.next().await {
                // An error ends the stream without [DONE].
                None => (
                    error(ApiError::internal(
                        "the decoding engine dropped the request".to_owned(),
                    )),
                    true,
                ),
                Some((index, event)) => match assembler.apply(index, event) {
                    Ok(chunks) => (
                        chunks
                            .into_iter()
                            .map(|c| Event::default().data(c.to_string()))
                            .collect(),
                        false,
                    ),
                    Err(e) => (error(e), true),
                },
            };
            Some((out, (events, assembler, ended)))
        },
    )
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)));
    Sse::new(body).keep_alive(KeepAlive::default())
}
