//! Choosing QEMU's accelerator: KVM when it really runs guests at hardware
//! speed, TCG (software emulation) otherwise.
//!
//! `/dev/kvm` opening is not enough. Some hosts offer a KVM that accepts
//! every ioctl and runs guests, but emulates ordinary (non-paravirtual)
//! guest code one instruction at a time: a nested paravirtual KVM such as
//! PVM (`kvm_pvm`) runs a stock kernel's decompressor at ~70 KiB/s, so it
//! never boots. The probe therefore measures, in the mode kernels run in:
//!
//! 1. Open `/dev/kvm`, check `KVM_GET_API_VERSION` is 12, `KVM_CREATE_VM`.
//! 2. Give the VM 32 KiB of memory holding identity page tables and a
//!    program; create one vCPU already in 64-bit long mode at CPL 0 (the
//!    state a kernel runs in), `rax = 0`.
//! 3. `KVM_RUN` the program: [`PROBE_CHUNKS`] rounds of a
//!    [`PROBE_ITERATIONS`]-step `dec`/`jnz` loop, each round ending with
//!    `out 0x10, al` of the rounds left, then `hlt`. Every exit must be
//!    that `out` with the right count, then `KVM_EXIT_HLT`: proof the code
//!    really ran.
//! 4. The whole program (two million instructions, about a millisecond on
//!    hardware) must finish within [`PROBE_BUDGET`]. The check runs after
//!    each round, so a slow KVM is given up on after a round or two.
//! 5. The probe runs on its own thread; if `KVM_RUN` never comes back the
//!    thread is left behind after [`PROBE_TIMEOUT`] and KVM is reported
//!    unusable.
//!
//! This module is ioctls on memory shared with the kernel, hence unsafe
//! code; every block says why it is sound.
#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use banger_proto::error_chain;

/// Where KVM lives.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// Rounds of the probe program.
pub const PROBE_CHUNKS: u32 = 10;
/// Loop steps per round (two instructions each).
pub const PROBE_ITERATIONS: u32 = 100_000;
/// How long the probe program may take in all. Hardware needs about a
/// millisecond; an emulating KVM needs seconds.
pub const PROBE_BUDGET: Duration = Duration::from_millis(250);
/// How long to wait for a probe whose `KVM_RUN` does not return.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when [`detect_accel`] finds it usable, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation (Tiny Code Generator).
    Tcg,
}

impl Accel {
    /// The `-accel` value; `None` for [`Accel::Auto`].
    #[must_use]
    pub fn qemu_name(self) -> Option<&'static str> {
        match self {
            Self::Auto => None,
            Self::Kvm => Some("kvm"),
            Self::Tcg => Some("tcg"),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.qemu_name().unwrap_or("auto"))
    }
}

/// The outcome of [`detect_accel`]: [`Accel::Kvm`] or [`Accel::Tcg`], never
/// `Auto`, and why, in words for `banger doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmProbeError {
    #[error("Could not open {}", path.display())]
    OpenDevice {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("KVM speaks API version {version}, not 12")]
    ApiVersion { version: i32 },
    #[error("KVM refused {call}")]
    Ioctl {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Could not map {what} for the probe guest")]
    MapMemory {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("The probe guest stopped with KVM exit reason {reason} after {rounds} of {PROBE_CHUNKS} rounds, not as programmed")]
    UnexpectedExit { reason: u32, rounds: u32 },
    #[error("The probe guest ran {rounds} of {PROBE_CHUNKS} rounds in {elapsed:?}, over the {PROBE_BUDGET:?} budget for all of them: this KVM emulates ordinary guests instead of running them (a nested paravirtual KVM?)")]
    TooSlow { rounds: u32, elapsed: Duration },
    #[error("The probe guest did not come back from KVM_RUN within {PROBE_TIMEOUT:?}")]
    Hung,
}

/// Picks KVM if [`probe_kvm`] succeeds on `/dev/kvm`, TCG otherwise.
/// Blocking; takes up to [`PROBE_TIMEOUT`] (about 1 ms when KVM works).
#[must_use]
pub fn detect_accel() -> AccelChoice {
    match probe_kvm(Path::new(KVM_DEVICE)) {
        Ok(elapsed) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!(
                "{KVM_DEVICE} ran a 64-bit test guest at hardware speed ({} instructions in {elapsed:?})",
                2 * PROBE_CHUNKS * PROBE_ITERATIONS
            ),
        },
        Err(error) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!(
                "KVM is not usable, using TCG (software emulation): {}",
                error_chain(&error)
            ),
        },
    }
}

/// Runs the probe (module docs, steps 1–5) against `device` and returns how
/// long the program took.
///
/// # Errors
/// Why the KVM at `device` is not usable.
pub fn probe_kvm(device: &Path) -> Result<Duration, KvmProbeError> {
    let kvm = File::options()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|source| KvmProbeError::OpenDevice {
            path: device.to_owned(),
            source,
        })?;
    let (sender, receiver) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = sender.send(run_probe(&kvm));
        });
    if let Err(source) = spawned {
        return Err(KvmProbeError::Ioctl {
            call: "a probe thread",
            source,
        });
    }
    receiver
        .recv_timeout(PROBE_TIMEOUT)
        .unwrap_or(Err(KvmProbeError::Hung))
}

// ioctl numbers from <linux/kvm.h> (type 0xAE).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
const KVM_RUN: libc::c_ulong = 0xAE80;
const KVM_SET_REGS: libc::c_ulong = 0x4090_AE82;
const KVM_GET_SREGS: libc::c_ulong = 0x8138_AE83;
const KVM_SET_SREGS: libc::c_ulong = 0x4138_AE84;

const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;
const KVM_EXIT_IO_OUT: u8 = 1;
const PROBE_PORT: u16 = 0x10;

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
struct UserspaceMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

/// `struct kvm_regs`.
#[repr(C)]
#[derive(Default)]
struct Registers {
    general: [u64; 16], // rax rbx rcx rdx rsi rdi rsp rbp r8..r15
    rip: u64,
    rflags: u64,
}

/// `struct kvm_segment`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Segment {
    base: u64,
    limit: u32,
    selector: u16,
    segment_type: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    padding: u8,
}

/// `struct kvm_dtable`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct DescriptorTable {
    base: u64,
    limit: u16,
    padding: [u16; 3],
}

/// `struct kvm_sregs`.
#[repr(C)]
#[derive(Default)]
struct SpecialRegisters {
    cs: Segment,
    ds: Segment,
    es: Segment,
    fs: Segment,
    gs: Segment,
    ss: Segment,
    tr: Segment,
    ldt: Segment,
    gdt: DescriptorTable,
    idt: DescriptorTable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

const _: () = assert!(std::mem::size_of::<UserspaceMemoryRegion>() == 32);
const _: () = assert!(std::mem::size_of::<Registers>() == 144);
const _: () = assert!(std::mem::size_of::<SpecialRegisters>() == 312);

/// Guest memory layout: page tables, then code.
const GUEST_MEMORY: usize = 0x8000;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PAGE_DIRECTORY: usize = 0x3000;
const CODE: usize = 0x4000;

/// The program of step 3, assembled by hand (offsets in the comments).
fn probe_program() -> Vec<u8> {
    let mut code = vec![0xBB]; //  0: mov ebx, PROBE_CHUNKS
    code.extend_from_slice(&PROBE_CHUNKS.to_le_bytes());
    code.push(0xB9); //                5: mov ecx, PROBE_ITERATIONS
    code.extend_from_slice(&PROBE_ITERATIONS.to_le_bytes());
    code.extend_from_slice(&[
        0xFF, 0xC9, //                10: dec ecx
        0x75, 0xFC, //                12: jnz 10
        0x89, 0xD8, //                14: mov eax, ebx
        0xE6, 0x10, //                16: out 0x10, al
        0xFF, 0xCB, //                18: dec ebx
        0x75, 0xEF, //                20: jnz 5
        0xF4, //                      22: hlt
    ]);
    code
}

fn run_probe(kvm: &File) -> Result<Duration, KvmProbeError> {
    let version = ioctl(
        kvm.as_raw_fd(),
        KVM_GET_API_VERSION,
        0,
        "KVM_GET_API_VERSION",
    )?;
    if version != 12 {
        return Err(KvmProbeError::ApiVersion { version });
    }
    let vm = new_fd(ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0, "KVM_CREATE_VM")?);

    let memory = Mapping::anonymous(GUEST_MEMORY).map_err(|source| KvmProbeError::MapMemory {
        what: "guest memory",
        source,
    })?;
    let write_u64 = |offset: usize, value: u64| {
        memory.bytes_mut()[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    };
    // Present | writable, and a 2 MiB page (PS) at the last level.
    write_u64(PML4, PDPT as u64 | 0x3);
    write_u64(PDPT, PAGE_DIRECTORY as u64 | 0x3);
    write_u64(PAGE_DIRECTORY, 0x83);
    let program = probe_program();
    memory.bytes_mut()[CODE..CODE + program.len()].copy_from_slice(&program);

    let region = UserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: GUEST_MEMORY as u64,
        userspace_addr: memory.address() as u64,
    };
    ioctl(
        vm.as_raw_fd(),
        KVM_SET_USER_MEMORY_REGION,
        std::ptr::from_ref(&region) as usize,
        "KVM_SET_USER_MEMORY_REGION",
    )?;
    let vcpu = new_fd(ioctl(
        vm.as_raw_fd(),
        KVM_CREATE_VCPU,
        0,
        "KVM_CREATE_VCPU",
    )?);
    let run_size = ioctl(
        kvm.as_raw_fd(),
        KVM_GET_VCPU_MMAP_SIZE,
        0,
        "KVM_GET_VCPU_MMAP_SIZE",
    )?;
    let run = Mapping::shared(&vcpu, usize::try_from(run_size).unwrap_or(0)).map_err(|source| {
        KvmProbeError::MapMemory {
            what: "the vCPU run area",
            source,
        }
    })?;

    let mut special = SpecialRegisters::default();
    ioctl(
        vcpu.as_raw_fd(),
        KVM_GET_SREGS,
        std::ptr::from_mut(&mut special) as usize,
        "KVM_GET_SREGS",
    )?;
    let data = Segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: 0x10,
        segment_type: 3, // read/write, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Segment::default()
    };
    special.cs = Segment {
        selector: 0x08,
        segment_type: 11, // execute/read, accessed
        db: 0,
        l: 1,
        ..data
    };
    special.ds = data;
    special.es = data;
    special.fs = data;
    special.gs = data;
    special.ss = data;
    special.cr3 = PML4 as u64;
    special.cr4 = 1 << 5; // PAE
    special.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    special.efer = 0x500; // LMA | LME
    ioctl(
        vcpu.as_raw_fd(),
        KVM_SET_SREGS,
        std::ptr::from_ref(&special) as usize,
        "KVM_SET_SREGS",
    )?;
    let registers = Registers {
        rip: CODE as u64,
        rflags: 0x2,
        ..Registers::default()
    };
    ioctl(
        vcpu.as_raw_fd(),
        KVM_SET_REGS,
        std::ptr::from_ref(&registers) as usize,
        "KVM_SET_REGS",
    )?;

    let started = Instant::now();
    let mut rounds = 0;
    loop {
        match ioctl(vcpu.as_raw_fd(), KVM_RUN, 0, "KVM_RUN") {
            Err(KvmProbeError::Ioctl { source, .. })
                if source.kind() == io::ErrorKind::Interrupted => {}
            result => {
                result?;
            }
        }
        let exit = run.read_exit();
        match exit {
            RunExit::Out { port, value }
                if port == PROBE_PORT && u32::from(value) == PROBE_CHUNKS - rounds =>
            {
                rounds += 1;
            }
            RunExit::Halt if rounds == PROBE_CHUNKS => return Ok(started.elapsed()),
            other => {
                return Err(KvmProbeError::UnexpectedExit {
                    reason: other.reason(),
                    rounds,
                })
            }
        }
        if started.elapsed() > PROBE_BUDGET {
            return Err(KvmProbeError::TooSlow {
                rounds,
                elapsed: started.elapsed(),
            });
        }
    }
}

enum RunExit {
    Out { port: u16, value: u8 },
    Halt,
    Other(u32),
}

impl RunExit {
    fn reason(&self) -> u32 {
        match self {
            Self::Out { .. } => KVM_EXIT_IO,
            Self::Halt => KVM_EXIT_HLT,
            Self::Other(reason) => *reason,
        }
    }
}

fn ioctl(
    fd: RawFd,
    request: libc::c_ulong,
    argument: usize,
    call: &'static str,
) -> Result<i32, KvmProbeError> {
    // SAFETY: every caller passes a KVM ioctl number together with the
    // argument that ioctl expects: either an integer, or the address of a
    // live, correctly laid out `#[repr(C)]` struct (sizes asserted above)
    // that outlives the call.
    let result = unsafe { libc::ioctl(fd, request, argument) };
    if result < 0 {
        return Err(KvmProbeError::Ioctl {
            call,
            source: io::Error::last_os_error(),
        });
    }
    Ok(result)
}

fn new_fd(fd: i32) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful KVM_CREATE_* ioctl and
    // is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An `mmap`ed region, unmapped on drop.
struct Mapping {
    address: *mut libc::c_void,
    length: usize,
}

impl Mapping {
    fn anonymous(length: usize) -> io::Result<Self> {
        Self::map(length, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
    }

    fn shared(fd: &OwnedFd, length: usize) -> io::Result<Self> {
        Self::map(length, libc::MAP_SHARED, fd.as_raw_fd())
    }

    fn map(length: usize, flags: i32, fd: RawFd) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint) overlaps
        // no Rust object; the result is checked before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { address, length })
    }

    fn address(&self) -> usize {
        self.address as usize
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: the mapping is `length` bytes, readable and writable, and
        // lives as long as `self`. Only the probe thread touches it, and the
        // guest only runs (and writes) inside KVM_RUN, when no slice from
        // here is alive.
        unsafe { std::slice::from_raw_parts_mut(self.address.cast::<u8>(), self.length) }
    }

    /// Decodes `struct kvm_run` after a `KVM_RUN`: `exit_reason` at offset
    /// 8, the `io` member of the exit union at offset 32.
    fn read_exit(&self) -> RunExit {
        let bytes = self.bytes_mut();
        let u32_at = |offset: usize| {
            u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap_or_default())
        };
        match u32_at(8) {
            KVM_EXIT_HLT => RunExit::Halt,
            KVM_EXIT_IO => {
                let direction = bytes[32];
                let size = bytes[33];
                let port = u16::from_le_bytes([bytes[34], bytes[35]]);
                let data_offset = u64::from_le_bytes(bytes[40..48].try_into().unwrap_or_default());
                let value = usize::try_from(data_offset)
                    .ok()
                    .and_then(|offset| bytes.get(offset).copied());
                match (direction, size, value) {
                    (KVM_EXIT_IO_OUT, 1, Some(value)) => RunExit::Out { port, value },
                    _ => RunExit::Other(KVM_EXIT_IO),
                }
            }
            reason => RunExit::Other(reason),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map`; no slice into
        // it outlives `self`.
        unsafe {
            libc::munmap(self.address, self.length);
        }
    }
}

// SAFETY: the mapping is plain memory owned by this value; moving it to the
// probe thread moves the only owner.
unsafe impl Send for Mapping {}

/// The host's TSC frequency in kHz, measured against the monotonic clock.
///
/// Under TCG the guest's TSC is the host's, but the guest kernel has no
/// reference clock (microvm has no HPET or ACPI PM timer) and calibrates
/// against the emulated PIT, which fails on a loaded host ("tsc: Unable to
/// calibrate against PIT") and leaves the boot hanging. Telling the guest
/// the frequency (`tsc_early_khz=`) skips that calibration. `None` when the
/// TSC is not constant-rate or this is not x86-64.
#[must_use]
pub fn measure_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|line| line.starts_with("flags"))?;
        if !flags.split_whitespace().any(|flag| flag == "constant_tsc") {
            return None;
        }
        let read_tsc = || {
            // SAFETY: RDTSC exists on every x86-64 CPU and only reads the
            // time-stamp counter.
            #[allow(unused_unsafe)]
            unsafe {
                std::arch::x86_64::_rdtsc()
            }
        };
        let started = Instant::now();
        let first = read_tsc();
        std::thread::sleep(Duration::from_millis(50));
        let cycles = read_tsc().checked_sub(first)?;
        let nanoseconds = started.elapsed().as_nanos();
        let khz = u128::from(cycles) * 1_000_000 / nanoseconds.max(1);
        u64::try_from(khz).ok().filter(|khz| *khz > 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_program_counts_down_and_halts() {
        let program = probe_program();
        assert_eq!(program.len(), 23);
        assert_eq!(program[22], 0xF4);
        // `jnz 5` from the end of the instruction at 20.
        assert_eq!(22 - usize::from(0x100 - u16::from(program[21])), 5);
    }

    #[test]
    fn detection_always_gives_a_reason() {
        let choice = detect_accel();
        assert_ne!(choice.accel, Accel::Auto);
        assert!(!choice.reason.is_empty());
        eprintln!("accel: {} ({})", choice.accel, choice.reason);
        if choice.accel == Accel::Kvm {
            assert!(
                choice.reason.contains("hardware speed"),
                "{}",
                choice.reason
            );
        } else {
            assert!(
                choice.reason.starts_with("KVM is not usable"),
                "{}",
                choice.reason
            );
        }
    }

    #[test]
    fn a_missing_device_is_reported_with_its_path() {
        let error = probe_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert_eq!(error.to_string(), "Could not open /nonexistent/kvm");
        assert!(error_chain(&error).ends_with("No such file or directory (os error 2)"));
    }

    #[test]
    fn tsc_frequency_is_plausible() {
        if let Some(khz) = measure_tsc_khz() {
            assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        }
    }

    #[test]
    fn accel_names() {
        assert_eq!(Accel::Kvm.to_string(), "kvm");
        assert_eq!(Accel::Tcg.to_string(), "tcg");
        assert_eq!(Accel::Auto.to_string(), "auto");
        assert_eq!(Accel::default(), Accel::Auto);
    }
}
