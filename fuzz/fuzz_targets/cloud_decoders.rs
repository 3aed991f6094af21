//! Fuzz target: everything the gateway decodes from the cloud side.
//!
//! The bytes go through the envelope decoder (with the fixed test key trusted), every body
//! decoder, the sync state machine as a manifest, chunk, delta and heartbeat, the report
//! decoder, the upload batch decoder (the cloud's side of the uplink) and the streaming bundle
//! reader. None may panic; the sync machine must never stage a chunk whose hash its manifest
//! does not name.

#![no_main]

use doorbridge::cloud::bundle::{Bundle, BundleStream};
use doorbridge::cloud::envelope;
use doorbridge::cloud::payload::{
    Chunk, Delta, Heartbeat, MAX_ENVELOPE_BYTES, Manifest, OpenDoor, ResyncCommand, Target,
    UnitSettings,
};
use doorbridge::cloud::report::Report;
use doorbridge::cloud::sync::{Action, Sync};
use doorbridge::cloud::uplink::Batch;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let trusted = [SigningKey::from_bytes(&[0x42; 32]).verifying_key()];
    let _ = envelope::open(data, &trusted, MAX_ENVELOPE_BYTES);
    let _ = OpenDoor::decode(data);
    let _ = ResyncCommand::decode(data);
    let _ = UnitSettings::decode(data);
    let _ = Report::decode(data);
    let _ = Batch::decode(data);
    let _ = Chunk::decode(data);
    let target = Target {
        site: "s1".into(),
        gateway: "gw1".into(),
    };
    let now = jiff::Timestamp::UNIX_EPOCH;
    let mut sync = Sync::new(target, 3);
    if let Ok(m) = Manifest::decode(data) {
        let _ = sync.on_manifest(m, now);
    }
    if let Ok(d) = Delta::decode(data) {
        let _ = sync.on_delta(d, now);
    }
    if let Ok(h) = Heartbeat::decode(data) {
        let _ = sync.on_heartbeat(&h, now);
    }
    for action in sync.on_chunk(data, now) {
        assert!(
            !matches!(action, Action::Stage { .. }),
            "a chunk was staged without a manifest naming its hash"
        );
    }
    let _ = Bundle::decode(data);
    if let Ok(mut stream) = BundleStream::new(data) {
        while let Ok(Some(_)) = stream.next_chunk() {}
    }
});
