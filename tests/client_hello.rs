//! What the ClientHello check does and does not see: only the first ClientHello is checked
//! (a HelloRetryRequest's second one passes, its SNI bound to the first by the origin), and an
//! Encrypted ClientHello's outer name is what is compared, so ECH to the host named fails closed;
//! a ClientHello of several full records is read whole.

mod common;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use common::*;
use miniapp_gateway::proxy::client_hello::with_extension;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

fn config(origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[resolve]
"api.shop.example" = "{origin}"

[[app]]
id = "demo"
server_domains = ["api.shop.example"]
"#
    )
}

/// A stream that keeps a copy of everything written to it.
struct Recorder<S> {
    inner: S,
    written: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How many ClientHello messages a client sent in cleartext: handshake records (0x16) whose
/// message type is ClientHello (1), counted until the first encrypted record (0x17).
fn client_hellos_sent(bytes: &[u8]) -> usize {
    let mut rest = bytes;
    let mut count = 0;
    while rest.len() >= 5 && rest[0] != 0x17 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest[0] == 0x16 && rest.get(5) == Some(&0x01) {
            count += 1;
        }
        rest = &rest[(5 + len).min(rest.len())..];
    }
    count
}

#[tokio::test]
async fn after_a_hello_retry_request_the_second_client_hello_passes() {
    // The origin offers only secp256r1; the client's first key share is X25519, so the origin
    // must answer with a HelloRetryRequest and the client send a second ClientHello.
    let only_p256 = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::ring::kx_group::SECP256R1],
        ..rustls::crypto::ring::default_provider()
    };
    let origin = Origin::start_with(&["api.shop.example"], only_p256).await;
    let gw = TestGateway::start(&config(origin.addr)).await;
    let client = client_config(&origin.ca, None);
    assert_eq!(client.crypto_provider().kx_groups[0].name(), rustls::NamedGroup::X25519, "first key share");

    let answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    let written = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder { inner: answer.stream, written: written.clone() };
    let mut tls = tls_with(recorder, client, "api.shop.example").await;
    assert_eq!(https_request(&mut tls, "GET", "/", b"").await, b"hello from origin");

    let group = tls.get_ref().1.negotiated_key_exchange_group().map(|g| g.name());
    assert_eq!(group, Some(rustls::NamedGroup::secp256r1));
    assert_eq!(client_hellos_sent(&written.lock().unwrap()), 2, "no HelloRetryRequest happened");
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 1);
    drop(tls);
    let line = gw.log.wait_for(|l| l["host"] == "api.shop.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("allow"), Some("whitelisted")));
}

/// `hello` with an `encrypted_client_hello` extension (0xfe0d) of the outer type, well formed.
fn with_encrypted_client_hello(hello: &[u8]) -> Vec<u8> {
    let mut ech = vec![0x00]; // ClientHelloOuter
    ech.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]); // HKDF-SHA256, AES-128-GCM
    ech.push(0x2a); // config_id
    ech.extend_from_slice(&32u16.to_be_bytes());
    ech.extend_from_slice(&[0x11; 32]); // enc: the HPKE encapsulated key
    ech.extend_from_slice(&200u16.to_be_bytes());
    ech.extend_from_slice(&[0x22; 200]); // payload: the encrypted ClientHelloInner
    with_extension(hello, 0xfe0d, &ech)
}

/// Wait until the origin has received `bytes` bytes.
async fn origin_receives(origin: &Origin, bytes: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while origin.bytes_received.load(Ordering::SeqCst) < bytes {
        assert!(tokio::time::Instant::now() < deadline, "the ClientHello did not reach the origin");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_encrypted_client_hello_to_the_host_named_is_refused_by_its_outer_name() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr)).await;
    // ECH: the real name is encrypted inside; the outer SNI is the provider's public name
    let hello = with_encrypted_client_hello(&client_hello("public.ech.example"));
    let mut answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    answer.stream.write_all(&hello).await.unwrap();
    closed_by_gateway(&mut answer.stream).await;
    let line = gw.log.wait_for(|l| l["host"] == "api.shop.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("deny"), Some("sni_mismatch")));
    assert_eq!(line["bytes_up"], 0);
    assert_eq!(origin.bytes_received.load(Ordering::SeqCst), 0, "a byte reached the origin");

    // The extension itself is not what is refused: with the outer name equal to the CONNECT
    // host the same kind of ClientHello is let through to the origin.
    let hello = with_encrypted_client_hello(&client_hello("api.shop.example"));
    let mut answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    answer.stream.write_all(&hello).await.unwrap();
    origin_receives(&origin, hello.len()).await;
}

#[tokio::test]
async fn a_client_hello_of_several_full_records_reaches_the_origin() {
    let origin = Origin::start(&["api.shop.example"]).await;
    let gw = TestGateway::start(&config(origin.addr)).await;
    // 40 KB in three records (large post-quantum key shares, many extensions)
    let hello = with_extension(&client_hello("api.shop.example"), 0x0015, &[0; 40_000]);
    let mut answer = connect_as(gw.addr(), "demo", "x", "api.shop.example:443").await;
    assert_eq!(answer.status, 200);
    answer.stream.write_all(&hello).await.unwrap();
    origin_receives(&origin, hello.len()).await;
    // the origin took it and answers with its ServerHello, through the tunnel
    let mut first = [0u8; 6];
    tokio::time::timeout(WAIT, answer.stream.read_exact(&mut first)).await.unwrap().unwrap();
    assert_eq!((first[0], first[5]), (0x16, 0x02), "a handshake record holding a ServerHello");
    // a clean end: the client's FIN through to the origin, which closes in turn
    answer.stream.shutdown().await.unwrap();
    closed_by_gateway(&mut answer.stream).await;
    drop(answer);
    let line = gw.log.wait_for(|l| l["host"] == "api.shop.example").await;
    assert_eq!((line["decision"].as_str(), line["reason"].as_str()), (Some("allow"), Some("whitelisted")));
}
