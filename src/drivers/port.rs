//! The bus's serial port as the driver uses it: non-blocking, registered with the runtime for
//! reading only.
//!
//! `tokio_serial::SerialStream` registers the port for reading and writing, and the kernel
//! signals writability at the edge of every write it has taken from its buffer: one more
//! wake-up of the bus per frame sent, which finds nothing to do (a poll exchange is a write of
//! 10 bytes and the answer). It also tries another `read` after every answer until one fails
//! with `EAGAIN`. Here a read that returns fewer bytes than asked drops the readiness instead
//! (the next bytes raise a new edge), and a write goes straight to the port: a frame is at most
//! a few hundred bytes, and the kernel's transmit buffer (4 KiB) holds several; should it be
//! full (a stalled line) the write is tried again every millisecond.

use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// How long a write that found the transmit buffer full waits before it tries again.
const WRITE_RETRY: Duration = Duration::from_millis(1);

/// An open serial port, non-blocking, registered with the current runtime for reading.
#[derive(Debug)]
pub(crate) struct Port {
    fd: AsyncFd<mio_serial::SerialStream>,
    /// While the transmit buffer is full: when to try the write again.
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Port {
    /// Opens the port as `builder` says (exclusively, as `serialport` does) and registers it.
    pub(crate) fn open(builder: &tokio_serial::SerialPortBuilder) -> io::Result<Port> {
        let stream = mio_serial::SerialStream::open(builder).map_err(io::Error::from)?;
        // SAFETY: the stream owns its descriptor (it closes it when dropped, and only then),
        // and `as_raw_fd` always returns that one: it stays open and the same for as long as
        // the `AsyncFd` that takes the stream lives.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(stream, Interest::READABLE) }?;
        Ok(Port { fd, retry: None })
    }
}

impl std::os::fd::AsRawFd for Port {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let room = buf.remaining();
            match guard.try_io(|fd| fd.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    // Fewer bytes than asked: the kernel had no more. The next ones arrive as
                    // a new edge; no read is needed to find out that there are none yet.
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `EAGAIN`: readiness cleared, wait for the next edge.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(retry) = self.retry.as_mut() {
                ready!(retry.as_mut().poll(cx));
                self.retry = None;
            }
            match self.fd.get_ref().write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.retry = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: a write is in the kernel once it returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
