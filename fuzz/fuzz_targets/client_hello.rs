//! The ClientHello peek: arbitrary bytes, delivered in arbitrary pieces, never panic, and
//! the verdict does not depend on how the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_gateway::proxy::client_hello::{ClientHelloReader, Peek};

fuzz_target!(|input: &[u8]| {
    let Some((&split, bytes)) = input.split_first() else { return };
    let whole = feed(bytes, bytes.len().max(1));
    let pieces = feed(bytes, usize::from(split).max(1));
    if whole != Peek::NeedMore && pieces != Peek::NeedMore {
        assert_eq!(whole, pieces, "the verdict changed with the split");
    }
});

fn feed(bytes: &[u8], piece: usize) -> Peek {
    let mut reader = ClientHelloReader::default();
    let mut peek = Peek::NeedMore;
    for chunk in bytes.chunks(piece) {
        peek = reader.feed(chunk);
        if peek != Peek::NeedMore {
            break;
        }
    }
    peek
}
