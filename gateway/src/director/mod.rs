//! The director's logic in user space, free of I/O: which gateways are
//! backends, and the Maglev table they share (see [`maglev`]). The HA agent
//! feeds it what adverts say; the datapath task writes the result into the
//! XDP program's maps (`crate::xdp::director`).

pub mod maglev;

use serde::{Deserialize, Serialize};
use tidegate_common::director::MAX_BACKEND_ID;

/// An Ethernet address.
pub type Mac = [u8; 6];

/// Director mode's settings (`[ha] mode = "director"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectorConfig {
    /// Entries of the Maglev table: a prime, the same on every gateway.
    pub table_size: u32,
    /// Pins the session map holds before the least recently used goes.
    pub max_sessions: u32,
}

/// A gateway of the location as the HA agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub gateway_id: u32,
    /// Its Ethernet address on the public segment.
    pub mac: Mac,
    /// This gateway.
    pub local: bool,
    /// It reports itself healthy and is neither faulty nor resigning.
    pub healthy: bool,
    /// It keeps its pinned clients but takes no new ones.
    pub draining: bool,
}

/// A backend the XDP program knows: a healthy gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub gateway_id: u32,
    pub mac: Mac,
    pub local: bool,
    pub draining: bool,
}

/// What the XDP program's director should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorState {
    /// Steer: this gateway is the master.
    pub on: bool,
    /// This gateway's Ethernet address, the source of steered frames.
    pub mac: Mac,
    /// The healthy gateways, by id: draining ones keep their pins; gone
    /// or unhealthy ones are not here, and their pins are made again.
    pub backends: Vec<BackendSpec>,
}

impl DirectorState {
    /// The director's state for `members` (this gateway among them),
    /// steering when `on`. Gateways with ids the program cannot hold
    /// (above 255) are left out and returned apart.
    pub fn new(on: bool, mac: Mac, members: impl IntoIterator<Item = Member>) -> (Self, Vec<u32>) {
        let mut backends = Vec::new();
        let mut unusable = Vec::new();
        for member in members {
            if !member.healthy {
                continue;
            }
            if member.gateway_id == 0 || member.gateway_id > MAX_BACKEND_ID {
                unusable.push(member.gateway_id);
                continue;
            }
            backends.push(BackendSpec {
                gateway_id: member.gateway_id,
                mac: member.mac,
                local: member.local,
                draining: member.draining,
            });
        }
        backends.sort_by_key(|b| b.gateway_id);
        backends.dedup_by_key(|b| b.gateway_id);
        (Self { on, mac, backends }, unusable)
    }

    /// The gateways the Maglev table is built from: healthy and not
    /// draining, by id.
    pub fn table_members(&self) -> Vec<u32> {
        self.backends
            .iter()
            .filter(|b| !b.draining)
            .map(|b| b.gateway_id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u32, healthy: bool, draining: bool) -> Member {
        Member {
            gateway_id: id,
            mac: [2, 0, 0, 0, 0, id as u8],
            local: id == 2,
            healthy,
            draining,
        }
    }

    #[test]
    fn healthy_gateways_are_backends_and_draining_ones_stay_out_of_the_table() {
        let (desired, unusable) = DirectorState::new(
            true,
            [2, 0, 0, 0, 0, 2],
            [
                member(3, true, true),
                member(1, true, false),
                member(2, true, false),
                member(4, false, false),
                member(300, true, false),
            ],
        );
        assert!(unusable == [300]);
        let ids: Vec<u32> = desired.backends.iter().map(|b| b.gateway_id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(desired.backends[1].local);
        assert!(desired.backends[2].draining);
        assert_eq!(desired.table_members(), [1, 2]);
    }

    #[test]
    fn the_same_view_in_any_order_is_the_same_state() {
        let members = [
            member(1, true, false),
            member(2, true, true),
            member(5, true, false),
        ];
        let mut reversed = members;
        reversed.reverse();
        let (a, _) = DirectorState::new(false, [0; 6], members);
        let (b, _) = DirectorState::new(false, [0; 6], reversed);
        assert_eq!(a, b);
    }
}
