//! Fuzz target: the streaming frame decoder, fed arbitrary bytes in arbitrary chunkings.
//!
//! The first bytes of the input (up to 16) choose the chunk sizes, the rest is the line. It
//! checks that the decoder's buffer stays bounded, that the chunking does not change what
//! comes out, and that every frame it accepts re-encodes to bytes that decode to the same frame.

#![no_main]

use doorbridge::bus::frame::{Decoder, MAX_ENCODED, MAX_FRAME, encode};
use doorbridge::bus::message::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b % 16) + 1)
        .min(data.len());
    let (sizes, line) = data.split_at(split);

    let mut chunked = Decoder::new();
    let mut items = Vec::new();
    let mut rest = line;
    let mut k = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(k % sizes.len().max(1))
            .map_or(1, |&s| usize::from(s) + 1);
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        items.extend(chunked.feed(chunk));
        assert!(chunked.buffered() <= MAX_ENCODED);
        rest = tail;
        k += 1;
    }

    let mut bytewise = Decoder::new();
    let single: Vec<_> = line.iter().filter_map(|&b| bytewise.push(b)).collect();
    assert_eq!(items, single);

    for frame in items.into_iter().flatten() {
        let wire = encode(&frame);
        assert!(wire.len() <= MAX_FRAME);
        assert_eq!(Decoder::new().feed(&wire), vec![Ok(frame.clone())]);
        let _ = Message::from_frame(&frame);
    }
});
