//! The operator API (`tidegate.admin.v1`) on Core's local Unix socket:
//! requests go to the store through the state thread; status and failover
//! go to the gateway links.

pub mod socket;

use std::{sync::Arc, time::Duration};

use tidegate_proto::admin::v1::{self as admin, admin_server::Admin};
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    leader::Leadership,
    links::{Directory, GatewayCommand, GatewayState, Live},
    now_ms,
    state::StateHandle,
    store::{Store, StoreError, db::Backend},
};

/// How long `CoreStatus` waits for the store (the roster).
const STATUS_STORE_WAIT: Duration = Duration::from_secs(2);
/// How long `Failover` waits for the master's answer.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: StateHandle,
    directory: watch::Receiver<Arc<Directory>>,
    /// Core's TLS files, for its certificates' status.
    pki: watch::Receiver<Live>,
    core_id: String,
    leadership: watch::Receiver<Leadership>,
}

impl AdminService {
    pub fn new(
        state: StateHandle,
        directory: watch::Receiver<Arc<Directory>>,
        pki: watch::Receiver<Live>,
        core_id: String,
        leadership: watch::Receiver<Leadership>,
    ) -> Self {
        Self {
            state,
            directory,
            pki,
            core_id,
            leadership,
        }
    }

    /// Runs a store job, mapping its error to a gRPC status.
    async fn store<T, F>(&self, job: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.state
            .call(job)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .map(Response::new)
            .map_err(status)
    }
}

/// The gRPC status of a store error.
pub fn status(error: StoreError) -> Status {
    let message = crate::error_chain(&error);
    let error = match error {
        StoreError::Batch { source, .. } => *source,
        other => other,
    };
    match error {
        StoreError::Invalid { .. } => Status::invalid_argument(message),
        StoreError::NotFound { .. } => Status::not_found(message),
        StoreError::Exists { .. } | StoreError::IdentityTaken { .. } => {
            Status::already_exists(message)
        }
        StoreError::InUse(_) => Status::failed_precondition(message),
        StoreError::NotLeader(_) => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

fn certificate(status: tidegate_proto::expiry::CertStatus) -> admin::Certificate {
    admin::Certificate {
        path: status.path,
        serial: status.serial,
        not_after_unix: status.not_after_unix,
        expiry: status.expiry,
        days_left: status.days_left,
    }
}

fn deleted(name: String) -> admin::Deleted {
    admin::Deleted { name }
}

/// A gateway's status from its link state.
fn gateway_status(gateway: admin::Gateway, state: Option<&GatewayState>) -> admin::GatewayStatus {
    let mut out = admin::GatewayStatus {
        name: gateway.name,
        address: gateway.address,
        enabled: gateway.enabled,
        ..Default::default()
    };
    let Some(state) = state else {
        out.link_error = if gateway.enabled {
            "not dialled yet".into()
        } else {
            "disabled".into()
        };
        return out;
    };
    out.connected = state.connected;
    out.since_unix_ms = state.since_ms;
    out.last_seen_unix_ms = state.last_seen_ms;
    out.link_error = state.link_error.clone();
    if let Some(hello) = &state.hello {
        out.gateway_id = hello.gateway_id;
        out.software_version = hello.software_version.clone();
        out.cert_not_after_unix_s = hello.cert_not_after_unix_s;
    }
    out.applied_version = state.applied_version;
    out.apply_error = state
        .apply_error
        .as_ref()
        .filter(|(v, _)| *v > state.applied_version)
        .map(|(v, e)| format!("version {v}: {e}"))
        .unwrap_or_default();
    if let Some(ha) = &state.ha {
        out.ha = true;
        out.role = ha.role.clone();
        out.priority = ha.priority;
        out.effective_priority = ha.effective_priority;
        out.healthy = ha.healthy;
        out.faults = ha.faults.clone();
        out.master_id = ha.master_id;
        out.maintenance = ha.maintenance;
    }
    out.peers = state.peers;
    out.peers_recent_handshake = state.peers_recent_handshake;
    out.status_unix_ms = state.status_ms;
    out
}

impl AdminService {
    fn edge_with_state(&self, mut edge: admin::Edge) -> admin::Edge {
        let directory = self.directory.borrow();
        match directory.edges.get(&edge.name) {
            Some(handle) => {
                let state = handle.state.borrow();
                edge.connected = state.connected;
                edge.since_unix_ms = state.since_ms;
                edge.link_error = state.link_error.clone();
                edge.requests = state.requests;
                edge.cert_not_after_unix_s = state.cert_not_after_unix_s;
            }
            None if edge.enabled => edge.link_error = "not dialled yet".into(),
            None => edge.link_error = "disabled".into(),
        }
        edge
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_location(
        &self,
        request: Request<admin::CreateLocationRequest>,
    ) -> Result<Response<admin::Location>, Status> {
        let req = request.into_inner();
        info!(location = %req.name, "creating a location");
        self.store(move |s| s.create_location(req, now_ms())).await
    }

    async fn list_locations(
        &self,
        _: Request<admin::ListLocationsRequest>,
    ) -> Result<Response<admin::ListLocationsResponse>, Status> {
        self.store(|s| {
            Ok(admin::ListLocationsResponse {
                locations: s.list_locations()?,
            })
        })
        .await
    }

    async fn get_location(
        &self,
        request: Request<admin::GetLocationRequest>,
    ) -> Result<Response<admin::Location>, Status> {
        let name = request.into_inner().name;
        self.store(move |s| s.location(&name)).await
    }

    async fn update_location(
        &self,
        request: Request<admin::UpdateLocationRequest>,
    ) -> Result<Response<admin::Location>, Status> {
        let req = request.into_inner();
        info!(location = %req.name, "changing a location");
        self.store(move |s| s.update_location(req)).await
    }

    async fn delete_location(
        &self,
        request: Request<admin::DeleteLocationRequest>,
    ) -> Result<Response<admin::Deleted>, Status> {
        let name = request.into_inner().name;
        info!(location = %name, "deleting a location");
        self.store(move |s| s.delete_location(&name).map(|()| deleted(name)))
            .await
    }

    async fn location_status(
        &self,
        request: Request<admin::LocationStatusRequest>,
    ) -> Result<Response<admin::LocationStatusResponse>, Status> {
        let name = request.into_inner().name;
        let (location, gateways, sessions) = self
            .store(move |s| {
                let location = s.location(&name)?;
                let gateways = s.list_gateways(&name)?;
                let sessions = if location.mfa {
                    s.list_devices("", &name)?
                        .iter()
                        .filter(|d| d.mfa_session)
                        .count()
                } else {
                    0
                };
                Ok((location, gateways, sessions))
            })
            .await?
            .into_inner();
        let directory = self.directory.borrow().clone();
        let gateways = gateways
            .into_iter()
            .map(|gateway| {
                let state = directory
                    .gateways
                    .get(&gateway.name)
                    .map(|h| h.state.borrow().clone());
                gateway_status(gateway, state.as_ref())
            })
            .collect();
        Ok(Response::new(admin::LocationStatusResponse {
            location: Some(location),
            gateways,
            mfa_sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
        }))
    }

    async fn failover(
        &self,
        request: Request<admin::FailoverRequest>,
    ) -> Result<Response<admin::FailoverResponse>, Status> {
        let name = request.into_inner().location;
        let lookup = name.clone();
        let location = self
            .store(move |s| s.location_id(&lookup))
            .await?
            .into_inner();
        let (master, roles) = {
            let directory = self.directory.borrow();
            let mut master = None;
            let mut roles = Vec::new();
            for gateway in directory.location(location) {
                let state = gateway.state.borrow();
                let role = match (state.connected, state.role()) {
                    (false, _) => "not connected".to_owned(),
                    (true, None) => "no HA".to_owned(),
                    (true, Some(role)) => role.to_owned(),
                };
                if state.connected && state.role() == Some("master") {
                    master = Some(gateway.clone());
                }
                roles.push(format!("{} {role}", gateway.target.name));
            }
            (master, roles)
        };
        let Some(master) = master else {
            return Err(Status::unavailable(format!(
                "location {name:?} has no connected MASTER to hand over ({})",
                if roles.is_empty() {
                    "no enabled gateways".to_owned()
                } else {
                    roles.join(", ")
                }
            )));
        };
        info!(location = %name, gateway = %master.target.name, "asking the master for a planned handover");
        let (reply, answer) = oneshot::channel();
        master
            .commands
            .send(GatewayCommand::Failover { reply })
            .await
            .map_err(|_| Status::unavailable("the master's link is closing"))?;
        match tokio::time::timeout(FAILOVER_TIMEOUT, answer).await {
            Ok(Ok(Ok(()))) => Ok(Response::new(admin::FailoverResponse {
                gateway: master.target.name.clone(),
            })),
            Ok(Ok(Err(error))) => Err(Status::failed_precondition(format!(
                "gateway {} refused the handover: {error}",
                master.target.name
            ))),
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the link to {} went down before it answered",
                master.target.name
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "gateway {} did not answer within {FAILOVER_TIMEOUT:?}",
                master.target.name
            ))),
        }
    }

    async fn create_gateway(
        &self,
        request: Request<admin::CreateGatewayRequest>,
    ) -> Result<Response<admin::Gateway>, Status> {
        let req = request.into_inner();
        info!(gateway = %req.name, location = %req.location, "adding a gateway");
        self.store(move |s| s.create_gateway(req, now_ms())).await
    }

    async fn list_gateways(
        &self,
        request: Request<admin::ListGatewaysRequest>,
    ) -> Result<Response<admin::ListGatewaysResponse>, Status> {
        let location = request.into_inner().location;
        self.store(move |s| {
            Ok(admin::ListGatewaysResponse {
                gateways: s.list_gateways(&location)?,
            })
        })
        .await
    }

    async fn get_gateway(
        &self,
        request: Request<admin::GetGatewayRequest>,
    ) -> Result<Response<admin::Gateway>, Status> {
        let name = request.into_inner().name;
        self.store(move |s| s.gateway(&name)).await
    }

    async fn update_gateway(
        &self,
        request: Request<admin::UpdateGatewayRequest>,
    ) -> Result<Response<admin::Gateway>, Status> {
        let req = request.into_inner();
        info!(gateway = %req.name, "changing a gateway");
        self.store(move |s| s.update_gateway(req)).await
    }

    async fn delete_gateway(
        &self,
        request: Request<admin::DeleteGatewayRequest>,
    ) -> Result<Response<admin::Deleted>, Status> {
        let name = request.into_inner().name;
        info!(gateway = %name, "deleting a gateway");
        self.store(move |s| s.delete_gateway(&name).map(|()| deleted(name)))
            .await
    }

    async fn create_user(
        &self,
        request: Request<admin::CreateUserRequest>,
    ) -> Result<Response<admin::UserWithSecret>, Status> {
        let req = request.into_inner();
        info!(user = %req.name, "creating a user");
        self.store(move |s| s.create_user(req, now_ms())).await
    }

    async fn list_users(
        &self,
        _: Request<admin::ListUsersRequest>,
    ) -> Result<Response<admin::ListUsersResponse>, Status> {
        self.store(|s| {
            Ok(admin::ListUsersResponse {
                users: s.list_users()?,
            })
        })
        .await
    }

    async fn get_user(
        &self,
        request: Request<admin::GetUserRequest>,
    ) -> Result<Response<admin::User>, Status> {
        let name = request.into_inner().name;
        self.store(move |s| s.user(&name)).await
    }

    async fn update_user(
        &self,
        request: Request<admin::UpdateUserRequest>,
    ) -> Result<Response<admin::UserWithSecret>, Status> {
        let req = request.into_inner();
        info!(user = %req.name, reset_totp = req.reset_totp, "changing a user");
        self.store(move |s| s.update_user(req)).await
    }

    async fn delete_user(
        &self,
        request: Request<admin::DeleteUserRequest>,
    ) -> Result<Response<admin::Deleted>, Status> {
        let name = request.into_inner().name;
        info!(user = %name, "deleting a user");
        self.store(move |s| s.delete_user(&name).map(|()| deleted(name)))
            .await
    }

    async fn create_device(
        &self,
        request: Request<admin::CreateDeviceRequest>,
    ) -> Result<Response<admin::Device>, Status> {
        let req = request.into_inner();
        info!(device = %req.name, user = %req.user, location = %req.location, "adding a device");
        self.store(move |s| s.create_device(req, now_ms())).await
    }

    async fn create_devices(
        &self,
        request: Request<admin::CreateDevicesRequest>,
    ) -> Result<Response<admin::CreateDevicesResponse>, Status> {
        let devices = request.into_inner().devices;
        info!(count = devices.len(), "adding devices");
        self.store(move |s| {
            let created = s.create_devices(devices, now_ms())?;
            Ok(admin::CreateDevicesResponse {
                created: u32::try_from(created).unwrap_or(u32::MAX),
            })
        })
        .await
    }

    async fn list_devices(
        &self,
        request: Request<admin::ListDevicesRequest>,
    ) -> Result<Response<admin::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        self.store(move |s| {
            Ok(admin::ListDevicesResponse {
                devices: s.list_devices(&req.user, &req.location)?,
            })
        })
        .await
    }

    async fn get_device(
        &self,
        request: Request<admin::GetDeviceRequest>,
    ) -> Result<Response<admin::Device>, Status> {
        let name = request.into_inner().name;
        self.store(move |s| s.device(&name)).await
    }

    async fn update_device(
        &self,
        request: Request<admin::UpdateDeviceRequest>,
    ) -> Result<Response<admin::Device>, Status> {
        let req = request.into_inner();
        info!(device = %req.name, "changing a device");
        self.store(move |s| s.update_device(req)).await
    }

    async fn delete_device(
        &self,
        request: Request<admin::DeleteDeviceRequest>,
    ) -> Result<Response<admin::Deleted>, Status> {
        let name = request.into_inner().name;
        info!(device = %name, "deleting a device");
        self.store(move |s| s.delete_device(&name).map(|()| deleted(name)))
            .await
    }

    async fn create_download_token(
        &self,
        request: Request<admin::CreateDownloadTokenRequest>,
    ) -> Result<Response<admin::DownloadToken>, Status> {
        let req = request.into_inner();
        info!(device = %req.device, "issuing a config download token");
        self.store(move |s| s.create_download_token(req, now_ms()))
            .await
    }

    async fn get_device_config(
        &self,
        request: Request<admin::GetDeviceConfigRequest>,
    ) -> Result<Response<admin::DeviceConfig>, Status> {
        let name = request.into_inner().name;
        self.store(move |s| s.device_config(&name)).await
    }

    async fn create_edge(
        &self,
        request: Request<admin::CreateEdgeRequest>,
    ) -> Result<Response<admin::Edge>, Status> {
        let req = request.into_inner();
        info!(edge = %req.name, "adding an Edge");
        let edge = self
            .store(move |s| s.create_edge(req, now_ms()))
            .await?
            .into_inner();
        Ok(Response::new(self.edge_with_state(edge)))
    }

    async fn list_edges(
        &self,
        _: Request<admin::ListEdgesRequest>,
    ) -> Result<Response<admin::ListEdgesResponse>, Status> {
        let edges = self.store(|s| s.list_edges()).await?.into_inner();
        Ok(Response::new(admin::ListEdgesResponse {
            edges: edges.into_iter().map(|e| self.edge_with_state(e)).collect(),
        }))
    }

    async fn get_edge(
        &self,
        request: Request<admin::GetEdgeRequest>,
    ) -> Result<Response<admin::Edge>, Status> {
        let name = request.into_inner().name;
        let edge = self.store(move |s| s.edge(&name)).await?.into_inner();
        Ok(Response::new(self.edge_with_state(edge)))
    }

    async fn update_edge(
        &self,
        request: Request<admin::UpdateEdgeRequest>,
    ) -> Result<Response<admin::Edge>, Status> {
        let req = request.into_inner();
        info!(edge = %req.name, "changing an Edge");
        let edge = self.store(move |s| s.update_edge(req)).await?.into_inner();
        Ok(Response::new(self.edge_with_state(edge)))
    }

    async fn delete_edge(
        &self,
        request: Request<admin::DeleteEdgeRequest>,
    ) -> Result<Response<admin::Deleted>, Status> {
        let name = request.into_inner().name;
        info!(edge = %name, "deleting an Edge");
        self.store(move |s| s.delete_edge(&name).map(|()| deleted(name)))
            .await
    }

    async fn core_certificates(
        &self,
        _request: Request<admin::CoreCertificatesRequest>,
    ) -> Result<Response<admin::CoreCertificatesResponse>, Status> {
        let status = self
            .pki
            .borrow()
            .pki
            .status(tidegate_proto::expiry::now_unix());
        Ok(Response::new(admin::CoreCertificatesResponse {
            certificate: Some(certificate(status.own)),
            ca: Some(certificate(status.ca)),
        }))
    }

    async fn core_status(
        &self,
        _request: Request<admin::CoreStatusRequest>,
    ) -> Result<Response<admin::CoreStatusResponse>, Status> {
        let lead = self.leadership.borrow().clone();
        let (gateways_connected, gateways, edges_connected, edges) =
            self.directory.borrow().counts();
        let this = admin::CoreNode {
            core_id: self.core_id.clone(),
            leading: lead.leading,
            term: lead.term,
            seen_unix_ms: now_ms(),
            gateways_connected,
            gateways,
            edges_connected,
            edges,
        };
        let asked = self.state.call(|s| {
            let backend = match s.backend() {
                Backend::Sqlite => "sqlite",
                Backend::Postgres => "postgres",
            };
            (backend, s.database().to_string(), s.roster())
        });
        // A store held up by a database that does not answer must not hold
        // up this answer: this Core's own line is known without it.
        let (backend, database, roster) = match tokio::time::timeout(STATUS_STORE_WAIT, asked).await
        {
            Ok(answer) => answer.map_err(|e| Status::unavailable(e.to_string()))?,
            Err(_) => (
                "",
                String::new(),
                Err(StoreError::InUse(format!(
                    "the store did not answer within {STATUS_STORE_WAIT:?} (the database is slow or away)"
                ))),
            ),
        };
        // The roster read may fail (the database is away): this Core's own
        // line is known all the same, and the failure is said.
        let mut problem = lead.problem;
        let mut cores = roster.unwrap_or_else(|e| {
            if problem.is_empty() {
                problem = format!("reading the other Cores: {}", crate::error_chain(&e));
            }
            Vec::new()
        });
        cores.retain(|c| c.core_id != self.core_id);
        for core in &mut cores {
            // A line from before the last takeover (a Core that died
            // leading) does not lead at the term this Core knows.
            core.leading &= core.term >= lead.term;
        }
        cores.push(this);
        cores.sort_by(|a, b| a.core_id.cmp(&b.core_id));
        Ok(Response::new(admin::CoreStatusResponse {
            core_id: self.core_id.clone(),
            backend: backend.into(),
            database,
            term: lead.term,
            leading: lead.leading,
            leader: lead.leader.unwrap_or_default(),
            problem,
            cores,
        }))
    }

    async fn list_events(
        &self,
        request: Request<admin::ListEventsRequest>,
    ) -> Result<Response<admin::ListEventsResponse>, Status> {
        let req = request.into_inner();
        self.store(move |s| {
            Ok(admin::ListEventsResponse {
                events: s.list_events(&req.location, req.limit)?,
            })
        })
        .await
    }
}
