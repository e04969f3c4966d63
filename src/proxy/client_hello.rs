//! The first bytes of a tunnel: is it a TLS ClientHello, and for which server name?
//!
//! The gateway must not hand a tunnel to the upstream until it knows the client speaks TLS to
//! the host it named in the CONNECT (plaintext and domain fronting are refused). The bytes
//! read here are kept and written upstream afterwards, so nothing is consumed: rustls'
//! [`Acceptor`] is fed a copy, one read at a time, until it has a whole ClientHello (which may
//! span several TCP segments and several TLS records) or knows it never will.

use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A ClientHello is one handshake message of at most 64 KiB, plus record headers.
pub const MAX_CLIENT_HELLO: usize = 0xffff + 5 * 16;

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes yet.
    NeedMore,
    /// A complete ClientHello, with its SNI if it sent one.
    Hello { server_name: Option<String> },
    /// Not TLS, or not a ClientHello, or a malformed one.
    NotTls,
}

/// Incremental ClientHello parser over a copy of the client's bytes.
#[derive(Default)]
pub struct ClientHelloReader {
    acceptor: Acceptor,
    fed: usize,
}

impl ClientHelloReader {
    /// Feed the next bytes the client sent; call again with more only after `NeedMore`.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Peek {
        self.fed += bytes.len();
        if self.fed > MAX_CLIENT_HELLO {
            return Peek::NotTls;
        }
        while !bytes.is_empty() {
            match self.acceptor.read_tls(&mut bytes) {
                Ok(0) | Err(_) => return Peek::NotTls,
                Ok(_) => {}
            }
        }
        match self.acceptor.accept() {
            Ok(None) => Peek::NeedMore,
            Ok(Some(accepted)) => Peek::Hello { server_name: accepted.client_hello().server_name().map(str::to_owned) },
            Err(_) => Peek::NotTls,
        }
    }
}

/// Read from `client` until its ClientHello is complete (or is not one), within `timeout`.
/// `prefix` is what the client already sent that was read elsewhere (hyper reads past the
/// CONNECT head when the client does not wait for the answer). Returns every byte seen,
/// prefix included, to be forwarded, and the verdict on them.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    prefix: &[u8],
    client: &mut S,
    timeout: Duration,
) -> (Vec<u8>, Peek) {
    let mut seen = Vec::with_capacity(2048);
    seen.extend_from_slice(prefix);
    let mut reader = ClientHelloReader::default();
    if !prefix.is_empty() {
        match reader.feed(prefix) {
            Peek::NeedMore => {}
            done => return (seen, done),
        }
    }
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return Peek::NotTls,
                Ok(n) => n,
            };
            seen.extend_from_slice(&chunk[..n]);
            match reader.feed(&chunk[..n]) {
                Peek::NeedMore => continue,
                done => return done,
            }
        }
    };
    let peek = tokio::time::timeout(timeout, read).await.unwrap_or(Peek::NotTls);
    (seen, peek)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello for `name`, as rustls' client writes it.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server_name = name.to_owned().try_into().unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_server_name_of_a_client_hello() {
        let hello = client_hello("api.shop.example");
        let peek = ClientHelloReader::default().feed(&hello);
        assert_eq!(peek, Peek::Hello { server_name: Some("api.shop.example".into()) });
    }

    #[test]
    fn a_client_hello_fed_one_byte_at_a_time_is_still_read() {
        let hello = client_hello("api.shop.example");
        let mut reader = ClientHelloReader::default();
        for (i, byte) in hello.iter().enumerate() {
            let peek = reader.feed(std::slice::from_ref(byte));
            if i + 1 < hello.len() {
                assert_eq!(peek, Peek::NeedMore, "byte {i} of {}", hello.len());
            } else {
                assert_eq!(peek, Peek::Hello { server_name: Some("api.shop.example".into()) });
            }
        }
    }

    #[test]
    fn a_client_hello_split_across_records_is_still_read() {
        // Re-frame the one handshake message into records of 100 bytes each.
        let hello = client_hello("api.shop.example");
        let (header, body) = hello.split_at(5);
        let mut reframed = Vec::new();
        for piece in body.chunks(100) {
            reframed.extend_from_slice(&[header[0], header[1], header[2]]);
            reframed.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            reframed.extend_from_slice(piece);
        }
        let peek = ClientHelloReader::default().feed(&reframed);
        assert_eq!(peek, Peek::Hello { server_name: Some("api.shop.example".into()) });
    }

    #[test]
    fn plaintext_and_garbage_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: api.shop.example\r\n\r\n"[..],
            b"\x16\x03\x01\x00\x05hello",
            b"\x15\x03\x03\x00\x02\x02\x28",
        ] {
            assert_eq!(ClientHelloReader::default().feed(bytes), Peek::NotTls, "{bytes:?}");
        }
    }

    #[test]
    fn a_partial_client_hello_needs_more() {
        let hello = client_hello("api.shop.example");
        assert_eq!(ClientHelloReader::default().feed(&hello[..hello.len() / 2]), Peek::NeedMore);
    }

    #[tokio::test]
    async fn reading_stops_at_the_timeout_or_the_end() {
        let (mut client, mut peer) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut peer, b"\x16\x03").await.unwrap();
        let (seen, peek) = read_client_hello(b"", &mut client, Duration::from_millis(50)).await;
        assert_eq!((seen.as_slice(), peek), (&b"\x16\x03"[..], Peek::NotTls));
        drop(peer);
        let (_, peek) = read_client_hello(b"", &mut client, Duration::from_secs(5)).await;
        assert_eq!(peek, Peek::NotTls);
    }
}
