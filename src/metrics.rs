//! Every metric the gateway exports, registered once and handed down as handles.
//!
//! The per-request counter has four labels, and the prometheus crate finds a labelled child by
//! hashing its label values under a lock. [`RequestCounters`] keeps, per policy snapshot, a
//! lazily filled table of child handles per app, so after a (app, channel, decision, reason)
//! has been counted once, counting it again is one map lookup and an atomic add: no lock, no
//! label strings.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::policy::{Channel, Policy, Reason, Verdict};

/// All metric handles. Cheap to clone (every handle is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub connections_active: IntGauge,
    pub connections_max: IntGauge,
    pub tunnels_active: IntGauge,
    pub bytes_upstream: IntCounter,
    pub bytes_downstream: IntCounter,
    pub tunnel_duration: Histogram,
    pub upstream_connect_duration: Histogram,
    pub reloads_success: IntCounter,
    pub reloads_failure: IntCounter,
    pub config_generation: IntGauge,
    pub last_reload_success: Gauge,
    pub apps_loaded: IntGauge,
    pub config_watcher_up: IntGauge,
    /// `gateway_store_revision`: the store change number whose apps are in force.
    pub store_revision: IntGauge,
    /// `gateway_store_up`: 1 while the store answers.
    pub store_up: IntGauge,
    /// `gateway_store_sync_lag_seconds`: how long since the replica last knew it enforced the
    /// store's newest change.
    pub store_sync_lag: Gauge,
    pub auth_failures_proxy: IntCounter,
    pub auth_failures_admin: IntCounter,
    /// `gateway_app_changes_total{action}`: app changes applied through the admin API.
    pub app_changes: IntCounterVec,
    /// `gateway_scope_decisions_total{app,scope,decision}`: scope decisions (decide, authorize,
    /// auth codes), by their outcome.
    pub scope_decisions: IntCounterVec,
}

impl Metrics {
    /// Register every metric (and the process collector) in a new registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("gateway_requests_total", "Decisions made, by app, channel, decision and reason."),
            &["app", "channel", "decision", "reason"],
        )
        .expect("valid metric");
        let connections_active =
            IntGauge::new("gateway_connections_active", "Client connections open.").expect("valid metric");
        let connections_max = IntGauge::new(
            "gateway_connections_max",
            "max_connections: the client connections the gateway accepts before answering 503.",
        )
        .expect("valid metric");
        let tunnels_active = IntGauge::new("gateway_tunnels_active", "Tunnels established.").expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new("gateway_tunnel_bytes_total", "Bytes moved through tunnels, by direction."),
            &["direction"],
        )
        .expect("valid metric");
        let tunnel_duration = Histogram::with_opts(
            HistogramOpts::new("gateway_tunnel_duration_seconds", "How long tunnels stayed open.")
                .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0]),
        )
        .expect("valid metric");
        let upstream_connect_duration = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_upstream_connect_duration_seconds",
                "Time to resolve and connect to an upstream, for successful connects.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        let reloads =
            IntCounterVec::new(Opts::new("gateway_config_reloads_total", "Config reloads, by result."), &["result"])
                .expect("valid metric");
        let config_generation =
            IntGauge::new("gateway_config_generation", "The generation of the policy in force.").expect("valid metric");
        let last_reload_success = Gauge::new(
            "gateway_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid metric");
        let apps_loaded = IntGauge::new("gateway_apps_loaded", "Apps in the policy in force.").expect("valid metric");
        let config_watcher_up = IntGauge::new(
            "gateway_config_watcher_up",
            "1 while the config file watcher runs; 0 when it failed (changes are then found by the periodic check).",
        )
        .expect("valid metric");
        let store_revision = IntGauge::new(
            "gateway_store_revision",
            "The store's change number whose apps are in force (PostgreSQL store; 0 with files).",
        )
        .expect("valid metric");
        let store_up = IntGauge::new(
            "gateway_store_up",
            "1 while the store answers (always 1 with files); 0 while the database is unreachable.",
        )
        .expect("valid metric");
        let store_sync_lag = Gauge::new(
            "gateway_store_sync_lag_seconds",
            "Seconds since this replica last knew it enforced the store's newest change (0 while it does).",
        )
        .expect("valid metric");
        store_up.set(1);
        let auth_failures = IntCounterVec::new(
            Opts::new("gateway_auth_failures_total", "Failed authentications, by listener (proxy, admin)."),
            &["listener"],
        )
        .expect("valid metric");
        let build_info =
            IntGaugeVec::new(Opts::new("gateway_build_info", "Build information; always 1."), &["version"])
                .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let app_changes = IntCounterVec::new(
            Opts::new("gateway_app_changes_total", "App changes applied through the admin API, by action."),
            &["action"],
        )
        .expect("valid metric");
        let scope_decisions = IntCounterVec::new(
            Opts::new(
                "gateway_scope_decisions_total",
                "Scope decisions (decide, authorize, auth codes), by app, scope and decision (allow, deny, prompt, report).",
            ),
            &["app", "scope", "decision"],
        )
        .expect("valid metric");
        let collectors: [Box<dyn prometheus::core::Collector>; 20] = [
            Box::new(requests.clone()),
            Box::new(connections_active.clone()),
            Box::new(connections_max.clone()),
            Box::new(tunnels_active.clone()),
            Box::new(bytes.clone()),
            Box::new(tunnel_duration.clone()),
            Box::new(upstream_connect_duration.clone()),
            Box::new(reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(last_reload_success.clone()),
            Box::new(apps_loaded.clone()),
            Box::new(config_watcher_up.clone()),
            Box::new(store_revision.clone()),
            Box::new(store_up.clone()),
            Box::new(store_sync_lag.clone()),
            Box::new(auth_failures.clone()),
            Box::new(app_changes.clone()),
            Box::new(scope_decisions.clone()),
            Box::new(build_info),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for collector in collectors {
            registry.register(collector).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            connections_active,
            connections_max,
            tunnels_active,
            bytes_upstream: bytes.with_label_values(&["upstream"]),
            bytes_downstream: bytes.with_label_values(&["downstream"]),
            tunnel_duration,
            upstream_connect_duration,
            reloads_success: reloads.with_label_values(&["success"]),
            reloads_failure: reloads.with_label_values(&["failure"]),
            config_generation,
            last_reload_success,
            apps_loaded,
            config_watcher_up,
            store_revision,
            store_up,
            store_sync_lag,
            auth_failures_proxy: auth_failures.with_label_values(&["proxy"]),
            auth_failures_admin: auth_failures.with_label_values(&["admin"]),
            app_changes,
            scope_decisions,
        }
    }

    /// Register a metric made elsewhere (the access log's drop counter).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(collector) {
            tracing::warn!(error = %e, "cannot register a metric");
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

const CHANNELS: usize = 3; // request, webview, none
const VERDICTS: usize = 3;
const OUTCOMES: usize = CHANNELS * VERDICTS * Reason::ALL.len();

/// The children of `gateway_requests_total` one app has used, filled on first use.
struct AppCounters {
    app: Box<str>,
    slots: OnceLock<Box<[OnceLock<IntCounter>; OUTCOMES]>>,
    /// Set when a reload removed the app: its series are gone, and whatever this snapshot
    /// still counts for it goes to the anonymous series rather than bringing them back.
    gone: AtomicBool,
}

/// Per-snapshot cache of `gateway_requests_total` children (see the module docs).
pub struct RequestCounters {
    family: IntCounterVec,
    apps: HashMap<Box<str>, AppCounters>,
    /// Requests refused before an app was known (no identity, malformed, unknown app).
    anonymous: AppCounters,
}

impl RequestCounters {
    pub fn new(metrics: &Metrics, policy: &Policy) -> RequestCounters {
        let apps = policy.apps().map(|app| (app.id.clone(), AppCounters::new(&app.id))).collect();
        RequestCounters { family: metrics.requests.clone(), apps, anonymous: AppCounters::new("") }
    }

    /// Count one decision. `app` is the app whose rules applied, `None` when none did.
    pub fn count(&self, app: Option<&str>, channel: Option<Channel>, verdict: Verdict, reason: Reason) {
        let counters = app.and_then(|id| self.apps.get(id)).filter(|c| !c.gone.load(Ordering::Relaxed));
        counters.unwrap_or(&self.anonymous).counter(&self.family, channel, verdict, reason).inc();
    }

    /// Remove the series of every app that `policy` (the one replacing this snapshot's) no
    /// longer has, so `/metrics` stops exporting apps that are gone.
    /// Every combination is removed, not only those this snapshot counted: the series may
    /// have been made under an earlier one.
    pub fn forget_apps_not_in(&self, policy: &Policy) {
        for counters in self.apps.values().filter(|counters| policy.app(&counters.app).is_none()) {
            counters.gone.store(true, Ordering::Relaxed);
            for index in 0..OUTCOMES {
                let (channel, verdict, reason) = outcome_labels(index);
                let _ = self.family.remove_label_values(&[&*counters.app, channel, verdict, reason]);
            }
        }
    }
}

/// The (channel, decision, reason) labels of a slot index (the inverse of `outcome_index`).
fn outcome_labels(index: usize) -> (&'static str, &'static str, &'static str) {
    let reason = Reason::ALL[index % Reason::ALL.len()];
    let rest = index / Reason::ALL.len();
    let verdict = [Verdict::Allow, Verdict::Deny, Verdict::Report][rest % VERDICTS];
    let channel = [Some(Channel::Request), Some(Channel::Webview), None][rest / VERDICTS];
    (channel.map_or("", Channel::as_str), verdict.as_str(), reason.as_str())
}

fn outcome_index(channel: Option<Channel>, verdict: Verdict, reason: Reason) -> usize {
    let channel_index = match channel {
        Some(Channel::Request) => 0,
        Some(Channel::Webview) => 1,
        None => 2,
    };
    let verdict_index = match verdict {
        Verdict::Allow => 0,
        Verdict::Deny => 1,
        Verdict::Report => 2,
    };
    let reason_index = reason as usize; // `Reason::ALL` is in declaration order
    (channel_index * VERDICTS + verdict_index) * Reason::ALL.len() + reason_index
}

impl AppCounters {
    fn new(app: &str) -> AppCounters {
        AppCounters { app: app.into(), slots: OnceLock::new(), gone: AtomicBool::new(false) }
    }

    fn counter(
        &self,
        family: &IntCounterVec,
        channel: Option<Channel>,
        verdict: Verdict,
        reason: Reason,
    ) -> &IntCounter {
        let index = outcome_index(channel, verdict, reason);
        let slots = self.slots.get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        slots[index].get_or_init(|| {
            let channel = channel.map_or("", Channel::as_str);
            family.with_label_values(&[&*self.app, channel, verdict.as_str(), reason.as_str()])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_labels_invert_slot_indexes() {
        for channel in [Some(Channel::Request), Some(Channel::Webview), None] {
            for verdict in [Verdict::Allow, Verdict::Deny, Verdict::Report] {
                for reason in Reason::ALL {
                    let labels = outcome_labels(outcome_index(channel, verdict, reason));
                    assert_eq!(labels, (channel.map_or("", Channel::as_str), verdict.as_str(), reason.as_str()));
                }
            }
        }
    }
}
