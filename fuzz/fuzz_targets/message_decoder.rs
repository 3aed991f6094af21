//! Fuzz target: the CBOR message decoder.
//!
//! The first byte is a message type, the rest a body. The body is decoded as that type and as
//! every known type; whatever is accepted must re-encode, and decode again to the same message.

#![no_main]

use doorbridge::bus::message::{Message, MsgType};
use libfuzzer_sys::fuzz_target;

fn check(msg_type: u8, body: &[u8]) {
    if let Ok(msg) = Message::decode(msg_type, body) {
        let again = msg.encode_body().expect("an accepted message re-encodes");
        assert_eq!(Message::decode(msg_type, &again).as_ref(), Ok(&msg));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&t, body)) = data.split_first() else {
        return;
    };
    check(t, body);
    for t in MsgType::ALL {
        check(t.code(), body);
    }
});
