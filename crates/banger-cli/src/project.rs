//! `banger.toml`: a project's defaults for `vm create`, read from the
//! directory given to `--workspace` or from `--project FILE`. Flags given on
//! the command line win over the file.
//!
//! ```toml
//! image = "debian-12"     # image name
//! kernel = "debian-12"    # kernel name
//! vcpus = 2
//! memory = 2048           # MiB
//! work_disk = "10G"       # a size makes NAME-work; a name attaches that disk
//! workspace = true        # prepare the project's directory in the guest
//! workspace_dest = "/root/repo"
//! ports = ["8080:80", "5353:53/udp"]   # as `-p`
//! egress = "allow=*.debian.org,10.0.0.0/8"   # as `--egress`
//! network_group = "backend"
//! ```
//!
//! Every key is optional; any other key is refused, naming it and the file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::error::{hinted, Hint as _, UsageError};

/// The file `vm create --workspace DIR` looks for in `DIR`.
pub const FILE_NAME: &str = "banger.toml";

/// The keys a project file may have, in the order the docs list them.
pub const KEYS: &[&str] = &[
    "image",
    "kernel",
    "vcpus",
    "memory",
    "work_disk",
    "workspace",
    "workspace_dest",
    "ports",
    "egress",
    "network_group",
];

/// A parsed `banger.toml`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub image: Option<String>,
    pub kernel: Option<String>,
    pub vcpus: Option<u8>,
    /// Memory in MiB.
    pub memory: Option<u32>,
    pub work_disk: Option<String>,
    /// Whether `vm create` prepares the project's directory as the VM's
    /// workspace (default: yes).
    pub workspace: Option<bool>,
    pub workspace_dest: Option<String>,
    /// Published ports, each as `-p` takes it.
    #[serde(default, deserialize_with = "ports")]
    pub ports: Option<Vec<banger_proto::PublishedPort>>,
    /// The egress policy, as `--egress` takes it.
    #[serde(default, deserialize_with = "egress")]
    pub egress: Option<banger_proto::EgressPolicy>,
    pub network_group: Option<String>,
}

fn ports<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<banger_proto::PublishedPort>>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| {
            banger_proto::PublishedPort::parse(text)
                .map_err(|error| serde::de::Error::custom(format!("ports: {error}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn egress<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<banger_proto::EgressPolicy>, D::Error> {
    let text = String::deserialize(deserializer)?;
    banger_proto::EgressPolicy::parse(&text)
        .map(Some)
        .map_err(|error| serde::de::Error::custom(format!("egress: {error}")))
}

/// A project file and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub path: PathBuf,
    pub project: Project,
}

impl Loaded {
    /// The directory the file is in: the workspace it describes.
    pub fn directory(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned)
    }
}

/// Parses `text`, the contents of `path`. Errors are one line naming the
/// file and what was wrong (an unknown key by name).
pub fn parse(path: &Path, text: &str) -> anyhow::Result<Project> {
    let table: toml::Table = toml::from_str(text).map_err(|error| {
        hinted(
            UsageError(format!("{}: {}", path.display(), one_line(&error, text))),
            "the file is TOML: `key = value` lines, strings in quotes",
        )
    })?;
    if let Some(key) = table.keys().find(|key| !KEYS.contains(&key.as_str())) {
        return Err(hinted(
            UsageError(format!("{}: unknown key `{key}`", path.display())),
            format!("a project file may set {}", KEYS.join(", ")),
        ));
    }
    Project::deserialize(toml::Value::Table(table)).map_err(|error| {
        hinted(
            UsageError(format!("{}: {}", path.display(), error.message().trim())),
            "README.md, \"Project file\", lists the keys and their types",
        )
    })
}

/// `line N: message` for a TOML syntax error.
fn one_line(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Reads and parses the project file at `path`.
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read the project file {}", path.display()))
        .hint("check the path given to --project; it is read by you, from this directory")?;
    Ok(Loaded {
        path: path.to_owned(),
        project: parse(path, &text)?,
    })
}

/// `DIR/banger.toml` when it exists.
pub fn find(directory: &Path) -> anyhow::Result<Option<Loaded>> {
    let path = directory.join(FILE_NAME);
    if path.is_file() {
        load(&path).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_parses() {
        let project = parse(
            Path::new("banger.toml"),
            "image = \"debian-12\"\nkernel = \"k\"\nvcpus = 2\nmemory = 2048\nwork_disk = \"10G\"\nworkspace = false\nworkspace_dest = \"/srv/app\"\nports = [\"8080:80\", \"0.0.0.0:5353:53/udp\"]\negress = \"allow=*.debian.org,10.0.0.0/8\"\nnetwork_group = \"backend\"\n",
        )
        .unwrap();
        assert_eq!(
            project,
            Project {
                image: Some("debian-12".into()),
                kernel: Some("k".into()),
                vcpus: Some(2),
                memory: Some(2048),
                work_disk: Some("10G".into()),
                workspace: Some(false),
                workspace_dest: Some("/srv/app".into()),
                ports: Some(vec![
                    banger_proto::PublishedPort::parse("8080:80").unwrap(),
                    banger_proto::PublishedPort::parse("0.0.0.0:5353:53/udp").unwrap(),
                ]),
                egress: Some(
                    banger_proto::EgressPolicy::parse("allow=*.debian.org,10.0.0.0/8").unwrap()
                ),
                network_group: Some("backend".into()),
            }
        );
        assert_eq!(parse(Path::new("b"), "").unwrap(), Project::default());
    }

    fn message(text: &str) -> String {
        let error = parse(Path::new("/repo/banger.toml"), text).unwrap_err();
        assert!(crate::error::links(&error)
            .iter()
            .any(|link| link.is::<UsageError>()));
        assert!(crate::error::hint(&error).is_some());
        banger_proto::error_chain(error.as_ref())
    }

    #[test]
    fn unknown_keys_and_bad_values_are_one_line_naming_the_file() {
        assert_eq!(
            message("image = \"x\"\nmemroy = 512\n"),
            "/repo/banger.toml: unknown key `memroy`"
        );
        assert_eq!(
            message("[vm]\nimage = \"x\"\n"),
            "/repo/banger.toml: unknown key `vm`"
        );
        let bad_type = message("vcpus = \"two\"\n");
        assert!(
            bad_type.starts_with("/repo/banger.toml: ") && bad_type.contains("string"),
            "{bad_type}"
        );
        assert!(!bad_type.contains('\n'));
        let syntax = message("image = \n");
        assert!(
            syntax.starts_with("/repo/banger.toml: line 1: "),
            "{syntax}"
        );
        assert!(!syntax.contains('\n'));
        let port = message("ports = [\"80\"]\n");
        assert!(port.starts_with("/repo/banger.toml: ports: "), "{port}");
        let egress = message("egress = \"sometimes\"\n");
        assert!(
            egress.starts_with("/repo/banger.toml: egress: "),
            "{egress}"
        );
    }
}
