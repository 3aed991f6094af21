//! Integration tests: one binary, a module per topic, shared helpers in `util` and `fixtures`.

mod broker;
mod bus;
mod chain;
mod cloud_sim;
mod config;
mod daemon;
mod demo;
mod doctor;
mod fixtures;
mod gateway;
mod link;
mod link_reference;
mod link_tls;
mod nats;
mod operator;
mod osdp;
mod osdp_sim;
mod powercut;
mod service;
mod sim;
mod stale;
mod store;
mod uplink;
mod util;
