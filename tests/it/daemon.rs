//! `doorbridge run` as systemd would start it: the real binary, real signals.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::util::{doorbridge, shipped_config};

/// Waits until a line of `lines` contains `needle`, or fails after `within`.
fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout | mpsc::RecvTimeoutError::Disconnected) => {
                panic!("no log line with {needle:?} within {within:?}")
            }
        }
    }
}

#[test]
fn run_opens_the_store_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/doorbridge.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    let mut child = doorbridge()
        .arg("--config")
        .arg(shipped_config())
        .arg("run")
        .env("DOORBRIDGE_STORAGE__PATH", &db)
        .env("DOORBRIDGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    wait_for_line(&lines, "store open", Duration::from_secs(20));
    assert!(
        db.exists(),
        "the database was created at the configured path"
    );

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for_line(&lines, "stopped", Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::yield_now();
    };
    assert!(exit.success(), "{exit:?}");
    // The WAL was folded into the database on the way out.
    let wal = dir.path().join("state/doorbridge.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
}

#[test]
fn run_with_an_unwritable_store_path_says_so_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the database file should be: it cannot be opened as a file.
    let db = dir.path().join("taken");
    std::fs::create_dir_all(&db).unwrap();
    let mut child = doorbridge()
        .arg("--config")
        .arg(shipped_config())
        .arg("run")
        .env("DOORBRIDGE_STORAGE__PATH", &db)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon kept running on a path it cannot use");
        }
        std::thread::yield_now();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(db.is_dir(), "the directory was left where it was");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the store at"), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
}
