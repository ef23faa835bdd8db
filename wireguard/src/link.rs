//! The WireGuard interface as a network link, through rtnetlink: find it,
//! create it (kernel WireGuard), and bring its addresses, MTU and state to
//! what the config says. Never deletes the link.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard};

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{op} {interface}")]
    Netlink {
        op: &'static str,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// What the kernel reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    /// `wireguard` for the kernel module, `tun` for wireguard-go.
    pub kind: Option<String>,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// What [`Links::configure`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChanges {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    pub mtu: Option<u32>,
    pub brought_up: bool,
}

impl LinkChanges {
    /// True when nothing was changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.mtu.is_none() && !self.brought_up
    }
}

/// An rtnetlink connection in the daemon's network namespace.
#[derive(Debug, Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens the connection; its I/O runs on a task of the current runtime.
    pub fn connect() -> Result<Self, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The link named `name`, if there is one.
    pub async fn find(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(Some(state(&message))),
            Ok(None) => Ok(None),
            // The kernel answers ENODEV for a name it does not know.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(source) => Err(netlink_err("looking up", name, source)),
        }
    }

    /// Creates a kernel WireGuard link; fails where the module is missing.
    pub async fn add_wireguard(&self, name: &str) -> Result<(), LinkError> {
        self.handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
            .map_err(|source| netlink_err("creating WireGuard link", name, source))
    }

    /// Gives link `name` exactly the `addresses` (link-local IPv6 addresses
    /// the kernel assigns itself are left alone), the MTU, and sets it up.
    pub async fn configure(
        &self,
        name: &str,
        link: &LinkState,
        addresses: &[IpNet],
        mtu: u32,
    ) -> Result<LinkChanges, LinkError> {
        let mut changes = LinkChanges::default();
        let current: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| netlink_err("listing addresses of", name, source))?;
        let mut present = Vec::new();
        for message in current {
            let Some(net) = address_of(&message) else {
                continue;
            };
            if addresses.contains(&net) || is_link_local(net.addr()) {
                present.push(net);
                continue;
            }
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(|source| netlink_err("removing an address from", name, source))?;
            changes.removed.push(net);
        }
        for net in addresses.iter().filter(|net| !present.contains(net)) {
            self.handle
                .address()
                .add(link.index, net.addr(), net.prefix_len())
                .execute()
                .await
                .map_err(|source| netlink_err("adding an address to", name, source))?;
            changes.added.push(*net);
        }
        if link.mtu != Some(mtu) || !link.up {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(link.index).mtu(mtu).up().build())
                .execute()
                .await
                .map_err(|source| netlink_err("setting MTU and up on", name, source))?;
            changes.mtu = (link.mtu != Some(mtu)).then_some(mtu);
            changes.brought_up = !link.up;
        }
        Ok(changes)
    }
}

fn netlink_err(op: &'static str, interface: &str, source: rtnetlink::Error) -> LinkError {
    LinkError::Netlink {
        op,
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

fn state(message: &LinkMessage) -> LinkState {
    let mut kind = None;
    let mut mtu = None;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(InfoKind::Wireguard) => Some("wireguard".to_owned()),
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    LinkState {
        index: message.header.index,
        kind,
        mtu,
        up: message.header.flags.contains(LinkFlags::Up),
    }
}

fn address_of(message: &AddressMessage) -> Option<IpNet> {
    // IFA_LOCAL is the interface's own address on point-to-point links;
    // IFA_ADDRESS is the peer's there, and the same as IFA_LOCAL elsewhere.
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNet::new(local.or(address)?, message.header.prefix_len).ok()
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
        IpAddr::V4(_) => false,
    }
}
