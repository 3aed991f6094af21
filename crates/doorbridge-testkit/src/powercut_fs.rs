//! A filesystem that loses power on command (after LazyFS): a FUSE passthrough over a backing
//! directory that remembers every change not yet made durable, and on a "power cut" takes
//! them back, whole or torn. Shared by the power-cut test (`tests/it/powercut.rs`) and the
//! campaign (`benches/powercut.rs`).
//!
//! What counts as durable is what a disk with a volatile write cache promises:
//! - a file's writes and size changes, once that file is `fsync`ed or `fdatasync`ed;
//! - a directory's creates, unlinks and renames, once that directory is `fsync`ed (SQLite
//!   syncs the directory after creating a WAL or a rollback journal, and after deleting one
//!   with `synchronous=EXTRA`). A file's own `fsync` does not make its name durable.
//!
//! The backing directory always holds what a reader sees (durable or not), so reads,
//! `mmap` (SQLite's `-shm`) and the kernel's page cache work as on any passthrough. The
//! [`Layer`] keeps, oldest first, an undo record for every change not yet durable: the bytes a
//! write overwrote and the size before it, the tail a truncation cut off, the name a create,
//! unlink or rename touched. A [`Cut`] replays those records backwards: all of them
//! ([`Cut::Whole`]: everything since the last sync is gone) or those after a random point
//! ([`Cut::Torn`]: a prefix of the unsynced changes reached the disk, the change at the cut
//! itself up to a 4 KiB page boundary when it spans several pages). Afterwards the backing
//! directory is exactly what the disk would hold after the power came back.
//!
//! A power cut is [`PowercutMount::cut`]: the caller has killed (SIGKILL) the processes that
//! used the mount (nothing runs after a power cut); from that instant every request, a late
//! write-back of a dead process's mapped pages included, is refused with `EIO`; the layer is
//! undone; the filesystem is unmounted, so the kernel's page cache of the dead mount cannot
//! leak into the next one. A new [`PowercutMount::mount`] starts over from what survived.
//!
//! The process that serves the mount must not use it itself: a `munmap` of a file mapped
//! from it waits for the write-back its own server thread may be unable to serve.
//!
//! One flat directory (no subdirectories, links or special files: the daemon's control
//! socket beside the database cannot be made, which it logs and goes on without): enough
//! for a SQLite database with its WAL, `-shm`, journal and lock files. Needs `/dev/fuse` and
//! the right to mount (root): the pure-Rust mount of the `fuser` crate calls `mount(2)`
//! itself, so neither libfuse nor `fusermount3` is needed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

/// The page size a torn cut respects: a partly kept write keeps whole pages only.
pub const PAGE: u64 = 4096;
const ROOT: u64 = 1;
/// How long the kernel may trust names and attributes: every change goes through this mount,
/// so its caches never go stale; the mount is new after every cut.
const TTL: Duration = Duration::from_secs(1);

/// How the power goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Every change since its last sync is lost.
    Whole,
    /// The changes up to a random point (chosen from `seed`) reached the disk, the rest did
    /// not; the change at that point is kept up to a page boundary when it spans several.
    Torn { seed: u64 },
}

/// What a cut took back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Changes not yet durable when the power went.
    pub pending: usize,
    /// Of those, kept whole (a torn cut's prefix).
    pub kept: usize,
    /// Whether the change at the cut was kept in part (some of its pages).
    pub torn_write: bool,
    /// Bytes written but not durable when the power went, and of those, kept.
    pub pending_bytes: u64,
    pub kept_bytes: u64,
    /// How each file was synced while mounted, by name (its name when it was synced).
    pub file_syncs: std::collections::BTreeMap<String, FileSyncs>,
}

/// A mount's `fsync` and `fdatasync` calls on files (directories apart). Both make a file's
/// data durable here; on ext4 with a journal (a Raspberry Pi's root), an `fsync` after a write
/// also commits the journal for the file's new modification time, an `fdatasync` does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileSyncs {
    pub fsync: u64,
    pub fdatasync: u64,
}

/// A change not yet durable, with what undoes it.
#[derive(Debug)]
enum Undo {
    /// `len` bytes written at `offset`; `old` is what they overwrote (the part within the old
    /// size), `old_size` the file's size before.
    Write {
        ino: u64,
        offset: u64,
        len: u64,
        old: Vec<u8>,
        old_size: u64,
    },
    /// The size set from `old_size` to `new_size`; `old_tail` is what a shrink cut off.
    Resize {
        ino: u64,
        old_size: u64,
        new_size: u64,
        old_tail: Vec<u8>,
    },
    Create {
        name: String,
        ino: u64,
    },
    Unlink {
        name: String,
        ino: u64,
    },
    /// `ino` renamed from `from` to `to`, replacing `replaced` there.
    Rename {
        from: String,
        to: String,
        ino: u64,
        replaced: Option<u64>,
    },
}

impl Undo {
    /// The file whose data this change is, for a file's sync (names are the directory's).
    fn data_of(&self) -> Option<u64> {
        match self {
            Undo::Write { ino, .. } | Undo::Resize { ino, .. } => Some(*ino),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Node {
    /// Its name in the backing directory; `None` once unlinked (it lives in the graveyard
    /// as long as a cut may bring it back or a handle may use it).
    name: Option<String>,
    /// One read-write handle for every open of this file: opened at first use.
    file: Option<File>,
}

/// The volatile layer over a backing directory; see the module header. Everything a FUSE
/// request does goes through it, under one lock, so the order of its records is the order
/// in which the changes happened.
#[derive(Debug)]
pub struct Layer {
    backing: PathBuf,
    /// Where unlinked and replaced files wait (a cut may bring them back).
    graveyard: PathBuf,
    nodes: HashMap<u64, Node>,
    by_name: HashMap<String, u64>,
    next_ino: u64,
    /// Changes not yet durable, oldest first.
    log: Vec<Undo>,
    /// Set by a cut: every later request fails with `EIO`.
    dead: bool,
    file_syncs: std::collections::BTreeMap<String, FileSyncs>,
}

fn name_of(name: &OsStr) -> io::Result<String> {
    name.to_str()
        .map(str::to_owned)
        .ok_or_else(|| io::Error::from_raw_os_error(libc_einval()))
}

/// `EINVAL`, without a dependency on libc here.
fn libc_einval() -> i32 {
    22
}

fn enoent() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

/// Reads `len` bytes at `offset`, fewer at the end of the file.
fn read_at(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; usize::try_from(len).unwrap_or(usize::MAX)];
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

/// A small deterministic generator (splitmix64) for the cut point: a seed repeats a cut.
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Layer {
    /// A layer over `backing` (the files as a reader sees them), with `graveyard` (emptied
    /// now) for unlinked files. Nothing is pending: what `backing` holds is durable.
    pub fn new(backing: &Path, graveyard: &Path) -> io::Result<Layer> {
        std::fs::create_dir_all(backing)?;
        if graveyard.exists() {
            std::fs::remove_dir_all(graveyard)?;
        }
        std::fs::create_dir_all(graveyard)?;
        Ok(Layer {
            backing: backing.to_owned(),
            graveyard: graveyard.to_owned(),
            nodes: HashMap::new(),
            by_name: HashMap::new(),
            next_ino: ROOT + 1,
            log: Vec::new(),
            dead: false,
            file_syncs: std::collections::BTreeMap::new(),
        })
    }

    fn check_alive(&self) -> io::Result<()> {
        if self.dead {
            Err(io::Error::from_raw_os_error(5)) // EIO: the power is off
        } else {
            Ok(())
        }
    }

    fn path_of(&self, ino: u64) -> io::Result<PathBuf> {
        let node = self.nodes.get(&ino).ok_or_else(enoent)?;
        Ok(match &node.name {
            Some(name) => self.backing.join(name),
            None => self.graveyard.join(ino.to_string()),
        })
    }

    fn file(&mut self, ino: u64) -> io::Result<&File> {
        let path = self.path_of(ino)?;
        let node = self.nodes.get_mut(&ino).ok_or_else(enoent)?;
        if node.file.is_none() {
            node.file = Some(OpenOptions::new().read(true).write(true).open(path)?);
        }
        Ok(node.file.as_ref().expect("opened above"))
    }

    /// The inode for `name`, given one now if the backing directory holds such a file.
    pub fn lookup(&mut self, name: &str) -> io::Result<u64> {
        self.check_alive()?;
        if let Some(&ino) = self.by_name.get(name) {
            return Ok(ino);
        }
        let meta = std::fs::symlink_metadata(self.backing.join(name))?;
        if !meta.is_file() {
            return Err(io::Error::from_raw_os_error(libc_einval()));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                name: Some(name.to_owned()),
                file: None,
            },
        );
        self.by_name.insert(name.to_owned(), ino);
        Ok(ino)
    }

    pub fn metadata(&mut self, ino: u64) -> io::Result<Metadata> {
        self.check_alive()?;
        if ino == ROOT {
            return std::fs::metadata(&self.backing);
        }
        std::fs::metadata(self.path_of(ino)?)
    }

    /// Creates `name` (`exclusive`: fail if it exists); the name is durable only once the
    /// directory is synced.
    pub fn create(&mut self, name: &str, mode: u32, exclusive: bool) -> io::Result<u64> {
        self.check_alive()?;
        match self.lookup(name) {
            Ok(_) if exclusive => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
            Ok(ino) => return Ok(ino),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode & 0o7777)
            .open(self.backing.join(name))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                name: Some(name.to_owned()),
                file: Some(file),
            },
        );
        self.by_name.insert(name.to_owned(), ino);
        self.log.push(Undo::Create {
            name: name.to_owned(),
            ino,
        });
        Ok(ino)
    }

    pub fn read(&mut self, ino: u64, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.check_alive()?;
        read_at(self.file(ino)?, offset, len)
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_alive()?;
        let file = self.file(ino)?;
        let old_size = file.metadata()?.len();
        let len = data.len() as u64;
        let old = if offset < old_size {
            read_at(file, offset, len.min(old_size - offset))?
        } else {
            Vec::new()
        };
        file.write_all_at(data, offset)?;
        self.log.push(Undo::Write {
            ino,
            offset,
            len,
            old,
            old_size,
        });
        Ok(())
    }

    pub fn set_len(&mut self, ino: u64, new_size: u64) -> io::Result<()> {
        self.check_alive()?;
        let file = self.file(ino)?;
        let old_size = file.metadata()?.len();
        if old_size == new_size {
            return Ok(());
        }
        let old_tail = if new_size < old_size {
            read_at(file, new_size, old_size - new_size)?
        } else {
            Vec::new()
        };
        file.set_len(new_size)?;
        self.log.push(Undo::Resize {
            ino,
            old_size,
            new_size,
            old_tail,
        });
        Ok(())
    }

    /// `fsync` / `fdatasync` of a file: its data and size are durable now.
    pub fn sync_file(&mut self, ino: u64) -> io::Result<()> {
        self.check_alive()?;
        self.log.retain(|u| u.data_of() != Some(ino));
        Ok(())
    }

    /// Counts an `fsync` (or, with `datasync`, an `fdatasync`) of a file under its name.
    fn count_sync(&mut self, ino: u64, datasync: bool) {
        let name = self
            .nodes
            .get(&ino)
            .and_then(|n| n.name.clone())
            .unwrap_or_else(|| format!("(unlinked {ino})"));
        let count = self.file_syncs.entry(name).or_default();
        if datasync {
            count.fdatasync += 1;
        } else {
            count.fsync += 1;
        }
    }

    /// `fsync` of the directory: its names are durable now.
    pub fn sync_dir(&mut self) -> io::Result<()> {
        self.check_alive()?;
        self.log.retain(|u| u.data_of().is_some());
        Ok(())
    }

    /// Everything so far is durable (`sync(2)`), e.g. after setting up.
    pub fn sync_all(&mut self) {
        self.log.clear();
    }

    /// Changes not yet durable, and the bytes they wrote.
    pub fn pending(&self) -> (usize, u64) {
        let bytes = self
            .log
            .iter()
            .map(|u| match u {
                Undo::Write { len, .. } => *len,
                _ => 0,
            })
            .sum();
        (self.log.len(), bytes)
    }

    /// Moves the file named `name` (inode `ino`) to the graveyard.
    fn bury(&mut self, name: &str, ino: u64) -> io::Result<()> {
        std::fs::rename(
            self.backing.join(name),
            self.graveyard.join(ino.to_string()),
        )?;
        self.by_name.remove(name);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.name = None;
        }
        Ok(())
    }

    /// Brings `ino` back from the graveyard as `name`.
    fn unbury(&mut self, name: &str, ino: u64) -> io::Result<()> {
        std::fs::rename(
            self.graveyard.join(ino.to_string()),
            self.backing.join(name),
        )?;
        self.by_name.insert(name.to_owned(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.name = Some(name.to_owned());
        }
        Ok(())
    }

    fn move_name(&mut self, from: &str, to: &str, ino: u64) -> io::Result<()> {
        std::fs::rename(self.backing.join(from), self.backing.join(to))?;
        self.by_name.remove(from);
        self.by_name.insert(to.to_owned(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.name = Some(to.to_owned());
        }
        Ok(())
    }

    pub fn unlink(&mut self, name: &str) -> io::Result<()> {
        let ino = self.lookup(name)?;
        self.bury(name, ino)?;
        self.log.push(Undo::Unlink {
            name: name.to_owned(),
            ino,
        });
        Ok(())
    }

    pub fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let ino = self.lookup(from)?;
        if from == to {
            return Ok(());
        }
        let replaced = match self.lookup(to) {
            Ok(old) => {
                self.bury(to, old)?;
                Some(old)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.move_name(from, to, ino)?;
        self.log.push(Undo::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
            ino,
            replaced,
        });
        Ok(())
    }

    /// The names in the directory.
    pub fn names(&mut self) -> io::Result<Vec<String>> {
        self.check_alive()?;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.backing)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// The power goes: from now on every request fails, and the changes not yet durable are
    /// taken back (all, or those after a random point), newest first. The backing directory
    /// is then what the disk holds when the power comes back.
    pub fn cut(&mut self, cut: Cut) -> io::Result<CutReport> {
        self.dead = true;
        let (pending, pending_bytes) = self.pending();
        let mut report = CutReport {
            pending,
            pending_bytes,
            file_syncs: std::mem::take(&mut self.file_syncs),
            ..CutReport::default()
        };
        // `keep` records survive whole; record `keep` (if any) may survive up to `boundary`.
        let (keep, boundary) = match cut {
            Cut::Whole => (0, None),
            Cut::Torn { seed } => {
                let mut state = seed;
                let keep = usize::try_from(splitmix(&mut state) % (pending as u64 + 1))
                    .expect("fits: at most the log's length");
                let boundary = match self.log.get(keep) {
                    Some(Undo::Write { offset, len, .. }) => {
                        // Page boundaries strictly inside the write: keep the pages before one.
                        let first = (offset / PAGE + 1) * PAGE;
                        let end = offset + len;
                        let inside = if first < end {
                            (end - 1 - first) / PAGE + 1
                        } else {
                            0
                        };
                        // Sometimes none of it (as often as each boundary).
                        let pick = splitmix(&mut state) % (inside + 1);
                        (pick < inside).then(|| first + pick * PAGE)
                    }
                    _ => None,
                };
                (keep, boundary)
            }
        };
        report.kept = keep;
        report.kept_bytes = self.log[..keep]
            .iter()
            .map(|u| match u {
                Undo::Write { len, .. } => *len,
                _ => 0,
            })
            .sum();
        let undone: Vec<Undo> = self.log.drain(keep..).collect();
        for (i, undo) in undone.into_iter().enumerate().rev() {
            let partial = if i == 0 { boundary } else { None };
            if let (Some(b), Undo::Write { offset, .. }) = (partial, &undo) {
                report.torn_write = true;
                report.kept_bytes += b - offset;
            }
            self.undo(undo, partial)?;
        }
        self.log.clear();
        for node in self.nodes.values_mut() {
            node.file = None;
        }
        Ok(report)
    }

    /// Takes one change back; a write with `keep_until` keeps its bytes before that offset.
    fn undo(&mut self, undo: Undo, keep_until: Option<u64>) -> io::Result<()> {
        match undo {
            Undo::Write {
                ino,
                offset,
                old,
                old_size,
                ..
            } => {
                let from = keep_until.unwrap_or(offset);
                let file = self.file(ino)?;
                // The overwritten bytes from `from` on, as far as the old file reached.
                let skip = usize::try_from(from - offset).expect("within one write");
                if skip < old.len() {
                    file.write_all_at(&old[skip..], from)?;
                }
                // Undone newest first, so the file is as this write left it: back to the
                // size it found (or as far as its kept pages reach).
                let size = keep_until.map_or(old_size, |b| old_size.max(b));
                if file.metadata()?.len() != size {
                    file.set_len(size)?;
                }
            }
            Undo::Resize {
                ino,
                old_size,
                new_size,
                old_tail,
            } => {
                let file = self.file(ino)?;
                file.set_len(old_size)?;
                if !old_tail.is_empty() {
                    file.write_all_at(&old_tail, new_size)?;
                }
            }
            Undo::Create { name, ino } => self.bury(&name, ino)?,
            Undo::Unlink { name, ino } => self.unbury(&name, ino)?,
            Undo::Rename {
                from,
                to,
                ino,
                replaced,
            } => {
                self.move_name(&to, &from, ino)?;
                if let Some(old) = replaced {
                    self.unbury(&to, old)?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The FUSE side
// ---------------------------------------------------------------------------------------------

/// The layer as a FUSE filesystem (one flat directory).
#[derive(Debug)]
struct PowercutFs {
    layer: Arc<Mutex<Layer>>,
}

fn lock(layer: &Mutex<Layer>) -> MutexGuard<'_, Layer> {
    layer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn time_of(secs: i64, nanos: i64) -> SystemTime {
    let secs = u64::try_from(secs).unwrap_or(0);
    let nanos = u32::try_from(nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn attr(ino: u64, meta: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: meta.size(),
        blocks: meta.blocks(),
        atime: time_of(meta.atime(), meta.atime_nsec()),
        mtime: time_of(meta.mtime(), meta.mtime_nsec()),
        ctime: time_of(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: if meta.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: u16::try_from(meta.mode() & 0o7777).unwrap_or(0o600),
        nlink: u32::try_from(meta.nlink()).unwrap_or(1),
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(5))
}

impl PowercutFs {
    fn entry(&self, name: &OsStr, create: Option<(u32, bool)>) -> io::Result<(u64, FileAttr)> {
        let name = name_of(name)?;
        let mut layer = lock(&self.layer);
        let ino = match create {
            Some((mode, exclusive)) => layer.create(&name, mode, exclusive)?,
            None => layer.lookup(&name)?,
        };
        let meta = layer.metadata(ino)?;
        Ok((ino, attr(ino, &meta)))
    }

    fn getattr_of(&self, ino: u64) -> io::Result<FileAttr> {
        let meta = lock(&self.layer).metadata(ino)?;
        Ok(attr(ino, &meta))
    }
}

fn only_root(parent: INodeNo) -> io::Result<()> {
    if parent.0 == ROOT {
        Ok(())
    } else {
        Err(enoent())
    }
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match only_root(parent).and_then(|()| self.entry(name, None)) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owners and times are not this filesystem's subject: only the size is tracked.
        let result = (|| {
            let mut layer = lock(&self.layer);
            if let Some(size) = size {
                layer.set_len(ino.0, size)?;
            }
            if let Some(mode) = mode
                && ino.0 != ROOT
            {
                let path = layer.path_of(ino.0)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            let meta = layer.metadata(ino.0)?;
            Ok::<_, io::Error>(attr(ino.0, &meta))
        })();
        match result {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // No direct I/O: SQLite maps its `-shm` file shared, which needs the page cache.
        match lock(&self.layer).metadata(ino.0) {
            Ok(_) => reply.opened(FileHandle(ino.0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        const O_EXCL: i32 = 0o200;
        let result = only_root(parent)
            .and_then(|()| self.entry(name, Some((mode & !umask, flags & O_EXCL != 0))));
        match result {
            Ok((ino, a)) => reply.created(
                &TTL,
                &a,
                Generation(0),
                FileHandle(ino),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match lock(&self.layer).read(ino.0, offset, u64::from(size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match lock(&self.layer).write(ino.0, offset, data) {
            Ok(()) => reply.written(u32::try_from(data.len()).expect("FUSE writes are small")),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        if lock(&self.layer).dead {
            reply.error(Errno::EIO);
        } else {
            reply.ok();
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut layer = lock(&self.layer);
        layer.count_sync(ino.0, datasync);
        match layer.sync_file(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let mut layer = lock(&self.layer);
        let names = match layer.names() {
            Ok(names) => names,
            Err(e) => {
                reply.error(errno(&e));
                return;
            }
        };
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        for name in names {
            if let Ok(ino) = layer.lookup(&name) {
                entries.push((ino, FileType::RegularFile, name));
            }
        }
        for (i, (ino, kind, name)) in entries
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match lock(&self.layer).sync_dir() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = only_root(parent)
            .and_then(|()| name_of(name))
            .and_then(|name| lock(&self.layer).unlink(&name));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let result = only_root(parent)
            .and_then(|()| only_root(newparent))
            .and_then(|()| Ok((name_of(name)?, name_of(newname)?)))
            .and_then(|(from, to)| lock(&self.layer).rename(&from, &to));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Plenty of room: a full disk is another test's subject.
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

/// The layer mounted at a directory; unmounted on drop (without a cut: as after a clean
/// shutdown, the pending changes stay).
#[derive(Debug)]
pub struct PowercutMount {
    layer: Arc<Mutex<Layer>>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowercutMount {
    /// Mounts a new layer over `backing` at `mountpoint` (created if need be). Fails with a
    /// message that says what is missing when `/dev/fuse` cannot be used.
    pub fn mount(backing: &Path, graveyard: &Path, mountpoint: &Path) -> io::Result<PowercutMount> {
        std::fs::create_dir_all(mountpoint)?;
        let layer = Arc::new(Mutex::new(Layer::new(backing, graveyard)?));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".into()),
            MountOption::RW,
            MountOption::NoAtime,
        ];
        let fs = PowercutFs {
            layer: Arc::clone(&layer),
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot mount the power-cut filesystem at {}: {e} (it needs /dev/fuse and \
                     the right to mount, i.e. root; `modprobe fuse` if /dev/fuse is missing)",
                    mountpoint.display()
                ),
            )
        })?;
        Ok(PowercutMount {
            layer,
            session: Some(session),
            mountpoint: mountpoint.to_owned(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Everything written so far is durable (`sync(2)`).
    pub fn sync_all(&self) {
        lock(&self.layer).sync_all();
    }

    /// Changes not yet durable, and the bytes they wrote.
    pub fn pending(&self) -> (usize, u64) {
        lock(&self.layer).pending()
    }

    /// The power goes (see the module header). Every process using the mount must be dead
    /// already (killed with SIGKILL and reaped): nothing runs after a power cut. Unmounts.
    pub fn cut(mut self, cut: Cut) -> io::Result<CutReport> {
        let report = lock(&self.layer).cut(cut)?;
        self.unmount();
        Ok(report)
    }

    fn unmount(&mut self) {
        if let Some(session) = self.session.take()
            && session.umount_and_join().is_err()
        {
            // Still busy (a handle outlived its process): detach it; the dead layer refuses
            // whatever still comes.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

impl Drop for PowercutMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

#[cfg(test)]
mod tests {
    //! The layer's promises, without FUSE: what a cut keeps and what it takes back.

    use super::*;

    struct Dir {
        _tmp: tempfile::TempDir,
        backing: PathBuf,
        layer: Layer,
    }

    fn dir() -> Dir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let backing = tmp.path().join("backing");
        let layer = Layer::new(&backing, &tmp.path().join("graveyard")).expect("layer");
        Dir {
            _tmp: tmp,
            backing,
            layer,
        }
    }

    impl Dir {
        fn contents(&self, name: &str) -> Option<Vec<u8>> {
            std::fs::read(self.backing.join(name)).ok()
        }
    }

    #[test]
    fn reads_see_unsynced_writes_and_a_cut_takes_them_back() {
        let mut d = dir();
        let f = d.layer.create("db", 0o644, true).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.write(f, 0, b"durable!").unwrap();
        d.layer.sync_file(f).unwrap();
        d.layer.write(f, 4, b"XXXXYYYY").unwrap();
        assert_eq!(d.layer.read(f, 0, 100).unwrap(), b"duraXXXXYYYY");
        assert_eq!(d.layer.pending(), (1, 8));
        let report = d.layer.cut(Cut::Whole).unwrap();
        assert_eq!((report.pending, report.kept), (1, 0));
        assert_eq!(
            d.contents("db").unwrap(),
            b"durable!",
            "overwrite and growth undone"
        );
        assert!(d.layer.read(f, 0, 1).is_err(), "a dead layer refuses reads");
        assert!(d.layer.write(f, 0, b"x").is_err(), "and writes");
    }

    #[test]
    fn an_fsync_makes_only_that_files_writes_durable() {
        let mut d = dir();
        let a = d.layer.create("a", 0o644, true).unwrap();
        let b = d.layer.create("b", 0o644, true).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.write(a, 0, b"aaaa").unwrap();
        d.layer.write(b, 0, b"bbbb").unwrap();
        d.layer.sync_file(a).unwrap();
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(d.contents("a").unwrap(), b"aaaa");
        assert_eq!(d.contents("b").unwrap(), b"", "b was never synced");
    }

    #[test]
    fn truncation_is_undone_with_its_tail() {
        let mut d = dir();
        let f = d.layer.create("wal", 0o644, true).unwrap();
        d.layer.write(f, 0, &[7; 10_000]).unwrap();
        d.layer.sync_file(f).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.set_len(f, 100).unwrap();
        d.layer.write(f, 100, b"new").unwrap();
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(d.contents("wal").unwrap(), vec![7; 10_000]);
    }

    #[test]
    fn a_created_file_is_gone_unless_its_directory_was_synced() {
        let mut d = dir();
        let f = d.layer.create("journal", 0o644, true).unwrap();
        d.layer.write(f, 0, b"data").unwrap();
        d.layer.sync_file(f).unwrap();
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(
            d.contents("journal"),
            None,
            "the data was synced, the name was not"
        );

        let mut d = dir();
        let f = d.layer.create("journal", 0o644, true).unwrap();
        d.layer.write(f, 0, b"data").unwrap();
        d.layer.sync_file(f).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(d.contents("journal").unwrap(), b"data");
    }

    #[test]
    fn unlink_and_rename_are_undone_until_the_directory_is_synced() {
        let mut d = dir();
        let a = d.layer.create("a", 0o644, true).unwrap();
        let b = d.layer.create("b", 0o644, true).unwrap();
        d.layer.write(a, 0, b"AAAA").unwrap();
        d.layer.write(b, 0, b"BBBB").unwrap();
        d.layer.sync_file(a).unwrap();
        d.layer.sync_file(b).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.unlink("a").unwrap();
        d.layer.rename("b", "c").unwrap();
        assert_eq!(d.contents("a"), None);
        assert_eq!(d.contents("c").unwrap(), b"BBBB");
        // A write through the renamed file, synced: its data is durable under its old name.
        d.layer.write(b, 0, b"bb").unwrap();
        d.layer.sync_file(b).unwrap();
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(d.contents("a").unwrap(), b"AAAA", "the unlink was undone");
        assert_eq!(
            d.contents("b").unwrap(),
            b"bbBB",
            "the rename was undone, the data kept"
        );
        assert_eq!(d.contents("c"), None);

        let mut d = dir();
        let a = d.layer.create("a", 0o644, true).unwrap();
        let b = d.layer.create("b", 0o644, true).unwrap();
        d.layer.write(a, 0, b"AAAA").unwrap();
        d.layer.write(b, 0, b"BBBB").unwrap();
        d.layer.sync_file(a).unwrap();
        d.layer.sync_file(b).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.rename("b", "a").unwrap();
        assert_eq!(d.contents("a").unwrap(), b"BBBB");
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(
            d.contents("a").unwrap(),
            b"AAAA",
            "the replaced file is back"
        );
        assert_eq!(d.contents("b").unwrap(), b"BBBB");

        let mut d = dir();
        let a = d.layer.create("a", 0o644, true).unwrap();
        d.layer.sync_dir().unwrap();
        d.layer.unlink("a").unwrap();
        d.layer.sync_dir().unwrap();
        let _ = a;
        d.layer.cut(Cut::Whole).unwrap();
        assert_eq!(d.contents("a"), None, "a synced unlink stays");
    }

    #[test]
    fn a_torn_cut_keeps_a_prefix_of_the_writes_cut_at_a_page_boundary() {
        // Page-sized writes of distinct bytes, then one large write across 4 pages: each
        // seed keeps the writes before some point, and of the write at that point whole
        // pages only.
        let mut seen_partial = false;
        let mut kept_counts = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let mut d = dir();
            let f = d.layer.create("wal", 0o644, true).unwrap();
            d.layer.sync_dir().unwrap();
            d.layer.sync_file(f).unwrap();
            for i in 0..3u8 {
                d.layer
                    .write(f, u64::from(i) * PAGE, &[i + 1; 4096])
                    .unwrap();
            }
            // 100 bytes into page 3 through page 6: boundaries at 4, 5 and 6 pages.
            d.layer.write(f, 3 * PAGE + 100, &[9; 3 * 4096]).unwrap();
            let report = d.layer.cut(Cut::Torn { seed }).unwrap();
            let got = d.contents("wal").unwrap();
            kept_counts.insert(report.kept);
            let whole = report.kept.min(3);
            let mut want = Vec::new();
            for i in 0..whole {
                want.extend_from_slice(&[u8::try_from(i).unwrap() + 1; 4096]);
            }
            if report.kept == 3 && report.torn_write {
                // Part of the large write: from its offset to a page boundary.
                want.resize(usize::try_from(3 * PAGE + 100).unwrap(), 0);
                let end = usize::try_from(report.kept_bytes - 3 * 4096).unwrap()
                    + usize::try_from(3 * PAGE + 100).unwrap();
                assert_eq!(end % 4096, 0, "seed {seed}: cut at a page boundary");
                want.resize(end, 9);
                seen_partial = true;
            } else if report.kept == 4 {
                want.resize(usize::try_from(3 * PAGE + 100).unwrap(), 0);
                want.resize(usize::try_from(6 * PAGE + 100).unwrap(), 9);
            } else if report.kept < 3 && report.torn_write {
                // A page-sized, page-aligned write has no boundary inside: never torn.
                panic!("seed {seed}: an aligned page was torn");
            }
            assert_eq!(got.len(), want.len(), "seed {seed}: {report:?}");
            assert!(got == want, "seed {seed}: {report:?}");
        }
        assert!(seen_partial, "some cut tore the large write");
        assert_eq!(
            kept_counts.into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4],
            "every prefix length occurs"
        );
    }

    #[test]
    fn a_torn_cut_undoes_names_and_data_in_order() {
        // Create, write, rename, write again: any prefix leaves a state that happened.
        for seed in 0..100 {
            let mut d = dir();
            let f = d.layer.create("tmp", 0o644, true).unwrap();
            d.layer.write(f, 0, b"one").unwrap();
            d.layer.rename("tmp", "final").unwrap();
            d.layer.write(f, 0, b"two").unwrap();
            let report = d.layer.cut(Cut::Torn { seed }).unwrap();
            let state = (d.contents("tmp"), d.contents("final"));
            let want = match report.kept {
                0 => (None, None),
                1 => (Some(b"".to_vec()), None),
                2 => (Some(b"one".to_vec()), None),
                3 => (None, Some(b"one".to_vec())),
                _ => (None, Some(b"two".to_vec())),
            };
            assert_eq!(state, want, "seed {seed}: {report:?}");
        }
    }
}
