//! Integration tests: one binary, a module per topic, shared helpers in `util` and `fixtures`.

mod bus;
mod cloud_sim;
mod config;
mod daemon;
mod fixtures;
mod sim;
mod store;
mod util;
