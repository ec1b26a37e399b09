//! `fake-jailer`: a stand-in for Firecracker's `jailer` (v1.x, see its
//! `docs/jailer.md`), so the daemon's tests run jailed.
//!
//! It takes the real jailer's flags and refuses what the real one refuses:
//! an unknown flag (`Found argument 'x' which wasn't expected, or isn't
//! valid in this context.`), a missing required one (`--exec-file`, `--gid`,
//! `--id`, `--uid`, checked in that order), an invalid id (1 to 64 ASCII
//! letters, digits or `-`), an `--exec-file` that is not a file, a missing
//! `--chroot-base-dir` (default `/srv/jailer`), a `--cgroup` not of the form
//! `<controller>.<file>=<value>`, a `--cgroup-version` other than 1 or 2, a
//! `--resource-limit` other than `fsize=N` or `no-file=N`. Everything after
//! `--` is passed to the exec file. Errors go to stderr, exit code 1.
//!
//! Then, as the real one does:
//!
//! 1. Makes `<chroot_base>/<exec_file_name>/<id>/root` and copies the exec
//!    file into it, owned by uid:gid.
//! 2. Sets `RLIMIT_NOFILE` (2048 unless `--resource-limit no-file=`) and
//!    `RLIMIT_FSIZE` if asked.
//! 3. With `--cgroup`: makes `<hierarchy>/<parent_cgroup>/<id>` in each
//!    hierarchy (from `/proc/mounts`; v2: enabling the controllers in
//!    every ancestor's `cgroup.subtree_control`), writes the values, and
//!    moves itself in (`cgroup.procs`, v1 `tasks`).
//! 4. Enters a new mount namespace (all mounts private), makes `dev`,
//!    `dev/net` and `run` (0700) in the chroot, `dev/kvm`, `dev/net/tun`
//!    (and `dev/urandom`, a warning if not possible) as device nodes, and
//!    gives all of it and the chroot root to uid:gid.
//! 5. `--daemonize`: double fork, `setsid`, stdio to `/dev/null`.
//! 6. `--new-pid-ns`: forks into a new PID namespace; the parent writes the
//!    child's pid to `<chroot>/<exec_file_name>.pid` and exits 0. Without
//!    it, its own pid goes there.
//! 7. Drops supplementary groups, then gid, then uid; clears the
//!    environment; execs `/<exec_file_name> --id <id> --start-time-us N
//!    --start-time-cpu-us N --parent-cpu-time-us N <args after -->`.
//!
//! Where it differs, and why: it does not `pivot_root`/`chroot` into the
//! jail, because `fake-firecracker` is dynamically linked and, as a test
//! double, must still reach its test hooks (request log, guest agent) on
//! the host. It runs the VMM with the chroot root as working directory and
//! `FAKE_FIRECRACKER_JAILED` set, and `fake-firecracker` then resolves every
//! absolute path it is given under it, so a path outside the jail is not
//! found, as with the real one. The environment keeps `FAKE_FIRECRACKER_*`
//! variables (the fake's test steering) and nothing else.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{ForkResult, Gid, Uid};

use crate::fake_firecracker::JAILED_VAR;

const VALUE_FLAGS: [&str; 10] = [
    "id",
    "exec-file",
    "uid",
    "gid",
    "cgroup",
    "cgroup-version",
    "chroot-base-dir",
    "netns",
    "parent-cgroup",
    "resource-limit",
];
const SWITCHES: [&str; 4] = ["daemonize", "new-pid-ns", "help", "version"];
const REQUIRED: [&str; 4] = ["exec-file", "gid", "id", "uid"];
const MULTIPLE: [&str; 2] = ["cgroup", "resource-limit"];

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cgroups: Vec<(String, String)>,
    pub cgroup_version: u8,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub parent_cgroup: Option<String>,
    pub no_file: u64,
    pub fsize: Option<u64>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub extra: Vec<OsString>,
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    if argv
        .first()
        .is_some_and(|first| first == GUEST_LAUNCHER_FLAG)
    {
        run_guest_launcher(&argv[1..]);
    }
    let args = match parse(&argv) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args) {
        Ok(never) => match never {},
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Parses and validates the flags as the real jailer does. `Ok(None)` for
/// `--help` and `--version`, which print and succeed.
///
/// # Errors
/// The real jailer's message for what is wrong.
pub fn parse(argv: &[OsString]) -> Result<Option<Args>, String> {
    let mut values: Vec<(String, String)> = Vec::new();
    let mut switches: Vec<String> = Vec::new();
    let mut extra = Vec::new();
    let mut rest = argv.iter();
    while let Some(argument) = rest.next() {
        let text = argument.to_string_lossy();
        if text == "--" {
            extra.extend(rest.by_ref().cloned());
            break;
        }
        let name = text.strip_prefix("--").unwrap_or(&text).to_owned();
        if !text.starts_with("--") || name.is_empty() {
            return Err(unexpected(&name));
        }
        if SWITCHES.contains(&name.as_str()) {
            switches.push(name);
        } else if VALUE_FLAGS.contains(&name.as_str()) {
            let Some(value) = rest.next() else {
                return Err(format!(
                    "Failed to parse arguments: The argument '{name}' requires a value, but none was supplied"
                ));
            };
            if !MULTIPLE.contains(&name.as_str()) && values.iter().any(|(seen, _)| *seen == name) {
                return Err(format!(
                    "Failed to parse arguments: The argument '{name}' was provided more than once."
                ));
            }
            values.push((name, value.to_string_lossy().into_owned()));
        } else {
            return Err(unexpected(&name));
        }
    }
    if switches.iter().any(|switch| switch == "help") {
        println!("fake-jailer: see banger_testkit::fake_jailer");
        return Ok(None);
    }
    if switches.iter().any(|switch| switch == "version") {
        println!("Jailer v1.17.0-dev (fake-jailer)");
        return Ok(None);
    }
    let single = |name: &str| {
        values
            .iter()
            .find(|(seen, _)| seen == name)
            .map(|(_, value)| value.clone())
    };
    let multiple = |name: &str| -> Vec<String> {
        values
            .iter()
            .filter(|(seen, _)| seen == name)
            .map(|(_, value)| value.clone())
            .collect()
    };
    for name in REQUIRED {
        if single(name).is_none() {
            return Err(format!(
                "Failed to parse arguments: Argument '{name}' required, but not found."
            ));
        }
    }
    let id = single("id").unwrap_or_default();
    validate_id(&id)?;
    let exec_file = PathBuf::from(single("exec-file").unwrap_or_default());
    let exec_file = std::fs::canonicalize(&exec_file).map_err(|error| {
        format!(
            "Failed to canonicalize path {}: {error}",
            exec_file.display()
        )
    })?;
    if !exec_file.is_file() {
        return Err(format!("{} is not a file", exec_file.display()));
    }
    let chroot_base = PathBuf::from(single("chroot-base-dir").unwrap_or("/srv/jailer".to_owned()));
    let chroot_base = std::fs::canonicalize(&chroot_base).map_err(|error| {
        format!(
            "Failed to canonicalize path {}: {error}",
            chroot_base.display()
        )
    })?;
    if !chroot_base.is_dir() {
        return Err(format!("{} is not a directory", chroot_base.display()));
    }
    let number = |name: &str| {
        let value = single(name).unwrap_or_default();
        value
            .parse::<u32>()
            .map_err(|_| format!("Invalid {name}: {value}"))
    };
    let (uid, gid) = (number("uid")?, number("gid")?);
    let version = single("cgroup-version").unwrap_or("1".to_owned());
    let cgroup_version = match version.as_str() {
        "1" => 1,
        "2" => 2,
        _ => return Err(format!("Invalid cgroup version: {version}")),
    };
    let mut cgroups = Vec::new();
    for cgroup in multiple("cgroup") {
        let Some((file, value)) = cgroup.split_once('=') else {
            return Err(format!("Invalid format for cgroups: {cgroup}"));
        };
        if value.is_empty() || file.split('.').filter(|part| !part.is_empty()).count() < 2 {
            return Err(format!("Invalid format for cgroups: {cgroup}"));
        }
        cgroups.push((file.to_owned(), value.to_owned()));
    }
    let parent_cgroup = single("parent-cgroup");
    if parent_cgroup.as_deref().is_some_and(|parent| {
        Path::new(parent)
            .components()
            .any(|part| !matches!(part, std::path::Component::Normal(_)))
    }) {
        return Err(format!(
            "Parent cgroup path is invalid: {}",
            parent_cgroup.unwrap_or_default()
        ));
    }
    let mut no_file = 2048;
    let mut fsize = None;
    for limit in multiple("resource-limit") {
        let Some((name, value)) = limit.split_once('=') else {
            return Err(format!("Invalid format for resource limits: {limit}"));
        };
        let value: u64 = value
            .parse()
            .map_err(|error| format!("Invalid limit value for resource: {value}: {error}"))?;
        match name {
            "no-file" => no_file = value,
            "fsize" => fsize = Some(value),
            _ => return Err(format!("Invalid resource argument: {name}")),
        }
    }
    Ok(Some(Args {
        id,
        exec_file,
        uid,
        gid,
        cgroups,
        cgroup_version,
        chroot_base,
        netns: single("netns").map(PathBuf::from),
        parent_cgroup,
        no_file,
        fsize,
        daemonize: switches.iter().any(|switch| switch == "daemonize"),
        new_pid_ns: switches.iter().any(|switch| switch == "new-pid-ns"),
        extra,
    }))
}

fn unexpected(name: &str) -> String {
    format!(
        "Failed to parse arguments: Found argument '{name}' which wasn't expected, or isn't valid in this context."
    )
}

fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("Invalid instance ID: Invalid len".to_owned());
    }
    if let Some((position, invalid)) = id
        .chars()
        .enumerate()
        .find(|(_, character)| !character.is_ascii_alphanumeric() && *character != '-')
    {
        return Err(format!(
            "Invalid instance ID: Invalid char ({invalid}) at position {position}"
        ));
    }
    Ok(())
}

enum Never {}

fn run(args: &Args) -> Result<Never, String> {
    let started_us = now_us();
    let exec_file_name = args
        .exec_file
        .file_name()
        .ok_or_else(|| {
            format!(
                "Failed to extract filename from path {}",
                args.exec_file.display()
            )
        })?
        .to_owned();
    let root = args
        .chroot_base
        .join(&exec_file_name)
        .join(&args.id)
        .join("root");
    std::fs::create_dir_all(&root)
        .map_err(|error| format!("Failed to create directory {}: {error}", root.display()))?;
    copy_exec_file(args, &root.join(&exec_file_name))?;

    set_limit(nix::sys::resource::Resource::RLIMIT_NOFILE, args.no_file)?;
    if let Some(fsize) = args.fsize {
        set_limit(nix::sys::resource::Resource::RLIMIT_FSIZE, fsize)?;
    }
    if let Some(netns) = &args.netns {
        let file = std::fs::File::open(netns)
            .map_err(|error| format!("Failed to open {}: {error}", netns.display()))?;
        nix::sched::setns(file, CloneFlags::CLONE_NEWNET)
            .map_err(|error| format!("Failed to join network namespace: {error}"))?;
    }
    setup_cgroups(args, &exec_file_name)?;

    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|error| format!("Failed to unshare into new mount namespace: {error}"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_PRIVATE | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|error| format!("Failed to change the propagation type to private: {error}"))?;
    for folder in ["", "dev", "dev/net", "run"] {
        let path = root.join(folder);
        std::fs::create_dir_all(&path)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)))
            .and_then(|()| std::os::unix::fs::chown(&path, Some(args.uid), Some(args.gid)))
            .map_err(|error| format!("Failed to set up {}: {error}", path.display()))?;
    }
    make_device(args, &root.join("dev/net/tun"), 10, 200)?;
    make_device(args, &root.join("dev/kvm"), 10, 232)?;
    if let Err(error) = make_device(args, &root.join("dev/urandom"), 1, 9) {
        println!("Warning! Could not create /dev/urandom device inside jailer: {error}.");
    }

    if args.daemonize {
        daemonize()?;
    }
    let pid_file = root.join(format!("{}.pid", exec_file_name.to_string_lossy()));
    if args.new_pid_ns {
        nix::sched::unshare(CloneFlags::CLONE_NEWPID)
            .map_err(|error| format!("Failed to clone into a new pid namespace: {error}"))?;
        // SAFETY: this process is single-threaded, so the child may do
        // anything the parent could.
        #[allow(unsafe_code)]
        let forked = unsafe { nix::unistd::fork() };
        match forked.map_err(|error| format!("Failed to clone: {error}"))? {
            ForkResult::Parent { child } => {
                write_pid(&pid_file, child.as_raw())?;
                std::process::exit(0);
            }
            ForkResult::Child => {}
        }
    } else {
        write_pid(&pid_file, nix::unistd::getpid().as_raw())?;
    }
    Err(exec(args, &root, &exec_file_name, started_us))
}

fn copy_exec_file(args: &Args, target: &Path) -> Result<(), String> {
    let mut source = std::fs::File::open(&args.exec_file)
        .map_err(|error| format!("Failed to open {}: {error}", args.exec_file.display()))?;
    let mode = source
        .metadata()
        .map_err(|error| {
            format!(
                "Failed to get metadata for {}: {error}",
                args.exec_file.display()
            )
        })?
        .permissions()
        .mode();
    let mut copy = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc_o_nofollow())
        .mode(mode)
        .open(target)
        .map_err(|error| format!("Failed to open {}: {error}", target.display()))?;
    std::os::unix::fs::fchown(&copy, Some(args.uid), Some(args.gid))
        .map_err(|error| format!("Failed to change owner for {}: {error}", target.display()))?;
    io::copy(&mut source, &mut copy)
        .and_then(|_| copy.flush())
        .map_err(|error| {
            format!(
                "Failed to copy {} to {}: {error}",
                args.exec_file.display(),
                target.display()
            )
        })?;
    Ok(())
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

fn set_limit(resource: nix::sys::resource::Resource, value: u64) -> Result<(), String> {
    nix::sys::resource::setrlimit(resource, value, value)
        .map_err(|error| format!("Failed to set resource limit: {error}"))
}

/// Step 3. With no `--cgroup`, v2 and an existing `--parent-cgroup`, the
/// real jailer moves itself into that cgroup; so does this.
fn setup_cgroups(args: &Args, exec_file_name: &std::ffi::OsStr) -> Result<(), String> {
    let parent = args
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| exec_file_name.to_string_lossy().into_owned());
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|error| format!("Failed to read /proc/mounts: {error}"))?;
    let pid = std::process::id().to_string();
    if args.cgroup_version == 2 {
        let root = mounts
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
            })
            .next()
            .ok_or("Cgroup hierarchy not found: unified")?;
        if args.cgroups.is_empty() {
            let procs = root.join(&parent).join("cgroup.procs");
            if procs.exists() {
                write(&procs, &pid)?;
            }
            return Ok(());
        }
        let location = root.join(&parent).join(&args.id);
        std::fs::create_dir_all(&location).map_err(|error| {
            format!("Failed to create directory {}: {error}", location.display())
        })?;
        for (file, _) in &args.cgroups {
            let controller = file.split('.').next().unwrap_or_default();
            let mut ancestor = location.parent();
            let mut chain = Vec::new();
            while let Some(dir) = ancestor {
                chain.push(dir.to_owned());
                if dir == root {
                    break;
                }
                ancestor = dir.parent();
            }
            for dir in chain.iter().rev() {
                write(
                    &dir.join("cgroup.subtree_control"),
                    &format!("+{controller}"),
                )?;
            }
        }
        for (file, value) in &args.cgroups {
            write(&location.join(file), value)?;
        }
        write(&location.join("cgroup.procs"), &pid)?;
    } else {
        for (file, value) in &args.cgroups {
            let controller = file.split('.').next().unwrap_or_default();
            let hierarchy = mounts
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.get(2) == Some(&"cgroup")
                        && fields.get(3).is_some_and(|options| {
                            options.split(',').any(|option| option == controller)
                        }))
                    .then(|| PathBuf::from(fields[1]))
                })
                .next()
                .ok_or_else(|| format!("Cgroup hierarchy not found: {controller}"))?;
            let location = hierarchy.join(&parent).join(&args.id);
            std::fs::create_dir_all(&location).map_err(|error| {
                format!("Failed to create directory {}: {error}", location.display())
            })?;
            write(&location.join(file), value)?;
            write(&location.join("tasks"), &pid)?;
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|error| format!("Failed to write to {}: {error}", path.display()))
}

fn make_device(args: &Args, path: &Path, major: u64, minor: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    nix::sys::stat::mknod(
        path,
        SFlag::S_IFCHR,
        Mode::S_IRUSR | Mode::S_IWUSR,
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|error| {
        format!(
            "Failed to create {} via mknod inside the jail: {error}",
            path.display()
        )
    })?;
    std::os::unix::fs::chown(path, Some(args.uid), Some(args.gid))
        .map_err(|error| format!("Failed to change owner for {}: {error}", path.display()))
}

#[allow(unsafe_code)]
fn daemonize() -> Result<(), String> {
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|error| format!("Failed to open /dev/null: {error}"))?;
    for _ in 0..2 {
        // SAFETY: single-threaded; see `run`.
        match unsafe { nix::unistd::fork() }
            .map_err(|error| format!("Failed to daemonize: {error}"))?
        {
            ForkResult::Parent { .. } => std::process::exit(0),
            ForkResult::Child => {}
        }
        let _ = nix::unistd::setsid();
    }
    for fd in 0..3 {
        nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&dev_null), fd)
            .map_err(|error| format!("Failed to duplicate fd: {error}"))?;
    }
    Ok(())
}

fn write_pid(path: &Path, pid: i32) -> Result<(), String> {
    std::fs::write(path, pid.to_string())
        .map_err(|error| format!("Failed to write to {}: {error}", path.display()))
}

/// The guest of a jailed fake-firecracker (`FAKE_FIRECRACKER_GUEST_AGENT_BIN`)
/// stands for what runs inside the VM, as root there: it cannot be started
/// by the unprivileged VMM. So, when that variable is set, a launcher is
/// forked here before privileges are dropped. It stays root, in the jail's
/// namespaces (it dies with the VMM), waits for the VMM to send the agent's
/// socket path on a socket pair, runs the agent, and exits when the agent
/// does, which the VMM sees as the end of the pair. Returns the VMM's end.
fn start_guest_launcher(
    uid: u32,
    gid: u32,
) -> Result<Option<std::os::unix::net::UnixStream>, String> {
    if std::env::var_os(crate::fake_firecracker::settings::GUEST_AGENT_BIN_VAR).is_none() {
        return Ok(None);
    }
    let (vmm_end, launcher_end) = std::os::unix::net::UnixStream::pair()
        .map_err(|error| format!("Failed to make the guest launcher's socket pair: {error}"))?;
    // SAFETY: single-threaded; see `run`.
    #[allow(unsafe_code)]
    let forked = unsafe { nix::unistd::fork() };
    match forked.map_err(|error| format!("Failed to fork the guest launcher: {error}"))? {
        ForkResult::Parent { .. } => Ok(Some(vmm_end)),
        ForkResult::Child => {
            drop(vmm_end);
            // A new program, so that its command line is not a jailer's
            // (a restarted daemon kills jailers of its state dir that no VM
            // accounts for).
            let fd = std::os::fd::AsRawFd::as_raw_fd(&launcher_end);
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            );
            let error = match std::env::current_exe() {
                Ok(exe) => Command::new(exe)
                    .arg0("fake-jailer-guest-launcher")
                    .arg(GUEST_LAUNCHER_FLAG)
                    .arg(fd.to_string())
                    .arg(uid.to_string())
                    .arg(gid.to_string())
                    .exec(),
                Err(error) => error,
            };
            eprintln!("fake-jailer: cannot start the guest launcher: {error}");
            std::process::exit(1);
        }
    }
}

/// The first argument that makes `fake-jailer` the guest launcher of
/// [`start_guest_launcher`]: `--guest-launcher FD UID GID`.
const GUEST_LAUNCHER_FLAG: &str = "--guest-launcher";

/// The guest launcher: reads the agent's socket path from FD, runs the
/// agent, exits when it does.
fn run_guest_launcher(argv: &[OsString]) -> ! {
    use std::io::BufRead;
    use std::os::fd::FromRawFd;
    let number = |index: usize| {
        argv.get(index)
            .and_then(|value| value.to_str())
            .and_then(|value| value.parse::<u32>().ok())
    };
    let (Some(fd), Some(uid), Some(gid)) = (number(0), number(1), number(2)) else {
        eprintln!("fake-jailer: usage: {GUEST_LAUNCHER_FLAG} FD UID GID");
        std::process::exit(2);
    };
    let Ok(fd) = i32::try_from(fd) else {
        std::process::exit(2);
    };
    // SAFETY: FD is the launcher's end of the socket pair, inherited from
    // `start_guest_launcher` and owned by nothing else in this process.
    #[allow(unsafe_code)]
    let launcher_end = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    let Some(binary) = std::env::var_os(crate::fake_firecracker::settings::GUEST_AGENT_BIN_VAR)
    else {
        std::process::exit(0);
    };
    let mut line = String::new();
    let mut reader = io::BufReader::new(&launcher_end);
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        std::process::exit(0);
    }
    let mut command = Command::new(binary);
    command
        .arg("--listen-unix")
        .arg(line.trim_end())
        .arg("--announce-unix")
        .arg(crate::fake_firecracker::vsock::guest_device_path(
            std::path::Path::new(line.trim_end()),
        ))
        .stdin(std::process::Stdio::null());
    if let Some(dir) = std::env::var_os(crate::fake_firecracker::settings::GUEST_AGENT_SSH_DIR_VAR)
    {
        command.arg("--ssh-config-dir").arg(dir);
    }
    if let Some(path) =
        std::env::var_os(crate::fake_firecracker::settings::GUEST_AGENT_COMMAND_PATH_VAR)
    {
        command.arg("--command-path").arg(path);
    }
    let socket = PathBuf::from(line.trim_end());
    // Watched before the agent starts, so its socket's creation wakes the
    // wait below at once.
    let created = watch_creations(&socket);
    match command.spawn() {
        Ok(mut agent) => {
            // The agent's socket is root's; the VMM bridging to it
            // is not. (In a real VM this is the vsock device.)
            for _ in 0..1000 {
                if std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).is_ok() {
                    break;
                }
                if agent.try_wait().ok().flatten().is_some() {
                    break;
                }
                wait_for_creation(created.as_ref());
            }
            let _ = agent.wait();
        }
        Err(error) => eprintln!("fake-jailer: cannot start the guest agent: {error}"),
    }
    drop(launcher_end);
    std::process::exit(0);
}

/// Entries made in `path`'s directory, one message each, from an inotify
/// watch read on a thread of its own; `None` where inotify is not available.
fn watch_creations(path: &Path) -> Option<std::sync::mpsc::Receiver<()>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    inotify
        .add_watch(
            path.parent()?,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
        )
        .ok()?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while inotify.read_events().is_ok() {
            if sender.send(()).is_err() {
                return;
            }
        }
    });
    Some(receiver)
}

/// Waits until an entry is made in the watched directory, at most 10 ms
/// (the agent may exit without making one); 10 ms without a watch.
fn wait_for_creation(watch: Option<&std::sync::mpsc::Receiver<()>>) {
    let pause = std::time::Duration::from_millis(10);
    match watch {
        Some(created) => {
            let _ = created.recv_timeout(pause);
        }
        None => std::thread::sleep(pause),
    }
}

/// Step 7; returns only on failure.
fn exec(args: &Args, root: &Path, exec_file_name: &std::ffi::OsStr, started_us: u64) -> String {
    if let Err(error) = std::env::set_current_dir(root) {
        return format!("Failed to enter {}: {error}", root.display());
    }
    let launcher = match start_guest_launcher(args.uid, args.gid) {
        Ok(launcher) => launcher,
        Err(error) => return error,
    };
    let mut launcher_fd = None;
    if let Some(launcher) = &launcher {
        let fd = std::os::fd::AsRawFd::as_raw_fd(launcher);
        if let Err(error) = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        ) {
            return format!("Failed to pass the guest launcher: {error}");
        }
        launcher_fd = Some(fd.to_string());
    }
    if let Err(error) = nix::unistd::setgroups(&[])
        .and_then(|()| nix::unistd::setgid(Gid::from_raw(args.gid)))
        .and_then(|()| nix::unistd::setuid(Uid::from_raw(args.uid)))
    {
        return format!(
            "Failed to drop privileges to {}:{}: {error}",
            args.uid, args.gid
        );
    }
    let kept: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(key, _)| key.as_bytes().starts_with(b"FAKE_FIRECRACKER_"))
        .collect();
    let program = Path::new(".").join(exec_file_name);
    let argv0 = Path::new("/").join(exec_file_name);
    let elapsed = now_us().saturating_sub(started_us).to_string();
    let mut command = Command::new(&program);
    command.env_clear().envs(kept).env(JAILED_VAR, "1");
    if let Some(fd) = launcher_fd {
        command.env(crate::fake_firecracker::settings::GUEST_LAUNCHER_FD_VAR, fd);
    }
    let error = command
        .arg0(&argv0)
        .args(["--id", &args.id])
        .args(["--start-time-us", &started_us.to_string()])
        .args(["--start-time-cpu-us", &elapsed])
        .args(["--parent-cpu-time-us", &elapsed])
        .args(&args.extra)
        .exec();
    format!("Failed to exec into {}: {error}", argv0.display())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn refuses_what_the_real_jailer_refuses() {
        assert_eq!(
            parse(&argv(&["--bogus", "1"])).unwrap_err(),
            "Failed to parse arguments: Found argument 'bogus' which wasn't expected, or isn't valid in this context."
        );
        assert_eq!(
            parse(&argv(&["--id", "x"])).unwrap_err(),
            "Failed to parse arguments: Argument 'exec-file' required, but not found."
        );
        let base = [
            "--exec-file",
            "/bin/sh",
            "--uid",
            "1",
            "--gid",
            "1",
            "--chroot-base-dir",
            "/tmp",
        ];
        let with = |extra: &[&str]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            parse(&argv(&all))
        };
        assert_eq!(
            with(&["--id", "a_b"]).unwrap_err(),
            "Invalid instance ID: Invalid char (_) at position 1"
        );
        assert_eq!(
            with(&["--id", "ab", "--cgroup-version", "2", "--cgroup", "cpu.max"]).unwrap_err(),
            "Invalid format for cgroups: cpu.max"
        );
        assert!(with(&["--id", "ab", "--cgroup-version", "3"]).is_err());
        let parsed = with(&[
            "--id",
            "ab",
            "--new-pid-ns",
            "--cgroup",
            "cpu.max=1 2",
            "--",
            "--api-sock",
            "/s",
        ])
        .unwrap()
        .unwrap();
        assert!(parsed.new_pid_ns && !parsed.daemonize);
        assert_eq!(parsed.cgroups, [("cpu.max".to_owned(), "1 2".to_owned())]);
        assert_eq!(parsed.extra, argv(&["--api-sock", "/s"]));
        assert_eq!(parsed.chroot_base, PathBuf::from("/tmp"));
    }
}
