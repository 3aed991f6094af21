//! The `sd_notify` protocol: what the service tells systemd (`READY=1`, `WATCHDOG=1`, `STATUS=…`,
//! `RELOADING=1`, `STOPPING=1`).
//!
//! [`Notifier`] is what the daemon holds. It sends through a [`Notify`] implementation:
//! [`Systemd`] for the real service (a datagram to `NOTIFY_SOCKET`, nothing at all when the
//! variable is unset, as outside systemd), [`Silent`] for the daemon run in-process, and
//! [`Recorder`] for tests that check what would have been sent. A failed send is logged and otherwise ignored: the doors never wait for systemd.

use std::fmt::{self, Write as _};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;

/// Where notifications go.
pub trait Notify: Send + Sync + fmt::Debug {
    /// Sends one message made of `states` (one `KEY=VALUE` line each).
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()>;
}

/// systemd's notification socket, named by `NOTIFY_SOCKET`; a no-op when it is unset.
#[derive(Clone, Copy, Debug, Default)]
pub struct Systemd;

impl Notify for Systemd {
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        sd_notify::notify(states)
    }
}

/// Keeps every message, one string per message (its lines as sent), for tests.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    sent: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    /// The messages so far.
    pub fn sent(&self) -> Vec<String> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Notify for Recorder {
    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let text = states.iter().fold(String::new(), |mut text, s| {
            let _ = writeln!(text, "{s}");
            text
        });
        self.sent
            .lock()
            .map_err(|_| io::Error::other("recorder poisoned"))?
            .push(text);
        Ok(())
    }
}

/// Sends the daemon's notifications; cheap to clone.
#[derive(Clone, Debug)]
pub struct Notifier {
    to: Arc<dyn Notify>,
    /// Whether a failed send was logged at warning level already (later ones go to debug).
    warned: Arc<AtomicBool>,
}

/// Sends nothing (the daemon run in-process by tests and benchmarks, which may themselves run
/// under a service manager whose `NOTIFY_SOCKET` they inherit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Notify for Silent {
    fn send(&self, _: &[NotifyState<'_>]) -> io::Result<()> {
        Ok(())
    }
}

impl Default for Notifier {
    /// [`Silent`].
    fn default() -> Self {
        Notifier::new(Silent)
    }
}

impl Notifier {
    /// Through [`Systemd`]: silent unless `NOTIFY_SOCKET` is set.
    pub fn systemd() -> Notifier {
        Notifier::new(Systemd)
    }

    pub fn new(to: impl Notify + 'static) -> Notifier {
        Notifier {
            to: Arc::new(to),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Start-up is done; `status` is the first `STATUS=` line.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// The tasks are alive: resets systemd's watchdog timer.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// A new one-line summary for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// A reload begins; [`Notifier::ready`] ends it. systemd 253 and later require the
    /// monotonic time with it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[
                NotifyState::Reloading,
                now,
                NotifyState::Status("reloading the configuration"),
            ]),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the monotonic clock for RELOADING=1");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// Shutdown begins.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = self.to.send(states) {
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(error = %e, "sd_notify failed");
            } else {
                tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); going on without");
            }
        }
    }
}

/// The watchdog interval systemd expects `WATCHDOG=1` within (`WATCHDOG_USEC`, for this
/// process if `WATCHDOG_PID` names one), or `None` when there is no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_sent_as_systemd_reads_them() {
        let recorder = Recorder::default();
        let notifier = Notifier::new(recorder.clone());
        notifier.ready("1/1 bus ports open");
        notifier.watchdog();
        notifier.reloading();
        notifier.stopping();
        let sent = recorder.sent();
        assert_eq!(sent[0], "READY=1\nSTATUS=1/1 bus ports open\n");
        assert_eq!(sent[1], "WATCHDOG=1\n");
        assert!(
            sent[2].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{}",
            sent[2]
        );
        assert_eq!(sent[3], "STOPPING=1\nSTATUS=stopping\n");
    }

    #[derive(Debug)]
    struct Broken;

    impl Notify for Broken {
        fn send(&self, _: &[NotifyState<'_>]) -> io::Result<()> {
            Err(io::Error::other("no socket"))
        }
    }

    #[test]
    fn a_failing_socket_does_not_stop_anything() {
        let notifier = Notifier::new(Broken);
        notifier.watchdog();
        notifier.watchdog();
        assert!(notifier.warned.load(Ordering::Relaxed));
    }
}
