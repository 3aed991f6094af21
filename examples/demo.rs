//! The whole system on one machine, in one process, telling the story of issue 7:
//!
//! ```sh
//! cargo run --release --example demo
//! ```
//!
//! An in-process MQTT broker, the reference cloud, the gateway (`doorbridge::daemon::serve`
//! on an embedded configuration, its state in a temporary directory) and four simulated door
//! units on two pseudo-terminals. Each step is checked; the summary table says what was
//! expected and what happened. Exit status 0 when every check holds, 1 naming the step that
//! failed. The story itself is `crates/doorbridge-testkit/src/story.rs`, which `tests/it/demo.rs` runs too.
//!
//! The gateway's log goes to stderr at `warn` (`DOORBRIDGE_LOG` sets another filter, e.g.
//! `DOORBRIDGE_LOG=info`).

use doorbridge_testkit::story;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Prints each line as it comes.
struct Stdout;

impl story::Narrator for Stdout {
    fn say(&mut self, line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn main() -> ExitCode {
    let filter = std::env::var("DOORBRIDGE_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        // rumqttd reports every connection the demo cuts at warn and error.
        .unwrap_or_else(|| EnvFilter::new("warn,rumqttd=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(story::run(&mut Stdout));
    println!();
    for line in outcome.table() {
        println!("{line}");
    }
    println!();
    match &outcome.failed {
        None => {
            println!(
                "All {} checks hold, in {:.1} s.",
                outcome.rows.len(),
                outcome.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Some((step, why)) => {
            let at = match step {
                0 => "the start".to_owned(),
                n => format!("step {n} ({})", story::STEPS[n - 1]),
            };
            println!("The demo FAILED at {at}: {why}");
            ExitCode::FAILURE
        }
    }
}
