//! The workspace's binaries as processes: Cargo gives a package's tests `CARGO_BIN_EXE_*` only
//! for that package's own binaries, so the daemon's tests (for `door-sim` and `cloud-sim`) and
//! this crate (for `doorbridge`, in the power-cut campaign and the benches' harness) ask here.
//! Also: programs found on the machine, and the workspace's root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

/// The package each binary is built from.
const BINARIES: [(&str, &str); 3] = [
    ("doorbridge", "doorbridge"),
    ("door-sim", "doorbridge-sim"),
    ("cloud-sim", "doorbridge-sim"),
];

/// The path of the workspace's binary `name` (`doorbridge`, `door-sim` or `cloud-sim`) in the
/// target directory and profile of the running test, bench or example.
///
/// `cargo test` and `cargo bench` at the workspace root build `doorbridge` beside the tests,
/// and `cargo test` builds `door-sim` and `cloud-sim` too (doorbridge-sim's own tests need
/// them), so they are as fresh as the tests. When one is missing (a run of one package alone,
/// or a bench), its package's binaries are built there first, once per process.
///
/// # Panics
/// For a name that is not one of the three, when the running executable is not under a Cargo
/// target directory, or when the build fails (its errors went to stderr).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let package = BINARIES.iter().find(|(bin, _)| *bin == name).map_or_else(
        || panic!("{name} is not one of the workspace's binaries"),
        |(_, package)| *package,
    );
    let dir = profile_dir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if !path.is_file() && !built.contains(&package) {
        build(&dir, package).unwrap_or_else(|e| panic!("{e}"));
        built.push(package);
    }
    path
}

/// The profile's directory of the target directory the running executable is in.
fn profile_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| format!("the running executable: {e}"))?;
        // target/<profile>/deps/<test or bench>, or target/<profile>/examples/<example>.
        exe.parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .ok_or_else(|| format!("{} is not in a Cargo target directory", exe.display()))
    })
    .clone()
}

/// Builds `package`'s binaries into `profile_dir`.
fn build(profile_dir: &Path, package: &str) -> Result<(), String> {
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
            package,
            "--bins",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace_root())
        .status()
        .map_err(|e| format!("cannot run cargo to build {package}: {e}"))?;
    if !status.success() {
        return Err(format!("building {package}'s binaries failed ({status})"));
    }
    Ok(())
}

/// The workspace's root directory (where `docs/` and `config/` are).
pub fn workspace_root() -> PathBuf {
    // crates/doorbridge-testkit, two levels down.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A program on `PATH`, or at `fallback` (where Debian installs it, for a `PATH` without
/// `/usr/sbin`).
pub fn find_binary(name: &str, fallback: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join(name))
        .chain([PathBuf::from(fallback)])
        .find(|candidate| candidate.is_file())
}
