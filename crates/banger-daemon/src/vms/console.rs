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

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// The rotated copy next to the console log.
pub const ROTATED_SUFFIX: &str = ".1";
const POLL: Duration = Duration::from_secs(1);

/// Rotates `path` whenever it exceeds `max` bytes, until `until` resolves.
pub async fn rotate_until(path: PathBuf, max: u64, until: impl std::future::Future<Output = ()>) {
    tokio::pin!(until);
    let watch = watch(&path);
    loop {
        if let Err(error) = rotate_if_over(&path, max) {
            tracing::warn!(path = %path.display(), %error, "could not rotate the console log");
        }
        let written = async {
            match &watch {
                Some(inotify) => {
                    if let Ok(mut ready) = inotify.readable().await {
                        // Drain the events; the size check follows.
                        let _ = inotify.get_ref().0.read_events();
                        ready.clear_ready();
                    }
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

/// An inotify instance, for [`AsyncFd`].
struct Watch(Inotify);

impl std::os::fd::AsRawFd for Watch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
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
/// whether it rotated.
pub fn rotate_if_over(path: &Path, max: u64) -> std::io::Result<bool> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() <= max {
        return Ok(false);
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
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversized_log_keeps_its_tail_in_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"0123456789").unwrap();
        assert!(!rotate_if_over(&log, 10).unwrap());
        let mut appender = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        appender.write_all(b"abcdef").unwrap();
        assert!(rotate_if_over(&log, 10).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"6789abcdef"
        );
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        // The writer's O_APPEND descriptor goes on at the new end.
        appender.write_all(b"next").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next");
        assert!(!rotate_if_over(&dir.path().join("missing"), 10).unwrap());
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
        let watcher = tokio::spawn(rotate_until(log.clone(), 64 * 1024, async {
            let _ = stopped.await;
        }));
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
