//! Wiring and shutdown of the running service.

pub fn run(config: &crate::config::Config) -> Result<(), std::io::Error> {
    let _ = config;
    Ok(())
}
