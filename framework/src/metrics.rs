//! Metric names: every metric parallm records, in one place.
//!
//! Names carry the `parallm_` prefix and their unit (`_seconds`, `_tokens`,
//! `_total` for counters), and labels are few and of low cardinality (a node
//! is `r{replica}.n{index}`, a finish reason is one of a handful of words).
//! This module only names and describes them — the `framework` crate records
//! nothing. The actors record engine metrics at their state transitions with
//! the `metrics` facade; the server installs the Prometheus exporter and uses
//! [`ALL`] to describe them and [`Metric::buckets`] to bucket histograms.
//! `docs/metrics.md` documents the same table, and a test keeps the two equal.

/// Every `reason` of [`REQUEST_FAILURE`].
pub const FAILURE_REASONS: &[&str] = &[
    "failed",
    "cancelled",
    "overloaded",
    "invalid",
    "timeout",
    "shutting_down",
];

/// The kind of a metric, as Prometheus sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Observations in buckets, with a sum and a count.
    Histogram,
}

impl Kind {
    /// The Prometheus type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric's definition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metric {
    /// Full name, with the `parallm_` prefix.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names (empty for none).
    pub labels: &'static [&'static str],
    /// One line of help text.
    pub help: &'static str,
}

/// Buckets for latencies from a millisecond to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
/// Buckets for per-token and per-step times.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Buckets for counts of sequences or tokens in a step.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

impl Metric {
    /// Histogram buckets (upper bounds), empty for counters and gauges.
    pub fn buckets(&self) -> &'static [f64] {
        match (self.kind, self.name) {
            (Kind::Histogram, BATCH_SIZE | BATCH_TOKENS) => COUNT_BUCKETS,
            (
                Kind::Histogram,
                TIME_PER_OUTPUT_TOKEN
                | NODE_STEP_DURATION
                | NODE_ALL_REDUCE_DURATION
                | EMBED_STEP_DURATION,
            ) => STEP_BUCKETS,
            (Kind::Histogram, _) => LATENCY_BUCKETS,
            _ => &[],
        }
    }
}

macro_rules! metrics {
    ($($(#[$doc:meta])* $konst:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        $($(#[$doc])* pub const $konst: &str = $name;)*
        /// Every metric, in documentation order.
        pub const ALL: &[Metric] = &[
            $(Metric { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help },)*
        ];
    };
}

metrics! {
    /// Requests in running steps.
    REQUESTS_RUNNING = "parallm_requests_running", Gauge, [],
        "Requests whose sequences are in the running batch";
    /// Requests accepted but not yet running, by where they wait.
    REQUESTS_WAITING = "parallm_requests_waiting", Gauge, ["stage"],
        "Requests accepted but not running: stage=queue before admission, stage=scheduler admitted and waiting for room (new or preempted)";
    /// KV cache blocks in use.
    KV_BLOCKS_USED = "parallm_kv_blocks_used", Gauge, [],
        "KV cache blocks in use, over all replicas";
    /// KV cache blocks in all.
    KV_BLOCKS_TOTAL = "parallm_kv_blocks_capacity", Gauge, [],
        "KV cache blocks in all, over all replicas";
    /// Used over total KV blocks.
    KV_USAGE_RATIO = "parallm_kv_usage_ratio", Gauge, [],
        "KV cache blocks in use divided by blocks in all (0 to 1)";
    /// Prompt tokens of finished requests.
    PROMPT_TOKENS = "parallm_prompt_tokens_total", Counter, [],
        "Prompt tokens of requests that finished";
    /// Generated tokens.
    GENERATION_TOKENS = "parallm_generation_tokens_total", Counter, [],
        "Tokens generated, counted as they are produced: every output token of every choice (not the stop token that ends one, which usage does not count either); a beam search counts one per step, its best beam's length";
    /// Time to first token.
    TIME_TO_FIRST_TOKEN = "parallm_time_to_first_token_seconds", Histogram, [],
        "Seconds from a request's acceptance to its first generated token";
    /// Time per output token after the first.
    TIME_PER_OUTPUT_TOKEN = "parallm_time_per_output_token_seconds", Histogram, [],
        "Seconds per generated token after the first, one observation per finished request";
    /// End-to-end latency.
    REQUEST_LATENCY = "parallm_request_latency_seconds", Histogram, [],
        "Seconds from a request's acceptance to its terminal event";
    /// Queue time.
    REQUEST_QUEUE_TIME = "parallm_request_queue_time_seconds", Histogram, [],
        "Seconds from a request's acceptance to its first scheduled step";
    /// Successful requests by finish reason.
    REQUEST_SUCCESS = "parallm_request_success_total", Counter, ["finish_reason"],
        "Requests that finished, by finish_reason: stop (end of sequence or stop string) or length";
    /// Failed requests by reason.
    REQUEST_FAILURE = "parallm_request_failure_total", Counter, ["reason"],
        "Requests that did not finish, by reason: failed (engine error), cancelled (client gone or cancelled), overloaded (queue full), invalid (refused at validation, in the engine or the HTTP layer, or while running), timeout (the body did not arrive in time), shutting_down (refused by an engine that was draining or had stopped); a 503 while the model loads or the server drains is counted only in parallm_http_requests_total";
    /// Preemptions.
    PREEMPTIONS = "parallm_preemptions_total", Counter, [],
        "Sequences preempted for lack of KV blocks (recomputed later)";
    /// Prompt tokens looked up in the prefix cache.
    PREFIX_CACHE_QUERIES = "parallm_prefix_cache_queries_total", Counter, [],
        "Tokens of sequences admitted with prefix caching on (prompt, or prompt and output for a preempted one), looked up in the prefix cache";
    /// Of those, tokens found.
    PREFIX_CACHE_HITS = "parallm_prefix_cache_hits_total", Counter, [],
        "Tokens whose keys and values came from the prefix cache instead of being computed";
    /// Hits over queried tokens.
    PREFIX_CACHE_HIT_RATIO = "parallm_prefix_cache_hit_ratio", Gauge, [],
        "Prompt tokens found in the prefix cache divided by those looked up, since the start (0 to 1)";
    /// Cached blocks evicted.
    PREFIX_CACHE_EVICTIONS = "parallm_prefix_cache_evictions_total", Counter, [],
        "Cached KV blocks evicted (least recently used) to make room";
    /// Requests admitted per replica.
    REQUESTS_ROUTED = "parallm_requests_routed_total", Counter, ["replica"],
        "Requests admitted to each data-parallel replica (by cache-aware or least-loaded routing)";
    /// Speculative tokens drafted.
    SPEC_DRAFTED_TOKENS = "parallm_spec_drafted_tokens_total", Counter, [],
        "Tokens drafted for speculative decoding and verified by the model (a step that ends its request is not counted)";
    /// Of those, accepted.
    SPEC_ACCEPTED_TOKENS = "parallm_spec_accepted_tokens_total", Counter, [],
        "Drafted tokens the model's own draws matched (kept without a step of their own)";
    /// Accepted over drafted.
    SPEC_ACCEPTANCE_RATE = "parallm_spec_acceptance_rate", Gauge, [],
        "Drafted tokens accepted divided by those drafted, since the start (0 to 1)";
    /// Sequences per step.
    BATCH_SIZE = "parallm_batch_size", Histogram, [],
        "Sequences in a scheduled step";
    /// Tokens per step.
    BATCH_TOKENS = "parallm_batch_tokens", Histogram, [],
        "Tokens (prefill and decode) in a scheduled step";
    /// A node's step duration.
    NODE_STEP_DURATION = "parallm_node_step_duration_seconds", Histogram, ["node", "phase"],
        "Seconds a node spent on one step, by node (r{replica}.n{index}) and phase (prefill, decode or mixed; `draft` for a draft model's node: its keys and values and its drafts)";
    /// A node's all-reduce time in a step.
    NODE_ALL_REDUCE_DURATION = "parallm_node_all_reduce_duration_seconds", Histogram, ["node"],
        "Seconds a node spent in tensor-parallel collectives (all-reduces and the logits gather) during one step (including waiting for peers)";
    /// Node restarts.
    NODE_RESTARTS = "parallm_node_restarts_total", Counter, ["node"],
        "Restarts of a compute node after a failure (each reloads its shard)";
    /// Sequences embedded.
    EMBED_SEQUENCES = "parallm_embedding_sequences_total", Counter, ["model"],
        "Inputs embedded (each input of an embeddings request is one sequence), by model (the id it is served under), counted when their request is answered";
    /// Tokens embedded.
    EMBED_TOKENS = "parallm_embedding_tokens_total", Counter, ["model"],
        "Tokens of the inputs embedded, by model, counted when their request is answered";
    /// An encoder node's step duration.
    EMBED_STEP_DURATION = "parallm_embedding_step_duration_seconds", Histogram, ["model", "node"],
        "Seconds an embedding model's node spent on one batch, by model and node (r{replica}.n{index} of that model's pipeline)";
    /// HTTP requests by route and status.
    HTTP_REQUESTS = "parallm_http_requests_total", Counter, ["route", "status"],
        "HTTP requests answered, by route and status code";
}

/// A node's label value.
pub fn node_label(replica: usize, index: usize) -> String {
    format!("r{replica}.n{index}")
}

/// Looks a metric up by name.
pub fn find(name: &str) -> Option<&'static Metric> {
    ALL.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_unique_and_carry_units() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(m.name.starts_with("parallm_"), "{}", m.name);
            assert!(seen.insert(m.name), "{} twice", m.name);
            if m.kind == Kind::Counter {
                assert!(m.name.ends_with("_total"), "{}", m.name);
            }
            if m.kind == Kind::Histogram {
                let b = m.buckets();
                assert!(
                    !b.is_empty() && b.windows(2).all(|w| w[0] < w[1]),
                    "{}",
                    m.name
                );
            }
            assert!(m.labels.len() <= 2, "{} has too many labels", m.name);
        }
    }
    #[test]
    fn docs_list_every_metric() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        let text = std::fs::read_to_string(&path).expect("docs/metrics.md");
        let rows: Vec<Vec<String>> = text
            .lines()
            .filter(|l| l.starts_with("| `parallm_"))
            .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
            .collect();
        assert_eq!(
            rows.len(),
            ALL.len(),
            "docs/metrics.md lists {} metrics",
            rows.len()
        );
        for (row, m) in rows.iter().zip(ALL) {
            assert_eq!(row[1], format!("`{}`", m.name));
            assert_eq!(row[2], m.kind.as_str(), "{}", m.name);
            let labels: Vec<String> = m.labels.iter().map(|l| format!("`{l}`")).collect();
            let labels = if labels.is_empty() {
                "—".to_string()
            } else {
                labels.join(", ")
            };
            assert_eq!(row[3], labels, "{}", m.name);
            assert_eq!(row[4], m.help, "{}", m.name);
        }
    }
    #[test]
    fn the_grafana_dashboard_queries_only_defined_metrics() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/grafana/parallm-dashboard.json");
        let text = std::fs::read_to_string(&path).expect("the dashboard");
        let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match (k.as_str(), v.as_str()) {
                            ("expr", Some(e)) => out.push(e.to_string()),
                            _ => exprs(v, out),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        exprs(&dash, &mut all);
        assert!(all.len() > 20, "only {} queries", all.len());
        let mut used = std::collections::HashSet::new();
        for e in &all {
            for (i, _) in e.match_indices("parallm_") {
                let name: String = e[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| find(b).is_some()))
                    .unwrap_or(&name);
                let m = find(base).unwrap_or_else(|| panic!("{name} in `{e}` is not a metric"));
                if base != name {
                    assert_eq!(m.kind, Kind::Histogram, "{name}");
                }
                used.insert(m.name);
            }
        }
        let unused: Vec<&str> = ALL
            .iter()
            .map(|m| m.name)
            .filter(|n| !used.contains(n))
            .collect();
        assert!(unused.is_empty(), "the dashboard does not show {unused:?}");
    }
}
