//! The simulated OSDP readers (`doorbridge_sim::osdp`, `door-sim --osdp`) against the real
//! gateway (`daemon::serve`, in process) on a pseudo-terminal: what an installer sees is what
//! the gateway decided. Every wait is a condition with a deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use doorbridge::osdp::install::{InstallRequest, install};
use doorbridge::osdp::key;
use doorbridge_sim::osdp::{
    self, Output, ReaderCommand, ReaderInput, ReaderSpec, ReadersHandle, Request, SimLine,
};
use tokio::sync::mpsc;

// The site (its key set has the resident's card), the in-process gateway and the reader
// configuration of the tests against the Python peer.
use crate::osdp::{CARD_RESIDENT, Gateway, KEY_A, Site, reader};

/// How long a step may take: the readers come online and set up the secure channel within a
/// few seconds; a loaded CI machine gets the rest.
const WAIT: Duration = Duration::from_secs(30);

const CARD_UNKNOWN: &str = "26:0badca40";

/// The simulated readers on a pty at the site's link, and everything they reported.
struct Readers {
    handle: ReadersHandle,
    outputs: mpsc::UnboundedReceiver<Output>,
    heard: Vec<Output>,
    link: PathBuf,
    device: String,
}

impl Readers {
    fn start(link: &Path, readers: Vec<ReaderSpec>) -> Readers {
        let (master, device) = osdp::linked_line(link).expect("a pty at the link");
        let (tx, outputs) = mpsc::unbounded_channel();
        let handle = osdp::spawn(master, &SimLine::pty(readers), tx).expect("the readers start");
        Readers {
            handle,
            outputs,
            heard: Vec::new(),
            link: link.to_owned(),
            device,
        }
    }

    fn at(&self, unit: u8, input: ReaderInput) {
        assert!(
            self.handle.send(ReaderCommand { unit, input }),
            "the readers run"
        );
    }

    /// Waits for a new output matching `pred`; returns it.
    async fn wait(&mut self, what: &str, pred: impl Fn(&Output) -> bool) -> Output {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = tokio::time::timeout(left, self.outputs.recv()).await;
            let Ok(received) = received else {
                panic!(
                    "no {what} within {WAIT:?}; the readers said {:#?}",
                    self.heard
                );
            };
            let Some(output) = received else {
                panic!(
                    "the readers stopped before {what}; they said {:#?}",
                    self.heard
                );
            };
            self.heard.push(output.clone());
            if pred(&output) {
                return output;
            }
        }
    }

    async fn secure(&mut self, unit: u8) {
        self.wait(
            &format!("reader {unit} online and secure"),
            |o| matches!(o, Output::State { unit: u, online: true, secure: true } if *u == unit),
        )
        .await;
    }

    fn stop(self) -> osdp::LineStats {
        let stats = self.handle.stop().expect("the line did not fail");
        doorbridge_sim::pty::remove_link(&self.link, Path::new(&self.device));
        stats
    }
}

fn decision(output: &Output) -> Option<(bool, Request, &str, &'static str)> {
    match output {
        Output::Decision {
            grant,
            credential,
            via,
            ..
        } => Some((*grant, credential.request, credential.text.as_str(), *via)),
        _ => None,
    }
}

/// A reader with its key comes up secure; a known card releases the strike and is printed
/// as a grant naming the card, an unknown one as a deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readers_hear_the_gateways_decisions_and_name_the_card() {
    let site = Site::new().await;
    let key_file = site.key_file("main", Some(KEY_A));
    let mut readers = Readers::start(
        &site.link,
        vec![ReaderSpec {
            address: 1,
            scbk: key::parse(KEY_A),
        }],
    );
    let gateway = Gateway::start(site.config(&[reader(
        1,
        "main",
        &format!(
            "key_file = \"{}\"\nrelay = 1\npulse = \"2s\"",
            key_file.display()
        ),
    )]));

    readers.secure(1).await;

    // A card the key set holds: the strike (output 1) for 2 s, then the grant line.
    readers.at(1, ReaderInput::card(CARD_RESIDENT).expect("card"));
    let pulse = readers
        .wait("the strike released", |o| {
            matches!(o, Output::Out { unit: 1, .. })
        })
        .await;
    assert_eq!(
        pulse,
        Output::Out {
            unit: 1,
            output_no: 1,
            control: 5,
            time_ms: 2000
        }
    );
    let grant = readers.wait("the grant", |o| decision(o).is_some()).await;
    assert_eq!(
        decision(&grant),
        Some((true, Request::Card, CARD_RESIDENT, "output"))
    );
    assert!(grant.to_json().to_string().starts_with(
        r#"{"unit":1,"type":"grant","request":"card","credential":"26:0a1b2c40","via":"output","after_ms":"#
    ));
    readers
        .wait("the green LED", |o| {
            matches!(
                o,
                Output::Led {
                    unit: 1,
                    color: "green",
                    time_ms: Some(2000),
                    ..
                }
            )
        })
        .await;

    // A card nobody has: red, a deny naming it; `decided` returns once it is answered.
    readers.at(1, ReaderInput::card(CARD_UNKNOWN).expect("card"));
    tokio::time::timeout(WAIT, readers.handle.decided(1))
        .await
        .expect("the unknown card is decided in time")
        .expect("the readers run");
    let deny = readers.wait("the deny", |o| decision(o).is_some()).await;
    assert_eq!(
        decision(&deny),
        Some((false, Request::Card, CARD_UNKNOWN, "led"))
    );
    let released = readers
        .heard
        .iter()
        .filter(|o| matches!(o, Output::Out { .. }))
        .count();
    assert_eq!(
        released, 1,
        "only the grant released the door: {:#?}",
        readers.heard
    );

    gateway.stop().await;
    let stats = readers.stop();
    assert!(stats.commands >= 4, "{stats:?}");
}

/// A reader in install mode (no key) takes the key `doorbridge osdp install` sends over the
/// default key's session, reports it, and comes up secure with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_in_install_mode_takes_and_reports_the_key_it_is_given() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let link = dir.path().join("ttyOSDP");
    let key_file = dir.path().join("reader-2.key");
    let mut readers = Readers::start(
        &link,
        vec![ReaderSpec {
            address: 2,
            scbk: None,
        }],
    );
    let request = InstallRequest {
        bus: "osdp".into(),
        port: link.clone(),
        baud: 115_200,
        rs485: None,
        address: 2,
        key_file: key_file.clone(),
        timeout: WAIT,
    };
    let installed = tokio::task::spawn_blocking(move || install(&request, |_| {}))
        .await
        .expect("the install task");
    installed
        .unwrap_or_else(|e| panic!("install failed: {e}; the readers said {:#?}", readers.heard));

    let given = key::read(&key_file).expect("the key file");
    let keyset = readers
        .wait("the new key", |o| {
            matches!(o, Output::KeySet { unit: 2, .. })
        })
        .await;
    assert_eq!(
        keyset,
        Output::KeySet {
            unit: 2,
            scbk: given
        }
    );
    // The install's proof: a session with the new key only.
    readers.secure(2).await;
    readers.stop();
}
