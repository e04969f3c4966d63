//! Reloading a 10,000-app `apps_dir` (one file per app, 30 server + 30 webview entries each):
//! from scratch, and after one app's file changed (the loader re-validates only that file);
//! and the same 10,000 apps held as the PostgreSQL store's apps, after one of them changed
//! (what a replica does with one change, less the database read). All include building the
//! serving snapshot.
//!
//! Run: `cargo bench --bench reload`

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use miniapp_gateway::config::Loader;
use miniapp_gateway::metrics::Metrics;
use miniapp_gateway::proxy::Snapshot;

const APPS: usize = 10_000;

fn app_file(a: usize, variant: usize) -> String {
    let mut text = format!("[[app]]\nid = \"app{a}\"\nserver_domains = [");
    for e in 0..30 {
        match e % 3 {
            0 => write!(text, "\"https://api{e}.v{variant}.tenant{a}.example\", "),
            1 => write!(text, "\"*.cdn{e}.tenant{a}.example\", "),
            _ => write!(text, "{{ domain = \"https://.svc{e}.tenant{a}.example:8443\", remark = \"service {e}\" }}, "),
        }
        .unwrap();
    }
    text.push_str("]\nwebview_domains = [");
    for e in 0..30 {
        write!(text, "\"*.h5-{e}.tenant{a}.example\", ").unwrap();
    }
    text.push_str("]\n");
    text
}

fn fixture(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("apps")).unwrap();
    for a in 0..APPS {
        std::fs::write(dir.join(format!("apps/app{a:05}.toml")), app_file(a, 0)).unwrap();
    }
    let main = dir.join("gateway.toml");
    std::fs::write(&main, "[policy]\napps_dir = \"apps\"\n").unwrap();
    main
}

fn reload(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let main = fixture(dir.path());
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("reload_10000_apps");
    group.sample_size(10);
    group.bench_function("full", |b| {
        b.iter(|| {
            let config = Loader::new(&main).load().expect("valid");
            black_box(Snapshot::new(config, &metrics))
        })
    });
    let mut loader = Loader::new(&main);
    loader.load().expect("valid");
    let changed = dir.path().join("apps/app04242.toml");
    let mut variant = 0;
    group.bench_function("one_app_changed", |b| {
        b.iter(|| {
            variant += 1;
            std::fs::write(&changed, app_file(4242, variant)).unwrap();
            let config = loader.load().expect("valid");
            black_box(Snapshot::new(config, &metrics))
        })
    });

    // The store's apps: each a definition of its own, as a replica holds them.
    let store_main = dir.path().join("store.toml");
    std::fs::write(&store_main, "[policy]\n").unwrap();
    let mut apps: std::collections::BTreeMap<String, std::sync::Arc<str>> =
        (0..APPS).map(|a| (format!("app{a}"), std::sync::Arc::from(app_file(a, 0)))).collect();
    let mut store_loader = Loader::new(&store_main);
    store_loader.set_store_apps(std::sync::Arc::new(apps.clone()));
    store_loader.load().expect("valid");
    group.bench_function("one_store_app_changed", |b| {
        b.iter(|| {
            variant += 1;
            apps.insert("app4242".to_owned(), std::sync::Arc::from(app_file(4242, variant)));
            store_loader.set_store_apps(std::sync::Arc::new(apps.clone()));
            let config = store_loader.load().expect("valid");
            black_box(Snapshot::new(config, &metrics))
        })
    });
    group.finish();
}

criterion_group!(benches, reload);
criterion_main!(benches);
