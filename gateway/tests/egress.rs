//! The egress guard (TC) and the handover hook of the XDP program, frame by
//! frame through `BPF_PROG_TEST_RUN`: each case names its input, the verdict
//! it must get, the one counter it must bump and, where the program changes
//! the frame, the exact frame that must come out (checksums included).
//! Needs root (it loads the programs into the kernel).

#[expect(
    dead_code,
    reason = "these tests use a few of the frame builders they share with the shield's"
)]
mod support;

use std::{net::IpAddr, time::Duration};

use support::{
    frames::*,
    harness::{self, Moved, require_root},
};
use tidegate_common::{client::ClientKey, egress::EgressCounter, stats::Counter, wireguard::*};
use tidegate_gateway::xdp::{Datapath, Ownership, ServiceTable};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP4: &str = "198.51.100.100";
const VIP6: &str = "2001:db8::100";
const HOST4: &str = "198.51.100.2";
const HOST6: &str = "2001:db8::2";
const CLIENT4: &str = "203.0.113.7";
const CLIENT6: &str = "2001:db8:1::7";
const LISTEN_PORT: u16 = 51820;
const CLIENT_PORT: u16 = 40_000;
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const OWN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A WireGuard message of `kind` and `len` bytes whose sender or receiver
/// index (bytes 4..8) is `index` (and, for a response, whose receiver index,
/// bytes 8..12, is `index` too).
fn message(kind: u8, len: usize, index: u32) -> Vec<u8> {
    let mut payload = wg(kind, len);
    payload[4..8].copy_from_slice(&index.to_ne_bytes());
    if kind == MESSAGE_RESPONSE {
        payload[8..12].copy_from_slice(&index.to_ne_bytes());
    }
    payload
}

/// A datagram the gateway sends: from (`src`, the listen port) to the
/// client, with real checksums.
fn outgoing(src: &str, payload: Vec<u8>) -> Vec<u8> {
    let client = if src.contains(':') { CLIENT6 } else { CLIENT4 };
    Udp::new(src, client, CLIENT_PORT, payload)
        .sport(LISTEN_PORT)
        .checksums()
        .build()
}

/// A datagram a client sends to the VIP.
fn incoming(src: &str, dst: &str, payload: Vec<u8>) -> Vec<u8> {
    Udp::new(src, dst, LISTEN_PORT, payload)
        .sport(CLIENT_PORT)
        .build()
}

/// The datapath with VIPs (198.51.100.100, 2001:db8::100), the shield on
/// both at the listen port, the lease renewed for 30 s (or never), and the
/// egress guard set to the listen port and `ownership`.
fn datapath(lease: bool, ownership: Ownership) -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("load the BPF object");
    let vips: Vec<IpAddr> = vec![VIP4.parse().unwrap(), VIP6.parse().unwrap()];
    let services = ServiceTable::new(
        [
            format!("{VIP4}:{LISTEN_PORT}"),
            format!("[{VIP6}]:{LISTEN_PORT}"),
        ]
        .iter()
        .map(|s| s.parse().unwrap()),
    )
    .unwrap();
    datapath.install_services(services).unwrap();
    datapath.set_vips(&vips).unwrap();
    if lease {
        datapath
            .renew_lease(Duration::from_secs(30), ownership == Ownership::All)
            .unwrap();
    }
    let continuity = datapath.continuity_mut();
    continuity.set_listen_port(LISTEN_PORT).unwrap();
    continuity.set_ownership(ownership).unwrap();
    datapath
}

type Case = harness::Case<Moved>;

/// Sent on as `output`, counted under `counter`.
fn out(name: &str, input: Vec<u8>, counter: EgressCounter, output: Vec<u8>) -> Case {
    Case::new(name, input, TC_ACT_OK, counter.name(), Some(output))
}

fn unchanged(name: &str, input: Vec<u8>, counter: EgressCounter) -> Case {
    out(name, input.clone(), counter, input)
}

fn shot(name: &str, input: Vec<u8>, counter: EgressCounter) -> Case {
    Case::new(name, input, TC_ACT_SHOT, counter.name(), None)
}

/// Runs every case through the egress guard.
fn run_egress(datapath: &Datapath, cases: &[Case]) {
    harness::run(
        datapath.egress_program().unwrap(),
        || datapath.continuity().counters().unwrap(),
        cases,
    );
}

fn initiation(index: u32) -> Vec<u8> {
    message(MESSAGE_INITIATION, INITIATION_LEN, index)
}

fn response(index: u32) -> Vec<u8> {
    message(MESSAGE_RESPONSE, RESPONSE_LEN, index)
}

fn transport(index: u32) -> Vec<u8> {
    message(MESSAGE_TRANSPORT, 64, index)
}

#[test]
fn the_master_sends_everything_from_the_vip() {
    let datapath = datapath(true, Ownership::All);
    let no_udp_checksum = |src: &str| {
        let mut frame = Udp::new(src, CLIENT4, CLIENT_PORT, transport(9))
            .sport(LISTEN_PORT)
            .checksums()
            .build();
        // UDP over IPv4 without a checksum (the field zero) stays so.
        frame[14 + 20 + 6..14 + 20 + 8].fill(0);
        frame
    };
    run_egress(
        &datapath,
        &[
            out(
                "an initiation from the host address leaves from the VIP",
                outgoing(HOST4, initiation(7)),
                EgressCounter::Rewritten,
                outgoing(VIP4, initiation(7)),
            ),
            out(
                "data from the host address leaves from the VIP",
                outgoing(HOST4, transport(8)),
                EgressCounter::Rewritten,
                outgoing(VIP4, transport(8)),
            ),
            out(
                "IPv6: a response from the host address leaves from the VIP",
                outgoing(HOST6, response(9)),
                EgressCounter::Rewritten,
                outgoing(VIP6, response(9)),
            ),
            out(
                "no UDP checksum: only the IP header's is fixed",
                no_udp_checksum(HOST4),
                EgressCounter::Rewritten,
                no_udp_checksum(VIP4),
            ),
            unchanged(
                "data from the VIP leaves as it is",
                outgoing(VIP4, transport(8)),
                EgressCounter::Allowed,
            ),
            unchanged(
                "IPv6 data from the VIP leaves as it is",
                outgoing(VIP6, transport(8)),
                EgressCounter::Allowed,
            ),
            unchanged(
                "UDP from another port is none of the guard's business",
                Udp::new(HOST4, CLIENT4, 53, wg(MESSAGE_INITIATION, 40))
                    .sport(5353)
                    .checksums()
                    .build(),
                EgressCounter::Other,
            ),
            unchanged(
                "TCP from the listen port number is not WireGuard",
                Udp::new(HOST4, CLIENT4, CLIENT_PORT, vec![0; 20])
                    .sport(LISTEN_PORT)
                    .protocol(IPPROTO_TCP)
                    .build(),
                EgressCounter::Other,
            ),
            unchanged(
                "ARP passes",
                arp_request([198, 51, 100, 1]),
                EgressCounter::Other,
            ),
        ],
    );
    // The sender indices of the handshake messages it let out are known.
    let continuity = datapath.continuity();
    assert!(continuity.own_index(7), "initiation's sender index");
    assert!(continuity.own_index(9), "response's sender index");
    assert!(!continuity.own_index(8), "data carries no sender index");
}

#[test]
fn a_backup_sends_nothing_and_records_nothing() {
    let datapath = datapath(true, Ownership::None);
    run_egress(
        &datapath,
        &[
            shot(
                "initiation",
                outgoing(HOST4, initiation(11)),
                EgressCounter::DeniedBackup,
            ),
            shot(
                "data from the VIP",
                outgoing(VIP4, transport(12)),
                EgressCounter::DeniedBackup,
            ),
            shot(
                "IPv6 response",
                outgoing(HOST6, response(13)),
                EgressCounter::DeniedBackup,
            ),
            unchanged(
                "other UDP",
                Udp::new(HOST4, CLIENT4, 53, vec![1; 30])
                    .sport(5353)
                    .build(),
                EgressCounter::Other,
            ),
        ],
    );
    assert!(!datapath.continuity().own_index(11));
}

#[test]
fn after_a_handover_the_old_master_answers_but_does_not_initiate() {
    let datapath = datapath(true, Ownership::Grace);
    run_egress(
        &datapath,
        &[
            shot(
                "an initiation (its rekey timer)",
                outgoing(HOST4, initiation(21)),
                EgressCounter::DeniedGrace,
            ),
            out(
                "a response",
                outgoing(HOST4, response(22)),
                EgressCounter::Rewritten,
                outgoing(VIP4, response(22)),
            ),
            unchanged(
                "data from the VIP",
                outgoing(VIP4, transport(23)),
                EgressCounter::Allowed,
            ),
            out(
                "a cookie reply",
                outgoing(HOST4, message(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN, 24)),
                EgressCounter::Rewritten,
                outgoing(VIP4, message(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN, 24)),
            ),
        ],
    );
}

#[test]
fn in_director_mode_only_owned_clients_are_sent_to() {
    let mut datapath = datapath(true, Ownership::Table);
    let client = ClientKey::v4(
        CLIENT4.parse::<std::net::Ipv4Addr>().unwrap().octets(),
        CLIENT_PORT.to_be(),
    );
    run_egress(
        &datapath,
        &[shot(
            "data to a client this gateway does not own",
            outgoing(VIP4, transport(31)),
            EgressCounter::DeniedNotOwned,
        )],
    );
    datapath.continuity_mut().own(&[client]).unwrap();
    assert!(datapath.continuity().owns(&client));
    run_egress(
        &datapath,
        &[
            out(
                "an initiation to an owned client",
                outgoing(HOST4, initiation(32)),
                EgressCounter::Rewritten,
                outgoing(VIP4, initiation(32)),
            ),
            shot(
                "IPv6: the same address family matters",
                outgoing(HOST6, transport(33)),
                EgressCounter::DeniedNotOwned,
            ),
        ],
    );
}

#[test]
fn a_lapsed_lease_silences_even_a_master() {
    let datapath = datapath(false, Ownership::All);
    run_egress(
        &datapath,
        &[
            shot(
                "initiation",
                outgoing(HOST4, initiation(41)),
                EgressCounter::DeniedFenced,
            ),
            shot(
                "data from the VIP",
                outgoing(VIP4, transport(42)),
                EgressCounter::DeniedFenced,
            ),
        ],
    );
}

/// Through the XDP program: passed untouched, counted under `counter`.
fn passes(name: &str, input: Vec<u8>, counter: Counter) -> Case {
    Case::new(name, input.clone(), XDP_PASS, counter.name(), Some(input))
}

/// Sent back out to the peer gateway, Ethernet addresses rewritten.
fn handed_on(name: &str, input: Vec<u8>) -> Case {
    let mut output = input.clone();
    output[..6].copy_from_slice(&PEER_MAC);
    output[6..12].copy_from_slice(&OWN_MAC);
    Case::new(
        name,
        input,
        XDP_TX,
        Counter::HandedOver.name(),
        Some(output),
    )
}

/// The master's own index 51 (seen by its egress guard in an initiation it
/// sent), and the window open toward the peer.
fn in_handover() -> Datapath {
    let mut datapath = datapath(true, Ownership::All);
    run_egress(
        &datapath,
        &[out(
            "the master's own initiation",
            outgoing(HOST4, initiation(51)),
            EgressCounter::Rewritten,
            outgoing(VIP4, initiation(51)),
        )],
    );
    let until = datapath.jiffies_in(Duration::from_secs(30)).unwrap();
    datapath
        .continuity_mut()
        .open_handover(PEER_MAC, OWN_MAC, until)
        .unwrap();
    datapath
}

#[test]
fn in_the_window_frames_of_the_other_gateways_sessions_are_handed_on() {
    let datapath = in_handover();
    let from_peer = |payload| {
        let mut frame = incoming(CLIENT4, VIP4, payload);
        frame[6..12].copy_from_slice(&PEER_MAC);
        frame
    };
    harness::run_shield(
        &datapath,
        &[
            passes(
                "data of this gateway's session",
                incoming(CLIENT4, VIP4, transport(51)),
                Counter::Transport,
            ),
            passes(
                "a response to this gateway's initiation",
                incoming(CLIENT4, VIP4, response(51)),
                Counter::Response,
            ),
            handed_on(
                "data of another session",
                incoming(CLIENT4, VIP4, transport(52)),
            ),
            handed_on(
                "IPv6 data of another session",
                incoming(CLIENT6, VIP6, transport(53)),
            ),
            handed_on(
                "a response to the other gateway's initiation",
                incoming(CLIENT4, VIP4, response(54)),
            ),
            handed_on(
                "a cookie reply for the other gateway",
                incoming(
                    CLIENT4,
                    VIP4,
                    message(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN, 55),
                ),
            ),
            passes(
                "an initiation always stays (it has no receiver index)",
                incoming(CLIENT4, VIP4, initiation(56)),
                Counter::Initiation,
            ),
            passes(
                "a frame the other gateway handed on is never sent back",
                from_peer(transport(57)),
                Counter::Transport,
            ),
            Case::new(
                "malformed WireGuard keeps its own reason",
                incoming(CLIENT4, VIP4, wg(9, 64)),
                XDP_DROP,
                Counter::BadType.name(),
                Some(incoming(CLIENT4, VIP4, wg(9, 64))),
            ),
        ],
    );
}

#[test]
fn a_closed_or_lapsed_window_hands_nothing_on() {
    let mut datapath = in_handover();
    datapath.continuity_mut().close_handover().unwrap();
    harness::run_shield(
        &datapath,
        &[passes(
            "data of another session, window closed",
            incoming(CLIENT4, VIP4, transport(62)),
            Counter::Transport,
        )],
    );
    // Open, but until a moment already past.
    let past = datapath.jiffies_in(Duration::ZERO).unwrap() - 1;
    datapath
        .continuity_mut()
        .open_handover(PEER_MAC, OWN_MAC, past)
        .unwrap();
    harness::run_shield(
        &datapath,
        &[passes(
            "data of another session, window past",
            incoming(CLIENT4, VIP4, transport(63)),
            Counter::Transport,
        )],
    );
}

#[test]
fn in_director_mode_the_sources_of_handshakes_become_owned() {
    let datapath = datapath(true, Ownership::Table);
    let client = |addr: &str| match addr.parse::<IpAddr>().unwrap() {
        IpAddr::V4(v4) => ClientKey::v4(v4.octets(), CLIENT_PORT.to_be()),
        IpAddr::V6(v6) => ClientKey::v6(v6.octets(), CLIENT_PORT.to_be()),
    };
    harness::run_shield(
        &datapath,
        &[
            passes(
                "an initiation",
                incoming(CLIENT4, VIP4, initiation(71)),
                Counter::Initiation,
            ),
            passes(
                "data from another client",
                incoming("203.0.113.8", VIP4, transport(72)),
                Counter::Transport,
            ),
            passes(
                "an IPv6 response",
                incoming(CLIENT6, VIP6, response(73)),
                Counter::Response,
            ),
        ],
    );
    let continuity = datapath.continuity();
    assert!(continuity.owns(&client(CLIENT4)));
    assert!(continuity.owns(&client(CLIENT6)));
    assert!(
        !continuity.owns(&client("203.0.113.8")),
        "data makes no owner"
    );
}
