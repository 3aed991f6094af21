//! A NATS cluster for the tests: `n` real `nats-server` processes on 127.0.0.1, each with
//! `JetStream`, MQTT and routes to the others, that a test can kill (SIGKILL) and start again.
//!
//! NATS is the clustered broker a fleet may run on, and its MQTT differs from mosquitto's: it
//! needs `JetStream` and a `server_name` per node, keeps MQTT sessions and `QoS` 1 messages in
//! `JetStream` streams replicated over the cluster (`stream_replicas`), has no `QoS` 2, and refuses
//! a `.` in a topic. Each node's configuration, `JetStream` store and log live in a temporary
//! directory; every port (client, route, MQTT, HTTP monitoring) is a free one. A node restarted
//! with [`NatsCluster::restart`] gets the same ports and store, as a rebooted machine would.
//!
//! Readiness is a condition, not a delay: every node has a route to every other node
//! (`/routez`), its `JetStream` is current (`/healthz?js-server-only=true`: not every stream and
//! consumer, which a restarted node may take a minute to catch up on), and it accepts an MQTT
//! CONNECT.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::brokers::free_port;

/// How long a cluster (or a restarted node) may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How many lines of each node's log a failure shows.
const LOG_TAIL: usize = 40;

/// What a test says when `nats-server` is not installed.
pub const MISSING: &str = "nats-server is not installed (looked on PATH and at \
     /usr/sbin/nats-server): run the tests with `scripts/test`, which installs it, or \
     `apt-get install nats-server`";

/// One node's ports and files.
#[derive(Debug)]
struct Node {
    name: String,
    client: u16,
    route: u16,
    mqtt: u16,
    http: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("nats.log")
    }
}

/// `n` `nats-server` nodes in one cluster; every process is killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    binary: PathBuf,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// The `nats-server` binary: the first on `PATH`, else `/usr/sbin/nats-server` (Debian's).
    pub fn binary() -> Option<PathBuf> {
        crate::find_binary("nats-server", "/usr/sbin/nats-server")
    }

    /// Starts `n` nodes and returns once the cluster is ready (see the module header); `None`
    /// if `nats-server` is not installed.
    pub fn start(n: usize) -> Option<NatsCluster> {
        assert!(n > 0, "a cluster of at least one node");
        let binary = Self::binary()?;
        // The ports are picked before the nodes bind them: if another process takes one in
        // between, that node exits, and the whole cluster starts again on new ports.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temporary directory for nats-server");
            let nodes = (0..n)
                .map(|i| Node {
                    name: format!("n{}", i + 1),
                    client: free_port(),
                    route: free_port(),
                    mqtt: free_port(),
                    http: free_port(),
                    dir: dir.path().join(format!("n{}", i + 1)),
                    child: None,
                })
                .collect();
            let mut cluster = NatsCluster {
                binary: binary.clone(),
                nodes,
                _dir: dir,
            };
            for i in 0..n {
                std::fs::create_dir_all(&cluster.nodes[i].dir).expect("a node's directory");
                std::fs::write(cluster.nodes[i].config(), cluster.config(i))
                    .expect("write nats.conf");
                cluster.spawn(i);
            }
            if cluster.until_ready(&(0..n).collect::<Vec<_>>()) {
                return Some(cluster);
            }
        }
        panic!("nats-server could not bind free ports in 5 tries");
    }

    /// How many nodes the cluster has (running or not).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The MQTT URL of node `i`.
    pub fn mqtt_url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt)
    }

    pub fn mqtt_port(&self, i: usize) -> u16 {
        self.nodes[i].mqtt
    }

    /// Node `i`'s `server_name`.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// SIGKILL node `i` (no shutdown code runs: a machine that died) and waits until it is gone.
    pub fn kill(&mut self, i: usize) {
        let mut child = self.nodes[i]
            .child
            .take()
            .unwrap_or_else(|| panic!("node {} is not running", self.nodes[i].name));
        child.kill().expect("kill -9 nats-server");
        child.wait().expect("wait for nats-server");
    }

    /// Starts node `i` again on its ports and store, and returns once it is back in the cluster
    /// (see the module header).
    pub fn restart(&mut self, i: usize) {
        assert!(
            self.nodes[i].child.is_none(),
            "node {} is still running",
            self.nodes[i].name
        );
        self.spawn(i);
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].child.is_some())
            .collect();
        assert!(
            self.until_ready(&running),
            "node {} did not start again on its ports; its log:\n{}",
            self.nodes[i].name,
            self.log(i)
        );
    }

    /// The MQTT client ids connected to node `i` right now (from its `/connz`); empty if the
    /// node does not answer.
    pub fn mqtt_clients(&self, i: usize) -> Vec<String> {
        let Some(connz) = get_json(self.nodes[i].http, "/connz?limit=4096") else {
            return Vec::new();
        };
        connz["connections"]
            .as_array()
            .map(|conns| {
                conns
                    .iter()
                    .filter_map(|c| c["mqtt_client"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The running node that MQTT client `client_id` is connected to, if any.
    pub fn node_of(&self, client_id: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i].child.is_some() && self.mqtt_clients(i).iter().any(|c| c == client_id)
        })
    }

    /// The last `n` lines of every node's log, each under its name.
    pub fn tails(&self, n: usize) -> String {
        (0..self.nodes.len()).fold(String::new(), |mut text, i| {
            let log = self.log(i);
            let lines: Vec<&str> = log.lines().collect();
            let _ = write!(
                text,
                "\n--- nats-server {} (last {n} lines) ---\n",
                self.nodes[i].name
            );
            for line in &lines[lines.len().saturating_sub(n)..] {
                let _ = writeln!(text, "{line}");
            }
            text
        })
    }

    /// What node `i` logged so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].log()).unwrap_or_default()
    }

    /// Node `i`'s configuration: the others as routes, `JetStream` in its own directory, MQTT
    /// with its streams on every node (up to 3), so a node's death loses no session or message.
    fn config(&self, i: usize) -> String {
        let node = &self.nodes[i];
        let routes = self.nodes.iter().enumerate().filter(|(j, _)| *j != i).fold(
            String::new(),
            |mut text, (_, other)| {
                let _ = write!(text, "\"nats-route://127.0.0.1:{}\", ", other.route);
                text
            },
        );
        let replicas = self.nodes.len().min(3);
        format!(
            "# Generated by the doorbridge tests.
server_name: {name}
listen: \"127.0.0.1:{client}\"
http: \"127.0.0.1:{http}\"
log_file: \"{log}\"
jetstream {{
  store_dir: \"{store}\"
  max_memory_store: 256MB
  max_file_store: 1GB
}}
cluster {{
  name: doorbridge-test
  listen: \"127.0.0.1:{route}\"
  routes: [{routes}]
}}
mqtt {{
  listen: \"127.0.0.1:{mqtt}\"
  stream_replicas: {replicas}
}}
",
            name = node.name,
            client = node.client,
            http = node.http,
            log = node.log().display(),
            store = node.dir.join("jetstream").display(),
            route = node.route,
            mqtt = node.mqtt,
        )
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(node.config())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        node.child = Some(child);
    }

    /// Waits until the nodes `running` are ready. False if one of them exited meanwhile (it
    /// could not bind a port); panics with the logs after [`READY_WITHIN`].
    fn until_ready(&mut self, running: &[usize]) -> bool {
        let deadline = Instant::now() + READY_WITHIN;
        let routes = running.len() - 1;
        loop {
            for &i in running {
                let child = self.nodes[i].child.as_mut().expect("a running node");
                if child.try_wait().expect("wait for nats-server").is_some() {
                    self.nodes[i].child = None;
                    return false;
                }
            }
            // Routes first: MQTT's streams are placed on the nodes the cluster has.
            let ready = running.iter().all(|&i| {
                let http = self.nodes[i].http;
                get_json(http, "/routez")
                    .is_some_and(|r| r["num_routes"].as_u64().is_some_and(|n| n >= routes as u64))
                    && get_json(http, "/healthz?js-server-only=true")
                        .is_some_and(|h| h["status"] == "ok")
            }) && running
                .iter()
                .all(|&i| mqtt_connects(self.nodes[i].mqtt, &format!("ready-{i}")));
            if ready {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster was not ready within {READY_WITHIN:?}:{}",
                self.tails(LOG_TAIL)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tails(LOG_TAIL));
        }
    }
}

/// GET `path` from the monitoring port `http` on 127.0.0.1, as JSON; `None` if it does not
/// answer (yet) or not with JSON.
fn get_json(http: u16, path: &str) -> Option<serde_json::Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// Whether the MQTT listener on 127.0.0.1:`port` accepts a CONNECT (MQTT 3.1.1, clean
/// session) from `client_id` now: NATS answers only once `JetStream` can hold MQTT sessions.
fn mqtt_connects(port: u16, client_id: &str) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let id = client_id.as_bytes();
    let id_len = u16::try_from(id.len()).expect("a short client id");
    // Variable header: protocol name, level 4, flags (clean session), keep-alive 10 s.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10];
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, u8::try_from(body.len()).expect("a short CONNECT")];
    packet.extend_from_slice(&body);
    if stream.write_all(&packet).is_err() {
        return false;
    }
    let mut connack = [0u8; 4];
    let accepted = stream.read_exact(&mut connack).is_ok() && connack == [0x20, 2, 0, 0];
    // DISCONNECT, so the broker drops the session at once.
    let _ = stream.write_all(&[0xE0, 0]);
    accepted
}
