//! `recontrol serve`: an OpenAI-compatible HTTP server that steers each request with a shipped
//! value head.
//!
//! - [`api`]: the request bodies (`/v1/chat/completions`, `/v1/completions`) checked into what
//!   the engine decodes; per-request `control` (`{"value", "alpha", "steps", "max_edit_norm"}`)
//!   and `control_trace`.
//! - [`engine`]: one thread that owns the model and value heads and decodes every request's
//!   rows in one batch, continuously (rows join and leave at step granularity), with rows of
//!   different heads, settings or no control side by side.
//! - [`http`]: routes (axum on tokio), API keys, JSON and server-sent-event answers.
//! - [`metrics`]: Prometheus metrics.
//!
//! [`serve`] loads the model, binds, and answers until SIGTERM or Ctrl-C; then it stops
//! accepting, lets in-flight requests finish for `shutdown_timeout`, cancels the rest, and
//! returns.

pub mod api;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod text;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use recontrol_controller::generation::{open_value_backend, ValueOptions};
use recontrol_controller::BackendKind;
use recontrol_lm::{DType, DeviceSpec, LanguageModel, LmTokenizer};

pub use error::{ApiError, Error, Result};

use crate::engine::{Engine, Head, Shared};
use crate::http::{AppState, HttpSettings, ModelInfo};

/// Everything `recontrol serve` is told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// `NAME=ARTIFACT` value heads (export directory, `.onnx` file or value directory).
    pub values: Vec<(String, PathBuf)>,
    pub device: DeviceSpec,
    pub dtype: DType,
    pub value_options: ValueOptions,
    pub host: String,
    pub port: u16,
    /// Rows decoded together at most.
    pub max_batch: usize,
    /// Rows waiting to join at most; more get 429.
    pub max_queue: usize,
    pub api_key: Option<String>,
    /// The name requests give as `model` (default: the model directory's name).
    pub served_model_name: Option<String>,
    pub max_body_bytes: usize,
    pub shutdown_timeout: Duration,
    pub default_max_tokens: usize,
    pub max_n: usize,
    pub max_steps: usize,
    pub max_alpha: f64,
}

impl ServeConfig {
    /// Defaults for `model`: loopback, port 8000, batches of 16, no API key.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            values: Vec::new(),
            device: DeviceSpec::Cpu,
            dtype: DType::F32,
            value_options: ValueOptions {
                backend: BackendKind::Onnx,
                allow_foreign: false,
                onnxruntime: None,
            },
            host: "127.0.0.1".to_owned(),
            port: 8000,
            max_batch: 16,
            max_queue: 256,
            api_key: None,
            served_model_name: None,
            max_body_bytes: 1 << 20,
            shutdown_timeout: Duration::from_secs(30),
            default_max_tokens: 256,
            max_n: 16,
            max_steps: 1000,
            max_alpha: 1e4,
        }
    }

    /// Refuses settings that cannot work, naming the flag.
    pub fn check(&self) -> Result<()> {
        let positive = |flag: &'static str, v: usize| {
            if v == 0 {
                Err(Error::Setting {
                    flag,
                    expected: "at least 1",
                    got: v.to_string(),
                })
            } else {
                Ok(())
            }
        };
        positive("max-batch", self.max_batch)?;
        positive("max-queue", self.max_queue)?;
        positive("max-body-bytes", self.max_body_bytes)?;
        positive("default-max-tokens", self.default_max_tokens)?;
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &self.values {
            if !seen.insert(name) {
                return Err(Error::DuplicateValue { name: name.clone() });
            }
        }
        if let Some(key) = &self.api_key {
            if key.is_empty() {
                return Err(Error::Setting {
                    flag: "api-key",
                    expected: "a non-empty key",
                    got: "an empty string".to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Parses `NAME=ARTIFACT`.
pub fn parse_value_spec(spec: &str) -> Result<(String, PathBuf)> {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        _ => Err(Error::ValueSpec {
            spec: spec.to_owned(),
        }),
    }
}

/// Loads the model and heads, binds, calls `on_listening` with the bound address, and serves
/// until SIGTERM or Ctrl-C. Returns after a graceful shutdown.
pub fn serve(config: ServeConfig, on_listening: impl FnOnce(SocketAddr) + Send) -> Result<()> {
    config.check()?;
    let shared = Arc::new(Shared::default());
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    let engine_config = config.clone();
    let engine_shared = shared.clone();
    // The engine owns the model and heads on its own thread (libtorch and ONNX Runtime work
    // is blocking); it reports what it loaded, or why it could not.
    let engine = std::thread::Builder::new()
        .name("recontrol-engine".to_owned())
        .spawn(move || match load(&engine_config, engine_shared) {
            Ok((engine, info)) => {
                let _ = ready_tx.send(Ok(info));
                engine.run(jobs_rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })?;
    let info = ready_rx
        .recv()
        .map_err(|_| Error::Engine("it stopped while loading".to_owned()))??;
    let tokenizer = Arc::new(LmTokenizer::from_dir(&config.model)?);
    let state = Arc::new(AppState {
        settings: HttpSettings {
            api_key: config.api_key.clone(),
            max_queue: config.max_queue,
            max_body_bytes: config.max_body_bytes,
            default_max_tokens: config.default_max_tokens,
            limits: api::Limits {
                model_name: info.name.clone(),
                max_n: config.max_n,
                max_steps: config.max_steps,
                max_alpha: config.max_alpha,
            },
        },
        info,
        tokenizer,
        shared: shared.clone(),
        jobs: Mutex::new(Some(jobs_tx)),
        draining: Default::default(),
        created: http::now(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run_http(&config, state.clone(), on_listening));
    // Whatever is still decoding is cancelled; the engine then stops.
    shared.cancel.store(true, Ordering::SeqCst);
    if let Ok(mut jobs) = state.jobs.lock() {
        jobs.take();
    }
    let _ = engine.join();
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run_http(
    config: &ServeConfig,
    state: Arc<AppState>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let address = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| Error::Bind {
            address: address.clone(),
            source,
        })?;
    on_listening(listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain_state = state.clone();
    let server =
        axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(async move {
            shutdown_signal().await;
            // New requests get 503 from here on; connections close as they finish.
            drain_state.draining.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        });
    let server = tokio::spawn(server.into_future());
    let mut stop_rx = stop_rx;
    let _ = stop_rx.wait_for(|&stop| stop).await;
    // In-flight requests get `shutdown_timeout` to finish; then they are cancelled (their
    // rows fail, their clients get an error) and the server stops waiting for them.
    let finished = tokio::time::timeout(config.shutdown_timeout, server).await;
    if finished.is_err() {
        state.shared.cancel.store(true, Ordering::SeqCst);
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Loads the model and value heads (on the engine's thread).
fn load(config: &ServeConfig, shared: Arc<Shared>) -> Result<(Engine, ModelInfo)> {
    let lm = LanguageModel::load(&config.model, config.device, config.dtype)?;
    let mut heads = Vec::with_capacity(config.values.len());
    let mut described = Vec::with_capacity(config.values.len());
    for (name, path) in &config.values {
        let backend = open_value_backend(path, &lm, &config.value_options).map_err(|source| {
            Error::ValueHead {
                name: name.clone(),
                path: path.clone(),
                source: Box::new(source),
            }
        })?;
        described.push((name.clone(), path.display().to_string(), backend.describe()));
        heads.push(Head {
            name: name.clone(),
            backend,
        });
    }
    let model_config = lm.model.config();
    let name = config.served_model_name.clone().unwrap_or_else(|| {
        config
            .model
            .file_name()
            .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let info = ModelInfo {
        name,
        identity: lm.identity.clone(),
        max_positions: model_config.max_position_embeddings,
        vocab_size: model_config.vocab_size,
        hidden_size: model_config.hidden_size,
        heads: described,
    };
    let LanguageModel {
        model,
        eos_token_ids,
        pad_token_id,
        ..
    } = lm;
    Ok((
        Engine::new(
            model,
            heads,
            eos_token_ids,
            pad_token_id,
            config.max_batch,
            shared,
        ),
        info,
    ))
}
