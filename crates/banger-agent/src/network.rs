//! The guest's network, from `banger.net=` on the kernel command line (format
//! in `banger_net::cmdline`; nothing depends on DHCP).
//!
//! 1. Parse `banger.net=`; absent means the VM has no network to configure.
//! 2. Pick the interface: the one whose MAC is `mac=`, else the first
//!    non-loopback one by name, waiting up to [`INTERFACE_WAIT`] for the
//!    driver to create it.
//! 3. Over netlink: `lo` up, the address with its prefix, the interface up,
//!    the default route through `gw` (replaced if one exists).
//! 4. Write `/etc/resolv.conf` (`search` domain, `nameserver`s) when
//!    `banger.net=` names any, through a temp file and a rename (which also
//!    replaces a symlink to a resolver that is not running).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_net::cmdline::{CmdlineError, GuestNetwork};
use futures_util::TryStreamExt;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

/// How long to wait for the network interface to appear.
pub const INTERFACE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Invalid network on the kernel command line")]
    Parse(#[source] CmdlineError),
    #[error("No network interface{} appeared within {waited:?}", .mac.as_ref().map(|mac| format!(" with MAC {mac}")).unwrap_or_default())]
    NoInterface {
        mac: Option<String>,
        waited: Duration,
    },
    #[error("Failed to open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("Failed to find interface {name} over netlink")]
    FindLink {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Interface {name} disappeared before it was configured")]
    NoSuchLink { name: String },
    #[error("Failed to {action} on {name}")]
    Configure {
        action: String,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Failed to write {path}")]
    WriteResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub interface: String,
    pub network: GuestNetwork,
}

/// The interface to configure among `/sys/class/net`'s entries at
/// `sys_class_net`: by MAC when given, else the first non-`lo` by name.
#[must_use]
pub fn choose_interface(sys_class_net: &Path, network: &GuestNetwork) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    match network.mac {
        Some(mac) => {
            let wanted = mac.to_string();
            names.into_iter().find(|name| {
                std::fs::read_to_string(sys_class_net.join(name).join("address"))
                    .is_ok_and(|address| address.trim().eq_ignore_ascii_case(&wanted))
            })
        }
        None => names.into_iter().next(),
    }
}

/// `/etc/resolv.conf` for `network`; `None` when it names no DNS server
/// and no domain (the file is then left alone).
#[must_use]
pub fn resolv_conf(network: &GuestNetwork) -> Option<String> {
    if network.dns.is_empty() && network.domain.is_none() {
        return None;
    }
    let mut text =
        String::from("# Written by banger-agent from banger.net= on the kernel command line.\n");
    if let Some(domain) = &network.domain {
        text.push_str(&format!("search {domain}\n"));
    }
    for server in &network.dns {
        text.push_str(&format!("nameserver {server}\n"));
    }
    Some(text)
}

/// Writes `contents` to `path` through a temp file and a rename.
fn write_replacing(path: &Path, contents: &str) -> Result<(), NetworkError> {
    let error = |source| NetworkError::WriteResolvConf {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("banger-tmp");
    std::fs::write(&temporary, contents).map_err(error)?;
    std::fs::rename(&temporary, path).map_err(|source| {
        let _ = std::fs::remove_file(&temporary);
        error(source)
    })
}

/// Steps 1–4 for `cmdline` (the text of `/proc/cmdline`). `Ok(None)` when
/// there is no `banger.net=`.
///
/// # Errors
/// A malformed `banger.net=`, no interface, a netlink or file failure.
pub async fn apply(
    cmdline: &str,
    sys_class_net: &Path,
    resolv_conf_path: &Path,
) -> Result<Option<Applied>, NetworkError> {
    let Some(network) = GuestNetwork::from_kernel_cmdline(cmdline).map_err(NetworkError::Parse)?
    else {
        return Ok(None);
    };
    let deadline = Instant::now() + INTERFACE_WAIT;
    let interface = loop {
        if let Some(interface) = choose_interface(sys_class_net, &network) {
            break interface;
        }
        if Instant::now() >= deadline {
            return Err(NetworkError::NoInterface {
                mac: network.mac.map(|mac| mac.to_string()),
                waited: INTERFACE_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    configure_link(&interface, &network).await?;
    if let Some(text) = resolv_conf(&network) {
        write_replacing(resolv_conf_path, &text)?;
    }
    Ok(Some(Applied { interface, network }))
}

/// Moves a running guest's network to `network` (a restored copy's new
/// identity): the first interface by name (its MAC is its source's) gets
/// `network`'s MAC, loses its other IPv4 addresses and is configured as by
/// [`apply`].
pub async fn move_to(
    network: &GuestNetwork,
    sys_class_net: &Path,
    resolv_conf_path: &Path,
) -> Result<String, NetworkError> {
    let by_name = GuestNetwork {
        mac: None,
        ..network.clone()
    };
    let interface = choose_interface(sys_class_net, &by_name).ok_or(NetworkError::NoInterface {
        mac: None,
        waited: Duration::ZERO,
    })?;
    let (connection, handle, _messages) =
        rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    let connection = tokio::spawn(connection);
    let result = async {
        let configure = |action: &str| {
            let action = action.to_owned();
            let name = interface.clone();
            move |source| NetworkError::Configure {
                action,
                name,
                source,
            }
        };
        let index = link_index(&handle, &interface).await?;
        if let Some(mac) = network.mac {
            handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .address(mac.octets().to_vec())
                        .build(),
                )
                .execute()
                .await
                .map_err(configure(&format!("set the MAC address {mac}")))?;
        }
        let mut addresses = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut old = Vec::new();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(configure("list addresses"))?
        {
            if message.header.family == rtnetlink::packet_route::AddressFamily::Inet {
                old.push(message);
            }
        }
        for message in old {
            handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(configure("remove an old address"))?;
        }
        Ok(())
    }
    .await;
    connection.abort();
    result?;
    configure_link(&interface, network).await?;
    if let Some(text) = resolv_conf(network) {
        write_replacing(resolv_conf_path, &text)?;
    }
    Ok(interface)
}

async fn configure_link(interface: &str, network: &GuestNetwork) -> Result<(), NetworkError> {
    let (connection, handle, _messages) =
        rtnetlink::new_connection().map_err(NetworkError::Connect)?;
    let connection = tokio::spawn(connection);
    let result = async {
        let configure = |action: &str| {
            let action = action.to_owned();
            move |source| NetworkError::Configure {
                action,
                name: interface.to_owned(),
                source,
            }
        };
        if let Ok(lo) = link_index(&handle, "lo").await {
            let _ = handle
                .link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await;
        }
        let index = link_index(&handle, interface).await?;
        let added = handle
            .address()
            .add(index, IpAddr::V4(network.address), network.prefix_len)
            .execute()
            .await;
        match added {
            Err(rtnetlink::Error::NetlinkError(message))
                if message.code.map(|code| -code.get()) == Some(libc::EEXIST) => {}
            other => other.map_err(configure(&format!(
                "add address {}/{}",
                network.address, network.prefix_len
            )))?,
        }
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(configure("set the link up"))?;
        handle
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(network.gateway)
                    .output_interface(index)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(configure(&format!(
                "add the default route via {}",
                network.gateway
            )))?;
        Ok(())
    }
    .await;
    connection.abort();
    result
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<u32, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(NetworkError::NoSuchLink {
            name: name.to_owned(),
        }),
        Err(source) => Err(NetworkError::FindLink {
            name: name.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(value: &str) -> GuestNetwork {
        GuestNetwork::parse_value(value).unwrap()
    }

    #[test]
    fn resolv_conf_lists_domain_and_servers_in_order() {
        let text = resolv_conf(&network(
            "ip=172.30.0.5/24,gw=172.30.0.1,dns=172.30.0.1,dns=9.9.9.9,domain=banger",
        ))
        .unwrap();
        assert!(text.ends_with("search banger\nnameserver 172.30.0.1\nnameserver 9.9.9.9\n"));
        assert_eq!(
            resolv_conf(&network("ip=172.30.0.5/24,gw=172.30.0.1")),
            None
        );
    }

    #[test]
    fn interface_is_found_by_mac_or_first_name() {
        let directory = tempfile::tempdir().unwrap();
        for (name, mac) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth1", "06:00:00:00:00:02"),
            ("eth0", "06:00:00:00:00:01"),
        ] {
            std::fs::create_dir(directory.path().join(name)).unwrap();
            std::fs::write(
                directory.path().join(name).join("address"),
                format!("{mac}\n"),
            )
            .unwrap();
        }
        let by_name = network("ip=10.0.0.2/24,gw=10.0.0.1");
        assert_eq!(
            choose_interface(directory.path(), &by_name).as_deref(),
            Some("eth0")
        );
        let by_mac = network("ip=10.0.0.2/24,gw=10.0.0.1,mac=06:00:00:00:00:02");
        assert_eq!(
            choose_interface(directory.path(), &by_mac).as_deref(),
            Some("eth1")
        );
        let unknown = network("ip=10.0.0.2/24,gw=10.0.0.1,mac=06:00:00:00:00:09");
        assert_eq!(choose_interface(directory.path(), &unknown), None);
    }

    #[tokio::test]
    async fn absent_or_malformed_network_is_reported() {
        let directory = tempfile::tempdir().unwrap();
        let resolv = directory.path().join("resolv.conf");
        assert_eq!(
            apply("console=ttyS0", directory.path(), &resolv)
                .await
                .unwrap(),
            None
        );
        let error = apply("banger.net=ip=1.2.3.4", directory.path(), &resolv)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "Invalid network on the kernel command line"
        );
        assert!(!resolv.exists());
    }

    #[test]
    fn resolv_conf_replaces_a_dangling_symlink() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub-resolv.conf", &path).unwrap();
        write_replacing(&path, "nameserver 10.0.0.1\n").unwrap();
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "nameserver 10.0.0.1\n"
        );
    }
}
