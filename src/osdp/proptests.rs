//! Property tests of the OSDP reply sniffer: arbitrary line bytes never panic it, and a reply
//! header split anywhere across reads is found. (The keypad's and the card mapping's are in
//! doorbridge-proto, beside them.) The libFuzzer target `osdp_inputs` in `fuzz/` goes further
//! where a nightly toolchain is available.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;

use super::cp::Replies;

proptest! {
    #[test]
    fn the_reply_sniffer_takes_any_bytes_and_finds_a_reply_split_anywhere(
        noise in vec(any::<u8>(), 0..200),
        address in 1u8..=126,
        split in 0usize..8,
    ) {
        let replies = Replies::new();
        replies.sniff(&noise);
        // A reply header: SOM, address with the reply bit, length 8 (LSB first), control.
        let reply = [0x53, address | 0x80, 8, 0, 0x04, 0x40, 0, 0];
        let (a, b) = reply.split_at(split.min(reply.len()));
        replies.sniff(a);
        replies.sniff(b);
        prop_assert!(replies.recently(address, Duration::from_secs(60)));
    }
}
