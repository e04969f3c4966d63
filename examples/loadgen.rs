//! Load generator for `benches/load/run.sh`: what oha cannot do against a proxy.
//!
//! `deny`: C kept-alive connections each send `CONNECT` for a host the proxy refuses, as
//! fast as the answers come, for S seconds; prints refusals per second.
//! `idle`: open N tunnels (CONNECT, then a full TLS handshake with the origin through each,
//! so every proxy has an established tunnel past any inspection), print `ready`, hold them
//! until stdin closes or S seconds pass; prints how many opened and how many failed.
//! `stall`: serve as a plain TCP origin on `--origin` (accept, count what arrives, hold), open N
//! tunnels to it, send the first half of a ClientHello grown to `--hello-bytes` on each and
//! stall there, as a client holding the gateway's ClientHello wait open would; print `ready`
//! with how many the gateway closed, hold until stdin closes or S seconds pass.
//!
//! Only ever connects to the proxy address it is given (the harness passes loopback).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    mode: String,
    proxy: SocketAddr,
    target: String,
    auth: Option<String>,
    connections: usize,
    seconds: u64,
    count: usize,
    ca: Option<String>,
    hello_bytes: usize,
    origin: Option<SocketAddr>,
}

fn args() -> Args {
    let mut args = Args {
        mode: String::new(),
        proxy: "127.0.0.1:8080".parse().unwrap(),
        target: String::new(),
        auth: None,
        connections: 32,
        seconds: 10,
        count: 1000,
        ca: None,
        hello_bytes: 65_000,
        origin: None,
    };
    let mut it = std::env::args().skip(1);
    args.mode = it.next().expect("usage: loadgen deny|idle --proxy ADDR --target HOST:PORT [...]");
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => args.proxy = value.parse().expect("--proxy IP:PORT"),
            "--target" => args.target = value,
            "--auth" => args.auth = Some(value),
            "--connections" => args.connections = value.parse().expect("a number"),
            "--seconds" => args.seconds = value.parse().expect("a number"),
            "--count" => args.count = value.parse().expect("a number"),
            "--ca" => args.ca = Some(value),
            "--hello-bytes" => args.hello_bytes = value.parse().expect("a number"),
            "--origin" => args.origin = Some(value.parse().expect("--origin IP:PORT")),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(args.proxy.ip().is_loopback(), "loadgen only talks to loopback proxies");
    assert!(args.origin.is_none_or(|o| o.ip().is_loopback()), "the origin listens on loopback only");
    args
}

fn connect_request(args: &Args) -> Vec<u8> {
    let mut request = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n", args.target);
    if let Some(auth) = &args.auth {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// Read one response head (and its body, by Content-Length); returns the status.
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<u16> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await?;
    Ok(status)
}

async fn deny(args: Arc<Args>) {
    let done = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let request = Arc::new(connect_request(&args));
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (args, done, refused, request) = (args.clone(), done.clone(), refused.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let Ok(stream) = TcpStream::connect(args.proxy).await else { continue };
                let _ = stream.set_nodelay(true);
                let mut stream = BufReader::new(stream);
                while Instant::now() < deadline {
                    if stream.get_mut().write_all(&request).await.is_err() {
                        break;
                    }
                    match read_response(&mut stream).await {
                        Ok(status) => {
                            done.fetch_add(1, Ordering::Relaxed);
                            if (400..500).contains(&status) {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let answered = done.load(Ordering::Relaxed);
    println!(
        "{{\"answered\":{answered},\"refused\":{},\"per_sec\":{:.1}}}",
        refused.load(Ordering::Relaxed),
        answered as f64 / args.seconds as f64
    );
}

async fn idle(args: Arc<Args>) {
    let ca = args.ca.as_deref().expect("idle needs --ca");
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("a PEM file") {
        roots.add(cert.expect("a certificate")).expect("a CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let host = args.target.rsplit_once(':').map_or(args.target.as_str(), |(h, _)| h).to_owned();
    let request = Arc::new(connect_request(&args));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connections));
    let mut tasks = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let (args, connector, host, request, gate) =
            (args.clone(), connector.clone(), host.clone(), request.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _opening = gate.acquire_owned().await.ok()?;
            let stream = TcpStream::connect(args.proxy).await.ok()?;
            let mut stream = BufReader::new(stream);
            stream.get_mut().write_all(&request).await.ok()?;
            if read_response(&mut stream).await.ok()? != 200 {
                return None;
            }
            let name = ServerName::try_from(host).ok()?;
            connector.connect(name, stream.into_inner()).await.ok()
        }));
    }
    let mut held = Vec::with_capacity(args.count);
    for task in tasks {
        if let Ok(Some(tunnel)) = task.await {
            held.push(tunnel);
        }
    }
    println!("{{\"ready\":true,\"opened\":{},\"failed\":{}}}", held.len(), args.count - held.len());
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(args.seconds), async {
        while let Ok(n) = stdin.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    drop(held);
}

/// A ClientHello rustls writes for `host`, grown by a padding extension to about `size` bytes
/// (at most a 64 KiB handshake message), in records of at most 16 KiB.
fn large_client_hello(host: &str, size: usize) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).expect("a host name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut first = Vec::new();
    conn.write_tls(&mut first).unwrap();
    // padding (extension 21) to bring the records to about `size` bytes on the wire
    let records = size.div_ceil(16 * 1024);
    let message = first.len() - 5;
    let padding = size.saturating_sub(message + 4 + 5 * records).min(0xffff - 4 - message);
    miniapp_gateway::proxy::client_hello::with_extension(&first, 0x0015, &vec![0; padding])
}

async fn stall(args: Arc<Args>) {
    let origin =
        tokio::net::TcpListener::bind(args.origin.expect("stall needs --origin")).await.expect("bind --origin");
    let origin_bytes = Arc::new(AtomicU64::new(0));
    let counted = origin_bytes.clone();
    tokio::spawn(async move {
        while let Ok((mut upstream, _)) = origin.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = upstream.read(&mut buf).await {
                    counted.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let host = args.target.rsplit_once(':').map_or(args.target.as_str(), |(h, _)| h);
    let hello = large_client_hello(host, args.hello_bytes);
    let half = Arc::new(hello[..hello.len() / 2].to_vec());
    let request = Arc::new(connect_request(&args));
    let closed = Arc::new(AtomicU64::new(0));
    let settled = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connections));
    let mut tasks = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let (args, request, half, gate) = (args.clone(), request.clone(), half.clone(), gate.clone());
        let (closed, settled, failed) = (closed.clone(), settled.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let open = async {
                let _opening = gate.acquire_owned().await.ok()?;
                let stream = TcpStream::connect(args.proxy).await.ok()?;
                let mut stream = BufReader::new(stream);
                stream.get_mut().write_all(&request).await.ok()?;
                if read_response(&mut stream).await.ok()? != 200 {
                    return None;
                }
                let mut stream = stream.into_inner();
                stream.write_all(&half).await.ok()?;
                Some(stream)
            };
            let opened = open.await;
            if opened.is_none() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            settled.fetch_add(1, Ordering::Relaxed);
            let mut stream = opened?;
            // Nothing comes back while the gateway waits; an end means it gave up on us.
            let mut sink = [0u8; 64];
            while let Ok(1..) = stream.read(&mut sink).await {}
            closed.fetch_add(1, Ordering::Relaxed);
            Some(())
        }));
    }
    while settled.load(Ordering::Relaxed) < args.count as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{{\"ready\":true,\"opened\":{},\"failed\":{failed},\"closed_by_gateway\":{},\"sent_each\":{},\"hello_bytes\":{},\"origin_bytes\":{}}}",
        args.count as u64 - failed,
        closed.load(Ordering::Relaxed),
        half.len(),
        hello.len(),
        origin_bytes.load(Ordering::Relaxed)
    );
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(args.seconds), async {
        while let Ok(n) = stdin.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    for task in tasks {
        task.abort();
    }
}

#[tokio::main]
async fn main() {
    let args = Arc::new(args());
    match args.mode.as_str() {
        "deny" => deny(args).await,
        "idle" => idle(args).await,
        "stall" => stall(args).await,
        other => panic!("unknown mode {other}: deny, idle or stall"),
    }
}
