//! Which XDP program, if any, is attached to an interface, as the kernel
//! reports it (`ip -j link show`).

use std::fmt;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::netns::Netns;

/// How an XDP program is attached (`IFLA_XDP_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native, in the driver (`XDP_ATTACHED_DRV`).
    Driver,
    /// Generic, on the skb path (`XDP_ATTACHED_SKB`).
    Generic,
    /// Offloaded to the NIC (`XDP_ATTACHED_HW`).
    Offload,
    /// Several programs in different modes (`XDP_ATTACHED_MULTI`).
    Multi,
}

impl XdpAttachMode {
    /// The mode for an `IFLA_XDP_ATTACHED` value.
    fn from_attached(value: u8) -> Result<Self> {
        Ok(match value {
            1 => Self::Driver,
            2 => Self::Generic,
            3 => Self::Offload,
            4 => Self::Multi,
            other => bail!("unknown XDP attach mode {other}"),
        })
    }

    /// The name the gateway's config and counters use ("driver", "generic").
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Generic => "generic",
            Self::Offload => "offload",
            Self::Multi => "multi",
        }
    }
}

impl fmt::Display for XdpAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attached XDP program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpAttachment {
    /// How it is attached.
    pub mode: XdpAttachMode,
    /// The program id (for a single program), as `bpftool prog` lists it.
    pub prog_id: Option<u32>,
    /// The program name (truncated to 15 characters by the kernel).
    pub prog_name: Option<String>,
}

/// One link of `ip -j link show`.
#[derive(Debug, Deserialize)]
struct LinkJson {
    xdp: Option<XdpJson>,
}

/// The `xdp` object of a link.
#[derive(Debug, Deserialize)]
struct XdpJson {
    mode: u8,
    prog: Option<ProgJson>,
}

/// The `prog` object of an attachment.
#[derive(Debug, Deserialize)]
struct ProgJson {
    id: u32,
    name: Option<String>,
}

/// The XDP program attached to `ifname` in `netns`, or `None`.
pub fn xdp_attachment(netns: &Netns, ifname: &str) -> Result<Option<XdpAttachment>> {
    let json = netns.ip(&["-j", "link", "show", "dev", ifname])?;
    parse_link_json(&json)
        .with_context(|| format!("reading XDP state of {ifname} in {}", netns.name()))
}

/// Parses the output of `ip -j link show dev X`.
fn parse_link_json(json: &str) -> Result<Option<XdpAttachment>> {
    let links: Vec<LinkJson> = serde_json::from_str(json).context("parsing `ip -j link show`")?;
    let [link] = links.as_slice() else {
        bail!("expected one link, found {}", links.len());
    };
    let Some(xdp) = &link.xdp else {
        return Ok(None);
    };
    Ok(Some(XdpAttachment {
        mode: XdpAttachMode::from_attached(xdp.mode)?,
        prog_id: xdp.prog.as_ref().map(|p| p.id),
        prog_name: xdp.prog.as_ref().and_then(|p| p.name.clone()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_generic_and_driver_attachments() {
        // Shapes printed by iproute2 6.1 for a veth with a program attached.
        let generic = r#"[{"ifindex":3,"ifname":"tgpa","mtu":1500,"xdp":{"mode":2,"prog":{"id":101,"name":"tidegate","tag":"614b434cd8324ecc","jited":1},"attached":[{"mode":2,"prog":{"id":101}}]},"operstate":"DOWN"}]"#;
        assert_eq!(
            parse_link_json(generic).unwrap(),
            Some(XdpAttachment {
                mode: XdpAttachMode::Generic,
                prog_id: Some(101),
                prog_name: Some("tidegate".into()),
            })
        );
        let driver = generic.replace("\"mode\":2", "\"mode\":1");
        assert_eq!(
            parse_link_json(&driver).unwrap().unwrap().mode,
            XdpAttachMode::Driver
        );
    }

    #[test]
    fn no_xdp_key_means_detached() {
        let json = r#"[{"ifindex":3,"ifname":"tgpa","mtu":1500,"operstate":"UP"}]"#;
        assert_eq!(parse_link_json(json).unwrap(), None);
    }

    #[test]
    fn rejects_unknown_mode_and_link_count() {
        assert!(parse_link_json(r#"[{"xdp":{"mode":9}}]"#).is_err());
        assert!(parse_link_json("[]").is_err());
    }
}
