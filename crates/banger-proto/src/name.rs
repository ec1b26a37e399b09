//! VM name rules: a DNS label, because the name becomes `NAME.banger`.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("Name is empty")]
    Empty,
    #[error("Name `{name}` is longer than 63 characters")]
    TooLong { name: String },
    #[error("Name `{name}` may only contain lowercase letters, digits and `-`")]
    InvalidCharacter { name: String },
    #[error("Name `{name}` must start and end with a letter or digit")]
    InvalidEdge { name: String },
}

/// Checks `name` against `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`.
pub fn validate_vm_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 63 {
        return Err(NameError::TooLong {
            name: name.to_owned(),
        });
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
    {
        return Err(NameError::InvalidCharacter {
            name: name.to_owned(),
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::InvalidEdge {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for name in ["a", "0", "dev-1", "a1b2", &"x".repeat(63), "9-9"] {
            assert_eq!(validate_vm_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(validate_vm_name(""), Err(NameError::Empty));
        assert!(matches!(
            validate_vm_name(&"x".repeat(64)),
            Err(NameError::TooLong { .. })
        ));
        for name in ["Dev", "a_b", "a.b", "a b", "ä", "a/b"] {
            assert!(
                matches!(
                    validate_vm_name(name),
                    Err(NameError::InvalidCharacter { .. })
                ),
                "{name}"
            );
        }
        for name in ["-a", "a-", "-"] {
            assert!(
                matches!(validate_vm_name(name), Err(NameError::InvalidEdge { .. })),
                "{name}"
            );
        }
    }
}
