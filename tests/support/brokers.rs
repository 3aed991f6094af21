//! Broker helpers shared by the integration tests (`tests/it/broker.rs`) and the benchmarks
//! (`benches/cloud.rs`, `benches/idle.rs`), which cannot import test modules: included in each
//! with `#[path]`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Largest MQTT packet the test clients and brokers accept: a key-set chunk is up to 128 KiB plus
/// its envelope, so this leaves room.
pub const MAX_PACKET: usize = 1024 * 1024;

/// A port that was free a moment ago on 127.0.0.1 (bound on port 0, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A rumqttd configuration with one MQTT 3.1.1 listener on 127.0.0.1:`port`, sized for key-set
/// snapshots of 100,000 keys (about 1,000 chunks of at most 128 KiB on one topic).
pub fn rumqttd_config(port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            // The commit log of one topic keeps up to 4 x 128 MiB in memory: a whole snapshot.
            max_segment_size: 128 * 1024 * 1024,
            max_segment_count: 4,
            ..rumqttd::RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..rumqttd::Config::default()
    }
}

/// Starts an in-process rumqttd (`rumqttd_config`) on a free port and returns its URL once it
/// accepts connections. Its threads run until the process exits: rumqttd has no shutdown.
pub fn start_rumqttd() -> String {
    for _ in 0..5 {
        let port = free_port();
        let config = rumqttd_config(port);
        let thread = std::thread::Builder::new()
            .name(format!("rumqttd-{port}"))
            .spawn(move || {
                rumqttd::Broker::new(config)
                    .start()
                    .map_err(|e| e.to_string())
            })
            .expect("spawn the rumqttd thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !thread.is_finished() {
            if accepts(port) {
                return format!("mqtt://127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("rumqttd could not bind a free port in 5 tries");
}
