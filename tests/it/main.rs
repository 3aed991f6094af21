//! Integration tests: one binary, a module per topic, shared helpers in `util`.

mod config;
mod util;
