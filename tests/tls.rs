//! Only real TLS to the host named goes through: the first bytes of every tunnel are checked
//! before any of them reach the origin.

mod common;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

fn config(origin: std::net::SocketAddr, policy: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[policy]
{policy}

[resolve]
"api.shop.example" = "{origin}"
"img.shop.example" = "{origin}"

[[app]]
id = "demo"
server_domains = ["api.shop.example", "img.shop.example"]

[[app]]
id = "watch"
action = "report"
server_domains = ["api.shop.example"]
"#
    )
}

async fn setup(policy: &str) -> (Origin, TestGateway) {
    let origin = Origin::start(&["api.shop.example", "img.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr, policy)).await;
    (origin, gw)
}

#[tokio::test]
async fn plaintext_in_a_tunnel_never_reaches_the_origin() {
    let (origin, gw) = setup("").await;
    let mut answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    answer.stream.write_all(b"GET / HTTP/1.1\r\nHost: api.shop.example\r\n\r\n").await.unwrap();
    closed_by_gateway(&mut answer.stream).await;
    let line = gw.log.wait_for(|l| l["reason"] == "not_tls").await;
    assert_eq!((line["decision"].as_str(), line["closed_by"].as_str()), (Some("deny"), Some("tls_check")));
    assert_eq!(line["bytes_up"], 0);
    assert_eq!(origin.bytes_received.load(Ordering::SeqCst), 0, "a plaintext byte reached the origin");
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 0);
    let sample = r#"gateway_requests_total{app="demo",channel="request",decision="deny",reason="not_tls"}"#;
    assert_eq!(gw.metric(sample).await, 1.0);
    let allowed = r#"gateway_requests_total{app="demo",channel="request",decision="allow",reason="whitelisted"}"#;
    assert_eq!(gw.metric(allowed).await, 0.0, "the tunnel is counted once, as refused");
}

#[tokio::test]
async fn tls_for_another_host_is_cut_before_the_origin_sees_a_client_hello() {
    let (origin, gw) = setup("").await;
    let answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    // domain fronting: the CONNECT names one allowed host, the TLS another
    let fronted = try_tls_with(answer.stream, client_config(&origin.ca, None), "img.shop.example").await;
    assert!(fronted.is_err(), "the handshake must not complete");
    let line = gw.log.wait_for(|l| l["reason"] == "sni_mismatch").await;
    assert_eq!(line["decision"], "deny");
    assert_eq!(origin.bytes_received.load(Ordering::SeqCst), 0, "the ClientHello reached the origin");
}

/// A stream that writes at most one byte per write, so every byte is its own TCP segment.
struct Trickle<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Trickle<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Trickle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let one = &buf[..buf.len().min(1)];
        Pin::new(&mut self.0).poll_write(cx, one)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_client_hello_sent_one_byte_at_a_time_passes() {
    let (origin, gw) = setup("").await;
    let answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    answer.stream.set_nodelay(true).unwrap();
    let mut tls = tls_over(Trickle(answer.stream), &origin.ca, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/bytes/3000", b"").await.len(), 3000);
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn report_mode_records_the_failure_and_lets_it_through() {
    let (origin, gw) = setup("").await;
    let mut answer = connect_as(gw.addr(), "watch", "x", "api.shop.example:443").await;
    assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
    answer.stream.write_all(b"plain words").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.bytes_received.load(Ordering::SeqCst) < 11 {
        assert!(tokio::time::Instant::now() < deadline, "report mode did not pass the bytes on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(answer);
    let line = gw.log.wait_for(|l| l["app"] == "watch").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("report"), Some("not_tls")));
    assert_eq!(line["bytes_up"], 11);
}

#[tokio::test]
async fn with_verify_tls_off_the_tunnel_is_not_inspected() {
    let (origin, gw) = setup("verify_tls = false").await;
    let mut answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    answer.stream.write_all(b"plain words").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.bytes_received.load(Ordering::SeqCst) < 11 {
        assert!(tokio::time::Instant::now() < deadline, "the bytes did not pass");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

mod https_proxy {
    use super::*;
    use miniapp_gateway::policy::Channel;
    use miniapp_gateway::tls::write_dev_certs;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpStream;

    struct Rig {
        origin: Origin,
        gw: TestGateway,
        certs: tempfile::TempDir,
        /// Certificates from a CA the gateway does not trust.
        strangers: tempfile::TempDir,
    }

    impl Rig {
        async fn start() -> Rig {
            let origin = Origin::start(&["api.shop.example", "m.shop.example"]).await;
            let certs = tempfile::tempdir().unwrap();
            let apps =
                [("demo".to_owned(), None), ("demo".to_owned(), Some(Channel::Webview)), ("ghost".to_owned(), None)];
            write_dev_certs(certs.path(), &[], &apps, false).unwrap();
            let strangers = tempfile::tempdir().unwrap();
            write_dev_certs(strangers.path(), &[], &apps[..1], false).unwrap();
            let dir = certs.path().display();
            let config = format!(
                r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[tls]
cert = "{dir}/gateway.crt"
key = "{dir}/gateway.key"
client_ca = "{dir}/ca.crt"

[resolve]
"api.shop.example" = "{o}"
"m.shop.example" = "{o}"

[[app]]
id = "demo"
token = "s3cret"
server_domains = ["api.shop.example"]
webview_domains = ["m.shop.example"]
"#,
                o = origin.addr
            );
            let gw = TestGateway::start(&config).await;
            Rig { origin, gw, certs, strangers }
        }

        fn pem(&self, dir: &std::path::Path, stem: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let cert = CertificateDer::from_pem_file(dir.join(format!("{stem}.crt"))).unwrap();
            let key = PrivateKeyDer::from_pem_file(dir.join(format!("{stem}.key"))).unwrap();
            (vec![cert], key)
        }

        fn gateway_ca(&self) -> CertificateDer<'static> {
            CertificateDer::from_pem_file(self.certs.path().join("ca.crt")).unwrap()
        }

        /// A TLS connection to the proxy listener, optionally with a client certificate.
        async fn proxy(
            &self,
            client_cert: Option<&str>,
        ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
            let identity = client_cert.map(|stem| self.pem(self.certs.path(), stem));
            let config = client_config(&self.gateway_ca(), identity);
            try_tls_with(TcpStream::connect(self.gw.addr()).await.unwrap(), config, "localhost").await
        }

        /// Through the HTTPS proxy to the origin and back.
        async fn fetch(
            &self,
            proxy: tokio_rustls::client::TlsStream<TcpStream>,
            target: &str,
            headers: &[(&str, &str)],
        ) -> (Answer<tokio_rustls::client::TlsStream<TcpStream>>, Option<Vec<u8>>) {
            let answer = connect_over(proxy, &format!("{target}:443"), headers).await;
            if answer.status != 200 {
                return (answer, None);
            }
            let Answer { status, headers, body, stream } = answer;
            let mut tls = tls_over(stream, &self.origin.ca, target).await;
            let got = https_request(&mut tls, "GET", "/", b"").await;
            (Answer { status, headers, body, stream: tls.into_inner().0 }, Some(got))
        }
    }

    #[tokio::test]
    async fn basic_auth_over_the_https_proxy() {
        let rig = Rig::start().await;
        let proxy = rig.proxy(None).await.unwrap();
        let auth = basic("demo", "s3cret");
        let (answer, body) = rig.fetch(proxy, "api.shop.example", &[("Proxy-Authorization", &auth)]).await;
        assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
        assert_eq!(body.as_deref(), Some(&b"hello from origin"[..]));
        let proxy = rig.proxy(None).await.unwrap();
        let (answer, _) = rig.fetch(proxy, "api.shop.example", &[]).await;
        assert_eq!((answer.status, answer.reason()), (407, "auth_required"));
    }

    #[tokio::test]
    async fn a_client_certificate_names_the_app_on_both_channels() {
        let rig = Rig::start().await;
        let (answer, body) = rig.fetch(rig.proxy(Some("demo")).await.unwrap(), "api.shop.example", &[]).await;
        assert_eq!((answer.status, answer.reason()), (200, "whitelisted"));
        assert_eq!(body.as_deref(), Some(&b"hello from origin"[..]));
        // a plain app certificate leaves the channel to the header
        let headers = [("X-Miniapp-Channel", "webview")];
        let (answer, body) = rig.fetch(rig.proxy(Some("demo")).await.unwrap(), "m.shop.example", &headers).await;
        assert_eq!((answer.status, body.is_some()), (200, true));
        // a miniapp://demo/webview certificate fixes the web-view channel
        let (answer, body) = rig.fetch(rig.proxy(Some("demo-webview")).await.unwrap(), "m.shop.example", &[]).await;
        assert_eq!((answer.status, body.is_some()), (200, true));
        let request = [("X-Miniapp-Channel", "request")];
        let (answer, _) = rig.fetch(rig.proxy(Some("demo-webview")).await.unwrap(), "api.shop.example", &request).await;
        assert_eq!((answer.status, answer.reason()), (403, "not_whitelisted"));
        assert_eq!(answer.json()["channel"], "webview");
        // the certificate comes before Basic auth: a wrong password does not matter
        let wrong = basic("demo", "wrong");
        let (answer, _) = rig
            .fetch(rig.proxy(Some("demo")).await.unwrap(), "api.shop.example", &[("Proxy-Authorization", &wrong)])
            .await;
        assert_eq!(answer.status, 200);
        let webview = r#"gateway_requests_total{app="demo",channel="webview",decision="allow",reason="whitelisted"}"#;
        assert_eq!(rig.gw.metric(webview).await, 2.0);
        let request = r#"gateway_requests_total{app="demo",channel="request",decision="allow",reason="whitelisted"}"#;
        assert_eq!(rig.gw.metric(request).await, 2.0);
    }

    #[tokio::test]
    async fn a_certificate_for_an_unknown_app_is_refused() {
        let rig = Rig::start().await;
        let (answer, _) = rig.fetch(rig.proxy(Some("ghost")).await.unwrap(), "api.shop.example", &[]).await;
        assert_eq!((answer.status, answer.reason()), (403, "unknown_app"));
        assert_eq!(answer.json()["app"], "ghost");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_not_an_identity() {
        let rig = Rig::start().await;
        let identity = rig.pem(rig.strangers.path(), "demo");
        let config = client_config(&rig.gateway_ca(), Some(identity));
        let stream = TcpStream::connect(rig.gw.addr()).await.unwrap();
        // TLS 1.3 reports the client's certificate being refused on the first read
        let refused = match try_tls_with(stream, config, "localhost").await {
            Err(_) => true,
            Ok(proxy) => {
                let answer = tokio::time::timeout(WAIT, async {
                    let mut proxy = proxy;
                    let request = "CONNECT api.shop.example:443 HTTP/1.1\r\nHost: api.shop.example:443\r\n\r\n";
                    if proxy.write_all(request.as_bytes()).await.is_err() {
                        return None;
                    }
                    read_head(&mut proxy).await.ok().flatten()
                })
                .await
                .unwrap();
                answer.is_none()
            }
        };
        assert!(refused, "a certificate from an untrusted CA got an answer");
        assert_eq!(rig.origin.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_new_client_ca_ends_what_the_old_one_verified() {
        let rig = Rig::start().await;
        let (answer, _) = rig.fetch(rig.proxy(Some("demo")).await.unwrap(), "api.shop.example", &[]).await;
        assert_eq!(answer.status, 200);
        let mut tunnel = answer.stream;
        // a kept-alive connection, refused once and still open
        let kept = connect_over(rig.proxy(Some("demo")).await.unwrap(), "evil.example:443", &[]).await;
        assert_eq!((kept.status, kept.reason()), (403, "not_whitelisted"));

        let text = std::fs::read_to_string(&rig.gw.path).unwrap();
        let ours = format!("client_ca = \"{}/ca.crt\"", rig.certs.path().display());
        let theirs = format!("client_ca = \"{}/ca.crt\"", rig.strangers.path().display());
        std::fs::write(&rig.gw.path, text.replace(&ours, &theirs)).unwrap();
        let (status, _) = admin_json(rig.gw.admin(), "POST", "/-/reload", None, None).await;
        assert_eq!(status, 200);

        closed_by_gateway(&mut tunnel).await;
        let again = connect_over(kept.stream, "api.shop.example:443", &[]).await;
        assert_eq!((again.status, again.reason()), (407, "bad_credentials"));
        assert!(again.json()["message"].as_str().unwrap().contains("no longer verifies"));
        let line = rig.gw.log.wait_for(|l| l["closed_by"] == "revoked").await;
        assert_eq!(line["app"], "demo");
    }

    #[tokio::test]
    async fn a_reload_may_not_take_tls_away_from_a_tls_listener() {
        let rig = Rig::start().await;
        let text = std::fs::read_to_string(&rig.gw.path).unwrap();
        let start = text.find("[tls]").unwrap();
        let end = text.find("[resolve]").unwrap();
        std::fs::write(&rig.gw.path, format!("{}{}", &text[..start], &text[end..])).unwrap();
        let (status, body) = admin_json(rig.gw.admin(), "POST", "/-/reload", None, None).await;
        assert_eq!(status, 422);
        assert!(body["error"].as_str().unwrap().contains("refusing to remove [tls]"), "{body}");
        let (answer, got) = rig.fetch(rig.proxy(Some("demo")).await.unwrap(), "api.shop.example", &[]).await;
        assert_eq!((answer.status, got.is_some()), (200, true), "still an HTTPS proxy");
    }

    #[tokio::test]
    async fn a_reload_rotates_the_proxy_certificate() {
        let rig = Rig::start().await;
        let fresh = tempfile::tempdir().unwrap();
        write_dev_certs(fresh.path(), &[], &[], false).unwrap();
        for file in ["gateway.crt", "gateway.key"] {
            std::fs::copy(fresh.path().join(file), rig.certs.path().join(file)).unwrap();
        }
        let (status, _) = admin_json(rig.gw.admin(), "POST", "/-/reload", None, None).await;
        assert_eq!(status, 200);
        let fresh_ca = CertificateDer::from_pem_file(fresh.path().join("ca.crt")).unwrap();
        let stream = TcpStream::connect(rig.gw.addr()).await.unwrap();
        assert!(try_tls_with(stream, client_config(&fresh_ca, None), "localhost").await.is_ok(), "new certificate");
        let stream = TcpStream::connect(rig.gw.addr()).await.unwrap();
        let old = try_tls_with(stream, client_config(&rig.gateway_ca(), None), "localhost").await;
        assert!(old.is_err(), "the old certificate is no longer served");
    }
}
