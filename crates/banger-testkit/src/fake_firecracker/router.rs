//! Turns an HTTP request (method, path, body) into one [`VmmAction`].
//!
//! This layer only parses: it knows the paths of the yaml, deserializes the
//! body into the transcribed model and checks the path id. Whether the
//! action is legal now is the VMM's business.

use hyper::Method;
use serde::de::DeserializeOwned;

use super::models::{Drive, InstanceActionInfo, MachineConfigurationUpdate, NetworkInterface};
use super::vmm::VmmAction;

/// Longest id accepted in `/drives/{drive_id}` and
/// `/network-interfaces/{iface_id}`.
const MAX_ID_LEN: usize = 64;

/// Why a request could not be parsed; the message chain becomes
/// `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod { method: String, path: String },
    #[error("fake-firecracker does not implement {method} {path}.")]
    NotImplemented { method: String, path: String },
    #[error("Empty {method} request.")]
    EmptyBody { method: String },
    #[error("An error occurred when deserializing the json body of a request")]
    Deserialize(#[source] serde_json::Error),
    #[error("Invalid ID {id:?}: {reason}.")]
    InvalidId { id: String, reason: &'static str },
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("Unsupported Content-Type {content_type:?}: the API consumes application/json.")]
    UnsupportedContentType { content_type: String },
}

/// Parses one request.
///
/// # Errors
/// The method and path are not an API operation, the body does not match
/// the operation's model, or the path id is invalid or differs from the
/// body's.
pub fn parse_request(method: &Method, path: &str, body: &[u8]) -> Result<VmmAction, RequestError> {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let request = Request { method, body };
    match (method, segments.as_slice()) {
        (&Method::GET, [""]) => Ok(VmmAction::GetInstanceInfo),
        (&Method::GET, ["version"]) => Ok(VmmAction::GetVersion),
        (&Method::PUT, ["actions"]) => {
            let info: InstanceActionInfo = request.body()?;
            Ok(VmmAction::Action(info.action_type))
        }
        (&Method::PUT, ["boot-source"]) => Ok(VmmAction::PutBootSource(request.body()?)),
        (&Method::PUT, ["drives", drive_id]) => {
            checked_id(drive_id)?;
            let drive: Drive = request.body()?;
            if drive.drive_id != *drive_id {
                return Err(RequestError::IdMismatch);
            }
            Ok(VmmAction::PutDrive(drive))
        }
        (&Method::GET, ["machine-config"]) => Ok(VmmAction::GetMachineConfiguration),
        (&Method::PUT, ["machine-config"]) => {
            Ok(VmmAction::PutMachineConfiguration(request.body()?))
        }
        (&Method::PATCH, ["machine-config"]) => {
            let update: MachineConfigurationUpdate = request.body()?;
            if update.is_empty() {
                return Err(RequestError::EmptyBody {
                    method: method.to_string(),
                });
            }
            Ok(VmmAction::PatchMachineConfiguration(update))
        }
        (&Method::PUT, ["logger"]) => Ok(VmmAction::PutLogger(request.body()?)),
        (&Method::PUT, ["metrics"]) => Ok(VmmAction::PutMetrics(request.body()?)),
        (&Method::PUT, ["network-interfaces", iface_id]) => {
            checked_id(iface_id)?;
            let interface: NetworkInterface = request.body()?;
            if interface.iface_id != *iface_id {
                return Err(RequestError::IdMismatch);
            }
            Ok(VmmAction::PutNetworkInterface(interface))
        }
        (&Method::PUT, ["vsock"]) => Ok(VmmAction::PutVsock(request.body()?)),
        (&Method::PATCH, ["vm"]) => Ok(VmmAction::PatchVm(request.body()?)),
        (&Method::PUT, ["snapshot", "create"]) => Ok(VmmAction::CreateSnapshot(request.body()?)),
        (&Method::PUT, ["snapshot", "load"]) => Ok(VmmAction::LoadSnapshot(request.body()?)),
        (&Method::GET, ["vm", "config"]) => Ok(VmmAction::GetFullVmConfiguration),
        _ if is_unimplemented_operation(method, &segments) => Err(RequestError::NotImplemented {
            method: method.to_string(),
            path: path.to_owned(),
        }),
        _ => Err(RequestError::InvalidPathMethod {
            method: method.to_string(),
            path: path.to_owned(),
        }),
    }
}

struct Request<'a> {
    method: &'a Method,
    body: &'a [u8],
}

impl Request<'_> {
    fn body<T: DeserializeOwned>(&self) -> Result<T, RequestError> {
        if self.body.is_empty() {
            return Err(RequestError::EmptyBody {
                method: self.method.to_string(),
            });
        }
        serde_json::from_slice(self.body).map_err(RequestError::Deserialize)
    }
}

/// Operations the yaml defines but the fake does not serve; they are told
/// apart from unknown paths so a test author sees what is missing.
fn is_unimplemented_operation(method: &Method, segments: &[&str]) -> bool {
    let get = method == Method::GET;
    let put = method == Method::PUT;
    let patch = method == Method::PATCH;
    match segments {
        ["balloon"] => get || put || patch,
        ["balloon", "statistics"] => get || patch,
        ["balloon", "hinting", "start" | "stop"] => patch,
        ["balloon", "hinting", "status"] => get,
        ["cpu-config" | "entropy" | "serial"] => put,
        ["drives" | "network-interfaces", _] => patch,
        ["pmem", _] => put || patch,
        ["mmds"] | ["hotplug", "memory"] => get || put || patch,
        ["mmds", "config"] => put,
        _ => false,
    }
}

/// Ids in paths: 1 to 64 characters, alphanumeric or `_`. Not in the yaml;
/// the real API server enforces it (ids are compared with the body's
/// without URL-decoding, so anything else could never match).
fn checked_id(id: &str) -> Result<(), RequestError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.chars().count() > MAX_ID_LEN {
        "it is longer than 64 characters"
    } else if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        "it can only contain alphanumeric characters and `_`"
    } else {
        return Ok(());
    };
    Err(RequestError::InvalidId {
        id: id.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_firecracker::models::ActionType;

    fn parse(method: Method, path: &str, body: &str) -> Result<VmmAction, RequestError> {
        parse_request(&method, path, body.as_bytes())
    }

    #[test]
    fn routes_known_operations() {
        assert_eq!(
            parse(Method::GET, "/", "").unwrap(),
            VmmAction::GetInstanceInfo
        );
        assert_eq!(
            parse(
                Method::PUT,
                "/actions",
                r#"{"action_type":"InstanceStart"}"#
            )
            .unwrap(),
            VmmAction::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            parse(Method::GET, "/vm/config", "").unwrap(),
            VmmAction::GetFullVmConfiguration
        );
    }

    #[test]
    fn unknown_path_gets_the_real_message() {
        let error = parse(Method::PUT, "/nope", "{}").unwrap_err();
        assert_eq!(
            error.to_string(),
            "Invalid request method and/or path: PUT /nope."
        );
        let error = parse(Method::GET, "/boot-source", "").unwrap_err();
        assert!(matches!(error, RequestError::InvalidPathMethod { .. }));
    }

    #[test]
    fn yaml_operations_not_served_say_so() {
        let error = parse(Method::PUT, "/balloon", "{}").unwrap_err();
        assert!(
            matches!(error, RequestError::NotImplemented { .. }),
            "{error}"
        );
        let error = parse(Method::PATCH, "/drives/rootfs", "{}").unwrap_err();
        assert!(
            matches!(error, RequestError::NotImplemented { .. }),
            "{error}"
        );
    }

    #[test]
    fn empty_body_is_refused() {
        let error = parse(Method::PUT, "/boot-source", "").unwrap_err();
        assert_eq!(error.to_string(), "Empty PUT request.");
        let error = parse(Method::PATCH, "/machine-config", "{}").unwrap_err();
        assert_eq!(error.to_string(), "Empty PATCH request.");
    }

    #[test]
    fn path_id_must_match_body_and_be_well_formed() {
        let body = r#"{"drive_id":"rootfs","is_root_device":true,"path_on_host":"/x","is_read_only":false}"#;
        assert!(matches!(
            parse(Method::PUT, "/drives/other", body).unwrap_err(),
            RequestError::IdMismatch
        ));
        assert!(matches!(
            parse(Method::PUT, "/drives/root-fs", body).unwrap_err(),
            RequestError::InvalidId { .. }
        ));
        assert!(matches!(
            parse(Method::PUT, "/drives/", body).unwrap_err(),
            RequestError::InvalidId { .. }
        ));
        assert!(matches!(
            parse(Method::PUT, "/drives/rootfs", body).unwrap(),
            VmmAction::PutDrive(_)
        ));
    }

    #[test]
    fn body_errors_keep_serde_message_as_source() {
        let error = parse(
            Method::PUT,
            "/vsock",
            r#"{"guest_cid":3,"uds_path":"/v","cid":1}"#,
        )
        .unwrap_err();
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert!(source.contains("unknown field `cid`"), "{source}");
    }
}
