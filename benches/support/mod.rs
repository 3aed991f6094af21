//! Helpers shared by the bench binaries, included in each with `#[path]`: keys and their
//! installation, a child process stopped as systemd stops it, what they say about the machine,
//! and their sections of `docs/performance.md`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use doorbridge::access::{
    Category, Credential, CredentialKind, Key, KeyRules, Schedule, Site, UseLimit,
};
use doorbridge::store::{DecisionContext, KeySetHeader, Store, StoreOptions};

/// An unlimited key valid at all times at `door`, with one credential: `secret` of `kind`
/// under `salt`.
pub fn key(id: String, door: String, kind: CredentialKind, secret: &[u8], salt: &[u8]) -> Key {
    Key {
        rules: KeyRules {
            name: format!("key {id}"),
            id,
            category: Category::Friend,
            doors: vec![door],
            opens_inner_door: false,
            valid_from: None,
            valid_until: None,
            schedule: Schedule::Always,
            use_limit: UseLimit::Unlimited,
            welcome: None,
            floors: vec![],
            revoked: false,
        },
        credentials: vec![Credential {
            kind,
            digest: doorbridge::access::credential::digest(salt, kind, secret),
        }],
    }
}

/// Installs `keys` as key set version 1 (salt `salt`) into the database at `db`, created if
/// need be, and closes it.
pub async fn install_keys(db: &Path, site: Site, salt: &[u8], keys: Vec<Key>) {
    let store = Store::open(StoreOptions::new(db, DecisionContext::new(site))).expect("store");
    store
        .install_key_set(
            KeySetHeader {
                version: 1,
                salt: salt.to_vec(),
                issued_at: Some(jiff::Timestamp::now()),
            },
            keys,
        )
        .await
        .expect("install the keys");
    store.close();
}

/// A child process, killed on drop; its stdout or stderr drained by a thread that keeps the
/// last 40 lines and counts those that contain a given text.
#[derive(Debug)]
pub struct Process {
    child: Child,
    tail: Arc<Mutex<Vec<String>>>,
    counted: Arc<AtomicUsize>,
}

impl Process {
    /// Starts `command` with its stdout (`stdout`) or its stderr drained, counting the lines
    /// that contain `count`; the other stream goes to /dev/null.
    pub fn spawn(mut command: Command, stdout: bool, count: &'static str) -> Process {
        command.stdin(Stdio::null());
        if stdout {
            command.stdout(Stdio::piped()).stderr(Stdio::null());
        } else {
            command.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        let mut child = command.spawn().expect("start a child process");
        let tail = Arc::new(Mutex::new(Vec::new()));
        let counted = Arc::new(AtomicUsize::new(0));
        let lines: Box<dyn std::io::Read + Send> = if stdout {
            Box::new(child.stdout.take().expect("piped stdout"))
        } else {
            Box::new(child.stderr.take().expect("piped stderr"))
        };
        let (keep, hits) = (Arc::clone(&tail), Arc::clone(&counted));
        std::thread::spawn(move || {
            for line in BufReader::new(lines).lines().map_while(Result::ok) {
                if line.contains(count) {
                    hits.fetch_add(1, Ordering::Relaxed);
                }
                let mut keep = keep.lock().expect("tail lock");
                if keep.len() >= 40 {
                    keep.remove(0);
                }
                keep.push(line);
            }
        });
        Process {
            child,
            tail,
            counted,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines seen so far that contain the text given to [`Process::spawn`].
    pub fn counted(&self) -> usize {
        self.counted.load(Ordering::Relaxed)
    }

    pub fn tail(&self) -> String {
        self.tail.lock().expect("tail lock").join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, as systemd stops a service; SIGKILL if it has not exited within 10 s.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `"1234567"` → `"1,234,567"`.
pub fn group_digits(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

/// The CPU model and core count, as `/proc/cpuinfo` names them.
pub fn cpu_model() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("an unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    format!("{model}, {cores} cores")
}

/// Replaces the section `<!-- bench:{name} -->` … `<!-- /bench:{name} -->` of
/// `docs/performance.md` with `section` (which carries both markers). A new section goes
/// before the commentary ("What the figures say"), after the other sections.
pub fn write_section(name: &str, section: &str) {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/performance.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_else(|_| "# Performance\n".into());
    let (start, end) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let new = match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{section}{}", &old[..a], &old[b + end.len()..])
        }
        _ => match old.find("### What the figures say") {
            Some(at) => format!("{}{section}\n\n{}", &old[..at], &old[at..]),
            None => format!("{}\n\n{section}\n", old.trim_end()),
        },
    };
    std::fs::write(&doc, new).expect("write docs/performance.md");
}
