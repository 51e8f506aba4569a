//! `recontrol serve`: an OpenAI-compatible server that steers each request with a value head.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use recontrol_serve::{parse_value_spec, serve, ServeConfig};

use crate::args::DeviceArgs;
use crate::generate::GradBackendArg;

/// Serve a model over the OpenAI API (chat and text completions, streamed or not), each request
/// optionally steered: `"control": {"value": NAME, "alpha": A, "steps": S}` in the body
/// (`extra_body` for OpenAI clients). Requests are decoded together, joining and leaving the
/// batch at every step. Stops on SIGTERM/Ctrl-C after in-flight requests finish.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A value head requests can steer with, as NAME=ARTIFACT (an export directory, one of its
    /// .onnx files, or a value directory); repeatable.
    #[arg(long = "value", value_name = "NAME=ARTIFACT", value_parser = parse_value)]
    pub values: Vec<(String, PathBuf)>,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Rows (request choices) decoded together at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// Rows waiting to join the batch at most; requests beyond get 429 with Retry-After.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue: u64,
    /// Require `Authorization: Bearer KEY` on /v1/ routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name requests give (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_body_bytes: u64,
    /// `max_tokens` of requests that give none (capped by the model's positions).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub default_max_tokens: u64,
    /// Seconds in-flight requests get to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30.0, value_parser = parse_seconds, allow_negative_numbers = true)]
    pub shutdown_timeout: f64,
    /// How value heads run.
    #[arg(long, value_enum, default_value_t = GradBackendArg::Onnx)]
    pub grad_backend: GradBackendArg,
    /// Accept value heads made from another model's states (same hidden size).
    #[arg(long)]
    pub allow_foreign_value: bool,
    /// ONNX Runtime library for --grad-backend onnx (default: $ORT_DYLIB_PATH, then the
    /// project venv).
    #[arg(long)]
    pub onnxruntime: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn parse_value(s: &str) -> Result<(String, PathBuf), String> {
    parse_value_spec(s).map_err(|e| e.to_string())
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected a number of seconds >= 0, got {s:?}")),
    }
}

impl ServeArgs {
    pub fn run(self) -> Result<()> {
        let mut config = ServeConfig::new(self.model.clone());
        config.values = self.values.clone();
        config.device = self.device.device;
        config.dtype = self.device.dtype.into();
        config.value_options = self
            .grad_backend
            .options(self.allow_foreign_value, self.onnxruntime.clone());
        config.host = self.host.clone();
        config.port = self.port;
        config.max_batch = self.max_batch as usize;
        config.max_queue = self.max_queue as usize;
        config.api_key = self.api_key.clone();
        config.served_model_name = self.served_model_name.clone();
        config.max_body_bytes = self.max_body_bytes as usize;
        config.default_max_tokens = self.default_max_tokens as usize;
        config.shutdown_timeout = Duration::from_secs_f64(self.shutdown_timeout);
        let heads = config.values.len();
        serve(config, |address| {
            // Scripts wait for this line.
            eprintln!(
                "recontrol serve: listening on http://{address} (model {}, {heads} value head(s))",
                self.model.display()
            );
            let _ = std::io::stderr().flush();
        })?;
        eprintln!("recontrol serve: stopped");
        Ok(())
    }
}
