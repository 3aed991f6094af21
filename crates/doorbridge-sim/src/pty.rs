//! A pseudo-terminal for simulated units, linked where a gateway's config expects its port.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_serial::{SerialPort, SerialStream};

/// Creates a pty pair, points a symlink at `link` to its device, and returns the master side
/// with the device name. The slave handle is dropped: ports open exclusively, so holding it
/// would keep the gateway out. Until the gateway opens the device, reads on the master fail
/// with EIO (wrap it in [`super::HangupTolerant`]).
pub fn linked_pty(link: &Path) -> io::Result<(PtyMaster, String)> {
    let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
    let device = slave
        .name()
        .ok_or_else(|| io::Error::other("the pseudo-terminal has no device name"))?;
    drop(slave);
    // tokio-serial offers no safe way to take the descriptor over, so it is duplicated.
    // SAFETY: `master` owns the descriptor and is alive for the borrow; the clone is a new
    // descriptor (dup) of the same pty master, which stays open when `master` is dropped.
    #[allow(unsafe_code)]
    let master_fd = unsafe { BorrowedFd::borrow_raw(master.as_raw_fd()) };
    let file = File::from(master_fd.try_clone_to_owned()?);
    drop(master);
    make_link(link, Path::new(&device))?;
    Ok((PtyMaster::new(file), device))
}

/// The simulator's side of a pty (non-blocking), registered with the async runtime that first
/// polls it.
///
/// Why not tokio-serial's stream: once the master has read a hang-up (nobody had the device
/// open yet, or the gateway closed it), tokio keeps the descriptor's "read closed" readiness
/// for good, so every later read woke at once and found nothing: a busy loop of some 30,000
/// reads a second per simulator. Here a read that fails with EIO marks the master hung up; it
/// is then read directly (the caller backs off, see [`super::HangupTolerant`]) until the
/// device is open again, and registered afresh.
#[derive(Debug)]
pub struct PtyMaster {
    /// The descriptor while it is not registered (before the first poll, and while hung up).
    file: Option<File>,
    io: Option<AsyncFd<File>>,
    hung_up: bool,
}

impl PtyMaster {
    fn new(file: File) -> PtyMaster {
        PtyMaster {
            file: Some(file),
            io: None,
            hung_up: false,
        }
    }

    fn file(&self) -> &File {
        match (&self.io, &self.file) {
            (Some(io), _) => io.get_ref(),
            (None, Some(file)) => file,
            // One of the two always holds the descriptor.
            (None, None) => unreachable!("a pty master without its descriptor"),
        }
    }

    /// The registered descriptor, registering it now if need be (also after a hang-up, so it
    /// starts with fresh readiness).
    fn registered(&mut self) -> io::Result<&AsyncFd<File>> {
        if self.io.is_none() {
            let file = self.file.take().expect("the descriptor, unregistered");
            // SAFETY: the `File` owns its descriptor, and nothing closes or replaces it while
            // the `AsyncFd` holds it (`hang_up` takes it back with `into_inner`).
            #[allow(unsafe_code)]
            let registered = unsafe { AsyncFd::register(file) };
            self.io = Some(registered?);
        }
        Ok(self.io.as_ref().expect("registered just now"))
    }

    /// Drops the registration (its readiness remembers the hang-up) and keeps the descriptor.
    fn hang_up(&mut self) {
        self.hung_up = true;
        if let Some(io) = self.io.take() {
            self.file = Some(io.into_inner());
        }
    }
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hung_up {
            // Not registered: one direct read says whether the device is open again.
            match this.file().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    this.hung_up = false;
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.hung_up = false,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        loop {
            let io = this.registered()?;
            let mut guard = ready!(io.poll_read_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => {
                    if super::shell::is_hangup(&e) {
                        this.hang_up();
                    }
                    return Poll::Ready(Err(e));
                }
                // Not readable after all: the readiness was cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hung_up {
            // Bytes for nobody go to the pty's buffer; a full one says so.
            return match this.file().write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                other => Poll::Ready(other),
            };
        }
        loop {
            let io = this.registered()?;
            let mut guard = ready!(io.poll_write_ready(cx))?;
            match guard.try_io(|fd| fd.get_ref().write(data)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Points `link` at `device`, replacing an old symlink (atomically, by renaming a new one
/// over it). Anything else at `link` is left alone and is an error.
pub fn make_link(link: &Path, device: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let old = std::fs::read_link(link).unwrap_or_default();
            tracing::info!(link = %link.display(), old = %old.display(), "replacing the old link");
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a symlink; not replacing it",
                    link.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot look at {}: {e}", link.display()),
            ));
        }
    }
    let name = link.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", link.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".door-sim-{}", std::process::id()));
    let tmp = link.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(device, &tmp).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create a symlink at {}: {e}", tmp.display()),
        )
    })?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io::Error::new(
            e.kind(),
            format!("cannot create the symlink {}: {e}", link.display()),
        )
    })
}

/// Removes `link` if it still points at `device` (another simulator may have taken it over).
pub fn remove_link(link: &Path, device: &Path) {
    if std::fs::read_link(link).is_ok_and(|target| target == device)
        && let Err(e) = std::fs::remove_file(link)
    {
        tracing::warn!(link = %link.display(), error = %e, "cannot remove the link");
    }
}
