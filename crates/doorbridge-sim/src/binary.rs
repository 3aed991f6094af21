//! The simulators as processes, for the daemon's tests and benches: Cargo gives a package's
//! tests `CARGO_BIN_EXE_*` only for that package's own binaries, so the daemon's tests ask
//! here for `door-sim` and `cloud-sim`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The path of this crate's binary `name` (`door-sim` or `cloud-sim`) in the target directory
/// and profile of the running test, bench or example.
///
/// `cargo test` at the workspace root builds them beside the tests (this crate's own
/// integration tests need them), so they are as fresh as the tests. When they are missing (a
/// test run of the daemon's package alone), they are built there first, once per process.
///
/// # Panics
/// When the running executable is not under a Cargo target directory, or the build fails (the
/// message carries cargo's status; its errors went to stderr).
pub fn binary(name: &str) -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR
        .get_or_init(|| {
            let dir = profile_dir()?;
            if !["door-sim", "cloud-sim"]
                .iter()
                .all(|b| dir.join(b).is_file())
            {
                build(&dir)?;
            }
            Ok(dir)
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"));
    dir.join(name)
}

/// The profile's directory of the target directory the running executable is in.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the running executable: {e}"))?;
    // target/<profile>/deps/<test or bench>, or target/<profile>/examples/<example>.
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} is not in a Cargo target directory", exe.display()))
}

/// Builds the binaries into `profile_dir`.
fn build(profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir.parent().ok_or_else(|| {
        format!(
            "{} is not in a Cargo target directory",
            profile_dir.display()
        )
    })?;
    // `debug` holds the dev and test profiles; `release` the release and bench profiles.
    let profile = if profile_dir.file_name() == Some("release".as_ref()) {
        "bench"
    } else {
        "dev"
    };
    let cargo: OsString = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "doorbridge-sim",
            "--bins",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cannot run cargo to build the simulators: {e}"))?;
    if !status.success() {
        return Err(format!("building door-sim and cloud-sim failed ({status})"));
    }
    Ok(())
}
