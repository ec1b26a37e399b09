//! Disks for banger: per-VM root disk clones, unpacking of untrusted image
//! sources, and ext4 images.
//!
//! - [`clone`]: the [`clone::CloneStrategy`] trait with `reflink` (FICLONE),
//!   `dm-snapshot` (device-mapper over loop devices) and `copy` (sparse copy),
//!   [`clone::select_strategy`] for `auto`, and the host scan that lets
//!   reconciliation find and remove leaked banger devices.
//! - [`unpack`]: extraction of tarballs (plain, gzip, zstd), directory trees,
//!   OCI image layouts and `docker save` archives into a staging directory,
//!   refusing anything that would escape it.
//! - [`confined`]: reading files a caller pointed at: beneath one opened
//!   directory (`openat2` `RESOLVE_BENEATH`), regular files only, bounded.
//! - [`initramfs`]: gzip-compressed newc initramfs images with the guest
//!   agent as `/init` and the kernel modules it needs, in load order.
//! - [`ext4`]: `mkfs.ext4 -d` images from a directory, empty work disks,
//!   growing (never shrinking) a disk.
//!
//! Everything here is blocking; the daemon calls it from `spawn_blocking`.

pub mod clone;
pub mod command;
pub mod confined;
pub mod ext4;
pub mod initramfs;
pub mod unpack;
pub mod vmlinux;
