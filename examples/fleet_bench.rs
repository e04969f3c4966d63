//! The PostgreSQL fleet's numbers, against gateways that are already running (see
//! `benches/fleet/run.sh`, which starts PostgreSQL and the replicas and runs this).
//!
//! ```text
//! fleet_bench propagate --db CONNINFO --admin A,B,C [--writes 1000] [--app bench]
//! fleet_bench load --db CONNINFO --apps 10000 --entries 30
//! fleet_bench cold --gateway BIN --config FILE --apps 10000
//! ```
//!
//! `propagate` makes `--writes` changes one after another through the first replica's admin
//! API (adding and removing an entry of one app in turn) and times each from its commit (the
//! moment its `NOTIFY`, whose payload is the change number, reaches a connection of this
//! program's own) until every replica has put it in force (the `store` event each replica sends
//! on `/v1/events` once the change is swapped in, with what it spent reading, validating and
//! swapping: `took_ms`). `load` puts `--apps` apps with `--entries` server and as many web-view
//! entries each into the store in one transaction (one change the replicas apply at once).
//! `cold` starts a gateway and times it until `/v1/status` shows the apps.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// When each (replica, change number) was put in force, and what the replica spent on it.
type Seen = Arc<Mutex<HashMap<(usize, i64), (Instant, f64)>>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One request with `Connection: close`: the status and the body.
async fn request(admin: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("connect to the admin listener");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// Follow `/v1/events` of replica `index` (HTTP/1.0: the stream is the body until close) and
/// note every `store` event.
async fn follow(index: usize, admin: SocketAddr, seen: Seen) {
    let mut stream = TcpStream::connect(admin).await.expect("connect to the admin listener");
    let head = format!("GET /v1/events HTTP/1.0\r\nHost: {admin}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let mut kind = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ")
            && kind == "store"
        {
            let at = Instant::now();
            let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(revision) = value["revision"].as_i64() {
                let took = value["took_ms"].as_f64().unwrap_or(f64::NAN);
                seen.lock().unwrap().insert((index, revision), (at, took));
            }
        }
    }
}

async fn db(conninfo: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<(i64, Instant)>) {
    let (client, mut connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message
                && let Ok(change) = n.payload().parse::<i64>()
            {
                let _ = tx.send((change, Instant::now()));
            }
        }
    });
    (client, rx)
}

async fn propagate(args: &[String]) {
    let conninfo = arg(args, "--db").expect("--db");
    let admins: Vec<SocketAddr> =
        arg(args, "--admin").expect("--admin").split(',').map(|a| a.parse().expect("an address")).collect();
    let writes: usize = arg(args, "--writes").map_or(1000, |w| w.parse().unwrap());
    let app = arg(args, "--app").unwrap_or_else(|| "bench".to_owned());
    let (client, mut notifications) = db(&conninfo).await;
    client.batch_execute("LISTEN gateway_apps").await.unwrap();
    let seen: Seen = Arc::default();
    for (i, admin) in admins.iter().enumerate() {
        tokio::spawn(follow(i, *admin, seen.clone()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = request(admins[0], "GET", &format!("/v1/apps/{app}"), "", "").await;
    if status == 404 {
        let (status, body) = request(admins[0], "PUT", &format!("/v1/apps/{app}"), "If-None-Match: *\r\n", "{}").await;
        assert_eq!(status, 201, "{body}");
        let _ = tokio::time::timeout(Duration::from_secs(5), notifications.recv()).await;
    } else {
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while notifications.try_recv().is_ok() {}

    let mut all = Vec::with_capacity(writes);
    let mut per_replica: Vec<Vec<f64>> = vec![Vec::new(); admins.len()];
    let mut took: Vec<f64> = Vec::new();
    let started = Instant::now();
    for i in 0..writes {
        let entry = format!("w{}.bench.example", i / 2);
        let (status, body) = if i % 2 == 0 {
            let body = format!("{{\"entry\":\"{entry}\"}}");
            request(admins[0], "POST", &format!("/v1/apps/{app}/server_domains"), "", &body).await
        } else {
            request(admins[0], "DELETE", &format!("/v1/apps/{app}/server_domains/{entry}"), "", "").await
        };
        assert!(status == 201 || status == 204, "write {i}: {status} {body}");
        let (change, committed) = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
            .await
            .expect("no notification within 10 s")
            .expect("the notification connection closed");
        let deadline = Instant::now() + Duration::from_secs(10);
        let applied = loop {
            let found: Vec<(Instant, f64)> = {
                let seen = seen.lock().unwrap();
                (0..admins.len()).filter_map(|r| seen.get(&(r, change)).copied()).collect()
            };
            if found.len() == admins.len() {
                break found;
            }
            assert!(Instant::now() < deadline, "change {change} not in force on every replica within 10 s");
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        for (r, (at, spent)) in applied.iter().enumerate() {
            per_replica[r].push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
            if r > 0 {
                took.push(*spent);
            }
        }
        let last = applied.iter().map(|(at, _)| *at).max().unwrap();
        all.push(last.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    let elapsed = started.elapsed();
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sort(&mut all);
    sort(&mut took);
    println!(
        "{writes} writes in {:.1} s through {}; commit -> in force on all {} replicas: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        elapsed.as_secs_f64(),
        admins[0],
        admins.len(),
        percentile(&all, 50.0),
        percentile(&all, 90.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN)
    );
    for (r, v) in per_replica.iter_mut().enumerate() {
        sort(v);
        println!(
            "  replica {} ({}): p50 {:.1} ms, p99 {:.1} ms",
            r,
            admins[r],
            percentile(v, 50.0),
            percentile(v, 99.0)
        );
    }
    println!(
        "  applying one change on the replicas that did not take the write (read, validate, swap): p50 {:.1} ms, p99 {:.1} ms",
        percentile(&took, 50.0),
        percentile(&took, 99.0)
    );
}

async fn load(args: &[String]) {
    let conninfo = arg(args, "--db").expect("--db");
    let apps: usize = arg(args, "--apps").map_or(10_000, |n| n.parse().unwrap());
    let entries: usize = arg(args, "--entries").map_or(30, |n| n.parse().unwrap());
    let (mut client, _) = db(&conninfo).await;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(apps);
    let mut definitions = Vec::with_capacity(apps);
    for a in 0..apps {
        let list = |kind: &str| -> String {
            (0..entries).map(|e| format!("  \"{kind}{e}.app{a}.example\",\n")).collect::<String>()
        };
        let id = format!("app{a:05}");
        definitions.push(format!(
            "[[app]]\nid = \"{id}\"\nserver_domains = [\n{}]\nwebview_domains = [\n{}]\n",
            list("api"),
            list("h5")
        ));
        ids.push(id);
    }
    let tx = client.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(7883952290624647271)", &[]).await.unwrap();
    let change: i64 = tx.query_one("SELECT nextval('gateway_change')", &[]).await.unwrap().get(0);
    tx.execute(
        "INSERT INTO gateway_apps (id, revision, definition, change)
         SELECT id, 1, definition, $3 FROM unnest($1::text[], $2::text[]) AS t(id, definition)
         ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, change = EXCLUDED.change",
        &[&ids, &definitions, &change],
    )
    .await
    .unwrap();
    tx.execute("SELECT pg_notify('gateway_apps', $1)", &[&change.to_string()]).await.unwrap();
    tx.commit().await.unwrap();
    let bytes: usize = definitions.iter().map(String::len).sum();
    println!(
        "loaded {apps} apps x {} entries ({:.1} MB of definitions) as change {change} in {:.2} s",
        2 * entries,
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
}

async fn cold(args: &[String]) {
    let gateway = arg(args, "--gateway").expect("--gateway");
    let config = arg(args, "--config").expect("--config");
    let admin: SocketAddr = arg(args, "--admin").expect("--admin").parse().unwrap();
    let apps: u64 = arg(args, "--apps").map_or(10_000, |n| n.parse().unwrap());
    let started = Instant::now();
    let mut child = tokio::process::Command::new(gateway)
        .args(["run", "-c", &config])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    loop {
        if TcpStream::connect(admin).await.is_ok() {
            let (status, body) = request(admin, "GET", "/v1/status", "", "").await;
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if status == 200 && value["apps"].as_u64() == Some(apps) {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "not serving {apps} apps after 2 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "cold start: serving {apps} apps from the database {:.0} ms after the process started",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let _ = child.kill().await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("propagate") => propagate(&args).await,
        Some("load") => load(&args).await,
        Some("cold") => cold(&args).await,
        _ => eprintln!("usage: fleet_bench propagate|load|cold ... (see the source)"),
    }
}
