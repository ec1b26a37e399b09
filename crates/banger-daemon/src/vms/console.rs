//! Size cap of a VM's `console.log`.
//!
//! The VMM appends the guest's console to `console.log` itself (`O_APPEND`;
//! it must outlive `bangerd`, so its output does not go through the
//! daemon). A guest can print without end, so the daemon rotates the file
//! copytruncate-style while it watches the VM's process:
//!
//! 1. inotify reports each write to the file (a 1 s poll covers a missed
//!    event or a file that cannot be watched);
//! 2. once the file is over the cap (`[vm] console_log_max`), its last
//!    `cap` bytes go to `console.log.1` (a temporary file renamed over it)
//!    and `console.log` is truncated; the VMM's next append lands at offset 0.
//!
//! Bytes written between the copy and the truncation are lost. The file is
//! opened without following symlinks and only a regular file is touched.
//! Watching starts with the supervision of the VMM process, so it is
//! re-armed for VMs adopted after a daemon restart, and ends with it.
//!
//! `vm.logs` reads the two files ([`read_all`]) and follows `console.log`
//! ([`Follower`]). A rotation and a follower's read hold the same
//! [`Rotation`] lock, so a follower that finds the file rotated knows the
//! length it had and takes what it missed from the tail of `console.log.1`:
//! a follower loses only what the rotation itself drops.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The rotated copy next to the console log.
pub const ROTATED_SUFFIX: &str = ".1";
const POLL: Duration = Duration::from_secs(1);

/// The rotations of one console log, shared by its rotator and followers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// How many rotations happened.
    pub count: u64,
    /// The length `console.log` had at the last rotation.
    pub length: u64,
}

/// The [`Rotation`] of each console log, by path.
#[derive(Debug, Default)]
pub struct Consoles {
    logs: Mutex<HashMap<PathBuf, Arc<Mutex<Rotation>>>>,
}

impl Consoles {
    pub fn of(&self, path: &Path) -> Arc<Mutex<Rotation>> {
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(logs.entry(path.to_owned()).or_default())
    }
}

/// Rotates `path` whenever it exceeds `max` bytes, until `until` resolves.
pub async fn rotate_until(
    path: PathBuf,
    max: u64,
    rotation: Arc<Mutex<Rotation>>,
    until: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(until);
    let watch = watch(&path);
    loop {
        if let Err(error) = rotate_recorded(&path, max, &rotation) {
            tracing::warn!(path = %path.display(), %error, "could not rotate the console log");
        }
        let written = async {
            match &watch {
                Some(inotify) => {
                    // Drain the events; the size check follows.
                    next_write(inotify).await;
                    // Coalesce a burst of writes.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = &mut until => return,
            () = written => {}
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// [`rotate_if_over`] under the rotation's lock, recording a rotation.
fn rotate_recorded(path: &Path, max: u64, rotation: &Mutex<Rotation>) -> std::io::Result<()> {
    let mut rotation = rotation.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(length) = rotate_if_over(path, max)? {
        rotation.count += 1;
        rotation.length = length;
    }
    Ok(())
}

/// An inotify instance, for [`AsyncFd`].
struct Watch(Inotify);

impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

/// Waits for the next write to the watched file (events drained).
async fn next_write(watch: &AsyncFd<Watch>) {
    if let Ok(mut ready) = watch.readable().await {
        let _ = watch.get_ref().0.read_events();
        ready.clear_ready();
    }
}

fn watch(path: &Path) -> Option<AsyncFd<Watch>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    inotify
        .add_watch(
            path,
            AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DONT_FOLLOW,
        )
        .ok()?;
    // SAFETY: `Watch` owns the inotify descriptor, which stays open and is
    // not replaced while the `AsyncFd` holds it.
    #[allow(unsafe_code)]
    let registered = unsafe { AsyncFd::register(Watch(inotify)) };
    registered.ok()
}

/// One copytruncate step: when `path` is a regular file over `max` bytes,
/// its last `max` bytes replace `path.1` and `path` is truncated. Returns
/// the length it had when it rotated.
pub fn rotate_if_over(path: &Path, max: u64) -> std::io::Result<Option<u64>> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() <= max {
        return Ok(None);
    }
    let len = metadata.len();
    file.seek(SeekFrom::Start(len - max))?;
    let mut tail = Vec::new();
    (&mut file).take(max).read_to_end(&mut tail)?;
    let mut rotated_name = path.as_os_str().to_owned();
    rotated_name.push(ROTATED_SUFFIX);
    let rotated = PathBuf::from(rotated_name);
    let mut temporary_name = rotated.as_os_str().to_owned();
    temporary_name.push(".tmp");
    let temporary = PathBuf::from(temporary_name);
    let _ = std::fs::remove_file(&temporary);
    let mut copy = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)?;
    copy.write_all(&tail)?;
    drop(copy);
    std::fs::rename(&temporary, &rotated)?;
    file.set_len(0)?;
    Ok(Some(len))
}

fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(ROTATED_SUFFIX);
    PathBuf::from(name)
}

/// The bytes of the regular file `path` from `offset` on; nothing when it
/// is missing or not a regular file (never follows a symlink).
fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => {
            return Ok(Vec::new())
        }
        Err(error) => return Err(error),
    };
    if !file.metadata()?.is_file() {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `lines` lines of `bytes` (a final line without a newline
/// counts); all of them for `None`.
pub fn last_lines(bytes: &[u8], lines: Option<u64>) -> &[u8] {
    let Some(lines) = lines else {
        return bytes;
    };
    if lines == 0 {
        return &bytes[bytes.len()..];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (index, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return &bytes[index + 1..];
            }
        }
    }
    bytes
}

/// Reads a console log and what it appends next, across rotations.
pub struct Follower {
    path: PathBuf,
    rotation: Arc<Mutex<Rotation>>,
    /// Rotations already accounted for.
    seen: u64,
    /// Bytes of the current `console.log` already read.
    offset: u64,
    watch: Option<AsyncFd<Watch>>,
}

impl Follower {
    /// Starts at the end of what is there, which it returns:
    /// `console.log.1` then `console.log`. With `follow`, the file is
    /// watched from before that read, so no write goes unnoticed.
    pub fn open(
        path: PathBuf,
        rotation: Arc<Mutex<Rotation>>,
        follow: bool,
    ) -> std::io::Result<(Self, Vec<u8>)> {
        let watch = if follow { watch(&path) } else { None };
        let (seen, mut bytes, offset) = {
            let rotation = rotation.lock().unwrap_or_else(PoisonError::into_inner);
            let mut bytes = read_from(&rotated_path(&path), 0)?;
            let current = read_from(&path, 0)?;
            let offset = current.len() as u64;
            bytes.extend_from_slice(&current);
            (rotation.count, bytes, offset)
        };
        bytes.shrink_to_fit();
        Ok((
            Self {
                path,
                rotation,
                seen,
                offset,
                watch,
            },
            bytes,
        ))
    }

    /// What was appended since the last read. After a rotation: what
    /// `console.log.1` holds past the last read, then the new
    /// `console.log`; a file that shrank otherwise is read from its start.
    pub fn read_new(&mut self) -> std::io::Result<Vec<u8>> {
        let rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let mut bytes = Vec::new();
        if rotation.count != self.seen {
            self.seen = rotation.count;
            if self.offset < rotation.length {
                let rotated = read_from(&rotated_path(&self.path), 0)?;
                // `console.log.1` is the tail of the file as it was.
                let start = rotation.length.saturating_sub(rotated.len() as u64);
                let skip = self.offset.saturating_sub(start) as usize;
                bytes.extend_from_slice(rotated.get(skip..).unwrap_or_default());
            }
            self.offset = 0;
        }
        let mut current = read_from(&self.path, self.offset)?;
        if current.is_empty() {
            let length = std::fs::symlink_metadata(&self.path).map_or(0, |meta| meta.len());
            if length < self.offset {
                // Truncated by someone else: start over.
                self.offset = 0;
                current = read_from(&self.path, 0)?;
            }
        }
        self.offset += current.len() as u64;
        bytes.extend_from_slice(&current);
        Ok(bytes)
    }

    /// Waits until the file may have grown: an inotify event, or a 1 s
    /// poll when the file could not be watched.
    pub async fn changed(&self) {
        match &self.watch {
            Some(watch) => next_write(watch).await,
            None => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_log_keeps_its_tail_in_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert_eq!(rotate_if_over(&log, 10).unwrap(), None);
        let mut appender = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        appender.write_all(b"abcdef").unwrap();
        assert_eq!(rotate_if_over(&log, 10).unwrap(), Some(16));
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"6789abcdef"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        // The writer's O_APPEND descriptor goes on at the new end.
        appender.write_all(b"next").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next");
        assert_eq!(
            rotate_if_over(&dir.path().join("missing"), 10).unwrap(),
            None
        );
    }

    #[test]
    fn a_follower_misses_nothing_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(dir.path().join("console.log.1"), b"old\n").unwrap();
        std::fs::write(&log, b"aaaa\n").unwrap();
        let rotation = Arc::new(Mutex::new(Rotation::default()));
        let (mut follower, existing) =
            Follower::open(log.clone(), Arc::clone(&rotation), false).unwrap();
        assert_eq!(existing, b"old\naaaa\n");
        assert_eq!(last_lines(&existing, Some(1)), b"aaaa\n");
        assert_eq!(last_lines(b"x\ny", Some(1)), b"y");
        assert_eq!(last_lines(&existing, Some(5)), existing.as_slice());
        let mut appender = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        // Appended, not read yet, then rotated away into console.log.1.
        appender.write_all(b"bbbb\n").unwrap();
        rotate_recorded(&log, 8, &rotation).unwrap();
        assert_eq!(
            *rotation.lock().unwrap(),
            Rotation {
                count: 1,
                length: 10
            }
        );
        // The new file grows past where the follower was.
        appender.write_all(b"cccccccccccc\n").unwrap();
        assert_eq!(follower.read_new().unwrap(), b"bbbb\ncccccccccccc\n");
        assert_eq!(follower.read_new().unwrap(), b"");
        appender.write_all(b"dd\n").unwrap();
        assert_eq!(follower.read_new().unwrap(), b"dd\n");
        // Truncated by someone else: read again from the start.
        std::fs::write(&log, b"e\n").unwrap();
        assert_eq!(follower.read_new().unwrap(), b"e\n");
    }

    #[test]
    fn a_symlinked_log_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, vec![b'x'; 100]).unwrap();
        let log = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &log).unwrap();
        assert!(rotate_if_over(&log, 10).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 100);
    }

    #[tokio::test]
    async fn a_growing_log_is_rotated_while_watched() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"").unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(rotate_until(
            log.clone(),
            64 * 1024,
            Arc::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let mut appender = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let line = vec![b'y'; 1024];
        for _ in 0..1024 {
            appender.write_all(&line).unwrap();
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let size = std::fs::metadata(&log).unwrap().len();
        let rotated = std::fs::metadata(dir.path().join("console.log.1"))
            .unwrap()
            .len();
        assert!(size <= 64 * 1024, "console.log is {size} bytes");
        assert_eq!(rotated, 64 * 1024);
        stop.send(()).unwrap();
        watcher.await.unwrap();
    }
}
