//! The VMM backends a VM can run on.

use serde::{Deserialize, Serialize};

/// A VMM backend. A VM keeps the one it was created with; on the wire, in
/// the store and on the command line it is its lowercase name.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Firecracker,
    Qemu,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Self::Firecracker, Self::Qemu];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firecracker => "firecracker",
            Self::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A name that is no [`Backend`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown backend `{name}`: use firecracker or qemu")]
pub struct UnknownBackend {
    pub name: String,
}

impl std::str::FromStr for Backend {
    type Err = UnknownBackend;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|backend| backend.as_str() == name)
            .ok_or_else(|| UnknownBackend {
                name: name.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for backend in Backend::ALL {
            assert_eq!(backend.as_str().parse::<Backend>(), Ok(backend));
            assert_eq!(backend.to_string(), backend.as_str());
            assert_eq!(
                serde_json::to_value(backend).unwrap(),
                serde_json::Value::from(backend.as_str())
            );
        }
    }

    #[test]
    fn unknown_names_are_refused_naming_them() {
        let error = "Qemu".parse::<Backend>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "Unknown backend `Qemu`: use firecracker or qemu"
        );
        let error = serde_json::from_str::<Backend>(r#""xen""#).unwrap_err();
        assert!(error.to_string().contains("`xen`"), "{error}");
    }
}
