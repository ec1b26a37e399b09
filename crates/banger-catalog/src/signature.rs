//! Detached PGP signatures, checked with `gpgv` against admin-chosen keyrings.
//!
//! `gpgv` is the verifier an administrator already trusts for this (Debian's
//! apt and kernel.org's instructions use it): it only verifies, has no trust
//! database and touches no `~/.gnupg` state. The keyrings are binary OpenPGP
//! keyrings or keyboxes (`gpg --export KEY > keyring.gpg`, or
//! `gpg --dearmor` for an armored key); armored `.asc` files are not
//! accepted by `gpgv`.
//!
//! Verification runs `gpgv --status-fd 1 --keyring K1 --keyring K2 … -- SIG FILE`
//! and succeeds only when `gpgv` exits 0 and reports `VALIDSIG`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use url::Url;

use crate::download::{DownloadError, Downloader};

/// The program run; a daemon may point this elsewhere with
/// [`verify_signature_with`].
pub const GPGV: &str = "gpgv";

/// A good signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSignature {
    /// The signing key's fingerprint, as `gpgv` reported it.
    pub fingerprint: String,
}

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("No keyring is configured to verify {signature}")]
    NoKeyrings { signature: PathBuf },
    #[error("Keyring {path} does not exist")]
    KeyringMissing { path: PathBuf },
    #[error("Could not run {program} (install the gpgv package)")]
    RunGpgv {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("Signature {signature} was made by key {key_id}, which is in none of the configured keyrings")]
    UnknownKey { signature: PathBuf, key_id: String },
    #[error("Bad signature: {signature} does not match {file} ({details})")]
    BadSignature {
        file: PathBuf,
        signature: PathBuf,
        /// What `gpgv` said, trimmed to its last lines.
        details: String,
    },
}

/// Checks the detached `signature` over `file` with `gpgv` against
/// `keyrings` (at least one).
pub async fn verify_signature(
    file: &Path,
    signature: &Path,
    keyrings: &[impl AsRef<Path>],
) -> Result<VerifiedSignature, SignatureError> {
    verify_signature_with(GPGV, file, signature, keyrings).await
}

/// The largest detached signature fetched.
const SIGNATURE_LIMIT: u64 = 64 * 1024;

/// Why a signature fetched from a URL was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum RemoteSignatureError {
    #[error("Could not fetch the signature {url}")]
    Fetch {
        url: Url,
        #[source]
        source: DownloadError,
    },
    #[error("Could not write the signature to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Verify(#[from] SignatureError),
}

/// Fetches the detached signature at `signature_url` (a catalog's
/// `signature_url`) next to `file` as `FILE.sig`, verifies it with
/// [`verify_signature`], and removes it again whatever the outcome.
pub async fn verify_signature_from_url(
    downloader: &Downloader,
    file: &Path,
    signature_url: &Url,
    keyrings: &[impl AsRef<Path>],
) -> Result<VerifiedSignature, RemoteSignatureError> {
    let signature = downloader
        .fetch_bytes(signature_url, SIGNATURE_LIMIT)
        .await
        .map_err(|source| RemoteSignatureError::Fetch {
            url: signature_url.clone(),
            source,
        })?;
    let mut signature_path = file.as_os_str().to_owned();
    signature_path.push(".sig");
    let signature_path = PathBuf::from(signature_path);
    tokio::fs::write(&signature_path, &signature)
        .await
        .map_err(|source| RemoteSignatureError::Write {
            path: signature_path.clone(),
            source,
        })?;
    let verified = verify_signature(file, &signature_path, keyrings).await;
    let _ = tokio::fs::remove_file(&signature_path).await;
    Ok(verified?)
}

/// [`verify_signature`] with an explicit `gpgv` program path.
pub async fn verify_signature_with(
    program: &str,
    file: &Path,
    signature: &Path,
    keyrings: &[impl AsRef<Path>],
) -> Result<VerifiedSignature, SignatureError> {
    if keyrings.is_empty() {
        return Err(SignatureError::NoKeyrings {
            signature: signature.to_owned(),
        });
    }
    let mut command = tokio::process::Command::new(program);
    command.arg("--status-fd").arg("1");
    for keyring in keyrings {
        let keyring = keyring.as_ref();
        if !keyring.is_file() {
            return Err(SignatureError::KeyringMissing {
                path: keyring.to_owned(),
            });
        }
        // gpgv reads a keyring name without a slash as relative to its home
        // directory; an absolute path means exactly this file.
        let keyring = std::path::absolute(keyring).unwrap_or_else(|_| keyring.to_owned());
        command.arg("--keyring").arg(keyring);
    }
    command
        .arg("--")
        .arg(signature)
        .arg(file)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = command
        .output()
        .await
        .map_err(|source| SignatureError::RunGpgv {
            program: program.to_owned(),
            source,
        })?;
    let status_lines = String::from_utf8_lossy(&output.stdout);
    let status = |keyword: &str| {
        status_lines.lines().find_map(|line| {
            let rest = line.strip_prefix("[GNUPG:] ")?;
            let (word, arguments) = rest.split_once(' ').unwrap_or((rest, ""));
            (word == keyword).then(|| arguments.to_owned())
        })
    };
    if output.status.success() {
        if let Some(arguments) = status("VALIDSIG") {
            let fingerprint = arguments.split(' ').next().unwrap_or_default().to_owned();
            return Ok(VerifiedSignature { fingerprint });
        }
    }
    if let Some(arguments) = status("NO_PUBKEY") {
        return Err(SignatureError::UnknownKey {
            signature: signature.to_owned(),
            key_id: arguments.trim().to_owned(),
        });
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut details: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    if details.len() > 3 {
        details.drain(..details.len() - 3);
    }
    let details = if details.is_empty() {
        format!("gpgv exited with {}", output.status)
    } else {
        details.join("; ")
    };
    Err(SignatureError::BadSignature {
        file: file.to_owned(),
        signature: signature.to_owned(),
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway signing key in its own GNUPGHOME, and its exported
    /// keyring. The agent gpg starts is stopped on drop.
    struct TestKey {
        home: tempfile::TempDir,
        keyring: PathBuf,
    }

    impl TestKey {
        fn generate(user: &str) -> Option<Self> {
            let home = tempfile::tempdir().unwrap();
            // gpg warns about a home directory others can read.
            std::fs::set_permissions(
                home.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o700),
            )
            .unwrap();
            let generated = std::process::Command::new("gpg")
                .env("GNUPGHOME", home.path())
                .args([
                    "--batch",
                    "--passphrase",
                    "",
                    "--quick-gen-key",
                    user,
                    "ed25519",
                    "sign",
                    "never",
                ])
                .output();
            match generated {
                Ok(output) if output.status.success() => {}
                Ok(output) => panic!(
                    "gpg --quick-gen-key failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ),
                Err(error) => {
                    eprintln!(
                        "skipping: gpg is not installed ({error}); apt-get install gnupg gpgv"
                    );
                    return None;
                }
            }
            let keyring = home.path().join("exported.gpg");
            let exported = std::process::Command::new("gpg")
                .env("GNUPGHOME", home.path())
                .args(["--batch", "--output"])
                .arg(&keyring)
                .args(["--export", user])
                .status()
                .unwrap();
            assert!(exported.success());
            Some(Self { home, keyring })
        }

        fn sign(&self, file: &Path) -> PathBuf {
            let signature = file.with_extension("detached");
            let signed = std::process::Command::new("gpg")
                .env("GNUPGHOME", self.home.path())
                .args([
                    "--batch",
                    "--yes",
                    "--pinentry-mode",
                    "loopback",
                    "--passphrase",
                    "",
                    "--detach-sign",
                    "--output",
                ])
                .arg(&signature)
                .arg(file)
                .status()
                .unwrap();
            assert!(signed.success());
            signature
        }
    }

    impl Drop for TestKey {
        fn drop(&mut self) {
            let _ = std::process::Command::new("gpgconf")
                .env("GNUPGHOME", self.home.path())
                .args(["--kill", "gpg-agent"])
                .status();
        }
    }

    fn gpgv_available() -> bool {
        let found = std::process::Command::new(GPGV)
            .arg("--version")
            .output()
            .is_ok();
        if !found {
            eprintln!("skipping: gpgv is not installed; apt-get install gpgv");
        }
        found
    }

    #[tokio::test]
    async fn good_and_bad_signatures() {
        if !gpgv_available() {
            return;
        }
        let Some(trusted) = TestKey::generate("Banger Test <trusted@banger.test>") else {
            return;
        };
        let Some(stranger) = TestKey::generate("Stranger <stranger@banger.test>") else {
            return;
        };
        let files = tempfile::tempdir().unwrap();
        let kernel = files.path().join("vmlinux");
        std::fs::write(&kernel, b"a kernel image").unwrap();
        let signature = trusted.sign(&kernel);

        let verified = verify_signature(&kernel, &signature, &[&trusted.keyring])
            .await
            .unwrap();
        assert_eq!(verified.fingerprint.len(), 40, "{verified:?}");

        // The catalog flow: the signature comes from a URL.
        let signature_url = Url::from_file_path(&signature).unwrap();
        let downloader = Downloader::allowing_http().unwrap();
        verify_signature_from_url(&downloader, &kernel, &signature_url, &[&trusted.keyring])
            .await
            .unwrap();
        assert!(!files.path().join("vmlinux.sig").exists());

        // Any one of several keyrings may hold the key.
        verify_signature(&kernel, &signature, &[&stranger.keyring, &trusted.keyring])
            .await
            .unwrap();

        std::fs::write(&kernel, b"a tampered kernel image").unwrap();
        let error = verify_signature(&kernel, &signature, &[&trusted.keyring])
            .await
            .unwrap_err();
        assert!(
            matches!(error, SignatureError::BadSignature { .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("Bad signature:"), "{error}");

        std::fs::write(&kernel, b"a kernel image").unwrap();
        let error = verify_signature(&kernel, &signature, &[&stranger.keyring])
            .await
            .unwrap_err();
        assert!(
            matches!(error, SignatureError::UnknownKey { .. }),
            "{error}"
        );

        let garbage = files.path().join("garbage.sig");
        std::fs::write(&garbage, b"not a signature").unwrap();
        let error = verify_signature(&kernel, &garbage, &[&trusted.keyring])
            .await
            .unwrap_err();
        assert!(
            matches!(error, SignatureError::BadSignature { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn configuration_errors_are_clear() {
        let files = tempfile::tempdir().unwrap();
        let file = files.path().join("f");
        let no_keyrings: [&Path; 0] = [];
        assert!(matches!(
            verify_signature(&file, &file, &no_keyrings).await,
            Err(SignatureError::NoKeyrings { .. })
        ));
        assert!(matches!(
            verify_signature(&file, &file, &[files.path().join("missing.gpg")]).await,
            Err(SignatureError::KeyringMissing { .. })
        ));
        std::fs::write(&file, b"x").unwrap();
        let error = verify_signature_with("/nonexistent/gpgv", &file, &file, &[&file])
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("install the gpgv package"),
            "{error}"
        );
    }
}
