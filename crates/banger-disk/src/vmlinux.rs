//! The uncompressed ELF `vmlinux` inside an x86 `bzImage`.
//!
//! Firecracker (x86_64) boots only ELF kernels, and QEMU's microvm boots an
//! ELF with a PVH note directly (skipping the decompressor), so kernels
//! imported from Debian are stored as their vmlinux:
//! 1. check the boot protocol header (`HdrS` at 0x202, protocol >= 2.08);
//! 2. find the compressed payload: it starts `payload_offset` (0x248) bytes
//!    into the protected-mode code, which follows the `setup_sects` (0x1f1)
//!    512-byte setup sectors and the boot sector;
//! 3. decompress it by its magic (LZ4 legacy frames, as Debian builds; gzip;
//!    zstd) and check the result is an ELF.
//!
//! The kernel's build appends the uncompressed size after the payload; the
//! decoders stop before it.

use std::io::Read;

const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Larger than any kernel; a bound against a hostile image.
const MAX_VMLINUX: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("Not a bzImage (no `HdrS` boot header)")]
    NotBzImage,
    #[error("bzImage boot protocol {major}.{minor} has no payload fields (need 2.08)")]
    OldProtocol { major: u8, minor: u8 },
    #[error("bzImage payload lies outside the file")]
    Truncated,
    #[error("bzImage payload is compressed with {format}, which banger does not unpack")]
    Unsupported { format: &'static str },
    #[error("Failed to decompress the {format} payload")]
    Decompress {
        format: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("The decompressed payload is not an ELF vmlinux")]
    NotElf,
    #[error("The decompressed payload exceeds {MAX_VMLINUX} bytes")]
    TooLarge,
}

/// Whether `image` already is an ELF kernel.
#[must_use]
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(ELF_MAGIC)
}

/// The ELF vmlinux in bzImage `image`.
///
/// # Errors
/// [`VmlinuxError`] naming what was wrong with the image.
pub fn extract(image: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    if image.get(0x202..0x206) != Some(HEADER_MAGIC.as_slice()) {
        return Err(VmlinuxError::NotBzImage);
    }
    let (minor, major) = (image[0x206], image[0x207]);
    if (major, minor) < (2, 8) {
        return Err(VmlinuxError::OldProtocol { major, minor });
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        sectors => usize::from(sectors),
    };
    let field = |offset: usize| -> Result<usize, VmlinuxError> {
        let bytes = image
            .get(offset..offset + 4)
            .ok_or(VmlinuxError::Truncated)?;
        usize::try_from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .map_err(|_| VmlinuxError::Truncated)
    };
    let start = (setup_sects + 1) * 512 + field(0x248)?;
    let payload = image
        .get(start..start + field(0x24c)?)
        .ok_or(VmlinuxError::Truncated)?;
    let vmlinux = if payload.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        lz4_legacy(&payload[4..])?
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        read_all("gzip", flate2::read::GzDecoder::new(payload))?
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let decoder = ruzstd::decoding::StreamingDecoder::new(payload).map_err(|error| {
            VmlinuxError::Decompress {
                format: "zstd",
                source: std::io::Error::other(error.to_string()),
            }
        })?;
        read_all("zstd", decoder)?
    } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        return Err(VmlinuxError::Unsupported { format: "xz" });
    } else if payload.starts_with(b"BZh") {
        return Err(VmlinuxError::Unsupported { format: "bzip2" });
    } else {
        return Err(VmlinuxError::Unsupported {
            format: "an unknown format",
        });
    };
    if !is_elf(&vmlinux) {
        return Err(VmlinuxError::NotElf);
    }
    Ok(vmlinux)
}

fn read_all(format: &'static str, reader: impl Read) -> Result<Vec<u8>, VmlinuxError> {
    let mut output = Vec::new();
    reader
        .take(MAX_VMLINUX as u64 + 1)
        .read_to_end(&mut output)
        .map_err(|source| VmlinuxError::Decompress { format, source })?;
    if output.len() > MAX_VMLINUX {
        return Err(VmlinuxError::TooLarge);
    }
    Ok(output)
}

/// LZ4 legacy frames (what `lz4 -l` and the kernel's build write): after the
/// magic, blocks of `u32` compressed length + data, each at most 8 MiB
/// uncompressed; a repeated magic starts another frame; 4 trailing bytes
/// (the kernel's appended size) are not a block.
fn lz4_legacy(mut input: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let corrupt = |message: String| VmlinuxError::Decompress {
        format: "lz4",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    };
    let mut output = Vec::new();
    let mut block = vec![0_u8; LZ4_LEGACY_BLOCK];
    while input.len() > 4 {
        let length = u32::from_le_bytes([input[0], input[1], input[2], input[3]]);
        if length == LZ4_LEGACY_MAGIC {
            input = &input[4..];
            continue;
        }
        let length = length as usize;
        if length > input.len() - 4 {
            break;
        }
        let written = lz4_flex::block::decompress_into(&input[4..4 + length], &mut block)
            .map_err(|error| corrupt(error.to_string()))?;
        output.extend_from_slice(&block[..written]);
        if output.len() > MAX_VMLINUX {
            return Err(VmlinuxError::TooLarge);
        }
        input = &input[4 + length..];
    }
    if output.is_empty() {
        return Err(corrupt("no blocks".to_owned()));
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal bzImage around `payload` (2 setup sectors, protocol 2.15).
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0_u8; 3 * 512];
        image[0x1f1] = 2;
        image[0x202..0x206].copy_from_slice(HEADER_MAGIC);
        image[0x206] = 15;
        image[0x207] = 2;
        image[0x248..0x24c].copy_from_slice(&16_u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        image.extend_from_slice(&[0x90; 16]);
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xAA; 4]);
        image
    }

    fn elf() -> Vec<u8> {
        let mut elf = ELF_MAGIC.to_vec();
        elf.extend((0..200_000_u32).map(|index| (index % 251) as u8));
        elf
    }

    #[test]
    fn lz4_legacy_payloads_come_out_whole() {
        let elf = elf();
        let mut payload = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in elf.chunks(70_000) {
            let block = lz4_flex::block::compress(chunk);
            payload.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
            payload.extend_from_slice(&block);
        }
        payload.extend_from_slice(&u32::try_from(elf.len()).unwrap().to_le_bytes());
        assert_eq!(extract(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn gzip_payloads_come_out_whole() {
        use std::io::Write;
        let elf = elf();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&elf).unwrap();
        let payload = encoder.finish().unwrap();
        assert_eq!(extract(&bzimage(&payload)).unwrap(), elf);
    }

    #[test]
    fn bad_images_are_named() {
        assert!(matches!(extract(b"plain"), Err(VmlinuxError::NotBzImage)));
        let xz = bzimage(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2]);
        assert!(matches!(
            extract(&xz),
            Err(VmlinuxError::Unsupported { format: "xz" })
        ));
        let mut truncated = bzimage(&[1, 2, 3]);
        truncated[0x24c..0x250].copy_from_slice(&1_000_000_u32.to_le_bytes());
        assert!(matches!(extract(&truncated), Err(VmlinuxError::Truncated)));
        let mut not_elf = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let block = lz4_flex::block::compress(b"definitely not an elf file");
        not_elf.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
        not_elf.extend_from_slice(&block);
        assert!(matches!(
            extract(&bzimage(&not_elf)),
            Err(VmlinuxError::NotElf)
        ));
    }

    /// The host's own Debian kernel, where there is one.
    #[test]
    fn the_hosts_debian_kernel_unpacks_to_an_elf() {
        let Some(kernel) = std::fs::read_dir("/boot").ok().and_then(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.to_string_lossy().contains("vmlinuz-"))
                .max()
        }) else {
            eprintln!("SKIPPED the_hosts_debian_kernel_unpacks_to_an_elf: no /boot/vmlinuz-*");
            return;
        };
        let Ok(image) = std::fs::read(&kernel) else {
            eprintln!(
                "SKIPPED the_hosts_debian_kernel_unpacks_to_an_elf: cannot read {}",
                kernel.display()
            );
            return;
        };
        match extract(&image) {
            Ok(vmlinux) => assert!(vmlinux.len() > image.len()),
            Err(VmlinuxError::Unsupported { format }) => {
                eprintln!(
                    "SKIPPED the_hosts_debian_kernel_unpacks_to_an_elf: {} is {format}",
                    kernel.display()
                );
            }
            Err(error) => panic!("{}: {error}", kernel.display()),
        }
    }
}
