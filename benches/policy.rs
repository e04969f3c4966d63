//! The pure hot path: normalizing a CONNECT target and deciding it, at 1, 1,000 and 10,000
//! apps of 30 entries each (a third of them wildcards); and loading a 10,000-app config.
//!
//! Run: `cargo bench --bench policy`

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use miniapp_gateway::config;
use miniapp_gateway::policy::{Channel, Policy, normalize_host, parse_authority};

/// A config of `apps` apps, each with 30 server and 30 webview entries: exact hosts,
/// `*.` wildcards and `.` domains, some on non-default ports.
fn config_text(apps: usize) -> String {
    let mut text = String::from("[policy]\nmax_server_domains = 30\n");
    for a in 0..apps {
        write!(text, "\n[[app]]\nid = \"app{a}\"\nserver_domains = [").unwrap();
        for e in 0..30 {
            let entry = match e % 3 {
                0 => format!("\"https://api{e}.tenant{a}.example\""),
                1 => format!("\"*.cdn{e}.tenant{a}.example\""),
                _ => format!("{{ domain = \"https://.svc{e}.tenant{a}.example:8443\", remark = \"service {e}\" }}"),
            };
            write!(text, "{entry}, ").unwrap();
        }
        text.push_str("]\nwebview_domains = [");
        for e in 0..30 {
            write!(text, "\"*.h5-{e}.tenant{a}.example\", ").unwrap();
        }
        text.push_str("]\n");
    }
    text
}

fn policy(apps: usize) -> Policy {
    config::load_str(Path::new("bench.toml"), config_text(apps)).expect("valid bench config").policy
}

fn normalize(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize_host");
    for host in ["api.tenant42.example", "API.Tenant42.Example.", "bücher.tenant42.example"] {
        group.bench_with_input(BenchmarkId::from_parameter(host), host, |b, host| {
            b.iter(|| normalize_host(black_box(host)).map(|h| h.len()))
        });
    }
    group.finish();
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for apps in [1, 1_000, 10_000] {
        let policy = policy(apps);
        let app = format!("app{}", apps / 2);
        let tenant = apps / 2;
        let cases = [
            ("exact_allow", format!("api3.tenant{tenant}.example:443")),
            ("wildcard_allow", format!("a.b.cdn4.tenant{tenant}.example:443")),
            ("deny", "www.unlisted-site.example:443".to_owned()),
        ];
        for (name, target) in &cases {
            group.bench_with_input(BenchmarkId::new(*name, apps), target, |b, target| {
                b.iter(|| {
                    let target = parse_authority(black_box(target)).expect("valid target");
                    policy.decide(black_box(&app), Channel::Request, &target).verdict
                })
            });
        }
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_load");
    group.sample_size(10);
    let text = config_text(10_000);
    group.bench_function("10000_apps_600000_entries", |b| {
        b.iter(|| config::load_str(Path::new("bench.toml"), black_box(text.clone())).map(|c| c.policy.app_count()))
    });
    group.finish();
}

criterion_group!(benches, normalize, decide, load);
criterion_main!(benches);
