//! Broker helpers shared by the integration tests (`tests/it/broker.rs`), the benchmarks
//! (`benches/cloud.rs`, `benches/uplink.rs`, `benches/idle.rs`, `benches/fleet.rs`) and the
//! demo's story ([`crate::story`]).
//!
//! - [`RumqttdBroker`]: an in-process rumqttd on a free port;
//! - [`Proxy`]: a TCP proxy whose [`Proxy::cut`] makes the internet go away for the clients
//!   that connect through it, until [`Proxy::restore`];
//! - [`start_rumqttd`] and [`Mosquitto`]: the benchmarks' brokers, started once per run and
//!   left as they are. The integration tests have a richer mosquitto of their own
//!   (`tests/it/broker.rs`: stop and start again with the session kept, TLS listeners).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
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
    rumqttd_config_with(port, MAX_PACKET)
}

/// [`rumqttd_config`] taking publishes of up to `max_payload` bytes.
pub fn rumqttd_config_with(port: u16, max_payload: usize) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload,
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

// ---------------------------------------------------------------------------------------------
// rumqttd
// ---------------------------------------------------------------------------------------------

/// An in-process rumqttd (MQTT 3.1.1) listening on 127.0.0.1:`port`.
///
/// Its threads run until the test process exits: rumqttd has no shutdown.
#[derive(Debug)]
pub struct RumqttdBroker {
    pub port: u16,
}

impl RumqttdBroker {
    /// Starts a broker on a free port and returns once it accepts TCP connections.
    pub fn start() -> RumqttdBroker {
        Self::start_with(MAX_PACKET)
    }

    /// [`RumqttdBroker::start`] taking publishes of up to `max_payload` bytes.
    pub fn start_with(max_payload: usize) -> RumqttdBroker {
        // The port is picked before rumqttd binds it, so another process may take it in between:
        // then rumqttd's server thread ends, and a new port is tried.
        for _ in 0..5 {
            let port = free_port();
            let config = rumqttd_config_with(port, max_payload);
            let thread = thread::Builder::new()
                .name(format!("rumqttd-{port}"))
                .spawn(move || {
                    let mut broker = rumqttd::Broker::new(config);
                    broker.start().map_err(|e| e.to_string())
                })
                .expect("spawn the rumqttd thread");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !thread.is_finished() {
                if accepts(port) {
                    return RumqttdBroker { port };
                }
                thread::sleep(Duration::from_millis(10));
            }
            assert!(
                thread.is_finished(),
                "rumqttd did not accept connections on port {port} within 10 s"
            );
        }
        panic!("rumqttd could not bind a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

/// A TCP proxy on 127.0.0.1 forwarding to 127.0.0.1:`target`.
///
/// [`Proxy::cut`] closes every live connection and closes new ones at once until
/// [`Proxy::restore`]: the internet going away between a gateway and its cloud.
#[derive(Debug)]
pub struct Proxy {
    port: u16,
    shared: Arc<ProxyShared>,
}

#[derive(Debug, Default)]
struct ProxyShared {
    /// Whether the link is cut, and both sockets of every live connection (taken together under
    /// one lock, so no connection slips past a cut).
    state: Mutex<ProxyState>,
    forwarded: AtomicUsize,
    stopping: AtomicBool,
}

#[derive(Debug, Default)]
struct ProxyState {
    cut: bool,
    live: Vec<TcpStream>,
}

impl Proxy {
    /// Starts a proxy on a free port forwarding to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(ProxyShared::default());
        let accepting = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(&listener, target, &accepting))
            .expect("spawn the proxy thread");
        Proxy { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// How many connections were forwarded to the target so far (not those closed by a cut).
    pub fn forwarded(&self) -> usize {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Closes every live connection (both ends see it closed at once) and closes every new one
    /// until [`Proxy::restore`].
    pub fn cut(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.cut = true;
        for stream in state.live.drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.state.lock().unwrap().cut = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so it sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn accept_loop(listener: &TcpListener, target: u16, shared: &Arc<ProxyShared>) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        let mut state = shared.state.lock().unwrap();
        if state.cut {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(c1), Ok(c2), Ok(u1), Ok(u2)) = (
            client.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
            upstream.try_clone(),
        ) else {
            continue;
        };
        state.live.push(client);
        state.live.push(upstream);
        drop(state);
        shared.forwarded.fetch_add(1, Ordering::SeqCst);
        thread::spawn(move || pump(c1, u1));
        thread::spawn(move || pump(u2, c2));
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Starts an in-process rumqttd on a free port (its threads run until the process exits:
/// rumqttd has no shutdown) and returns its URL once it accepts connections.
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

/// The real mosquitto on a free port, killed on drop.
pub struct Mosquitto {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn binary() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .unwrap_or_default();
        on_path
            .into_iter()
            .map(|dir| dir.join("mosquitto"))
            .chain([PathBuf::from("/usr/sbin/mosquitto")])
            .find(|candidate| candidate.is_file())
    }

    /// Starts it (no persistence, unlimited queues, large packets); `None` if not installed.
    pub fn start() -> Option<Mosquitto> {
        let binary = Self::binary()?;
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir for mosquitto");
            let port = free_port();
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                     persistence false\nmax_packet_size {MAX_PACKET}\n\
                     max_inflight_messages 100\nmax_queued_messages 0\nmax_queued_bytes 0\n\
                     set_tcp_nodelay true\nlog_dest file {}/mosquitto.log\n",
                    dir.path().display()
                ),
            )
            .expect("write mosquitto.conf");
            let mut child = Command::new(&binary)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start mosquitto");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().expect("wait for mosquitto").is_some() {
                    break;
                }
                if accepts(port) {
                    return Some(Mosquitto {
                        port,
                        child,
                        _dir: dir,
                    });
                }
                assert!(Instant::now() < deadline, "mosquitto did not start in 10 s");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("mosquitto could not bind a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Its process id, for its `/proc` counters (`benches/fleet.rs` reads its memory and CPU).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `mosquitto -h` prints its version on the first line.
    pub fn version() -> String {
        Self::binary()
            .and_then(|b| Command::new(b).arg("-h").output().ok())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
