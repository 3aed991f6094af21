//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

/// The `doorbridge` binary built for this test run.
pub fn doorbridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_doorbridge"))
}

/// A command for the binary that inherits no `DOORBRIDGE_*` variable from the test's own
/// environment, so only what a test sets reaches the configuration.
pub fn doorbridge() -> Command {
    let mut command = Command::new(doorbridge_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("DOORBRIDGE_") {
            command.env_remove(name);
        }
    }
    command
}

pub use doorbridge_testkit::find_binary;

/// libfaketime's preload library (Debian's `libfaketime` package), which moves a process's
/// wall clock: `/usr/lib/<triplet>/faketime/libfaketime.so.1`, or `/usr/lib/faketime/…`.
pub fn libfaketime() -> Option<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/local/lib")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path()));
    }
    dirs.into_iter()
        .map(|dir| dir.join("faketime/libfaketime.so.1"))
        .find(|lib| lib.is_file())
}

/// What a finished command did.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` with `args` to completion.
pub fn run<I, S>(command: &mut Command, args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = command
        .args(args)
        .output()
        .expect("the doorbridge binary could not be started");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The example configuration shipped in the repository.
pub fn shipped_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/doorbridge.toml")
}
