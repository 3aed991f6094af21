//! The simulators' command lines: each binary explains itself, and refuses a bad argument with
//! exit status 2 and a message that names it. (Cargo also builds the binaries for these tests,
//! which is how `cargo test` at the workspace root has them ready for the daemon's tests.)

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn door_sim_explains_itself_and_refuses_a_bad_unit_list() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_door-sim"), &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--pty"), "{out}");
    assert!(out.contains("--units"), "{out}");
    let (code, _, err) = run(env!("CARGO_BIN_EXE_door-sim"), &["--units", "1,x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains('x'), "{err}");
}

#[test]
fn cloud_sim_explains_itself_and_refuses_an_unknown_command() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_cloud-sim"), &["--help"]);
    assert_eq!(code, 0);
    for command in ["keygen", "build", "publish", "records"] {
        assert!(out.contains(command), "no {command} in:\n{out}");
    }
    let (code, _, err) = run(env!("CARGO_BIN_EXE_cloud-sim"), &["no-such-command"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no-such-command"), "{err}");
}
