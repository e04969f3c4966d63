//! The first bytes of a tunnel: is it a TLS ClientHello, and for which server name?
//!
//! The gateway must not hand a tunnel to the upstream until it knows the client speaks TLS to
//! the host it named in the CONNECT (plaintext and domain fronting are refused). The bytes
//! read here are kept and written upstream afterwards, so nothing is consumed. While a
//! connection waits, it holds one buffer of what it sent and nothing else: a small record-layer
//! scan says when the first handshake message is whole (or cannot be a ClientHello), and only
//! then is a copy handed to rustls' [`Acceptor`], synchronously, so no parser state or second
//! copy lives across an await. A buffer beyond [`FREE_HELLO_BYTES`] must be reserved from one
//! gateway-wide budget of [`HELLO_BUDGET_BYTES`], so slow clients cannot make the waits
//! together hold more than that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A ClientHello is one handshake message of at most 64 KiB, plus record headers.
pub const MAX_CLIENT_HELLO: usize = 0xffff + 5 * 16;

/// Buffer any waiting connection may hold without touching the shared budget. Real
/// ClientHellos are 0.5 to 2 KiB (about 2 KiB with a post-quantum key share), so nearly
/// every tunnel is judged within it.
pub const FREE_HELLO_BYTES: usize = 4096;

/// What all connections waiting for their ClientHello may hold beyond [`FREE_HELLO_BYTES`]
/// each, together. Without it, thousands of authenticated clients each sending part of a large
/// ClientHello and then stalling until `header_timeout` would each pin what they sent, and a
/// 512 MiB pod could be pushed over its limit; with it, the waits pin at most this much between
/// them, and that still lets 2,000 tunnels wait with 8 KiB sent each, or about 500 with half of
/// a maximal ClientHello (BENCHMARKS.md). A connection that cannot get what it needs is refused
/// as not TLS: it fails closed, like any ClientHello the gateway cannot read.
pub const HELLO_BUDGET_BYTES: usize = 16 << 20;

/// How much a waiting buffer grows by at a time beyond what it holds, so what it reserves
/// stays within this of what the client actually sent.
const GROW_STEP: usize = 4096;

/// The first allocation for a connection's bytes, enough for a typical ClientHello in one read.
const FIRST_READ: usize = 2048;

/// The budget every tunnel of this process waits within.
static SHARED_BUDGET: HelloBudget = HelloBudget::new(HELLO_BUDGET_BYTES);

/// Bytes that waiting connections may reserve between them; a reservation returns on drop.
#[derive(Debug)]
pub struct HelloBudget {
    available: AtomicUsize,
}

impl HelloBudget {
    pub const fn new(bytes: usize) -> HelloBudget {
        HelloBudget { available: AtomicUsize::new(bytes) }
    }

    /// What is not reserved now.
    pub fn available(&self) -> usize {
        self.available.load(Ordering::Acquire)
    }

    /// Take `bytes` if they are all there; never waits (a wait would only hold memory longer).
    fn take(&self, bytes: usize) -> bool {
        self.available.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| left.checked_sub(bytes)).is_ok()
    }
}

/// What one waiting connection has reserved.
struct Reservation<'a> {
    budget: &'a HelloBudget,
    bytes: usize,
}

impl Reservation<'_> {
    /// Hold `total` bytes in all; false (and nothing more held) when the budget is short.
    fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        if !self.budget.take(total - self.bytes) {
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.available.fetch_add(self.bytes, Ordering::AcqRel);
    }
}

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
        if bytes.is_empty() {
            return Peek::NeedMore;
        }
        loop {
            match self.acceptor.read_tls(&mut bytes) {
                Ok(0) | Err(_) => return Peek::NotTls,
                Ok(_) => {}
            }
            // Between reads, so rustls joins the records of a large ClientHello as they come:
            // unprocessed, its buffer refuses more than one record's worth.
            match self.acceptor.accept() {
                Ok(None) if bytes.is_empty() => return Peek::NeedMore,
                Ok(None) => {}
                Ok(Some(accepted)) => {
                    return Peek::Hello { server_name: accepted.client_hello().server_name().map(str::to_owned) };
                }
                Err(_) => return Peek::NotTls,
            }
        }
    }
}

/// Where a scan of the record layer has got to: it says whether the bytes so far cannot be
/// judged yet, i.e. they are a prefix of TLS handshake records whose first handshake message is
/// a ClientHello not yet whole. It reads only record and handshake headers (whether the message
/// is a valid ClientHello is rustls' to say once it is whole), and it resumes where it stopped,
/// so a client sending one byte at a time costs constant work per read.
#[derive(Default)]
struct HelloFraming {
    /// Bytes of whole records already scanned.
    scanned: usize,
    /// The handshake header (type and 24-bit length) as far as it has been seen.
    header: [u8; 4],
    header_len: usize,
    /// Handshake bytes in the records scanned.
    payload: usize,
}

impl HelloFraming {
    /// `bytes` is everything the client sent so far (a longer slice on every call).
    fn incomplete(&mut self, bytes: &[u8]) -> bool {
        const HANDSHAKE: u8 = 0x16;
        const CLIENT_HELLO: u8 = 0x01;
        loop {
            let rest = &bytes[self.scanned..];
            match rest.first() {
                None => return true,
                Some(&kind) if kind != HANDSHAKE => return false,
                Some(_) => {}
            }
            let Some(&[_, _, _, hi, lo]) = rest.get(..5) else { return true };
            let record_len = usize::from(u16::from_be_bytes([hi, lo]));
            let body = &rest[5..];
            let here = &body[..body.len().min(record_len)];
            // Counted over what has arrived of this record, kept only once it is whole.
            let (mut header, mut header_len) = (self.header, self.header_len);
            for &byte in here.iter().take(4 - header_len) {
                header[header_len] = byte;
                header_len += 1;
            }
            let payload = self.payload + here.len();
            if header_len == 4 {
                if header[0] != CLIENT_HELLO {
                    return false;
                }
                let body_len = usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
                if payload >= 4 + body_len {
                    return false;
                }
            }
            if here.len() < record_len {
                return true;
            }
            (self.header, self.header_len, self.payload) = (header, header_len, payload);
            self.scanned += 5 + record_len;
        }
    }
}

/// Read from `client` until its ClientHello is complete (or is not one), within `timeout`.
/// `prefix` is what the client already sent that was read elsewhere (hyper reads past the
/// CONNECT head when the client does not wait for the answer). Returns every byte seen,
/// prefix included, to be forwarded, and the verdict on them. Waits within the gateway-wide
/// [`HELLO_BUDGET_BYTES`].
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    prefix: &[u8],
    client: &mut S,
    timeout: Duration,
) -> (Vec<u8>, Peek) {
    read_client_hello_within(&SHARED_BUDGET, prefix, client, timeout).await
}

/// [`read_client_hello`] within `budget`: a connection whose buffer must grow past
/// [`FREE_HELLO_BYTES`] reserves the excess from it, and gets `NotTls` when it cannot. The
/// reservation returns when this returns.
pub async fn read_client_hello_within<S: AsyncRead + Unpin>(
    budget: &HelloBudget,
    prefix: &[u8],
    client: &mut S,
    timeout: Duration,
) -> (Vec<u8>, Peek) {
    let mut reservation = Reservation { budget, bytes: 0 };
    let mut seen = Vec::new();
    if prefix.len() > MAX_CLIENT_HELLO || !reserve(&mut seen, &mut reservation, prefix.len().max(FIRST_READ)) {
        return (prefix.to_vec(), Peek::NotTls);
    }
    seen.extend_from_slice(prefix);
    let mut framing = HelloFraming::default();
    let read = async {
        while framing.incomplete(&seen) {
            if seen.len() == seen.capacity() {
                let wanted = (seen.len() + GROW_STEP).min(MAX_CLIENT_HELLO);
                if wanted == seen.len() || !reserve(&mut seen, &mut reservation, wanted) {
                    return false;
                }
            }
            // Straight into the buffer's spare room: the future holds no read chunk of its own.
            match client.read_buf(&mut seen).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    };
    let whole = tokio::time::timeout(timeout, read).await.unwrap_or(false);
    let peek = if whole {
        // The framing says there is nothing more to wait for, so rustls wanting more means it
        // is not a ClientHello it can read.
        match ClientHelloReader::default().feed(&seen) {
            Peek::NeedMore => Peek::NotTls,
            done => done,
        }
    } else {
        Peek::NotTls
    };
    (seen, peek)
}

/// Let `seen` hold `capacity` bytes, reserving from the budget what lies beyond
/// [`FREE_HELLO_BYTES`]; false when the budget cannot cover it.
fn reserve(seen: &mut Vec<u8>, reservation: &mut Reservation<'_>, capacity: usize) -> bool {
    if !reservation.grow_to(capacity.saturating_sub(FREE_HELLO_BYTES)) {
        tracing::debug!(capacity, "no ClientHello budget left; refusing the tunnel as not TLS");
        return false;
    }
    seen.reserve_exact(capacity.saturating_sub(seen.len()));
    true
}

/// `hello` (one record, as rustls writes it) with one more extension of `kind` holding `data`:
/// the extension block, handshake and record lengths fixed, the message re-framed into records
/// of at most 16 KiB. What the tests and the load generator send to make a large or unusual
/// ClientHello out of a real one; nothing in the gateway calls it.
#[doc(hidden)]
pub fn with_extension(hello: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
    let mut message = hello[5..].to_vec();
    let session_id = 4 + 2 + 32;
    let suites = session_id + 1 + usize::from(message[session_id]);
    let compression = suites + 2 + usize::from(u16::from_be_bytes([message[suites], message[suites + 1]]));
    let extensions = compression + 1 + usize::from(message[compression]);
    let block = usize::from(u16::from_be_bytes([message[extensions], message[extensions + 1]]));
    assert_eq!(extensions + 2 + block, message.len(), "extensions end the message");
    let block = u16::try_from(block + 4 + data.len()).expect("an extension block of at most 64 KiB");
    message[extensions..extensions + 2].copy_from_slice(&block.to_be_bytes());
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&u16::try_from(data.len()).expect("an extension of at most 64 KiB").to_be_bytes());
    message.extend_from_slice(data);
    let body = u32::try_from(message.len() - 4).expect("a message of at most 16 MiB").to_be_bytes();
    message[1..4].copy_from_slice(&body[1..]);
    let mut records = Vec::new();
    for piece in message.chunks(16 * 1024) {
        records.extend_from_slice(&[0x16, 0x03, 0x01]);
        records.extend_from_slice(&u16::try_from(piece.len()).expect("16 KiB at most").to_be_bytes());
        records.extend_from_slice(piece);
    }
    records
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

    /// A real ClientHello grown by a padding extension to about `size` bytes on the wire.
    fn large_client_hello(name: &str, size: usize) -> Vec<u8> {
        let hello = client_hello(name);
        with_extension(&hello, 0x0015, &vec![0; size - hello.len() - 4])
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

    /// The one handshake message of `hello` (one record) re-framed into records of `size` bytes.
    fn in_records_of(hello: &[u8], size: usize) -> Vec<u8> {
        let (header, body) = hello.split_at(5);
        let mut reframed = Vec::new();
        for piece in body.chunks(size) {
            reframed.extend_from_slice(&header[..3]);
            reframed.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            reframed.extend_from_slice(piece);
        }
        reframed
    }

    #[test]
    fn a_client_hello_split_across_records_is_still_read() {
        // Re-frame the one handshake message into records of 100 bytes each.
        let hello = client_hello("api.shop.example");
        let reframed = in_records_of(&hello, 100);
        let peek = ClientHelloReader::default().feed(&reframed);
        assert_eq!(peek, Peek::Hello { server_name: Some("api.shop.example".into()) });
    }

    #[test]
    fn a_client_hello_of_several_full_records_is_read_in_socket_sized_pieces() {
        // Four records of up to 16 KiB: rustls must join each record before it takes more.
        let large = large_client_hello("api.shop.example", 60_000);
        let mut reader = ClientHelloReader::default();
        let mut peek = Peek::NeedMore;
        for piece in large.chunks(4096) {
            assert_eq!(peek, Peek::NeedMore);
            peek = reader.feed(piece);
        }
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

    #[test]
    fn the_framing_scan_waits_exactly_as_long_as_rustls() {
        let hello = client_hello("api.shop.example");
        let reframed = in_records_of(&hello, 100);
        let large = large_client_hello("api.shop.example", 40_000);
        assert_eq!(
            ClientHelloReader::default().feed(&large),
            Peek::Hello { server_name: Some("api.shop.example".into()) }
        );
        for (what, bytes, step) in
            [("one record", &hello, 1), ("100-byte records", &reframed, 1), ("40 KB", &large, 97)]
        {
            let mut resumed = HelloFraming::default();
            for end in (0..bytes.len()).step_by(step).chain([bytes.len()]) {
                let rustls_waits = ClientHelloReader::default().feed(&bytes[..end]) == Peek::NeedMore;
                let fresh = HelloFraming::default().incomplete(&bytes[..end]);
                assert_eq!(fresh, rustls_waits, "{what}, first {end} of {} bytes", bytes.len());
                assert_eq!(resumed.incomplete(&bytes[..end]), fresh, "{what}, resumed at {end}");
            }
        }
        for bytes in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x03\x01\x00\x05hello", b"\x15\x03\x03\x00\x02\x02\x28"] {
            assert!(!HelloFraming::default().incomplete(bytes), "{bytes:?}");
        }
    }

    /// A client that sends `bytes` and then stalls, holding the connection open.
    async fn stalling_client(bytes: &[u8]) -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        let (client, mut peer) = tokio::io::duplex(128 * 1024);
        tokio::io::AsyncWriteExt::write_all(&mut peer, bytes).await.unwrap();
        (client, peer)
    }

    #[tokio::test]
    async fn a_typical_client_hello_needs_no_budget() {
        let empty = HelloBudget::new(0);
        let hello = client_hello("api.shop.example");
        let (mut client, _peer) = stalling_client(&hello).await;
        let (seen, peek) = read_client_hello_within(&empty, b"", &mut client, Duration::from_secs(5)).await;
        assert_eq!((seen, peek), (hello, Peek::Hello { server_name: Some("api.shop.example".into()) }));

        // a large one cannot wait without budget: refused at once, not at the timeout
        let large = large_client_hello("api.shop.example", 20_000);
        let (mut client, _peer) = stalling_client(&large[..10_000]).await;
        let started = std::time::Instant::now();
        let (_, peek) = read_client_hello_within(&empty, b"", &mut client, Duration::from_secs(30)).await;
        assert_eq!(peek, Peek::NotTls);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_large_client_hello_is_read_within_the_budget_and_returns_it() {
        let budget = HelloBudget::new(128 * 1024);
        let large = large_client_hello("api.shop.example", 60_000);
        let (mut client, mut peer) = tokio::io::duplex(1024);
        let send = tokio::spawn(async move {
            for piece in large.chunks(1000) {
                tokio::io::AsyncWriteExt::write_all(&mut peer, piece).await.unwrap();
            }
            (large, peer)
        });
        let (seen, peek) = read_client_hello_within(&budget, b"", &mut client, Duration::from_secs(5)).await;
        let (large, _peer) = send.await.unwrap();
        assert_eq!(peek, Peek::Hello { server_name: Some("api.shop.example".into()) });
        assert_eq!(seen, large);
        assert!(seen.capacity() < large.len() + GROW_STEP, "the buffer grew past what was sent");
        assert_eq!(budget.available(), 128 * 1024, "the reservation was not returned");
    }

    #[tokio::test]
    async fn slow_large_client_hellos_together_stay_within_the_budget() {
        const BUDGET: usize = 256 * 1024;
        const CLIENTS: usize = 20;
        let budget: &'static HelloBudget = Box::leak(Box::new(HelloBudget::new(BUDGET)));
        // each sends half of a maximal ClientHello, then stalls
        let large = large_client_hello("api.shop.example", 65_000);
        let half = &large[..large.len() / 2];
        let mut peers = Vec::new();
        let mut waits = Vec::new();
        for _ in 0..CLIENTS {
            let (mut client, peer) = stalling_client(half).await;
            peers.push(peer);
            waits.push(tokio::spawn(async move {
                read_client_hello_within(budget, b"", &mut client, Duration::from_secs(60)).await.1
            }));
        }
        // let every wait read what it was sent
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while waits.iter().filter(|w| w.is_finished()).count() < CLIENTS - BUDGET / (half.len() - FREE_HELLO_BYTES) {
            assert!(std::time::Instant::now() < deadline, "too few were refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = waits.iter().filter(|w| !w.is_finished()).count();
        let reserved = BUDGET - budget.available();
        assert!(waiting > 0, "nobody could wait");
        assert!(reserved >= waiting * (half.len() - FREE_HELLO_BYTES), "{waiting} waiting with {reserved} reserved");
        assert!(reserved <= BUDGET);
        // the waits end (the clients go away) and the budget comes back whole
        drop(peers);
        for wait in waits {
            assert_eq!(wait.await.unwrap(), Peek::NotTls);
        }
        assert_eq!(budget.available(), BUDGET);
    }
}
