//! A pseudo-terminal for simulated units, linked where a gateway's config expects its port.

use std::io;
use std::path::Path;

use tokio_serial::{SerialPort, SerialStream};

/// Creates a pty pair, points a symlink at `link` to its device, and returns the master side
/// with the device name. The slave handle is dropped: ports open exclusively, so holding it
/// would keep the gateway out. Until the gateway opens the device, reads on the master fail
/// with EIO (wrap it in [`super::HangupTolerant`]).
pub fn linked_pty(link: &Path) -> io::Result<(SerialStream, String)> {
    let (master, slave) = SerialStream::pair().map_err(io::Error::from)?;
    let device = slave
        .name()
        .ok_or_else(|| io::Error::other("the pseudo-terminal has no device name"))?;
    drop(slave);
    make_link(link, Path::new(&device))?;
    Ok((master, device))
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
