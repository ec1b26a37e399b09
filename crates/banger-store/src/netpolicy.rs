//! Published ports and network policies (egress, group) of VMs.

use std::net::Ipv4Addr;

use banger_proto::{EgressPolicy, Protocol, PublishedPort};
use rusqlite::params;

use crate::{Store, StoreError};

/// Whether two published ports would answer the same packets: the same
/// protocol and port on the same address, or either on every address.
#[must_use]
pub fn ports_overlap(left: &PublishedPort, right: &PublishedPort) -> bool {
    left.protocol == right.protocol
        && left.host_port == right.host_port
        && (left.host_ip == right.host_ip
            || left.host_ip.is_unspecified()
            || right.host_ip.is_unspecified())
}

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        table: "published_ports",
        detail,
    }
}

impl Store {
    /// Publishes `port` for `vm_id`, unless a published port of any VM
    /// overlaps it: then the name of that VM and its port (`Ok(Err(..))`).
    pub fn add_port(
        &self,
        vm_id: &str,
        port: &PublishedPort,
    ) -> Result<Result<(), (String, PublishedPort)>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection.transaction()?;
        let existing = {
            let mut statement = transaction.prepare(
                "SELECT vms.name, p.host_ip, p.host_port, p.guest_port, p.protocol
                 FROM published_ports p JOIN vms ON vms.id = p.vm_id",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, u16>(2)?,
                    row.get::<_, u16>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (name, host_ip, host_port, guest_port, protocol) in existing {
            let other = port_from_columns(&host_ip, host_port, guest_port, &protocol)?;
            if ports_overlap(&other, port) {
                return Ok(Err((name, other)));
            }
        }
        transaction.execute(
            "INSERT INTO published_ports (vm_id, host_ip, host_port, guest_port, protocol)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                vm_id,
                port.host_ip.to_string(),
                port.host_port,
                port.guest_port,
                port.protocol.as_str()
            ],
        )?;
        transaction.commit()?;
        Ok(Ok(()))
    }

    /// Stops publishing `port` for `vm_id`; whether it was published.
    pub fn remove_port(&self, vm_id: &str, port: &PublishedPort) -> Result<bool, StoreError> {
        Ok(self.lock().execute(
            "DELETE FROM published_ports WHERE vm_id = ?1 AND host_ip = ?2 AND host_port = ?3
             AND guest_port = ?4 AND protocol = ?5",
            params![
                vm_id,
                port.host_ip.to_string(),
                port.host_port,
                port.guest_port,
                port.protocol.as_str()
            ],
        )? > 0)
    }

    /// Stops publishing every port of `vm_id`.
    pub fn remove_ports_of(&self, vm_id: &str) -> Result<(), StoreError> {
        self.lock()
            .execute("DELETE FROM published_ports WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// Every published port as (VM id, port), ordered.
    pub fn list_ports(&self) -> Result<Vec<(String, PublishedPort)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT vm_id, host_ip, host_port, guest_port, protocol FROM published_ports
             ORDER BY protocol, host_port, host_ip",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, u16>(2)?,
                row.get::<_, u16>(3)?,
                row.get::<_, String>(4)?,
            ))
        })?;
        let mut ports = Vec::new();
        for row in rows {
            let (vm_id, host_ip, host_port, guest_port, protocol) = row?;
            ports.push((
                vm_id,
                port_from_columns(&host_ip, host_port, guest_port, &protocol)?,
            ));
        }
        Ok(ports)
    }

    /// The ports published for `vm_id`.
    pub fn ports_of(&self, vm_id: &str) -> Result<Vec<PublishedPort>, StoreError> {
        Ok(self
            .list_ports()?
            .into_iter()
            .filter(|(id, _)| id == vm_id)
            .map(|(_, port)| port)
            .collect())
    }

    /// Records `vm_id`'s egress policy and network group.
    pub fn set_network_policy(
        &self,
        vm_id: &str,
        egress: &EgressPolicy,
        group: Option<&str>,
    ) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT INTO network_policies (vm_id, egress, network_group) VALUES (?1, ?2, ?3)
             ON CONFLICT (vm_id) DO UPDATE SET egress = ?2, network_group = ?3",
            params![vm_id, egress.to_string(), group],
        )?;
        Ok(())
    }

    /// Every VM's egress policy and group that is not the default
    /// (allow-all, no group), by VM id.
    pub fn list_network_policies(
        &self,
    ) -> Result<Vec<(String, EgressPolicy, Option<String>)>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT vm_id, egress, network_group FROM network_policies ORDER BY vm_id")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut policies = Vec::new();
        for row in rows {
            let (vm_id, egress, group) = row?;
            let egress = EgressPolicy::parse(&egress).map_err(|detail| StoreError::Corrupt {
                table: "network_policies",
                detail,
            })?;
            policies.push((vm_id, egress, group));
        }
        Ok(policies)
    }

    /// `vm_id`'s egress policy and group (allow-all and none when unset).
    pub fn network_policy(
        &self,
        vm_id: &str,
    ) -> Result<(EgressPolicy, Option<String>), StoreError> {
        Ok(self
            .list_network_policies()?
            .into_iter()
            .find(|(id, _, _)| id == vm_id)
            .map(|(_, egress, group)| (egress, group))
            .unwrap_or_default())
    }
}

fn port_from_columns(
    host_ip: &str,
    host_port: u16,
    guest_port: u16,
    protocol: &str,
) -> Result<PublishedPort, StoreError> {
    Ok(PublishedPort {
        host_ip: host_ip
            .parse::<Ipv4Addr>()
            .map_err(|_| corrupt(format!("host address {host_ip:?}")))?,
        host_port,
        guest_port,
        protocol: Protocol::parse(protocol)
            .ok_or_else(|| corrupt(format!("protocol {protocol:?}")))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rules() {
        let port = PublishedPort::parse("8080:80").unwrap();
        assert!(ports_overlap(
            &port,
            &PublishedPort::parse("127.0.0.1:8080:81").unwrap()
        ));
        assert!(ports_overlap(
            &port,
            &PublishedPort::parse("0.0.0.0:8080:80").unwrap()
        ));
        assert!(!ports_overlap(
            &port,
            &PublishedPort::parse("8080:80/udp").unwrap()
        ));
        assert!(!ports_overlap(
            &port,
            &PublishedPort::parse("10.0.0.1:8080:80").unwrap()
        ));
        assert!(!ports_overlap(
            &port,
            &PublishedPort::parse("8081:80").unwrap()
        ));
    }
}
