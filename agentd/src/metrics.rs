//! Prometheus metrics: counters next to the code that bumps them, rendered as text at
//! `GET /metrics`. Sandboxes by state are counted at scrape time from the manager.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
/// Most models counted apart in the token metrics (the rest count as `other`).
const MAX_MODELS: usize = 64;

const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += s;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// The daemon's metrics. A std mutex: updates are a few additions, never across an await.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    create: Histogram,
    ready: Histogram,
    gateway_tokens: BTreeMap<&'static str, u64>,
    /// Tokens by (model, kind); models are bounded by `llm_models`, or else by [`MAX_MODELS`].
    model_tokens: BTreeMap<(String, &'static str), u64>,
    /// Egress proxy connections by verdict, and their bytes.
    egress: BTreeMap<&'static str, u64>,
    egress_bytes: u64,
}

impl Metrics {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("metrics lock")
    }

    /// One API request on `route` (a pattern, not the path) answered with `status`.
    pub fn count_request(&self, route: &str, status: u16) {
        *self
            .inner()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// Time from create request to a running sandbox.
    pub fn observe_create(&self, d: Duration) {
        self.inner().create.observe(d);
    }

    /// Time from create request to OpenCode answering.
    pub fn observe_ready(&self, d: Duration) {
        self.inner().ready.observe(d);
    }

    /// Tokens forwarded by the LLM gateway.
    pub fn count_tokens(&self, model: &str, prompt: u64, completion: u64) {
        let mut i = self.inner();
        *i.gateway_tokens.entry("prompt").or_default() += prompt;
        *i.gateway_tokens.entry("completion").or_default() += completion;
        // A model name is the sandbox's word (agentd checked it at create, but an agent's
        // own requests name what they like): the label set stays bounded.
        let known = i.model_tokens.keys().any(|(m, _)| m == model);
        let model = if known || i.model_tokens.len() < 2 * MAX_MODELS {
            model.chars().take(128).collect()
        } else {
            "other".to_string()
        };
        *i.model_tokens.entry((model.clone(), "prompt")).or_default() += prompt;
        *i.model_tokens.entry((model, "completion")).or_default() += completion;
    }

    /// One connection through the egress proxy (`allowed` or refused) and its bytes.
    pub fn count_egress(&self, allowed: bool, bytes: u64) {
        let mut i = self.inner();
        *i.egress
            .entry(if allowed { "allowed" } else { "denied" })
            .or_default() += 1;
        i.egress_bytes += bytes;
    }

    /// The Prometheus text, with the sandbox counts by state.
    pub fn render(&self, sandboxes_by_state: &BTreeMap<&'static str, u64>) -> String {
        let i = self.inner();
        let mut out = String::new();
        out.push_str(
            "# HELP agentd_sandboxes Sandboxes by state.\n# TYPE agentd_sandboxes gauge\n",
        );
        for (state, n) in sandboxes_by_state {
            let _ = writeln!(out, "agentd_sandboxes{{state=\"{state}\"}} {n}");
        }
        i.create.render(
            &mut out,
            "agentd_sandbox_create_seconds",
            "Time from a create request to a running sandbox.",
        );
        i.ready.render(
            &mut out,
            "agentd_sandbox_ready_seconds",
            "Time from a create request to OpenCode answering its health check.",
        );
        out.push_str("# HELP agentd_api_requests_total API requests by route and status.\n# TYPE agentd_api_requests_total counter\n");
        for ((route, status), n) in &i.requests {
            let _ = writeln!(
                out,
                "agentd_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP agentd_llm_tokens_total Tokens through the LLM gateway.\n# TYPE agentd_llm_tokens_total counter\n");
        for (kind, n) in &i.gateway_tokens {
            let _ = writeln!(out, "agentd_llm_tokens_total{{kind=\"{kind}\"}} {n}");
        }
        out.push_str("# HELP agentd_llm_model_tokens_total Tokens through the LLM gateway by model.\n# TYPE agentd_llm_model_tokens_total counter\n");
        for ((model, kind), n) in &i.model_tokens {
            let model = model.replace(['\\', '"', '\n'], "_");
            let _ = writeln!(
                out,
                "agentd_llm_model_tokens_total{{model=\"{model}\",kind=\"{kind}\"}} {n}"
            );
        }
        out.push_str("# HELP agentd_egress_connections_total Connections sandboxes asked the egress proxy for, by verdict.\n# TYPE agentd_egress_connections_total counter\n");
        for (verdict, n) in &i.egress {
            let _ = writeln!(
                out,
                "agentd_egress_connections_total{{verdict=\"{verdict}\"}} {n}"
            );
        }
        out.push_str("# HELP agentd_egress_bytes_total Bytes through the egress proxy, both ways.\n# TYPE agentd_egress_bytes_total counter\n");
        let _ = writeln!(out, "agentd_egress_bytes_total {}", i.egress_bytes);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_render() {
        let m = Metrics::default();
        m.count_request("/v1/sandboxes", 201);
        m.observe_create(Duration::from_millis(30));
        m.count_tokens("m1", 5, 7);
        m.count_tokens("m\"2", 1, 1);
        for i in 0..200 {
            m.count_tokens(&format!("x{i}"), 1, 0);
        }
        m.count_egress(false, 0);
        m.count_egress(true, 100);
        let mut states = BTreeMap::new();
        states.insert("ready", 2);
        let text = m.render(&states);
        assert!(text.contains("agentd_sandboxes{state=\"ready\"} 2"));
        assert!(
            text.contains("agentd_api_requests_total{route=\"/v1/sandboxes\",status=\"201\"} 1")
        );
        assert!(text.contains("agentd_sandbox_create_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("agentd_sandbox_create_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("agentd_llm_tokens_total{kind=\"completion\"} 8"));
        assert!(text.contains("agentd_llm_model_tokens_total{model=\"m1\",kind=\"prompt\"} 5"));
        assert!(text.contains("agentd_llm_model_tokens_total{model=\"m_2\",kind=\"completion\"} 1"));
        // Model labels stay bounded.
        assert!(text.matches("agentd_llm_model_tokens_total{").count() <= 2 * MAX_MODELS + 2);
        assert!(text.contains("model=\"other\""));
        assert!(text.contains("agentd_egress_connections_total{verdict=\"denied\"} 1"));
        assert!(text.contains("agentd_egress_bytes_total 100"));
    }
}
