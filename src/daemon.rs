//! Wiring and shutdown of the running service.
