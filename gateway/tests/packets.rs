//! The XDP shield, frame by frame, through `BPF_PROG_TEST_RUN`: each case
//! names its input, the verdict it must get and the one counter it must bump.
//! Needs root (it loads the program into the kernel).

mod support;

use aya::programs::{TestRun as _, TestRunOptions};
use std::time::Duration;
use support::{
    frames::*,
    harness::{self, Moved, require_root},
};
use tidegate_common::{maps, stats::Counter, wireguard::*};

use tidegate_gateway::xdp::{AdvertGate, Datapath, ServiceTable, ShieldSettings};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const SERVICE4: &str = "198.51.100.1";
const SERVICE6: &str = "2001:db8::1";
const SECOND4: &str = "198.51.100.9";
const SECOND6: &str = "2001:db8::9";
const CLIENT4: &str = "203.0.113.7";
const CLIENT6: &str = "2001:db8:1::7";
const PORT: u16 = 51820;

type Case = harness::Case<Moved>;

/// `input` gets `verdict` and is counted under `counter`; passed, it comes
/// out untouched.
fn case(name: impl Into<String>, input: Vec<u8>, verdict: u32, counter: Counter) -> Case {
    let output = (verdict == XDP_PASS).then(|| input.clone());
    Case::new(name, input, verdict, counter.name(), output)
}

fn pass(name: impl Into<String>, input: Vec<u8>, counter: Counter) -> Case {
    case(name, input, XDP_PASS, counter)
}

fn drop(name: impl Into<String>, input: Vec<u8>, counter: Counter) -> Case {
    case(name, input, XDP_DROP, counter)
}

/// Loads the shield with the test services: (198.51.100.1, 51820),
/// (2001:db8::1, 51820), (198.51.100.1, 51821), and second addresses on the
/// first port, (198.51.100.9, 51820) and (2001:db8::9, 51820), which the
/// program finds through the slot arrays rather than inline.
fn shield() -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("load the XDP program");
    let services = ServiceTable::new(
        [
            format!("{SERVICE4}:{PORT}"),
            format!("[{SERVICE6}]:{PORT}"),
            format!("{SERVICE4}:{}", PORT + 1),
            format!("{SECOND4}:{PORT}"),
            format!("[{SECOND6}]:{PORT}"),
        ]
        .iter()
        .map(|s| s.parse().unwrap()),
    )
    .unwrap();
    datapath.install_services(services).unwrap();
    datapath
}

/// Runs every case on a fresh shield.
fn run(cases: Vec<Case>) {
    harness::run_shield(&shield(), &cases);
}

fn v4(payload: Vec<u8>) -> Udp {
    Udp::new(CLIENT4, SERVICE4, PORT, payload)
}

fn v6(payload: Vec<u8>) -> Udp {
    Udp::new(CLIENT6, SERVICE6, PORT, payload)
}

/// Each message type at its right length, and the counter it lands in.
fn well_formed() -> Vec<(&'static str, Vec<u8>, Counter)> {
    vec![
        (
            "initiation",
            wg(MESSAGE_INITIATION, INITIATION_LEN),
            Counter::Initiation,
        ),
        (
            "response",
            wg(MESSAGE_RESPONSE, RESPONSE_LEN),
            Counter::Response,
        ),
        (
            "cookie reply",
            wg(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN),
            Counter::CookieReply,
        ),
        (
            "keepalive",
            wg(MESSAGE_TRANSPORT, TRANSPORT_MIN_LEN),
            Counter::Transport,
        ),
        (
            "transport 48",
            wg(MESSAGE_TRANSPORT, 48),
            Counter::Transport,
        ),
        (
            "transport 1440",
            wg(MESSAGE_TRANSPORT, 1440),
            Counter::Transport,
        ),
    ]
}

#[test]
fn the_object_defines_every_map_and_the_program() {
    require_root();
    let ebpf = aya::Ebpf::load(tidegate_gateway::xdp::OBJECT).expect("parse and create maps");
    for name in maps::ALL {
        assert!(
            ebpf.map(name).is_some(),
            "map {name} is missing from the object"
        );
    }
    for name in [maps::PROGRAM, maps::RENEW_PROGRAM, maps::EGRESS_PROGRAM] {
        assert!(ebpf.program(name).is_some(), "program {name} is missing");
    }
}

#[test]
fn each_message_type_passes_at_its_length() {
    let mut cases = Vec::new();
    for (name, payload, counter) in well_formed() {
        cases.push(pass(
            format!("ipv4 {name}"),
            v4(payload.clone()).build(),
            counter,
        ));
        cases.push(pass(
            format!("ipv6 {name}, checksummed, from port 1024"),
            v6(payload).sport(1024).checksums().build(),
            counter,
        ));
    }
    run(cases);
}

#[test]
fn wrong_lengths_types_and_reserved_bytes_are_dropped() {
    let mut cases = Vec::new();
    let wrong_lengths = [
        (
            MESSAGE_INITIATION,
            [INITIATION_LEN - 1, INITIATION_LEN + 1, RESPONSE_LEN],
        ),
        (
            MESSAGE_RESPONSE,
            [RESPONSE_LEN - 1, RESPONSE_LEN + 1, INITIATION_LEN],
        ),
        (
            MESSAGE_COOKIE_REPLY,
            [COOKIE_REPLY_LEN - 1, COOKIE_REPLY_LEN + 16, 4],
        ),
        (
            MESSAGE_TRANSPORT,
            [TRANSPORT_MIN_LEN - 1, TRANSPORT_MIN_LEN + 1, 47],
        ),
    ];
    for (msg_type, lengths) in wrong_lengths {
        for len in lengths {
            let name = format!("type {msg_type} length {len}");
            cases.push(drop(
                format!("ipv4 {name}"),
                v4(wg(msg_type, len)).build(),
                Counter::BadLength,
            ));
            cases.push(drop(
                format!("ipv6 {name}"),
                v6(wg(msg_type, len)).build(),
                Counter::BadLength,
            ));
        }
    }
    for len in [0, 1, 3] {
        cases.push(drop(
            format!("payload of {len} bytes"),
            v4(wg(MESSAGE_TRANSPORT, len)).build(),
            Counter::BadLength,
        ));
    }
    for msg_type in [0, 5, 0x7f, 0xff] {
        cases.push(drop(
            format!("ipv4 type {msg_type}"),
            v4(wg(msg_type, 148)).build(),
            Counter::BadType,
        ));
        cases.push(drop(
            format!("ipv6 type {msg_type}"),
            v6(wg(msg_type, 32)).build(),
            Counter::BadType,
        ));
    }
    for byte in 1..4 {
        for (name, mut payload, _) in well_formed() {
            payload[byte] = 0x01;
            cases.push(drop(
                format!("{name} reserved byte {byte}"),
                v4(payload).build(),
                Counter::BadReserved,
            ));
        }
    }
    cases.push(drop(
        "UDP length beyond the frame",
        v4(wg(MESSAGE_TRANSPORT, 32)).udp_len(8 + 48).build(),
        Counter::Truncated,
    ));
    cases.push(drop(
        "UDP length below the header",
        v4(wg(MESSAGE_TRANSPORT, 32)).udp_len(7).build(),
        Counter::Truncated,
    ));
    cases.push(drop(
        "second service port is checked too",
        Udp::new(CLIENT4, SERVICE4, PORT + 1, wg(9, 32)).build(),
        Counter::BadType,
    ));
    run(cases);
}

/// A second address of one family on a port is found through the slot
/// arrays rather than inline in the port's entry.
#[test]
fn second_addresses_on_a_port_are_checked() {
    let mut cases = Vec::new();
    for (name, dst) in [
        ("second IPv4 address", SECOND4),
        ("second IPv6 address", SECOND6),
    ] {
        let client = if dst.contains(':') { CLIENT6 } else { CLIENT4 };
        let good = Udp::new(client, dst, PORT, wg(MESSAGE_RESPONSE, RESPONSE_LEN)).build();
        let bad = Udp::new(client, dst, PORT, wg(MESSAGE_RESPONSE, RESPONSE_LEN + 1)).build();
        cases.push(pass(format!("{name} on the port"), good, Counter::Response));
        cases.push(drop(format!("{name}, bad length"), bad, Counter::BadLength));
    }
    run(cases);
}

#[test]
fn non_service_traffic_passes_untouched() {
    let junk = vec![0xee; 100];
    run(vec![
        pass("ARP", arp_request([198, 51, 100, 1]), Counter::NotService),
        pass(
            "UDP to another port",
            Udp::new(CLIENT4, SERVICE4, 53, junk.clone()).build(),
            Counter::NotService,
        ),
        pass(
            "UDP to another address",
            Udp::new(CLIENT4, "198.51.100.2", PORT, junk.clone()).build(),
            Counter::NotService,
        ),
        pass(
            "IPv6 UDP to the IPv4-only port",
            Udp::new(CLIENT6, SERVICE6, PORT + 1, junk.clone()).build(),
            Counter::NotService,
        ),
        pass(
            "IPv6 UDP to another address",
            Udp::new(CLIENT6, "2001:db8::2", PORT, junk.clone()).build(),
            Counter::NotService,
        ),
        pass(
            "TCP to the service port",
            v4(junk.clone()).protocol(IPPROTO_TCP).build(),
            Counter::NotService,
        ),
        pass(
            "IPv6 TCP to the service port",
            v6(junk.clone()).protocol(IPPROTO_TCP).build(),
            Counter::NotService,
        ),
        pass(
            "unknown EtherType",
            ethernet(&[], 0x88b5, &junk),
            Counter::NotService,
        ),
        pass(
            "three VLAN tags are not looked through",
            v4(junk.clone())
                .vlan(ETH_P_8021AD, 1)
                .vlan(ETH_P_8021Q, 2)
                .vlan(ETH_P_8021Q, 3)
                .build(),
            Counter::NotService,
        ),
    ]);
}

#[test]
fn vlan_tags_and_ipv4_options_are_looked_through() {
    let good = wg(MESSAGE_INITIATION, INITIATION_LEN);
    let bad = wg(MESSAGE_INITIATION, INITIATION_LEN - 1);
    let mut cases = vec![
        pass(
            "802.1Q",
            v4(good.clone()).vlan(ETH_P_8021Q, 10).build(),
            Counter::Initiation,
        ),
        drop(
            "802.1Q bad length",
            v4(bad.clone()).vlan(ETH_P_8021Q, 10).build(),
            Counter::BadLength,
        ),
        pass(
            "QinQ",
            v4(good.clone())
                .vlan(ETH_P_8021AD, 100)
                .vlan(ETH_P_8021Q, 10)
                .build(),
            Counter::Initiation,
        ),
        drop(
            "QinQ bad type",
            v6(wg(7, 148))
                .vlan(ETH_P_8021AD, 100)
                .vlan(ETH_P_8021Q, 10)
                .build(),
            Counter::BadType,
        ),
        pass(
            "IPv6 on 802.1Q",
            v6(good.clone()).vlan(ETH_P_8021Q, 10).build(),
            Counter::Initiation,
        ),
        pass(
            "IPv6 hop-by-hop header",
            v6(good.clone()).ip_options(vec![1, 4, 0, 0, 0, 0]).build(),
            Counter::Initiation,
        ),
        drop(
            "IPv6 hop-by-hop header, bad length",
            v6(bad.clone()).ip_options(vec![1, 4, 0, 0, 0, 0]).build(),
            Counter::BadLength,
        ),
        pass(
            "Ethernet padding after the datagram",
            v4(wg(MESSAGE_TRANSPORT, 32)).trailer(18).build(),
            Counter::Transport,
        ),
    ];
    for words in [1, 2, 10] {
        let options = vec![1u8; words * 4];
        cases.push(pass(
            format!("IPv4 with {words} option words"),
            v4(good.clone()).ip_options(options.clone()).build(),
            Counter::Initiation,
        ));
        cases.push(drop(
            format!("IPv4 with {words} option words, bad length"),
            v4(bad.clone()).ip_options(options).build(),
            Counter::BadLength,
        ));
    }
    run(cases);
}

#[test]
fn fragments_and_malformed_ip_headers_pass_to_the_kernel() {
    let payload = wg(MESSAGE_TRANSPORT, 64);
    let mut bad_version = v4(payload.clone()).build();
    bad_version[14] = 0x55;
    let mut short_ihl = v4(payload.clone()).build();
    short_ihl[14] = 0x44;
    let mut bad_v6_version = v6(payload.clone()).build();
    bad_v6_version[14] = 0x40;
    run(vec![
        pass(
            "IPv4 first fragment",
            v4(payload.clone()).frag_field(0x2000).build(),
            Counter::Fragment,
        ),
        pass(
            "IPv4 later fragment",
            v4(payload.clone()).frag_field(0x00b9).build(),
            Counter::Fragment,
        ),
        pass(
            "IPv6 first fragment",
            v6(payload.clone()).v6_fragment(0x0001).build(),
            Counter::Fragment,
        ),
        pass(
            "IPv6 later fragment",
            v6(payload.clone()).v6_fragment(0x00b8).build(),
            Counter::Fragment,
        ),
        pass("IPv4 version 5", bad_version, Counter::Unparsed),
        pass("IPv4 header length 4 words", short_ihl, Counter::Unparsed),
        pass(
            "IPv6 version 4 in the header",
            bad_v6_version,
            Counter::Unparsed,
        ),
    ]);
}

/// An atomic fragment (offset 0, no more fragments: RFC 6946) is a whole
/// datagram, which the kernel hands to UDP as it is: checked as one.
#[test]
fn an_ipv6_atomic_fragment_is_checked_as_the_datagram_it_is() {
    let good = wg(MESSAGE_TRANSPORT, 64);
    let bad = b"any payload behind eight bytes".to_vec();
    run(vec![
        pass(
            "atomic fragment, WireGuard",
            v6(good.clone()).v6_fragment(0x0000).build(),
            Counter::Transport,
        ),
        drop(
            "atomic fragment, not WireGuard",
            v6(bad.clone()).v6_fragment(0x0000).build(),
            Counter::BadType,
        ),
        drop(
            "atomic fragment, reserved bits set, not WireGuard",
            v6(bad.clone()).v6_fragment(0x0006).build(),
            Counter::BadType,
        ),
        drop(
            "hop-by-hop, then an atomic fragment, not WireGuard",
            v6(bad.clone())
                .ip_options(vec![1, 4, 0, 0, 0, 0])
                .v6_fragment(0x0000)
                .build(),
            Counter::BadType,
        ),
        drop(
            "atomic fragment to a second address, not WireGuard",
            Udp::new(CLIENT6, SECOND6, PORT, bad)
                .v6_fragment(0x0000)
                .build(),
            Counter::BadType,
        ),
    ]);
}

/// The walk follows four extension headers; a longer chain to a service
/// address is dropped (the kernel would follow it to the port), and one to
/// any other address passes.
#[test]
fn ipv6_extension_chains_longer_than_the_walk_are_dropped_to_service_addresses() {
    let bad = b"any payload behind eight bytes".to_vec();
    let good = wg(MESSAGE_TRANSPORT, 64);
    let mut cases = Vec::new();
    for headers in 1..=4 {
        cases.push(drop(
            format!("{headers} destination-options headers, not WireGuard"),
            v6(bad.clone()).v6_dest_options(headers).build(),
            Counter::BadType,
        ));
        cases.push(pass(
            format!("{headers} destination-options headers, WireGuard"),
            v6(good.clone()).v6_dest_options(headers).build(),
            Counter::Transport,
        ));
    }
    cases.extend([
        drop(
            "5 destination-options headers",
            v6(good.clone()).v6_dest_options(5).build(),
            Counter::DeepHeaders,
        ),
        drop(
            "8 destination-options headers to a second address",
            Udp::new(CLIENT6, SECOND6, PORT, bad.clone())
                .v6_dest_options(8)
                .build(),
            Counter::DeepHeaders,
        ),
        drop(
            "5 destination-options headers to the service address, another port",
            Udp::new(CLIENT6, SERVICE6, 4000, bad.clone())
                .v6_dest_options(5)
                .build(),
            Counter::DeepHeaders,
        ),
        drop(
            "hop-by-hop and 4 destination-options headers",
            v6(bad.clone())
                .ip_options(vec![1, 4, 0, 0, 0, 0])
                .v6_dest_options(4)
                .build(),
            Counter::DeepHeaders,
        ),
        drop(
            "4 destination-options headers and an atomic fragment",
            v6(bad.clone())
                .v6_dest_options(4)
                .v6_fragment(0x0000)
                .build(),
            Counter::DeepHeaders,
        ),
        pass(
            "5 destination-options headers to another address",
            Udp::new(CLIENT6, "2001:db8:2::5", PORT, bad.clone())
                .v6_dest_options(5)
                .build(),
            Counter::Unparsed,
        ),
        pass(
            "4 destination-options headers, then TCP",
            v6(bad).v6_dest_options(4).protocol(IPPROTO_TCP).build(),
            Counter::NotService,
        ),
    ]);
    run(cases);
}

/// With `[shield] drop_fragments`, a fragment to any service address is
/// dropped (a later one carries no port); fragments to other addresses
/// pass, and an atomic fragment is no fragment.
#[test]
fn fragments_to_service_addresses_are_dropped_when_the_shield_says_so() {
    let mut datapath = shield();
    datapath
        .set_shield(ShieldSettings {
            drop_fragments: true,
        })
        .unwrap();
    let payload = wg(MESSAGE_TRANSPORT, 64);
    let other4 = "198.51.100.77";
    let other6 = "2001:db8:2::5";
    let cases = vec![
        drop(
            "IPv4 first fragment",
            v4(payload.clone()).frag_field(0x2000).build(),
            Counter::FragmentDropped,
        ),
        drop(
            "IPv4 later fragment to a second address",
            Udp::new(CLIENT4, SECOND4, PORT, payload.clone())
                .frag_field(0x00b9)
                .build(),
            Counter::FragmentDropped,
        ),
        drop(
            "IPv4 later fragment to the service address, another port",
            Udp::new(CLIENT4, SERVICE4, 4000, payload.clone())
                .frag_field(0x00b9)
                .build(),
            Counter::FragmentDropped,
        ),
        drop(
            "IPv6 first fragment",
            v6(payload.clone()).v6_fragment(0x0001).build(),
            Counter::FragmentDropped,
        ),
        drop(
            "IPv6 later fragment to a second address",
            Udp::new(CLIENT6, SECOND6, PORT, payload.clone())
                .v6_fragment(0x00b8)
                .build(),
            Counter::FragmentDropped,
        ),
        pass(
            "IPv4 fragment to another address",
            Udp::new(CLIENT4, other4, PORT, payload.clone())
                .frag_field(0x2000)
                .build(),
            Counter::Fragment,
        ),
        pass(
            "IPv6 fragment to another address",
            Udp::new(CLIENT6, other6, PORT, payload.clone())
                .v6_fragment(0x0001)
                .build(),
            Counter::Fragment,
        ),
        pass(
            "IPv6 atomic fragment",
            v6(payload.clone()).v6_fragment(0x0000).build(),
            Counter::Transport,
        ),
        pass(
            "IPv4 whole datagram",
            v4(payload).build(),
            Counter::Transport,
        ),
    ];
    harness::run_shield(&datapath, &cases);
    // Off again, fragments pass.
    datapath.set_shield(ShieldSettings::default()).unwrap();
    harness::run_shield(
        &datapath,
        &[pass(
            "IPv4 first fragment, setting off",
            v4(wg(MESSAGE_TRANSPORT, 64)).frag_field(0x2000).build(),
            Counter::Fragment,
        )],
    );
}

/// The advert port takes datagrams sent with TTL 255 from the location's
/// gateways, and from strangers on the segment within a budget per CPU;
/// the shield drops the rest before any socket sees them.
#[test]
fn the_advert_port_takes_the_gateways_and_a_budget_of_strangers_on_the_segment() {
    const ADVERTS: u16 = 51899;
    const GATEWAY: &str = "198.51.100.2";
    const STRANGER: &str = "198.51.100.50";
    const RATE: u32 = 3;
    // The budget is per CPU: stay on one.
    pin_to_one_cpu();
    let mut datapath = shield();
    datapath
        .gate_adverts(AdvertGate {
            port: ADVERTS,
            gateways: vec![GATEWAY.parse().unwrap()],
            segment: vec!["198.51.100.0/24".parse().unwrap()],
            stranger_rate: RATE,
        })
        .unwrap();
    let advert = |from: &str, to: &str| {
        Udp::new(from, to, ADVERTS, b"TGHA any advert".to_vec())
            .ttl(255)
            .build()
    };
    let group = "239.255.77.18";
    let mut cases = vec![
        pass(
            "from a gateway to the group",
            advert(GATEWAY, group),
            Counter::Advert,
        ),
        pass(
            "from a gateway to this gateway",
            advert(GATEWAY, SERVICE4),
            Counter::Advert,
        ),
        drop(
            "from a gateway, TTL 254",
            Udp::new(GATEWAY, group, ADVERTS, vec![0; 32])
                .ttl(254)
                .build(),
            Counter::AdvertTtl,
        ),
        drop(
            "from a gateway, TTL 64",
            Udp::new(GATEWAY, group, ADVERTS, vec![0; 32]).build(),
            Counter::AdvertTtl,
        ),
        drop(
            "from off the segment",
            advert(CLIENT4, group),
            Counter::AdvertStranger,
        ),
        pass(
            "from off the segment, another port",
            Udp::new(CLIENT4, group, ADVERTS + 1, vec![0; 32])
                .ttl(255)
                .build(),
            Counter::NotService,
        ),
        pass(
            "IPv6 to the advert port (no socket listens)",
            Udp::new(CLIENT6, SERVICE6, ADVERTS, vec![0; 32])
                .ttl(255)
                .build(),
            Counter::NotService,
        ),
    ];
    for n in 1..=RATE {
        cases.push(pass(
            format!("stranger on the segment #{n}, within the budget"),
            advert(STRANGER, group),
            Counter::Advert,
        ));
    }
    cases.push(drop(
        "stranger on the segment, past the budget",
        advert(STRANGER, group),
        Counter::AdvertThrottled,
    ));
    harness::run_shield(&datapath, &cases);

    // Heard in an authenticated advert, the stranger is a gateway.
    datapath
        .admit_advert_source(STRANGER.parse().unwrap())
        .unwrap();
    let admitted: Vec<Case> = (1..=2 * RATE)
        .map(|n| {
            pass(
                format!("admitted gateway #{n}"),
                advert(STRANGER, group),
                Counter::Advert,
            )
        })
        .collect();
    harness::run_shield(&datapath, &admitted);

    // Unicast adverts: no segment, strangers are dropped.
    let mut unicast = shield();
    unicast
        .gate_adverts(AdvertGate {
            port: ADVERTS,
            gateways: vec![GATEWAY.parse().unwrap()],
            segment: Vec::new(),
            stranger_rate: 0,
        })
        .unwrap();
    harness::run_shield(
        &unicast,
        &[
            pass(
                "a configured peer",
                advert(GATEWAY, SERVICE4),
                Counter::Advert,
            ),
            drop(
                "a stranger on the segment",
                advert(STRANGER, SERVICE4),
                Counter::AdvertStranger,
            ),
        ],
    );
}

/// Keeps the calling thread on the CPU it runs on.
fn pin_to_one_cpu() {
    // SAFETY: plain syscalls on this thread's own affinity mask.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// Every prefix of a frame, from the Ethernet header on: cut inside the
/// headers, the shield cannot see the port and passes the frame (the kernel
/// drops it); cut after the UDP header, the datagram is truncated and dropped.
#[test]
fn frames_cut_at_every_length_are_handled() {
    const ETH_HLEN: usize = 14;
    let frames = [
        (
            "ipv4",
            v4(wg(MESSAGE_INITIATION, INITIATION_LEN)).build(),
            ETH_HLEN + 20,
        ),
        (
            "ipv4 options vlan",
            v4(wg(MESSAGE_RESPONSE, RESPONSE_LEN))
                .ip_options(vec![1; 8])
                .vlan(ETH_P_8021Q, 7)
                .build(),
            ETH_HLEN + 4 + 28,
        ),
        ("ipv6", v6(wg(MESSAGE_TRANSPORT, 48)).build(), ETH_HLEN + 40),
        (
            "ipv6 hop-by-hop",
            v6(wg(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN))
                .ip_options(vec![1, 4, 0, 0, 0, 0])
                .build(),
            ETH_HLEN + 48,
        ),
    ];
    let mut cases = Vec::new();
    for (name, frame, udp_off) in frames {
        for len in ETH_HLEN..frame.len() {
            let counter = if len < udp_off + 8 {
                Counter::Unparsed
            } else {
                Counter::Truncated
            };
            cases.push(case(
                format!("{name} cut to {len} bytes"),
                frame[..len].to_vec(),
                counter.verdict() as u32,
                counter,
            ));
        }
    }
    run(cases);
}

/// The kernel refuses test frames shorter than an Ethernet header, so the
/// program never sees one; this pins that assumption.
#[test]
fn frames_shorter_than_ethernet_never_reach_the_program() {
    let datapath = shield();
    let program = datapath.program().unwrap();
    for len in [0, 1, 13] {
        let input = vec![0u8; len];
        let result = program.test_run(TestRunOptions {
            data_in: Some(&input),
            ..Default::default()
        });
        assert!(result.is_err(), "a {len}-byte frame was run");
    }
}

/// The shield with the VIP fence guarding (198.51.100.1, 2001:db8::1), and
/// the lease renewed for `lease` with `holds_vips`, or never.
fn fenced(lease: Option<(Duration, bool)>) -> Datapath {
    let mut datapath = shield();
    datapath
        .set_vips(&[SERVICE4.parse().unwrap(), SERVICE6.parse().unwrap()])
        .unwrap();
    if let Some((lease, holds_vips)) = lease {
        datapath.renew_lease(lease, holds_vips).unwrap();
    }
    datapath
}

/// The frames the fence looks at, and what each gets with the fence up
/// (`fenced`) and with a live lease that holds the VIPs (`open`).
fn fence_cases(fenced: bool, arp_fenced: bool) -> Vec<Case> {
    let v4 = |dst: &str, payload| Udp::new(CLIENT4, dst, PORT, payload).build();
    let v6 = |payload| Udp::new(CLIENT6, SERVICE6, PORT, payload).build();
    let wg_case = |name: &str, input: Vec<u8>, counter| {
        if fenced {
            drop(name, input, Counter::Fenced)
        } else {
            pass(name, input, counter)
        }
    };
    let neighbour = |name: &str, input: Vec<u8>| {
        if arp_fenced {
            drop(name, input, Counter::Fenced)
        } else {
            pass(name, input, Counter::NotService)
        }
    };
    vec![
        wg_case(
            "initiation to an IPv4 VIP",
            v4(SERVICE4, wg(MESSAGE_INITIATION, INITIATION_LEN)),
            Counter::Initiation,
        ),
        wg_case(
            "transport to an IPv4 VIP",
            v4(SERVICE4, wg(MESSAGE_TRANSPORT, 128)),
            Counter::Transport,
        ),
        wg_case(
            "initiation to an IPv6 VIP",
            v6(wg(MESSAGE_INITIATION, INITIATION_LEN)),
            Counter::Initiation,
        ),
        wg_case(
            "VLAN-tagged transport to an IPv4 VIP (full walk)",
            Udp::new(CLIENT4, SERVICE4, PORT, wg(MESSAGE_TRANSPORT, 64))
                .vlan(ETH_P_8021Q, 7)
                .build(),
            Counter::Transport,
        ),
        pass(
            "initiation to a service address that is no VIP",
            v4(SECOND4, wg(MESSAGE_INITIATION, INITIATION_LEN)),
            Counter::Initiation,
        ),
        drop(
            "malformed WireGuard to a VIP keeps its own reason",
            v4(SERVICE4, wg(9, 64)),
            Counter::BadType,
        ),
        neighbour(
            "ARP request for an IPv4 VIP",
            arp_request([198, 51, 100, 1]),
        ),
        pass(
            "ARP request for another address",
            arp_request([198, 51, 100, 2]),
            Counter::NotService,
        ),
        neighbour(
            "neighbour solicitation for an IPv6 VIP",
            neighbor_solicitation(CLIENT6, SERVICE6),
        ),
        pass(
            "neighbour solicitation for another address",
            neighbor_solicitation(CLIENT6, SECOND6),
            Counter::NotService,
        ),
    ]
}

#[test]
fn a_lapsed_lease_fences_the_vips() {
    // VIPs set and the lease never granted: a daemon that died at once.
    harness::run_shield(&fenced(None), &fence_cases(true, true));
}

#[test]
fn a_master_with_a_live_lease_answers_for_its_vips() {
    let lease = Some((Duration::from_secs(30), true));
    harness::run_shield(&fenced(lease), &fence_cases(false, false));
}

#[test]
fn a_backup_with_a_live_lease_takes_vip_traffic_but_does_not_answer_for_vips() {
    let lease = Some((Duration::from_secs(30), false));
    harness::run_shield(&fenced(lease), &fence_cases(false, true));
}

#[test]
fn a_lease_lapses_when_it_is_not_renewed() {
    // Long enough for the cases to run while it holds, on an emulated CPU
    // too.
    let lease = support::stretch(Duration::from_millis(100));
    let datapath = fenced(Some((lease, true)));
    harness::run_shield(&datapath, &fence_cases(false, false));
    // Twice the lease plus a few jiffies at any HZ.
    std::thread::sleep(lease * 3);
    harness::run_shield(&datapath, &fence_cases(true, true));
    let status = datapath.fence_status().unwrap();
    assert!(status.holds_vips && status.lease_left_ms == 0, "{status:?}");
}
