//! The VIPs as addresses, through rtnetlink. Every gateway keeps them on
//! `lo`, so a backup can answer for them as a direct-server-return backend;
//! the public interface, whose ARP and neighbour answers clients follow,
//! holds them only on the master. `arp_ignore=1` and `arp_announce=2` on the
//! public interface keep a backup from answering ARP for its `lo` copies.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use futures::TryStreamExt as _;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{AddressMessageBuilder, Handle};

/// A netlink or sysctl request that failed.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("opening a netlink socket")]
    Connect(#[source] io::Error),
    #[error("no interface {0}")]
    NoInterface(String),
    #[error("{op} {vip} on {interface}")]
    Netlink {
        op: &'static str,
        vip: IpAddr,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("looking up interface {interface}")]
    Lookup {
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("setting {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The VIPs and the interfaces they go on.
#[derive(Debug, Clone)]
pub struct Vips {
    handle: Handle,
    public: String,
    public_index: u32,
    lo_index: u32,
    vips: Vec<IpAddr>,
}

const EEXIST: i32 = -libc::EEXIST;
const EADDRNOTAVAIL: i32 = -libc::EADDRNOTAVAIL;

impl Vips {
    /// Looks up the interfaces. Must run inside a tokio runtime.
    pub async fn new(public: &str, vips: Vec<IpAddr>) -> Result<Self, VipError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VipError::Connect)?;
        tokio::spawn(connection);
        let public_index = index(&handle, public).await?;
        let lo_index = index(&handle, "lo").await?;
        Ok(Self {
            handle,
            public: public.to_owned(),
            public_index,
            lo_index,
            vips,
        })
    }

    /// The VIPs.
    pub fn vips(&self) -> &[IpAddr] {
        &self.vips
    }

    /// Index of the public interface.
    pub fn public_index(&self) -> u32 {
        self.public_index
    }

    /// Puts every VIP on `lo` (kept there in every role).
    pub async fn keep_on_lo(&self) -> Result<(), VipError> {
        for &vip in &self.vips {
            self.add(self.lo_index, "lo", vip).await?;
        }
        Ok(())
    }

    /// Puts every VIP on the public interface.
    pub async fn take(&self) -> Result<(), VipError> {
        for &vip in &self.vips {
            self.add(self.public_index, &self.public, vip).await?;
        }
        Ok(())
    }

    /// Takes every VIP off the public interface.
    pub async fn release(&self) -> Result<(), VipError> {
        for &vip in &self.vips {
            self.remove(self.public_index, &self.public, vip).await?;
        }
        Ok(())
    }

    /// The VIPs the public interface holds now.
    pub async fn held(&self) -> Result<Vec<IpAddr>, VipError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.public_index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| VipError::Lookup {
                interface: self.public.clone(),
                source: Box::new(source),
            })?;
        let on_public: Vec<IpAddr> = messages
            .iter()
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        Ok(self
            .vips
            .iter()
            .copied()
            .filter(|vip| on_public.contains(vip))
            .collect())
    }

    async fn add(&self, index: u32, interface: &str, vip: IpAddr) -> Result<(), VipError> {
        let prefix = if vip.is_ipv4() { 32 } else { 128 };
        let mut request = self.handle.address().add(index, vip, prefix);
        if vip.is_ipv6() {
            // No duplicate address detection: the address must work now,
            // not after DAD's second, and the old master still has it.
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match request.execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == EEXIST => Ok(()),
            Err(source) => Err(VipError::Netlink {
                op: "adding",
                vip,
                interface: interface.to_owned(),
                source: Box::new(source),
            }),
        }
    }

    async fn remove(&self, index: u32, interface: &str, vip: IpAddr) -> Result<(), VipError> {
        let message = match vip {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(v4, 32)
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(v6, 128)
                .build(),
        };
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == EADDRNOTAVAIL => Ok(()),
            Err(source) => Err(VipError::Netlink {
                op: "removing",
                vip,
                interface: interface.to_owned(),
                source: Box::new(source),
            }),
        }
    }
}

async fn index(handle: &Handle, name: &str) -> Result<u32, VipError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(link.header.index),
        Ok(None) => Err(VipError::NoInterface(name.to_owned())),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            Err(VipError::NoInterface(name.to_owned()))
        }
        Err(source) => Err(VipError::Lookup {
            interface: name.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// Makes the public interface answer ARP only for its own addresses
/// (`arp_ignore=1`) and source ARP from them (`arp_announce=2`).
pub fn set_arp_sysctls(public: &str) -> Result<(), VipError> {
    for (name, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let path = format!("/proc/sys/net/ipv4/conf/{public}/{name}");
        std::fs::write(Path::new(&path), value)
            .map_err(|source| VipError::Sysctl { path, source })?;
    }
    Ok(())
}
