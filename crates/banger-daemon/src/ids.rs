//! Identifiers and timestamps.

use rand::Rng;

/// A random 16-hex-digit id (64 bits): short enough for socket paths, and
/// any unique prefix of it names the object.
pub fn new_id() -> String {
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// Now, as RFC 3339 UTC with second precision.
pub fn now() -> String {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// An image or kernel name [`validate_artifact_name`] refused.
#[derive(Debug, thiserror::Error)]
#[error("Invalid {artifact} name `{name}`: use up to 64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit")]
pub struct InvalidArtifactName {
    /// `image` or `kernel`.
    pub artifact: &'static str,
    pub name: String,
}

/// Image and kernel names: lowercase letters, digits, `.`, `_`, `-`, up to 64
/// characters, starting with a letter or digit.
pub fn validate_artifact_name(
    artifact: &'static str,
    name: &str,
) -> Result<(), InvalidArtifactName> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit())
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'.' | b'_' | b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(InvalidArtifactName {
            artifact,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_16_hex_digits_and_distinct() {
        let first = new_id();
        assert_eq!(first.len(), 16);
        assert!(first.bytes().all(|byte| byte.is_ascii_hexdigit()));
        assert_ne!(first, new_id());
    }

    #[test]
    fn artifact_names() {
        for name in ["default", "debian-12", "v6.1.0_cloud", "1"] {
            assert!(validate_artifact_name("image", name).is_ok(), "{name}");
        }
        for name in ["", "Debian", "-x", "a/b", "../x", &"a".repeat(65)] {
            assert!(validate_artifact_name("image", name).is_err(), "{name}");
        }
    }

    #[test]
    fn now_is_rfc3339() {
        let text = now();
        assert!(text.ends_with('Z'), "{text}");
        assert!(
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
    }
}
