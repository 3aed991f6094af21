//! The demo's story (`doorbridge_testkit::story`), run here in process and quietly, so that the
//! README's first command cannot rot: every step must hold, as `cargo run --example demo`
//! checks it.

use doorbridge_testkit::story;

/// Keeps the lines for the failure message.
struct Quiet(Vec<String>);

impl story::Narrator for Quiet {
    fn say(&mut self, line: &str) {
        self.0.push(line.to_owned());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tells_its_whole_story() {
    let mut lines = Quiet(Vec::new());
    let outcome = story::run(&mut lines).await;
    let shown = || {
        format!(
            "{}\n\n{}\n(after {:?})",
            lines.0.join("\n"),
            outcome.table().join("\n"),
            outcome.elapsed
        )
    };
    assert!(outcome.failed.is_none(), "{}", shown());
    for step in 1..=story::STEPS.len() {
        assert!(
            outcome.rows.iter().any(|r| r.step == step && r.ok),
            "step {step} checked nothing\n{}",
            shown()
        );
    }
}
