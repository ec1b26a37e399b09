//! The warm pool (`[vm] warm_pool = N`): root disks of the default image
//! cloned ahead of time, so a create of that image does no disk copy on its
//! path.
//!
//! 1. Only file-backed clone strategies (`copy`, `reflink`) have a pool: a
//!    dm-snapshot disk is a device named after its VM and is O(1) anyway.
//! 2. An entry is `STATE/warm/<image file stem>.<id>.ext4`, a clone of the
//!    image file `images/<image file stem>.ext4` made by the clone strategy
//!    (so sparse, or sharing extents). It is made in `STATE/warm/tmp-<id>/`
//!    and renamed into place whole, so an entry is always complete.
//! 3. [`WarmPool::take`] renames an entry of the requested image into the
//!    VM's directory as its root disk (O(1); one taker wins each entry),
//!    and asks for a refill.
//! 4. [`WarmPool::refill`] runs in the background, one refill at a time:
//!    it removes entries of images other than the current default (an image
//!    removed, replaced, or no longer the default), then clones until the
//!    pool holds N.
//! 5. At daemon start [`WarmPool::reconcile`] removes unfinished clones
//!    (`tmp-*`) and stale entries, then refills; removing an image removes
//!    its entries ([`WarmPool::forget_image`]). Every file under `warm/` is
//!    accounted for by one of these.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use banger_disk::clone::{CloneRequest, CloneStrategy, RootDisk, StrategyKind, ROOT_DISK_FILE};
use banger_store::Store;

use crate::ids::new_id;

/// The pool's directory under the state directory.
pub const WARM_DIR: &str = "warm";
const ENTRY_SUFFIX: &str = ".ext4";
const TMP_PREFIX: &str = "tmp-";

pub struct WarmPool {
    directory: PathBuf,
    /// Entries to keep ready; 0 turns the pool off.
    size: usize,
    /// The image the pool holds clones of (`[vm] image`).
    image_name: String,
    clone: Arc<dyn CloneStrategy>,
    store: Store,
    refilling: AtomicBool,
    /// Set when a refill was asked for while one ran: it goes round again.
    again: AtomicBool,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WarmPool")
            .field("directory", &self.directory)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl WarmPool {
    /// The pool for `size` clones of `image_name` in `state_dir/warm`; with a
    /// strategy that is not file-backed the pool is off (size 0).
    pub fn new(
        state_dir: &Path,
        size: usize,
        image_name: &str,
        clone: Arc<dyn CloneStrategy>,
        store: Store,
    ) -> Self {
        let file_backed = matches!(clone.kind(), StrategyKind::Copy | StrategyKind::Reflink);
        Self {
            directory: state_dir.join(WARM_DIR),
            size: if file_backed { size } else { 0 },
            image_name: image_name.to_owned(),
            clone,
            store,
            refilling: AtomicBool::new(false),
            again: AtomicBool::new(false),
        }
    }

    /// Whether the pool keeps clones at all.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// Moves a ready clone of `image` into `vm_dir` as the VM's root disk,
    /// or `None` when the pool has none (or is off). Asks for a refill
    /// either way.
    pub fn take(self: &Arc<Self>, image: &Path, vm_dir: &Path) -> Option<RootDisk> {
        if !self.enabled() {
            return None;
        }
        let stem = image_stem(image)?;
        let destination = vm_dir.join(ROOT_DISK_FILE);
        let taken = self.entries_of(&stem).into_iter().find(|entry| {
            // Another create may take the same entry first: then try the next.
            std::fs::rename(entry, &destination).is_ok()
        });
        self.refill();
        taken.map(|_| RootDisk {
            strategy: self.clone.kind(),
            path: destination,
            file_backed: true,
        })
    }

    /// Starts filling the pool in the background, unless a refill runs (it
    /// then goes round once more).
    pub fn refill(self: &Arc<Self>) {
        if !self.enabled() {
            return;
        }
        self.again.store(true, Ordering::SeqCst);
        if self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            loop {
                pool.again.store(false, Ordering::SeqCst);
                if let Err(error) = pool.fill() {
                    tracing::warn!(directory = %pool.directory.display(), %error, "could not fill the warm pool");
                }
                pool.refilling.store(false, Ordering::SeqCst);
                // A request that came while this round ran, and found it
                // running, is served here.
                if !pool.again.load(Ordering::SeqCst) || pool.refilling.swap(true, Ordering::SeqCst)
                {
                    break;
                }
            }
        });
    }

    /// Removes what an earlier daemon left half made and entries of other
    /// images, then refills. Returns the paths removed.
    pub fn reconcile(self: &Arc<Self>) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.directory) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TMP_PREFIX) {
                    let _ = self.clone.remove("", &entry.path());
                    if std::fs::remove_dir_all(entry.path()).is_ok() {
                        removed.push(entry.path());
                    }
                }
            }
        }
        removed.extend(self.remove_stale(self.current_stem().as_deref()));
        self.refill();
        removed
    }

    /// Removes every entry of `image` (the image is being removed).
    pub fn forget_image(&self, image: &Path) {
        if let Some(stem) = image_stem(image) {
            for entry in self.entries_of(&stem) {
                if let Err(error) = std::fs::remove_file(&entry) {
                    tracing::warn!(path = %entry.display(), %error, "could not remove a warm pool entry");
                }
            }
        }
    }

    /// One refill round: stale entries out, clones in until full.
    fn fill(&self) -> std::io::Result<()> {
        let current = self.current_stem();
        self.remove_stale(current.as_deref());
        let Some(stem) = current else {
            return Ok(());
        };
        let image = self.image_path()?;
        std::fs::create_dir_all(&self.directory)?;
        while self.entries_of(&stem).len() < self.size {
            let id = new_id();
            let scratch = self.directory.join(format!("{TMP_PREFIX}{id}"));
            std::fs::create_dir(&scratch)?;
            let cloned = self.clone.clone_image(&CloneRequest {
                vm_id: &id,
                image: &image,
                vm_dir: &scratch,
                cancelled: &|| false,
            });
            let outcome = cloned.map_err(std::io::Error::other).and_then(|disk| {
                std::fs::rename(
                    &disk.path,
                    self.directory.join(format!("{stem}.{id}{ENTRY_SUFFIX}")),
                )
            });
            let _ = self.clone.remove(&id, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            outcome?;
        }
        Ok(())
    }

    /// The default image's file stem, if the image is registered.
    fn current_stem(&self) -> Option<String> {
        let image = self.store.find_image(&self.image_name).ok()??;
        image_stem(Path::new(&image.path))
    }

    fn image_path(&self) -> std::io::Result<PathBuf> {
        match self.store.find_image(&self.image_name) {
            Ok(Some(image)) => Ok(PathBuf::from(image.path)),
            _ => Err(std::io::Error::other(format!(
                "image `{}` is not registered",
                self.image_name
            ))),
        }
    }

    /// Removes entries that are not clones of the image `keep`.
    fn remove_stale(&self, keep: Option<&str>) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for (stem, path) in self.all_entries() {
            if Some(stem.as_str()) != keep && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        removed
    }

    fn entries_of(&self, stem: &str) -> Vec<PathBuf> {
        self.all_entries()
            .into_iter()
            .filter(|(entry_stem, _)| entry_stem == stem)
            .map(|(_, path)| path)
            .collect()
    }

    /// Every ready entry as (image stem, path).
    fn all_entries(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.directory) else {
            return Vec::new();
        };
        let mut found: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let base = name.strip_suffix(ENTRY_SUFFIX)?;
                let (stem, _id) = base.rsplit_once('.')?;
                (!name.starts_with(TMP_PREFIX)).then(|| (stem.to_owned(), entry.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// Ready entries (for tests and status).
    pub fn ready(&self) -> usize {
        self.current_stem()
            .map_or(0, |stem| self.entries_of(&stem).len())
    }
}

/// The `clone root disk` stage's detail: how the disk was made and, for a
/// copy, that it was one and how to get O(1) clones.
pub fn clone_detail(kind: StrategyKind, from_pool: bool, state_dir: &Path) -> String {
    match (kind, from_pool) {
        (_, true) => format!("{kind}, taken from the warm pool"),
        (StrategyKind::Copy, false) => format!(
            "copy: the image's data was copied (no reflink or device-mapper here); \
             for O(1) clones put {} on a reflink file system (XFS, btrfs), \
             or keep clones ready with `[vm] warm_pool = N`",
            state_dir.display()
        ),
        (kind, false) => kind.to_string(),
    }
}

/// `images/<stem>.ext4` → `<stem>` (the image id).
fn image_stem(image: &Path) -> Option<String> {
    Some(image.file_stem()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_disk::clone::Copy;
    use banger_proto::Image;
    use std::time::{Duration, Instant};

    fn image_row(name: &str, path: &Path) -> Image {
        Image {
            id: path.file_stem().unwrap().to_string_lossy().into_owned(),
            name: name.to_owned(),
            path: path.display().to_string(),
            size_bytes: 15,
            digest: "sha256:00".to_owned(),
            source: "test".to_owned(),
            created_at: crate::ids::now(),
        }
    }

    async fn until_ready(pool: &Arc<WarmPool>, count: usize) {
        let started = Instant::now();
        while pool.ready() != count || pool.refilling.load(Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pool holds {}, not {count}",
                pool.ready()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn files_under(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[tokio::test]
    async fn takes_refills_forgets_and_reconciles() {
        let state = tempfile::tempdir().unwrap();
        let images = state.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let image = images.join("img1.ext4");
        std::fs::write(&image, b"root filesystem").unwrap();
        let store = Store::open_in_memory().unwrap();
        store.insert_image(&image_row("default", &image)).unwrap();
        let pool = Arc::new(WarmPool::new(
            state.path(),
            2,
            "default",
            Arc::new(Copy),
            store.clone(),
        ));
        // Leftovers of an earlier daemon: a half-made clone, an entry of an
        // image that is gone.
        let warm = state.path().join(WARM_DIR);
        std::fs::create_dir_all(warm.join("tmp-old")).unwrap();
        std::fs::write(warm.join("tmp-old/rootfs.ext4"), b"half").unwrap();
        std::fs::write(warm.join("gone.abc.ext4"), b"stale").unwrap();
        let removed = pool.reconcile();
        assert_eq!(removed.len(), 2, "{removed:?}");
        until_ready(&pool, 2).await;
        assert_eq!(files_under(&warm).len(), 2, "{:?}", files_under(&warm));

        let vm_dir = state.path().join("vm1");
        std::fs::create_dir(&vm_dir).unwrap();
        let disk = pool.take(&image, &vm_dir).unwrap();
        assert_eq!(disk.path, vm_dir.join(ROOT_DISK_FILE));
        assert_eq!(std::fs::read(&disk.path).unwrap(), b"root filesystem");
        assert_eq!(disk.strategy, StrategyKind::Copy);
        until_ready(&pool, 2).await;

        // Another image is not served from this pool.
        let other = images.join("img2.ext4");
        assert!(pool.take(&other, &vm_dir).is_none());
        until_ready(&pool, 2).await;

        pool.forget_image(&image);
        assert_eq!(pool.ready(), 0);
        store.delete_image("default").unwrap();
        pool.refill();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(files_under(&warm).is_empty(), "{:?}", files_under(&warm));
    }

    #[test]
    fn off_without_a_size_or_for_device_clones() {
        let state = tempfile::tempdir().unwrap();
        let store = Store::open_in_memory().unwrap();
        let pool = Arc::new(WarmPool::new(
            state.path(),
            0,
            "default",
            Arc::new(Copy),
            store,
        ));
        assert!(!pool.enabled());
        assert!(pool.take(Path::new("/x/img.ext4"), state.path()).is_none());
        assert!(!state.path().join(WARM_DIR).exists());
    }
}
