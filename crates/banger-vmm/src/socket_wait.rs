//! Waiting for a VMM's Unix socket to listen, without a poll interval.
//!
//! A VMM binds its API socket some milliseconds after it starts. Instead of
//! trying to connect every few milliseconds, [`until_listening`] watches the
//! socket's directory with inotify and tries again when an entry is created
//! there (or moved in). Between `bind` and `listen` a connection is refused
//! for a moment; only then does it retry after a short pause.
//! Where inotify is not available it falls back to a pause between
//! attempts.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;

/// The pause after a refused connection (bound, not yet listening), and
/// between attempts where inotify is not available.
const RETRY_PAUSE: Duration = Duration::from_millis(1);
const FALLBACK_PAUSE: Duration = Duration::from_millis(10);

/// Returns once a connection to `socket` succeeds, with the number of
/// connection attempts it made. Errors other than the socket not existing
/// yet are kept in `last_error` for the caller's timeout to report; this
/// never gives up by itself.
pub async fn until_listening(socket: &Path, last_error: &mut Option<io::Error>) -> u32 {
    let mut attempts = 0;
    let watch: Option<AsyncFd<OwnedFd>> = socket.parent().and_then(|directory| {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        inotify
            .add_watch(
                directory,
                AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
            )
            .ok()?;
        let fd = inotify.as_fd().try_clone_to_owned().ok()?;
        // SAFETY: `fd` is an owned, open inotify fd (a duplicate; the
        // instance lives while it is open) that the `AsyncFd` owns from here on.
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register(fd) };
        registered.ok()
    });
    loop {
        // Watched before this attempt, so a socket made right after it
        // still wakes the wait below.
        attempts += 1;
        match UnixStream::connect(socket).await {
            Ok(_) => return attempts,
            Err(error) if error.kind() == io::ErrorKind::NotFound => match &watch {
                Some(watch) => {
                    if let Ok(mut guard) = watch.readable().await {
                        // Drained; the next attempt decides.
                        let mut events = [0_u8; 4096];
                        if let Err(nix::errno::Errno::EAGAIN) =
                            nix::unistd::read(guard.get_inner().as_raw_fd(), &mut events)
                        {
                            guard.clear_ready();
                        }
                    } else {
                        tokio::time::sleep(FALLBACK_PAUSE).await;
                    }
                }
                None => tokio::time::sleep(FALLBACK_PAUSE).await,
            },
            Err(error) => {
                *last_error = Some(error);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn a_socket_made_later_ends_the_wait_at_once() {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("api.sock");
        let made = {
            let socket = socket.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let listener = tokio::net::UnixListener::bind(&socket).unwrap();
                (Instant::now(), listener)
            })
        };
        let mut last_error = None;
        let attempts = tokio::time::timeout(
            Duration::from_secs(10),
            until_listening(&socket, &mut last_error),
        )
        .await
        .unwrap();
        let ended = Instant::now();
        let (bound, _listener) = made.await.unwrap();
        // One attempt before the socket exists, one when it appears (and
        // perhaps one more between its bind and listen): woken by the
        // socket's creation, not by polling through the 300 ms.
        assert!(attempts <= 3, "{attempts} connection attempts");
        let late = ended.saturating_duration_since(bound);
        assert!(
            late < Duration::from_millis(100),
            "woke {late:?} after the bind"
        );
    }
}
