//! Test harness: a real TLS origin on port 0, the real gateway on port 0, and a client that
//! speaks CONNECT and then TLS through the tunnel, as curl would.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miniapp_gateway::access_log::{AccessLog, LogFormat};
use miniapp_gateway::config;
use miniapp_gateway::proxy::Gateway;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const WAIT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS origin that answers `GET /bytes/N` with N pattern bytes and `POST /sum` with the
/// length and checksum of the body it received.
pub struct Origin {
    pub addr: SocketAddr,
    pub ca: CertificateDer<'static>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// TLS handshakes completed.
    pub handshakes: Arc<AtomicUsize>,
    /// Raw bytes received on every connection, before TLS.
    pub bytes_received: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The byte at position `i` of every generated body.
pub fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// FNV-1a, to compare large bodies without keeping both.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

impl Origin {
    pub async fn start(names: &[&str]) -> Origin {
        Self::start_with(names, rustls::crypto::ring::default_provider()).await
    }

    /// An origin whose TLS is made with `provider` (to offer only some key exchange groups).
    pub async fn start_with(names: &[&str], provider: rustls::crypto::CryptoProvider) -> Origin {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let bytes_received = Arc::new(AtomicUsize::new(0));
        let (c, h, b) = (connections.clone(), handshakes.clone(), bytes_received.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let h = h.clone();
                let stream = Counting { inner: stream, count: b.clone() };
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        h.fetch_add(1, Ordering::SeqCst);
                        let _ = serve_origin(tls).await;
                    }
                });
            }
        });
        Origin { addr, ca: cert, connections, handshakes, bytes_received, task }
    }
}

/// A stream that counts the bytes read from it.
pub struct Counting<S> {
    pub inner: S,
    pub count: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count.fetch_add(buf.filled().len() - before, Ordering::SeqCst);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_origin<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) -> std::io::Result<()> {
    loop {
        let Some((head, mut rest)) = read_head(&mut tls).await? else { return Ok(()) };
        let request_line = head.lines().next().unwrap_or_default().to_owned();
        let headers = parse_headers(&head);
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
        let body: Vec<u8> = if let Some(n) = path.strip_prefix("/bytes/") {
            let n: usize = n.parse().unwrap_or(0);
            (0..n).map(pattern).collect()
        } else if path == "/sum" {
            let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while rest.len() < len {
                let mut buf = vec![0u8; 64 * 1024];
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&buf[..n]);
            }
            format!("{} {}", rest.len(), checksum(&rest)).into_bytes()
        } else {
            b"hello from origin".to_vec()
        };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&body).await?;
        tls.flush().await?;
    }
}

/// Read an HTTP head; returns it and whatever was read past it.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok(Some((head, buf[end + 4..].to_vec())));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn parse_headers(head: &str) -> HashMap<String, String> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// A shared buffer the access log writes into.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// Wait for a line satisfying `pred` (the log is written by a background thread).
    pub async fn wait_for(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            assert!(tokio::time::Instant::now() < deadline, "no such access log line in {:#?}", self.lines());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running gateway on port 0, serving a config file in its own temporary directory, with
/// the file watcher running as in production.
pub struct TestGateway {
    /// `server.listen` first, then each `[[listener]]`.
    pub addrs: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log: LogBuffer,
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub reloader: Arc<miniapp_gateway::reload::Reloader>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    watcher: JoinHandle<()>,
}

impl TestGateway {
    /// Start a gateway on `toml` (its `listen` addresses should use port 0).
    pub async fn start(toml: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        Self::start_at(dir, path).await
    }

    /// Start a gateway on `toml` whose `apps_dir = "apps"` holds `apps`: (file name, text).
    pub async fn start_with_apps(toml: &str, apps: &[(&str, &str)]) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("apps")).unwrap();
        for (name, text) in apps {
            std::fs::write(dir.path().join("apps").join(name), text).unwrap();
        }
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        Self::start_at(dir, path).await
    }

    /// Start a gateway on the config file at `path` inside `dir`.
    pub async fn start_at(dir: tempfile::TempDir, path: std::path::PathBuf) -> TestGateway {
        // MINIAPP_TEST_WORKERS=N runs every such gateway on N worker event loops.
        if let Ok(workers) = std::env::var("MINIAPP_TEST_WORKERS") {
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.contains("\nworkers =") {
                let text = text.replacen("[server]\n", &format!("[server]\nworkers = {workers}\n"), 1);
                std::fs::write(&path, text).unwrap();
            }
        }
        let mut loader = config::Loader::new(&path);
        let config = loader.load().unwrap_or_else(|e| panic!("{e}"));
        let log = LogBuffer::default();
        let (access_log, _writer) = AccessLog::start(LogFormat::Json, Box::new(log.clone()));
        let gateway = Gateway::bind(config, loader, access_log).await.unwrap();
        let addrs = gateway.local_addrs();
        let admin = gateway.admin_addr();
        let reloader = gateway.reloader();
        let watcher = miniapp_gateway::reload::spawn_watcher(reloader.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        TestGateway { addrs, admin, log, dir, path, reloader, stop: Some(stop), task: Some(task), watcher }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the test config sets admin_listen")
    }

    /// Begin shutdown; returns the task that completes when the gateway has drained.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.take().expect("shut down once")
    }

    /// Replace the config file the way editors do: write a new file, rename it over.
    pub fn save_config(&self, toml: &str) {
        let tmp = self.dir.path().join(".gateway.toml.tmp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// The value of the metric sample whose name and labels are exactly `sample`
    /// (e.g. `gateway_config_generation` or `gateway_config_reloads_total{result="success"}`).
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, _, body) = admin_request(self.admin(), "GET", "/metrics", None, None).await;
        metric_value(&String::from_utf8(body).unwrap(), sample)
    }

    /// Wait until `sample` reaches `value`; returns the last value seen.
    pub async fn wait_metric(&self, sample: &str, value: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = self.metric(sample).await;
            if seen == value || tokio::time::Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The value of one sample in a Prometheus text exposition; 0 when absent.
pub fn metric_value(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// One request to the admin listener: (status, headers, body).
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, HashMap<String, String>, Vec<u8>) {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    let answer = send_raw(admin, &request).await;
    (answer.status, answer.headers, answer.body)
}

/// `admin_request` whose body is JSON.
pub async fn admin_json(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, headers, body) = admin_request(admin, method, path, body, token).await;
    assert_eq!(headers.get("content-type").map(String::as_str), Some("application/json"), "{path}");
    (status, serde_json::from_slice(&body).unwrap())
}

/// What a CONNECT got back.
pub struct Answer<S = TcpStream> {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The connection, positioned after the response (the tunnel when status is 200).
    pub stream: S,
}

impl<S> Answer<S> {
    pub fn reason(&self) -> &str {
        self.headers.get("x-gateway-reason").map_or("", String::as_str)
    }

    pub fn decision(&self) -> &str {
        self.headers.get("x-gateway-decision").map_or("", String::as_str)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub fn basic(app: &str, token: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{app}:{token}")))
}

/// Send raw request text on a new connection and read one response.
pub async fn send_raw(proxy: SocketAddr, request: &str) -> Answer {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

pub async fn read_answer<S: AsyncRead + Unpin>(mut stream: S) -> Answer<S> {
    let (head, mut body) =
        tokio::time::timeout(WAIT, read_head(&mut stream)).await.unwrap().unwrap().expect("a response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = parse_headers(&head);
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    Answer { status, headers, body, stream }
}

/// `CONNECT target` with the given extra header lines.
pub async fn connect(proxy: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Answer {
    connect_over(TcpStream::connect(proxy).await.unwrap(), target, headers).await
}

/// `CONNECT target` over an established connection to the proxy (plain or TLS).
pub async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &str,
    headers: &[(&str, &str)],
) -> Answer<S> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_answer(stream).await
}

/// `CONNECT target` as app `app` with token `token`.
pub async fn connect_as(proxy: SocketAddr, app: &str, token: &str, target: &str) -> Answer {
    let auth = basic(app, token);
    connect(proxy, target, &[("Proxy-Authorization", &auth)]).await
}

/// Speak TLS for `server_name` over an established tunnel.
pub async fn tls_over<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ca: &CertificateDer<'static>,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<S> {
    tls_with(stream, client_config(ca, None), server_name).await
}

/// A TLS client config trusting `ca`, optionally presenting a client certificate.
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// Complete a TLS handshake for `server_name` over `stream` with `config`.
pub async fn tls_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: rustls::ClientConfig,
    server_name: &str,
) -> tokio_rustls::client::TlsStream<S> {
    try_tls_with(stream, config, server_name).await.unwrap()
}

pub async fn try_tls_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: rustls::ClientConfig,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, stream)).await.unwrap()
}

/// One HTTP/1.1 request over a TLS stream; returns the response body.
pub async fn https_request<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut S,
    method: &str,
    path: &str,
    body: &[u8],
) -> Vec<u8> {
    let head = format!("{method} {path} HTTP/1.1\r\nhost: origin\r\ncontent-length: {}\r\n\r\n", body.len());
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    tls.flush().await.unwrap();
    let (head, mut rest) = tokio::time::timeout(WAIT, read_head(tls)).await.unwrap().unwrap().unwrap();
    let len: usize = parse_headers(&head)["content-length"].parse().unwrap();
    let mut chunk = vec![0u8; 64 * 1024];
    while rest.len() < len {
        let n = tokio::time::timeout(WAIT, tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "tunnel closed after {} of {len} bytes", rest.len());
        rest.extend_from_slice(&chunk[..n]);
    }
    rest
}

/// Wait until the gateway closes `stream`; panics if it stays open.
pub async fn closed_by_gateway<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("the tunnel stayed open") {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// hangs until the caller gives up. Keep the fillers and the listener alive meanwhile.
pub async fn blackhole() -> (SocketAddr, Vec<TcpStream>, TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => break,
        }
    }
    (addr, fillers, listener)
}

/// The first flight rustls' client writes for `name`: one record holding a ClientHello.
pub fn client_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name.to_owned().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Make room for `wanted` open files in this test process (the soft limit is often 1,024).
pub fn raise_open_files_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < wanted {
            // Raising the hard limit too works where the tests run as root (CI does).
            let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max.max(wanted) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                limit.rlim_cur = wanted.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

/// An `[[admin_user]]` table admitting `token` as `name` with `role`.
pub fn admin_user(name: &str, role: &str, token: &str) -> String {
    format!("\n[[admin_user]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nrole = \"{role}\"\n", token_hash(token))
}

/// The SHA-256 of a token in hex, as `[[admin_user]].token_sha256` holds it.
pub fn token_hash(token: &str) -> String {
    miniapp_gateway::config::token_sha256(token).iter().map(|b| format!("{b:02x}")).collect()
}
