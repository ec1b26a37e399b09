//! Layout of the state directory.

use std::path::PathBuf;

/// ```text
/// STATE_DIR/
///   state.db        SQLite (WAL)
///   bangerd.lock    held by the running daemon
///   images/ID.ext4  imported root filesystems
///   kernels/ID/     kernel (+ initrd)
///   vms/ID/         root disk, VMM sockets, console and VMM logs
///   disks/ID.ext4   work disks
///   jail/           jailed Firecrackers' chroots: jail/<binary name>/ID/root,
///                   each living as long as its VMM
///   tmp/            imports in progress; emptied at start
/// ```
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub root: PathBuf,
}

impl StatePaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("state.db")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.root.join("bangerd.lock")
    }

    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn kernels(&self) -> PathBuf {
        self.root.join("kernels")
    }

    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.vms().join(vm_id)
    }

    pub fn disks(&self) -> PathBuf {
        self.root.join("disks")
    }

    pub fn jail(&self) -> PathBuf {
        self.root.join("jail")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Creates every directory of the layout (mode 0700: VM disks and
    /// sockets are root's business).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [
            self.root.clone(),
            self.images(),
            self.kernels(),
            self.vms(),
            self.disks(),
            self.jail(),
            self.tmp(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
        }
        Ok(())
    }
}
