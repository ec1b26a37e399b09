//! A directory tree as a source: walked without following symlinks and
//! written through the same checked tree writer as archives.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::tree::{read_xattrs, Metadata, RelativePath, SpecialKind, Tree};
use super::UnpackError;

pub(crate) fn copy_tree(source: &Path, tree: &mut Tree<'_>) -> Result<(), UnpackError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |error| UnpackError::Read {
            path: path.clone(),
            source: error,
        }
    };
    // (device, inode) of multiply linked files → where the first copy went.
    let mut linked: HashMap<(u64, u64), RelativePath> = HashMap::new();
    let mut pending = vec![RelativePath(Vec::new())];
    while let Some(relative) = pending.pop() {
        let absolute = source.join(relative.0.iter().collect::<std::path::PathBuf>());
        let metadata = std::fs::symlink_metadata(&absolute).map_err(read_error(&absolute))?;
        let file_type = metadata.file_type();
        let attributes = Metadata {
            uid: metadata.uid(),
            gid: metadata.gid(),
            mode: metadata.mode(),
            modified: metadata.modified().ok(),
            xattrs: if file_type.is_symlink() {
                Vec::new()
            } else {
                read_xattrs(&absolute).map_err(read_error(&absolute))?
            },
        };
        if file_type.is_dir() {
            tree.directory(&relative, &attributes)?;
            let mut children = Vec::new();
            for entry in std::fs::read_dir(&absolute).map_err(read_error(&absolute))? {
                let entry = entry.map_err(read_error(&absolute))?;
                let mut child = relative.clone();
                child.0.push(entry.file_name());
                children.push(child);
            }
            // Reverse-sorted so the stack pops them in name order.
            children.sort_by(|a, b| b.0.cmp(&a.0));
            pending.extend(children);
        } else if file_type.is_symlink() {
            let target = std::fs::read_link(&absolute).map_err(read_error(&absolute))?;
            tree.symlink(&relative, &target, &attributes)?;
        } else if file_type.is_file() {
            if metadata.nlink() > 1 {
                let key = (metadata.dev(), metadata.ino());
                if let Some(first) = linked.get(&key) {
                    tree.hard_link(&relative, first)?;
                    continue;
                }
                linked.insert(key, relative.clone());
            }
            // O_NOFOLLOW: the file may have been swapped for a link since lstat.
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags_nofollow()
                .open(&absolute)
                .map_err(read_error(&absolute))?;
            tree.file(&relative, &attributes, metadata.len(), &mut file)?;
        } else if file_type.is_socket() {
            // Sockets mean nothing in an image.
        } else {
            let kind = if file_type.is_char_device() {
                SpecialKind::Character
            } else if file_type.is_block_device() {
                SpecialKind::Block
            } else {
                SpecialKind::Fifo
            };
            let device = metadata.rdev();
            #[allow(clippy::cast_possible_truncation)]
            let numbers = (
                nix::sys::stat::major(device) as u32,
                nix::sys::stat::minor(device) as u32,
            );
            tree.special(&relative, kind, numbers, &attributes)?;
        }
    }
    Ok(())
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NOFOLLOW)
    }
}
