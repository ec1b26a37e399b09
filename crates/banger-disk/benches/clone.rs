//! Clone a 4 GiB image holding ~1 GiB of data with `reflink` and with
//! `copy`, on an XFS (reflink=1) loop mount made for the run, and print the
//! times and the space each clone took. Root only; prints why it skips.
//!
//! `cargo bench -p banger-disk --bench clone`

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::time::Instant;

use banger_disk::clone::{CloneRequest, CloneStrategy, Copy, Reflink};
use common::{require_root_and_tools, XfsMount};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn main() {
    if !require_root_and_tools("bench clone", &["mkfs.xfs", "losetup", "mount", "umount"]) {
        return;
    }
    let xfs = XfsMount::new(8 * GIB);
    let image = xfs.mount_point.join("image.ext4");
    // 1 GiB of data in four 256 MiB runs spread over a 4 GiB sparse file,
    // like a root file system's data among free space.
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(4 * GIB).unwrap();
    let mut chunk = vec![0_u8; MIB as usize];
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for run in 0..4_u64 {
        for index in 0..256_u64 {
            for byte in &mut chunk {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = (state >> 24) as u8 | 1;
            }
            file.write_all_at(&chunk, run * GIB + index * MIB).unwrap();
        }
    }
    file.sync_all().unwrap();
    drop(file);
    let cold = drop_caches();
    println!(
        "image: 4 GiB, 1 GiB of data, on XFS reflink=1 ({})",
        if cold {
            "page cache dropped before each clone"
        } else {
            "page cache NOT dropped: copy reads from cache"
        }
    );
    for (label, strategy) in [("reflink", &Reflink as &dyn CloneStrategy), ("copy", &Copy)] {
        let vm_dir = xfs.mount_point.join(label);
        std::fs::create_dir(&vm_dir).unwrap();
        drop_caches();
        let before = xfs.used();
        let started = Instant::now();
        let disk = strategy
            .clone_image(&CloneRequest {
                vm_id: label,
                image: &image,
                vm_dir: &vm_dir,
                cancelled: &|| false,
            })
            .unwrap();
        let elapsed = started.elapsed();
        nix::unistd::sync();
        let used = xfs.used().saturating_sub(before);
        println!(
            "{label:8} {:>10.3} ms   space used by the clone: {:>8.1} MiB   ({})",
            elapsed.as_secs_f64() * 1000.0,
            used as f64 / MIB as f64,
            disk.path.display()
        );
        strategy.remove(label, &vm_dir).unwrap();
    }
}
