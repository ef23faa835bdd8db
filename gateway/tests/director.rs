//! The XDP director (the `tidegate_director` program), frame by frame,
//! through `BPF_PROG_TEST_RUN`: each case names its input, the verdict it
//! must get, the exact frame that must come out, the shield counter it must
//! bump and what it must do to the per-backend counters. Picks are predicted
//! with user space's Maglev builder and client hash, so a program that
//! hashed or indexed differently from user space fails here. Needs root (it
//! loads the program).

#[expect(
    dead_code,
    reason = "the director's cases use a few of the frame builders shared with the shield's"
)]
mod support;

use std::{net::SocketAddr, time::Duration};

use support::{
    frames::*,
    harness::{self, Counters, Moved, counted, require_root},
};
use tidegate_common::{
    director::{DEFAULT_TABLE_SIZE, client_hash, table_index},
    stats::Counter,
    wireguard::*,
};
use tidegate_gateway::{
    director::{BackendSpec, DirectorState, Mac, maglev},
    xdp::{Datapath, DirectorStatus, ServiceTable, director::client_key},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP4: &str = "198.51.100.100";
const VIP6: &str = "2001:db8::100";
/// A service address that is not a VIP: never steered.
const HOST4: &str = "198.51.100.2";
const CLIENT4: &str = "203.0.113.7";
const CLIENT6: &str = "2001:db8:1::7";
const PORT: u16 = 51820;

/// This gateway (2) and the others on its segment.
const OWN_MAC: Mac = [0x02, 0, 0, 0, 0x0a, 0x02];
const MAC1: Mac = [0x02, 0, 0, 0, 0x0a, 0x01];
const MAC3: Mac = [0x02, 0, 0, 0, 0x0a, 0x03];
const LOCAL_ID: u32 = 2;

fn backend(id: u32, draining: bool) -> BackendSpec {
    let mac = match id {
        1 => MAC1,
        2 => OWN_MAC,
        3 => MAC3,
        _ => [0x02, 0, 0, 0, 0x0a, id as u8],
    };
    BackendSpec {
        gateway_id: id,
        mac,
        local: id == LOCAL_ID,
        draining,
    }
}

fn desired(on: bool, backends: Vec<BackendSpec>) -> DirectorState {
    DirectorState {
        on,
        mac: OWN_MAC,
        backends,
    }
}

/// The program with services on the VIPs and on a host address, the VIPs
/// fenced with a live lease held (a master), and the director as `state`.
fn director(state: &DirectorState) -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("load the XDP program");
    let services = ServiceTable::new(
        [
            format!("{VIP4}:{PORT}"),
            format!("[{VIP6}]:{PORT}"),
            format!("{HOST4}:{PORT}"),
        ]
        .iter()
        .map(|s| s.parse().unwrap()),
    )
    .unwrap();
    datapath.install_services(services).unwrap();
    datapath
        .set_vips(&[VIP4.parse().unwrap(), VIP6.parse().unwrap()])
        .unwrap();
    datapath.renew_lease(Duration::from_secs(60), true).unwrap();
    datapath.set_director(state).unwrap();
    datapath
}

/// The gateway the Maglev table of `members` picks for `client`, as user
/// space computes it.
fn predicted(members: &[u32], client: SocketAddr) -> u32 {
    let table = maglev::build(members, DEFAULT_TABLE_SIZE).unwrap();
    let key = client_key(client);
    u32::from(table[table_index(client_hash(&key), DEFAULT_TABLE_SIZE) as usize])
}

/// The first client from `addr` (source ports from 40000 on) that `members`
/// pick for gateway `want`, and that `avoid` does not hold.
fn client_for(members: &[u32], want: u32, addr: &str, avoid: &[SocketAddr]) -> SocketAddr {
    (40_000u16..)
        .map(|port| SocketAddr::new(addr.parse().unwrap(), port))
        .find(|client| !avoid.contains(client) && predicted(members, *client) == want)
        .expect("some port picks every backend")
}

/// A WireGuard frame from `client` to `vip`.
fn frame(client: SocketAddr, vip: &str, payload: Vec<u8>) -> Udp {
    let mut udp = Udp::new(&client.ip().to_string(), vip, PORT, payload);
    udp.sport = client.port();
    udp
}

/// `input` with the Ethernet destination `to` and source `from`.
fn rewritten(input: &[u8], to: Mac, from: Mac) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&to);
    out[6..12].copy_from_slice(&from);
    out
}

/// What a frame does to one backend's counters (public, as the delta of
/// the director's `Counters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendDelta {
    gateway_id: u32,
    packets: u64,
    bytes: u64,
    new_pins: u64,
}

/// One frame and everything it must do: the frame that must come out, the
/// shield counter and the backend counters (gateway 0: unpinned) that must
/// move.
type Case = harness::Case<(Moved, Vec<BackendDelta>)>;

fn case(
    name: &str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    counter: Counter,
    backends: Vec<BackendDelta>,
) -> Case {
    Case {
        name: name.into(),
        counters: (counted(counter.name(), &input), backends),
        input,
        verdict,
        output: Some(output),
    }
}

/// Steered to remote gateway `id` at `mac`, pinned now or already.
fn steered(name: &str, input: Vec<u8>, id: u32, mac: Mac, new_pin: bool) -> Case {
    let output = rewritten(&input, mac, OWN_MAC);
    let backends = vec![delta(id, &input, new_pin)];
    case(name, input, XDP_TX, output, Counter::Steered, backends)
}

/// Passed to this gateway's stack untouched, under `counter`, counted for
/// backend `id` (0: unpinned) or for none.
fn local(name: &str, input: Vec<u8>, counter: Counter, id: Option<u32>, new_pin: bool) -> Case {
    let backends = id
        .map(|id| delta(id, &input, new_pin))
        .into_iter()
        .collect();
    case(name, input.clone(), XDP_PASS, input, counter, backends)
}

/// Dropped as it came, under `counter`, before the director looks at it.
fn dropped(name: &str, input: Vec<u8>, counter: Counter) -> Case {
    case(name, input.clone(), XDP_DROP, input, counter, vec![])
}

/// `frame` counted for backend `id`.
fn delta(id: u32, frame: &[u8], new_pin: bool) -> BackendDelta {
    BackendDelta {
        gateway_id: id,
        packets: 1,
        bytes: frame.len() as u64,
        new_pins: u64::from(new_pin),
    }
}

/// Runs every case in order through the director, watching the shield's
/// counters and the backends'.
fn run_on(datapath: &Datapath, cases: &[Case]) {
    harness::run(
        datapath.director_program().unwrap(),
        || {
            (
                datapath.counters().unwrap().counters,
                datapath.director_status().unwrap(),
            )
        },
        cases,
    );
}

/// How each backend's counters moved, gateway 0 being the unpinned ones.
impl Counters for DirectorStatus {
    type Delta = Vec<BackendDelta>;

    fn since(&self, before: &Self) -> Vec<BackendDelta> {
        let mut out = Vec::new();
        if self.unpinned != before.unpinned {
            out.push(BackendDelta {
                gateway_id: 0,
                packets: self.unpinned.packets - before.unpinned.packets,
                bytes: self.unpinned.bytes - before.unpinned.bytes,
                new_pins: 0,
            });
        }
        for b in &self.backends {
            let (packets, bytes, new_pins) = before
                .backends
                .iter()
                .find(|o| o.gateway_id == b.gateway_id)
                .map_or((0, 0, 0), |o| (o.packets, o.bytes, o.new_pins));
            if (b.packets, b.bytes, b.new_pins) != (packets, bytes, new_pins) {
                out.push(BackendDelta {
                    gateway_id: b.gateway_id,
                    packets: b.packets - packets,
                    bytes: b.bytes - bytes,
                    new_pins: b.new_pins - new_pins,
                });
            }
        }
        out
    }
}

/// The pins the director holds, as (client, gateway).
fn pins(datapath: &Datapath) -> Vec<(SocketAddr, u32)> {
    datapath
        .sessions()
        .unwrap()
        .into_iter()
        .map(|s| (s.client, s.gateway_id))
        .collect()
}

fn initiation() -> Vec<u8> {
    wg(MESSAGE_INITIATION, INITIATION_LEN)
}

fn transport() -> Vec<u8> {
    wg(MESSAGE_TRANSPORT, 128)
}

#[test]
fn the_object_defines_the_director_maps() {
    require_root();
    let ebpf = aya::Ebpf::load(tidegate_gateway::xdp::OBJECT).expect("parse and create maps");
    for name in tidegate_common::maps::ALL {
        assert!(ebpf.map(name).is_some(), "map {name} is missing");
    }
}

/// Copies of a few bytes (a MAC address, an IPv6 address) compile to calls
/// of these when the compiler sees them as one block copy; each call costs
/// more than the rest of a pinned hit's rewrite.
const MEMORY_FUNCTIONS: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

#[test]
fn the_programs_call_no_memory_function() {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    let file = object::File::parse(tidegate_gateway::xdp::OBJECT).expect("an ELF object");
    // The memory functions' own code, which the object carries whether
    // called or not.
    let bodies: Vec<(u64, u64)> = file
        .symbols()
        .filter(|s| s.name().is_ok_and(|n| MEMORY_FUNCTIONS.contains(&n)))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    let mut calls = Vec::new();
    for section in file.sections() {
        let name = section.name().unwrap_or_default().to_owned();
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let target = file.symbol_by_index(index).expect("a symbol");
            let target = target.name().unwrap_or_default();
            let inside = name == ".text"
                && bodies
                    .iter()
                    .any(|(start, end)| (*start..*end).contains(&offset));
            if MEMORY_FUNCTIONS.contains(&target) && !inside {
                calls.push(format!("{name}+{offset:#x} calls {target}"));
            }
        }
    }
    assert!(calls.is_empty(), "{calls:#?}");
}

#[test]
fn new_clients_are_pinned_and_steered_to_remote_and_local_backends() {
    let members = [1, 2, 3];
    let datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    let remote = client_for(&members, 1, CLIENT4, &[]);
    let remote3 = client_for(&members, 3, CLIENT4, &[]);
    let local_client = client_for(&members, 2, CLIENT4, &[]);
    let remote6 = client_for(&members, 3, CLIENT6, &[]);
    let local6 = client_for(&members, 2, CLIENT6, &[]);
    let cases = [
        steered(
            "first initiation from a client of gateway 1",
            frame(remote, VIP4, initiation()).build(),
            1,
            MAC1,
            true,
        ),
        steered(
            "its transport, pinned",
            frame(remote, VIP4, transport()).build(),
            1,
            MAC1,
            false,
        ),
        steered(
            "a client of gateway 3",
            frame(remote3, VIP4, transport()).build(),
            3,
            MAC3,
            true,
        ),
        local(
            "a client of this gateway passes to the local stack",
            frame(local_client, VIP4, initiation()).build(),
            Counter::Initiation,
            Some(2),
            true,
        ),
        local(
            "and again, pinned",
            frame(local_client, VIP4, transport()).build(),
            Counter::Transport,
            Some(2),
            false,
        ),
        steered(
            "an IPv6 client of gateway 3",
            frame(remote6, VIP6, initiation()).build(),
            3,
            MAC3,
            true,
        ),
        steered(
            "its transport, pinned",
            frame(remote6, VIP6, transport()).build(),
            3,
            MAC3,
            false,
        ),
        local(
            "an IPv6 client of this gateway",
            frame(local6, VIP6, transport()).build(),
            Counter::Transport,
            Some(2),
            true,
        ),
        steered(
            "VLAN-tagged, through the full walk: the tag stays",
            frame(remote, VIP4, transport())
                .vlan(ETH_P_8021Q, 7)
                .build(),
            1,
            MAC1,
            false,
        ),
        steered(
            "IPv4 options, through the full walk",
            frame(remote, VIP4, transport())
                .ip_options(vec![1, 1, 1, 1])
                .build(),
            1,
            MAC1,
            false,
        ),
    ];
    run_on(&datapath, &cases);
    let mut want = vec![
        (remote, 1),
        (remote3, 3),
        (local_client, 2),
        (remote6, 3),
        (local6, 2),
    ];
    want.sort();
    assert_eq!(pins(&datapath), want);
    let sessions = datapath.sessions().unwrap();
    assert!(
        sessions
            .iter()
            .all(|s| s.last_seen_ms.is_some_and(|ms| ms < 5_000)),
        "{sessions:?}"
    );
}

#[test]
fn what_the_director_does_not_steer() {
    let members = [1, 2, 3];
    let datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    let remote = client_for(&members, 1, CLIENT4, &[]);
    let cases = [
        local(
            "WireGuard to a service address that is no VIP",
            frame(remote, HOST4, initiation()).build(),
            Counter::Initiation,
            None,
            false,
        ),
        dropped(
            "malformed WireGuard to a VIP: the shield drops it first",
            frame(remote, VIP4, wg(9, 64)).build(),
            Counter::BadType,
        ),
        local(
            "other UDP to a VIP",
            Udp::new(CLIENT4, VIP4, 53, vec![0; 40]).build(),
            Counter::NotService,
            None,
            false,
        ),
        local(
            "an IP fragment to a VIP",
            frame(remote, VIP4, transport()).frag_field(0x2000).build(),
            Counter::Fragment,
            None,
            false,
        ),
        local(
            "ARP for a VIP (this gateway answers for it)",
            arp_request([198, 51, 100, 100]),
            Counter::NotService,
            None,
            false,
        ),
    ];
    run_on(&datapath, &cases);
    assert_eq!(pins(&datapath), []);
}

#[test]
fn the_shield_program_never_steers() {
    let members = [1, 2, 3];
    let datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    let remote = client_for(&members, 1, CLIENT4, &[]);
    let input = frame(remote, VIP4, initiation()).build();
    harness::run_shield(
        &datapath,
        &[harness::Case::new(
            "a client of gateway 1",
            input.clone(),
            XDP_PASS,
            Counter::Initiation.name(),
            Some(input),
        )],
    );
    assert_eq!(pins(&datapath), []);
}

#[test]
fn with_the_director_off_everything_passes_locally() {
    let members = [1, 2, 3];
    let all = vec![backend(1, false), backend(2, false), backend(3, false)];
    let mut datapath = director(&desired(false, all.clone()));
    let remote = client_for(&members, 1, CLIENT4, &[]);
    run_on(
        &datapath,
        &[local(
            "a client of gateway 1 on a backup",
            frame(remote, VIP4, initiation()).build(),
            Counter::Initiation,
            None,
            false,
        )],
    );
    assert_eq!(pins(&datapath), []);
    // On again (this gateway became the master): steered.
    datapath.set_director(&desired(true, all)).unwrap();
    run_on(
        &datapath,
        &[steered(
            "the same client on the master",
            frame(remote, VIP4, transport()).build(),
            1,
            MAC1,
            true,
        )],
    );
}

#[test]
fn a_lapsed_lease_fences_before_the_director_steers() {
    let members = [1, 2, 3];
    let mut datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    datapath.renew_lease(Duration::ZERO, true).unwrap();
    // A lease of zero lapses within a jiffy.
    std::thread::sleep(Duration::from_millis(50));
    let remote = client_for(&members, 1, CLIENT4, &[]);
    run_on(
        &datapath,
        &[dropped(
            "transport to a VIP while fenced",
            frame(remote, VIP4, transport()).build(),
            Counter::Fenced,
        )],
    );
    assert_eq!(pins(&datapath), []);
}

#[test]
fn a_draining_backend_keeps_its_clients_and_gets_no_new_ones() {
    let all = [1, 2, 3];
    let mut datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    let pinned = client_for(&all, 3, CLIENT4, &[]);
    let pinned6 = client_for(&all, 3, CLIENT6, &[]);
    run_on(
        &datapath,
        &[
            steered(
                "a client of gateway 3",
                frame(pinned, VIP4, initiation()).build(),
                3,
                MAC3,
                true,
            ),
            steered(
                "an IPv6 client of gateway 3",
                frame(pinned6, VIP6, initiation()).build(),
                3,
                MAC3,
                true,
            ),
        ],
    );
    // Gateway 3 drains: the table is rebuilt from 1 and 2.
    datapath
        .set_director(&desired(
            true,
            vec![backend(1, false), backend(2, false), backend(3, true)],
        ))
        .unwrap();
    let status = datapath.director_status().unwrap();
    let three = status.backends.iter().find(|b| b.gateway_id == 3).unwrap();
    assert!(
        three.draining && three.present && three.table_entries == 0,
        "{three:?}"
    );
    // A new client the old table gave to gateway 3: the new one does not.
    let newcomer = client_for(&all, 3, CLIENT4, &[pinned]);
    let now = predicted(&[1, 2], newcomer);
    assert_ne!(now, 3);
    let newcomer_case = if now == LOCAL_ID {
        local(
            "a new client that gateway 3 would have had goes to this gateway",
            frame(newcomer, VIP4, initiation()).build(),
            Counter::Initiation,
            Some(2),
            true,
        )
    } else {
        steered(
            "a new client that gateway 3 would have had goes to gateway 1",
            frame(newcomer, VIP4, initiation()).build(),
            1,
            MAC1,
            true,
        )
    };
    run_on(
        &datapath,
        &[
            steered(
                "the pinned client stays with draining gateway 3",
                frame(pinned, VIP4, transport()).build(),
                3,
                MAC3,
                false,
            ),
            steered(
                "the pinned IPv6 client stays too",
                frame(pinned6, VIP6, transport()).build(),
                3,
                MAC3,
                false,
            ),
            newcomer_case,
        ],
    );
    assert!(pins(&datapath).contains(&(pinned, 3)));
    assert!(pins(&datapath).contains(&(newcomer, now)));
}

#[test]
fn a_client_pinned_to_a_gateway_that_has_gone_is_pinned_again() {
    let all = [1, 2, 3];
    let mut datapath = director(&desired(
        true,
        vec![backend(1, false), backend(2, false), backend(3, false)],
    ));
    let orphan = client_for(&all, 3, CLIENT4, &[]);
    run_on(
        &datapath,
        &[steered(
            "a client of gateway 3",
            frame(orphan, VIP4, initiation()).build(),
            3,
            MAC3,
            true,
        )],
    );
    // Gateway 3 is gone (unhealthy or silent): not a backend any more.
    datapath
        .set_director(&desired(true, vec![backend(1, false), backend(2, false)]))
        .unwrap();
    let status = datapath.director_status().unwrap();
    let three = status.backends.iter().find(|b| b.gateway_id == 3).unwrap();
    assert!(!three.present && three.packets == 1, "{three:?}");
    let next = predicted(&[1, 2], orphan);
    let case = if next == LOCAL_ID {
        local(
            "its next frame is pinned again, to this gateway",
            frame(orphan, VIP4, transport()).build(),
            Counter::Transport,
            Some(2),
            true,
        )
    } else {
        steered(
            "its next frame is pinned again, to gateway 1",
            frame(orphan, VIP4, transport()).build(),
            1,
            MAC1,
            true,
        )
    };
    run_on(&datapath, &[case]);
    assert_eq!(pins(&datapath), [(orphan, next)]);
}

#[test]
fn pins_of_an_earlier_term_are_made_again_from_the_table() {
    // A client pinned to gateway 3 while this gateway was the master with
    // 1, 2 and 3; then it was a backup while 3 drained and came back.
    let all = vec![backend(1, false), backend(2, false), backend(3, false)];
    let mut datapath = director(&desired(true, all.clone()));
    let client = client_for(&[1, 2, 3], 3, CLIENT4, &[]);
    run_on(
        &datapath,
        &[steered(
            "a client of gateway 3",
            frame(client, VIP4, initiation()).build(),
            3,
            MAC3,
            true,
        )],
    );
    let draining = vec![backend(1, false), backend(2, false), backend(3, true)];
    datapath
        .set_director(&desired(false, draining.clone()))
        .unwrap();
    // Off: the pin is kept and still listed as the last term's.
    assert_eq!(pins(&datapath), [(client, 3)]);
    // This gateway is the master again, with gateway 3 draining: a new
    // master would pick from the table, and so does this one.
    datapath.set_director(&desired(true, draining)).unwrap();
    assert_eq!(pins(&datapath), []);
    let next = predicted(&[1, 2], client);
    let case = if next == LOCAL_ID {
        local(
            "its next frame is pinned from the table, to this gateway",
            frame(client, VIP4, transport()).build(),
            Counter::Transport,
            Some(2),
            true,
        )
    } else {
        steered(
            "its next frame is pinned from the table, to gateway 1",
            frame(client, VIP4, transport()).build(),
            1,
            MAC1,
            true,
        )
    };
    run_on(&datapath, &[case]);
    assert_eq!(pins(&datapath), [(client, next)]);
}

#[test]
fn with_no_backend_to_pick_this_gateway_serves_without_a_pin() {
    // Every gateway drains (or none is healthy but this one, draining):
    // the table is empty.
    let mut datapath = director(&desired(true, vec![backend(2, true), backend(1, true)]));
    assert!(
        datapath
            .director_status()
            .unwrap()
            .backends
            .iter()
            .all(|b| b.table_entries == 0)
    );
    let client: SocketAddr = format!("{CLIENT4}:40000").parse().unwrap();
    let client6: SocketAddr = format!("[{CLIENT6}]:40000").parse().unwrap();
    run_on(
        &datapath,
        &[
            local(
                "an IPv4 client, unpinned",
                frame(client, VIP4, initiation()).build(),
                Counter::Initiation,
                Some(0),
                false,
            ),
            local(
                "an IPv6 client, unpinned",
                frame(client6, VIP6, initiation()).build(),
                Counter::Initiation,
                Some(0),
                false,
            ),
        ],
    );
    assert_eq!(pins(&datapath), []);
    // No backend at all (the set is empty): the same.
    datapath.set_director(&desired(true, vec![])).unwrap();
    run_on(
        &datapath,
        &[local(
            "a client with no backend known",
            frame(client, VIP4, transport()).build(),
            Counter::Transport,
            Some(0),
            false,
        )],
    );
    // A backend returns: the next frame is pinned.
    datapath
        .set_director(&desired(true, vec![backend(1, false)]))
        .unwrap();
    run_on(
        &datapath,
        &[steered(
            "the same client once gateway 1 is back",
            frame(client, VIP4, transport()).build(),
            1,
            MAC1,
            true,
        )],
    );
    assert_eq!(pins(&datapath), [(client, 1)]);
}
