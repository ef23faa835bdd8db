//! Kernel WireGuard over generic netlink (wireguard-uapi's Linux client).
//! The request building is pure and unit-tested; the socket calls need a
//! kernel with the WireGuard module.

use std::net::IpAddr;

use neli::err::NlError;
use wireguard_uapi::{
    DeviceInterface, WgSocket,
    err::SetDeviceError,
    linux::set::{self, WgDeviceF, WgPeerF},
};

use super::{
    backend::{ApplyCost, BackendError, actual_from},
    reconcile::{Actual, OpKind, Plan},
};

/// A kernel WireGuard device.
#[derive(Debug)]
pub struct Kernel {
    interface: String,
}

impl Kernel {
    /// The kernel device named `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
        }
    }

    /// Reads the device.
    pub fn get(&self) -> Result<Actual, BackendError> {
        let mut socket = WgSocket::connect().map_err(|e| self.error("connecting for", e))?;
        let device = socket
            .get_device(DeviceInterface::from_name(self.interface.as_str()))
            .map_err(|e| self.error("reading", e))?;
        Ok(actual_from(device))
    }

    /// Applies `plan`: the listen port alone first, then the rest.
    pub fn apply(&self, plan: &Plan) -> Result<ApplyCost, BackendError> {
        let mut socket = WgSocket::connect().map_err(|e| self.error("connecting for", e))?;
        let allowed: Vec<Vec<IpAddr>> = allowed_addrs(plan);
        let mut cost = ApplyCost::default();
        for request in requests(&self.interface, plan, &allowed) {
            cost.requests += 1;
            let port = request.listen_port;
            socket.set_device(request).map_err(|e| match port {
                Some(port) if errno(&e) == Some(libc::EADDRINUSE) => {
                    BackendError::PortInUse { port }
                }
                _ => self.error("configuring", e),
            })?;
        }
        Ok(cost)
    }

    fn error(
        &self,
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> BackendError {
        BackendError::Netlink {
            op,
            interface: self.interface.clone(),
            source: Box::new(source),
        }
    }
}

/// The errno of a request the kernel refused (netlink carries it negated).
fn errno(error: &SetDeviceError) -> Option<i32> {
    match error {
        SetDeviceError::NlError(NlError::Nlmsgerr(refused)) => Some(refused.error.abs()),
        _ => None,
    }
}

/// The addresses of each op's allowed IPs, kept alive for the borrowed
/// netlink requests.
pub fn allowed_addrs(plan: &Plan) -> Vec<Vec<IpAddr>> {
    plan.peers
        .iter()
        .map(|op| {
            op.allowed_ips
                .iter()
                .flatten()
                .map(|net| net.addr())
                .collect()
        })
        .collect()
}

/// The netlink requests for `plan`: the listen port alone first, then the
/// private key and peers. Pure: what a plan becomes on the kernel.
pub fn requests<'a>(
    interface: &'a str,
    plan: &'a Plan,
    allowed: &'a [Vec<IpAddr>],
) -> Vec<set::Device<'a>> {
    let mut out = Vec::new();
    if let Some(port) = plan.listen_port {
        out.push(set::Device::from_ifname(interface).listen_port(port));
    }
    if plan.private_key.is_none()
        && plan.peers.is_empty()
        && !plan.replace_peers
        && plan.fwmark.is_none()
    {
        return out;
    }
    let mut device = set::Device::from_ifname(interface);
    if let Some(mark) = plan.fwmark {
        device = device.fwmark(mark);
    }
    if plan.replace_peers {
        device = device.flags(vec![WgDeviceF::ReplacePeers]);
    }
    if let Some(key) = &plan.private_key {
        device = device.private_key(key.as_bytes());
    }
    let peers = plan
        .peers
        .iter()
        .zip(allowed)
        .map(|(op, addrs)| {
            let mut peer = set::Peer::from_public_key(op.public_key.as_bytes());
            let mut flags = Vec::new();
            match op.kind {
                OpKind::Remove => return peer.flags(vec![WgPeerF::RemoveMe]),
                OpKind::Update => flags.push(WgPeerF::UpdateOnly),
                OpKind::Add => {}
            }
            if let Some(psk) = &op.preshared_key {
                peer = peer.preshared_key(psk.as_bytes());
            }
            if let Some(endpoint) = &op.endpoint {
                peer = peer.endpoint(endpoint);
            }
            if let Some(interval) = op.persistent_keepalive {
                peer = peer.persistent_keepalive_interval(interval);
            }
            if let Some(nets) = &op.allowed_ips {
                flags.push(WgPeerF::ReplaceAllowedIps);
                peer = peer.allowed_ips(
                    nets.iter()
                        .zip(addrs)
                        .map(|(net, addr)| set::AllowedIp {
                            ipaddr: addr,
                            cidr_mask: Some(net.prefix_len()),
                        })
                        .collect(),
                );
            }
            peer.flags(flags)
        })
        .collect();
    out.push(device.peers(peers));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{key::Key, reconcile::PeerOp};

    fn op(kind: OpKind, n: u8) -> PeerOp {
        PeerOp {
            kind,
            public_key: Key::new([n; 32]),
            preshared_key: Some(Key::new([0; 32])),
            persistent_keepalive: Some(0),
            endpoint: Some("198.51.100.2:51820".parse().unwrap()),
            allowed_ips: Some(vec![
                "10.0.0.2/32".parse().unwrap(),
                "2001:db8::/64".parse().unwrap(),
            ]),
        }
    }

    #[test]
    fn builds_the_same_operations_as_the_uapi_path() {
        let plan = Plan {
            fwmark: None,
            listen_port: Some(51820),
            private_key: Some(Key::new([9; 32])),
            replace_peers: false,
            peers: vec![
                op(OpKind::Add, 1),
                op(OpKind::Update, 2),
                op(OpKind::Remove, 3),
            ],
        };
        let allowed = allowed_addrs(&plan);
        let requests = requests("wg0", &plan, &allowed);
        assert_eq!(requests.len(), 2);

        let port = &requests[0];
        assert_eq!(port.listen_port, Some(51820));
        assert!(port.private_key.is_none() && port.peers.is_empty());

        let main = &requests[1];
        assert!(matches!(&main.interface, DeviceInterface::Name(n) if n == "wg0"));
        assert_eq!(main.private_key, Some(&[9; 32]));
        assert_eq!(main.listen_port, None);
        let [add, update, remove] = &main.peers[..] else {
            panic!("three peers: {:?}", main.peers);
        };
        assert_eq!(add.public_key, &[1; 32]);
        assert_eq!(add.flags, vec![WgPeerF::ReplaceAllowedIps]);
        assert_eq!(add.preshared_key, Some(&[0; 32]));
        assert_eq!(add.persistent_keepalive_interval, Some(0));
        assert_eq!(
            add.endpoint.map(ToString::to_string).as_deref(),
            Some("198.51.100.2:51820")
        );
        let ips: Vec<String> = add
            .allowed_ips
            .iter()
            .map(|ip| format!("{}/{}", ip.ipaddr, ip.cidr_mask.unwrap()))
            .collect();
        assert_eq!(ips, ["10.0.0.2/32", "2001:db8::/64"]);
        assert_eq!(
            update.flags,
            vec![WgPeerF::UpdateOnly, WgPeerF::ReplaceAllowedIps]
        );
        assert_eq!(remove.flags, vec![WgPeerF::RemoveMe]);
        assert!(remove.allowed_ips.is_empty() && remove.endpoint.is_none());
    }

    #[test]
    fn replacing_every_peer_is_one_message_with_the_flag() {
        let plan = Plan {
            replace_peers: true,
            peers: vec![op(OpKind::Add, 1)],
            ..Plan::default()
        };
        let allowed = allowed_addrs(&plan);
        let built = requests("wg0", &plan, &allowed);
        assert_eq!(built.len(), 1);
        assert_eq!(built[0].flags, vec![WgDeviceF::ReplacePeers]);
        assert_eq!(built[0].peers.len(), 1);
        let none = Plan {
            replace_peers: true,
            ..Plan::default()
        };
        let built = requests("wg0", &none, &[]);
        assert_eq!(built.len(), 1, "an empty replacement removes every peer");
        assert!(built[0].peers.is_empty());
    }

    #[test]
    fn only_a_kernel_refusal_carries_an_errno() {
        let other = SetDeviceError::NlError(NlError::Msg("socket closed".into()));
        assert_eq!(errno(&other), None);
    }

    #[test]
    fn an_empty_plan_sends_nothing() {
        let plan = Plan::default();
        assert!(requests("wg0", &plan, &[]).is_empty());
    }
}
