//! The async shell around [`SimUnits`]: moves bytes between a port and the pure units.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

use super::units::{Output, SimCommand, SimUnits};

/// `EIO`: what a pty master's reads fail with while nobody has the slave open (the same
/// number on Linux, the BSDs and macOS).
const EIO: i32 = 5;

/// Runs the simulated units on `port` until `shutdown` completes, the port reaches its end
/// (a read of zero bytes) or fails. Frames from the gateway are handed to `units`, their
/// answers written back when due (a late answer waits; nothing else is ever delayed), and
/// every [`Output`] is sent to `output`. Commands arrive on `commands` and are taken before
/// bytes that arrived at the same time; one that cannot be carried out comes out as
/// [`Output::Rejected`]. A closed `commands` channel only means no
/// more commands; a closed `output` channel drops the outputs. Returns the units, with their
/// counters, when it stops.
///
/// For a pty master, wrap the port in [`HangupTolerant`] so that the times nobody has the
/// other end open do not end the run.
pub async fn run_sim<P>(
    port: P,
    mut units: SimUnits,
    mut commands: mpsc::Receiver<SimCommand>,
    output: mpsc::Sender<Output>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<SimUnits>
where
    P: AsyncRead + AsyncWrite,
{
    let mut port = std::pin::pin!(port);
    let mut shutdown = std::pin::pin!(shutdown);
    let start = Instant::now();
    let mut buf = vec![0u8; 1024];
    let mut commands_open = true;
    let mut outs: Vec<Output> = Vec::new();
    loop {
        let now = start.elapsed();
        outs.extend(units.on_timeout(now));
        while let Some(bytes) = units.poll_transmit(now) {
            tracing::trace!(bytes = %Hex(&bytes), "to the gateway");
            port.write_all(&bytes).await?;
            port.flush().await?;
        }
        for o in outs.drain(..) {
            // Nobody listening is not a reason to stop answering the gateway.
            let _ = output.send(o).await;
        }
        let deadline = units.next_deadline().map(|d| start + d);
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            command = commands.recv(), if commands_open => match command {
                Some(command) => {
                    tracing::debug!(?command, "command");
                    match units.command(command.clone(), start.elapsed()) {
                        Ok(o) => outs = o,
                        Err(error) => outs.push(Output::Rejected { command, error }),
                    }
                }
                None => commands_open = false,
            },
            read = port.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    tracing::info!("the line reached its end");
                    break;
                }
                let chunk = buf.get(..n).unwrap_or_default();
                tracing::trace!(bytes = %Hex(chunk), "from the gateway");
                outs = units.on_bytes(chunk, start.elapsed());
            }
            () = sleep_until_opt(deadline) => {}
        }
    }
    Ok(units)
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Bytes as compact hex, for trace logs.
struct Hex<'a>(&'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A port whose far end may come and go: a pty master while nobody has the slave open (the
/// gateway has not started yet, or restarts). A read failing with `EIO` waits `backoff` and
/// tries again instead of failing; a write failing with `EIO` discards the bytes (nobody is
/// listening). Every other error, and the end of the stream, pass through.
#[derive(Debug)]
pub struct HangupTolerant<P> {
    inner: P,
    backoff: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    hung_up: bool,
}

impl<P> HangupTolerant<P> {
    pub fn new(inner: P, backoff: Duration) -> HangupTolerant<P> {
        HangupTolerant {
            inner,
            backoff,
            sleep: None,
            hung_up: false,
        }
    }

    /// Whether the last read found nobody at the other end.
    pub fn is_hung_up(&self) -> bool {
        self.hung_up
    }

    pub fn get_ref(&self) -> &P {
        &self.inner
    }

    pub fn into_inner(self) -> P {
        self.inner
    }
}

pub(super) fn is_hangup(e: &io::Error) -> bool {
    e.raw_os_error() == Some(EIO)
}

impl<P: AsyncRead + Unpin> AsyncRead for HangupTolerant<P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if is_hangup(&e) => {
                    if !this.hung_up {
                        this.hung_up = true;
                        tracing::info!("nobody has the other end of the line open; waiting");
                    }
                    this.sleep = Some(Box::pin(tokio::time::sleep(this.backoff)));
                }
                Poll::Ready(Ok(())) => {
                    if this.hung_up && buf.filled().len() > before {
                        this.hung_up = false;
                        tracing::info!("the other end of the line is open");
                    }
                    return Poll::Ready(Ok(()));
                }
                other => return other,
            }
        }
    }
}

impl<P: AsyncWrite + Unpin> AsyncWrite for HangupTolerant<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.get_mut().inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) if is_hangup(&e) => Poll::Ready(Ok(buf.len())),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.get_mut().inner).poll_flush(cx) {
            Poll::Ready(Err(e)) if is_hangup(&e) => Poll::Ready(Ok(())),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.get_mut().inner).poll_shutdown(cx) {
            Poll::Ready(Err(e)) if is_hangup(&e) => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::SimConfig;
    use doorbridge_proto::bus::frame::{Address, Decoder, encode};
    use doorbridge_proto::bus::message::Message;

    fn unit(n: u8) -> Address {
        Address::unit(n).unwrap()
    }

    /// A reader that fails with EIO a few times, then yields bytes, then ends.
    struct Flaky {
        hangups: u32,
        data: Vec<u8>,
    }

    impl AsyncRead for Flaky {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.hangups > 0 {
                this.hangups -= 1;
                return Poll::Ready(Err(io::Error::from_raw_os_error(EIO)));
            }
            let n = this.data.len().min(buf.remaining());
            buf.put_slice(&this.data[..n]);
            this.data.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn hangups_are_waited_out() {
        let flaky = Flaky {
            hangups: 3,
            data: b"hello".to_vec(),
        };
        let mut port = HangupTolerant::new(flaky, Duration::from_millis(10));
        let before = Instant::now();
        let mut buf = [0u8; 8];
        let n = port.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(!port.is_hung_up());
        // Three hang-ups, each waited out for the backoff.
        assert!(before.elapsed() >= Duration::from_millis(30));
        assert_eq!(port.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn other_errors_pass_through() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
                _buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::other("broken")))
            }
        }
        let mut port = HangupTolerant::new(Broken, Duration::from_millis(100));
        let mut buf = [0u8; 8];
        assert!(port.read(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn answers_polls_over_a_duplex_stream_and_carries_out_commands() {
        let (gateway, line) = tokio::io::duplex(4096);
        let units = SimUnits::new(
            &[unit(5)],
            SimConfig {
                boot_status: false,
                first_id: Some(0x1234),
                ..SimConfig::default()
            },
        )
        .unwrap();
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let (out_tx, mut out_rx) = mpsc::channel(8);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_sim(line, units, cmd_rx, out_tx, async move {
            let _ = stop_rx.await;
        }));
        let (mut rx, mut tx) = tokio::io::split(gateway);
        let mut decoder = Decoder::new();
        let mut exchange = async |bytes: &[u8]| -> Message {
            tx.write_all(bytes).await.unwrap();
            let mut buf = [0u8; 256];
            loop {
                let n = rx.read(&mut buf).await.unwrap();
                assert!(n > 0, "the sim closed the line");
                if let Some(item) = decoder.feed(&buf[..n]).into_iter().next() {
                    return Message::from_frame(&item.unwrap()).unwrap();
                }
            }
        };
        let poll = encode(&Message::Poll.to_frame(unit(5), 7).unwrap());
        assert_eq!(exchange(&poll).await, Message::Idle);
        assert_eq!(out_rx.recv().await, Some(Output::Contact { unit: unit(5) }));

        // A command that fails comes back as an output; one that works changes the answer.
        cmd_tx
            .send(SimCommand::Retransmit {
                unit: unit(5),
                report: false,
            })
            .await
            .unwrap();
        assert!(matches!(out_rx.recv().await, Some(Output::Rejected { .. })));
        cmd_tx
            .send(SimCommand::Call {
                unit: unit(5),
                button: 1,
            })
            .await
            .unwrap();
        // The command was queued before the poll was written, and the shell takes queued
        // commands before bytes from the line.
        let answer = exchange(&poll).await;
        assert!(matches!(answer, Message::CallButton(c) if c.button == 1));

        stop_tx.send(()).unwrap();
        let units = task.await.unwrap().unwrap();
        assert_eq!(units.stats().answers, 2);
    }
}
