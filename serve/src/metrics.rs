//! The server's Prometheus metrics (`GET /metrics`, text exposition format).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Whether a row is steered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Mode {
    Plain,
    Controlled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    pub mode: Mode,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Prompt tokens admitted to decoding.
    pub prompt_tokens: Counter,
    /// Tokens generated, plain or controlled.
    pub generated_tokens: Family<ModeLabels, Counter>,
    /// Rows waiting to join the decoding batch.
    pub queue_depth: Gauge,
    /// Rows in the decoding batch.
    pub active_rows: Gauge,
    /// Rows per decoding step.
    pub batch_size: Histogram,
    /// Seconds per decoding step (admission, editing, the forward pass).
    pub step_seconds: Histogram,
    /// Seconds from a request's arrival to its last token, by mode.
    pub request_seconds: Family<ModeLabels, Histogram, fn() -> Histogram>,
    /// Seconds from a request's arrival to its first token.
    pub first_token_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("recontrol");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests answered", requests.clone());
        let prompt_tokens = Counter::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens admitted to decoding",
            prompt_tokens.clone(),
        );
        let generated_tokens = Family::<ModeLabels, Counter>::default();
        registry.register(
            "generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Rows waiting to join the decoding batch",
            queue_depth.clone(),
        );
        let active_rows = Gauge::default();
        registry.register(
            "active_rows",
            "Rows in the decoding batch",
            active_rows.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        registry.register("batch_size", "Rows per decoding step", batch_size.clone());
        let step_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "step_seconds",
            "Seconds per decoding step",
            step_seconds.clone(),
        );
        let request_seconds =
            Family::<ModeLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "request_seconds",
            "Seconds from a request's arrival to its last token",
            request_seconds.clone(),
        );
        let first_token_seconds = latency_histogram();
        registry.register(
            "first_token_seconds",
            "Seconds from a request's arrival to its first token",
            first_token_seconds.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            queue_depth,
            active_rows,
            batch_size,
            step_seconds,
            request_seconds,
            first_token_seconds,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a request answered with `status` on `endpoint`.
    pub fn answered(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_metric_with_its_labels() {
        let m = Metrics::new();
        m.answered("/v1/completions", 200);
        m.generated_tokens
            .get_or_create(&ModeLabels {
                mode: Mode::Controlled,
            })
            .inc_by(3);
        m.batch_size.observe(4.0);
        m.request_seconds
            .get_or_create(&ModeLabels { mode: Mode::Plain })
            .observe(0.2);
        let text = m.encode();
        for needle in [
            "recontrol_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 1",
            "recontrol_generated_tokens_total{mode=\"Controlled\"} 3",
            "recontrol_batch_size_count 1",
            "recontrol_request_seconds_count{mode=\"Plain\"} 1",
            "recontrol_queue_depth 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
    }
}
