//! What the daemon trusts from a catalog: with keyrings configured, only
//! files with a signature that verifies; plain http only when the config
//! says so.

use std::path::{Path, PathBuf};

use banger_testkit::test_daemon::{
    binary, make_ext4, serve_directory, sha256_hex, write_fake_kernel, TestDaemon,
};

/// A throwaway GnuPG home with one key, its public keyring exported.
struct TestKey {
    home: tempfile::TempDir,
    keyring: PathBuf,
}

impl TestKey {
    fn generate() -> Option<Self> {
        let home = tempfile::tempdir().unwrap();
        let generated = std::process::Command::new("gpg")
            .env("GNUPGHOME", home.path())
            .args([
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase",
                "",
                "--quick-gen-key",
                "Catalog <catalog@banger.test>",
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
                eprintln!("SKIPPED: gpg is not installed ({error}); apt-get install gnupg gpgv");
                return None;
            }
        }
        let keyring = home.path().join("catalog.gpg");
        let exported = std::process::Command::new("gpg")
            .env("GNUPGHOME", home.path())
            .args(["--batch", "--output"])
            .arg(&keyring)
            .args(["--export", "catalog@banger.test"])
            .status()
            .unwrap();
        assert!(exported.success());
        Some(Self { home, keyring })
    }

    /// Writes `FILE.sig`, a detached signature over `file`.
    fn sign(&self, file: &Path) {
        let mut signature = file.as_os_str().to_owned();
        signature.push(".sig");
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
            .arg(signature)
            .arg(file)
            .status()
            .unwrap();
        assert!(signed.success());
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

/// A site with an image, a kernel and an initrd (`base.ext4`, `vmlinux`,
/// `initrd`), served on loopback; returns the port.
fn site(daemon: &TestDaemon, key: Option<&TestKey>, catalog: impl Fn(&Path) -> String) -> u16 {
    let site = daemon.dir.path().join("site");
    std::fs::create_dir(&site).unwrap();
    make_ext4(&site.join("base.ext4"), 32);
    write_fake_kernel(&site.join("vmlinux"));
    std::fs::write(site.join("initrd"), b"an initrd").unwrap();
    if let Some(key) = key {
        for file in ["base.ext4", "vmlinux", "initrd"] {
            key.sign(&site.join(file));
        }
    }
    std::fs::write(site.join("catalog.toml"), catalog(&site)).unwrap();
    serve_directory(&site)
}

fn sizes(site: &Path) -> (u64, String, String, String) {
    (
        std::fs::metadata(site.join("base.ext4")).unwrap().len(),
        sha256_hex(&site.join("base.ext4")),
        sha256_hex(&site.join("vmlinux")),
        sha256_hex(&site.join("initrd")),
    )
}

fn names(daemon: &TestDaemon, kind: &str) -> Vec<String> {
    daemon
        .banger_json(&[kind, "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn with_a_keyring_only_entries_signed_throughout_are_pulled() {
    let Some(key) = TestKey::generate() else {
        return;
    };
    let mut daemon = TestDaemon::new(&[]);
    let port = site(&daemon, Some(&key), |site| {
        let (image_size, image_sha, kernel_sha, initrd_sha) = sizes(site);
        format!(
            r#"[[images]]
name = "signed"
version = "1"
url = "base.ext4"
size = {image_size}
sha256 = "{image_sha}"
signature_url = "base.ext4.sig"

[[images]]
name = "plain"
version = "1"
url = "base.ext4"
size = {image_size}
sha256 = "{image_sha}"

[[images]]
name = "forged"
version = "1"
url = "base.ext4"
size = {image_size}
sha256 = "{image_sha}"
signature_url = "vmlinux.sig"

[[kernels]]
name = "signed"
version = "1"
url = "vmlinux"
size = 4096
sha256 = "{kernel_sha}"
signature_url = "vmlinux.sig"
initrd_url = "initrd"
initrd_sha256 = "{initrd_sha}"
initrd_signature_url = "initrd.sig"

[[kernels]]
name = "halfsigned"
version = "1"
url = "vmlinux"
size = 4096
sha256 = "{kernel_sha}"
signature_url = "vmlinux.sig"
initrd_url = "initrd"
initrd_sha256 = "{initrd_sha}"

[[kernels]]
name = "plain"
version = "1"
url = "vmlinux"
size = 4096
sha256 = "{kernel_sha}"
"#
        )
    });
    let mut config = std::fs::read_to_string(&daemon.config).unwrap();
    config.push_str(&format!(
        "\n[catalog]\nurl = \"http://127.0.0.1:{port}/catalog.toml\"\nallow_insecure_http = true\nkeyrings = [\"{}\"]\n",
        key.keyring.display()
    ));
    std::fs::write(&daemon.config, config).unwrap();
    daemon.start();

    let refused = |kind: &str, name: &str, expected: &str| {
        let output = daemon.banger(&[kind, "pull", name]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{kind} {name}: {stderr}");
        assert!(stderr.contains(expected), "{kind} {name}: {stderr}");
        stderr.into_owned()
    };
    let stderr = refused(
        "image",
        "plain",
        "Image `plain` in the catalog has no signature for its image, and `[catalog] keyrings` requires one",
    );
    assert!(stderr.contains("remove `[catalog] keyrings`"), "{stderr}");
    refused(
        "kernel",
        "plain",
        "Kernel `plain` in the catalog has no signature for its kernel, and",
    );
    refused(
        "kernel",
        "halfsigned",
        "Kernel `halfsigned` in the catalog has no signature for its initrd",
    );
    refused(
        "image",
        "forged",
        "Image `forged` failed signature verification of its image",
    );
    daemon.banger_ok(&["image", "pull", "signed"]);
    daemon.banger_ok(&["kernel", "pull", "signed"]);
    assert_eq!(names(&daemon, "image"), ["signed"]);
    assert_eq!(names(&daemon, "kernel"), ["signed"]);
    let kernel = daemon.banger_json(&["kernel", "show", "signed"]);
    assert!(kernel["initrd_path"].is_string(), "{kernel}");
    daemon.assert_no_leaks();
}

#[test]
fn plain_http_catalogs_need_the_opt_in() {
    let daemon = TestDaemon::new(&[]);
    let port = site(&daemon, None, |site| {
        let (image_size, image_sha, _, _) = sizes(site);
        format!(
            "[[images]]\nname = \"base\"\nversion = \"1\"\nurl = \"base.ext4\"\nsize = {image_size}\nsha256 = \"{image_sha}\"\n"
        )
    });
    let url = format!("http://127.0.0.1:{port}/catalog.toml");
    let base_config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        format!("{base_config}\n[catalog]\nurl = \"{url}\"\n"),
    )
    .unwrap();
    let output = std::process::Command::new(binary("bangerd"))
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error_lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("error"))
        .collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(
        error_lines[0].contains(&format!(
            "`catalog.url` {url} is plain http; use https, or set `catalog.allow_insecure_http = true`"
        )),
        "{stderr}"
    );
    assert!(!daemon.socket.exists());

    let mut daemon = daemon;
    std::fs::write(
        &daemon.config,
        format!("{base_config}\n[catalog]\nurl = \"{url}\"\nallow_insecure_http = true\n"),
    )
    .unwrap();
    daemon.start();
    daemon.banger_ok(&["image", "pull", "base"]);
    assert_eq!(names(&daemon, "image"), ["base"]);
    daemon.assert_no_leaks();
}
