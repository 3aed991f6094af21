//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The `doorbridge` binary built for this test run.
pub fn doorbridge_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_doorbridge"))
}
