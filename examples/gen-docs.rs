//! Renders the man pages and shell completions of `doorbridge` from its command-line
//! definition (`src/cli.rs`, the very module the binary parses with), for the Debian package.
//! `packaging/build-deb` runs
//!
//! ```sh
//! cargo run --locked --example gen-docs -- target/debian-assets
//! ```
//!
//! before `cargo deb`, which ships what it writes (`[package.metadata.deb] assets`):
//!
//! - `man/doorbridge.1` and one page per command, `man/doorbridge-status.1`,
//!   `man/doorbridge-keys-import.1`, … (cargo-deb gzips them into `/usr/share/man/man1/`);
//! - `completions/doorbridge.bash`, `completions/_doorbridge` (zsh) and
//!   `completions/doorbridge.fish`.
//!
//! An example rather than a build script or a hidden subcommand: `clap_mangen` and
//! `clap_complete` stay dev-dependencies, out of the daemon's dependency tree. The output
//! depends on nothing but the definition and the crate's version (no date, no path), so a
//! package built twice from one commit holds the same pages.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory as _;
use clap_complete::Shell;
use doorbridge::cli;

/// The sections the main page adds to what clap knows: where things are, and the rest of the
/// documentation (installed by the package under /usr/share/doc/doorbridge).
const MAIN_PAGE_EXTRA: &str = r".SH FILES
.TP
\fI/etc/doorbridge/doorbridge.toml\fR
The main configuration file. As the package installs it, it sets no key, and the service is
skipped at boot until it does.
.TP
\fI/etc/doorbridge/config.d/*.toml\fR
Drop-in files, read after the main file in sorted name order.
.TP
\fI/var/lib/doorbridge/doorbridge.db\fR
The store: key set, use counters, records not yet uploaded (storage.path). Its control
socket, for \fBstatus\fR and \fBevents tail\fR, is next to it: \fIdoorbridge.db.sock\fR.
.TP
\fI/usr/share/doc/doorbridge/examples/doorbridge.toml\fR
The annotated example: every key, with its meaning, unit and default.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1);
\fI/usr/share/doc/doorbridge/operations.md\fR (installing, configuring, running, recovering)
and \fI/usr/share/doc/doorbridge/configuration.md\fR (sources, precedence, problems).
";

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-docs OUT_DIR   (writes OUT_DIR/man/*.1 and OUT_DIR/completions/*)");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("gen-docs: {}: {error}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// `text` as lines of roff to print as they are (inside `.nf`): backslashes and hyphens
/// escaped, and no line taken for a request.
fn roff_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.replace('\\', "\\e").replace('-', "\\-");
        if line.starts_with(['.', '\'']) {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Writes every page and completion under `out`, replacing what an earlier run left there
/// (so that a command since removed leaves no page behind); returns the files written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => fs::create_dir_all(dir)?,
        }
    }

    // As clap_mangen::generate_to, with the main page's extra sections: one page per command
    // that is not hidden, named after its path (doorbridge-keys-import.1); no `help` command.
    let mut command = cli::Cli::command().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    let mut pending = vec![command.clone()];
    while let Some(page) = pending.pop() {
        pending.extend(page.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let after_help = page.get_after_help().map(ToString::to_string);
        let man_page = clap_mangen::Man::new(page)
            .manual("doorbridge manual")
            .source(concat!("doorbridge ", env!("CARGO_PKG_VERSION")));
        let path = man.join(man_page.get_filename());
        let mut text = Vec::new();
        match after_help {
            // The main page: clap_mangen would fill the after-help (the configuration sources
            // and exit statuses, laid out in lines) into one paragraph; keep its lines.
            Some(after_help) => {
                man_page.render_title(&mut text)?;
                man_page.render_name_section(&mut text)?;
                man_page.render_synopsis_section(&mut text)?;
                man_page.render_description_section(&mut text)?;
                man_page.render_options_section(&mut text)?;
                man_page.render_subcommands_section(&mut text)?;
                text.extend_from_slice(b".SH \"CONFIGURATION AND EXIT STATUS\"\n.nf\n");
                text.extend_from_slice(roff_lines(&after_help).as_bytes());
                text.extend_from_slice(b".fi\n");
                text.extend_from_slice(MAIN_PAGE_EXTRA.as_bytes());
                man_page.render_version_section(&mut text)?;
            }
            None => man_page.render(&mut text)?,
        }
        fs::write(&path, text)?;
        written.push(path);
    }

    for (shell, name) in [
        (Shell::Bash, "doorbridge.bash"),
        (Shell::Zsh, "_doorbridge"),
        (Shell::Fish, "doorbridge.fish"),
    ] {
        let path = completions.join(name);
        let mut file = fs::File::create(&path)?;
        clap_complete::generate(shell, &mut command, "doorbridge", &mut file);
        file.flush()?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}
