//! Who starts each WireGuard handshake: a packet socket on a client's
//! interface records every handshake message to or from the location's
//! port, with its direction and the time it was seen. A tunnel resumed by
//! the gateway's kick starts with an initiation the client receives; one
//! resumed by the client's own timer starts with an initiation it sends.

use std::time::Instant;

use anyhow::Result;

use crate::capture::Capture;
use crate::netns::Netns;

/// WireGuard's handshake initiation and response.
pub const INITIATION: u8 = 1;
pub const RESPONSE: u8 = 2;

/// One handshake message seen on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeMessage {
    pub at: Instant,
    /// [`INITIATION`] or [`RESPONSE`].
    pub kind: u8,
    /// Sent by the watched side (else received).
    pub sent: bool,
}

/// A running watch; [`Self::finish`] stops it and returns what it saw.
#[derive(Debug)]
pub struct HandshakeWatch(Capture<HandshakeMessage>);

impl HandshakeWatch {
    /// Watches `ifname` in `netns` for handshake messages from or to UDP
    /// port `port` (the location's).
    pub fn start(netns: &Netns, ifname: &str, port: u16) -> Result<Self> {
        let capture = Capture::start(netns, ifname, move |frame| {
            handshake_kind(frame.packet, port).map(|kind| HandshakeMessage {
                at: frame.at,
                kind,
                sent: frame.sent,
            })
        })?;
        Ok(Self(capture))
    }

    /// Stops the watch; every message it saw, in order.
    pub fn finish(self) -> Result<Vec<HandshakeMessage>> {
        self.0.finish()
    }
}

/// Who started the first handshake after `since`: `Some(true)` when the
/// watched side sent that initiation, `Some(false)` when it received it,
/// `None` when no initiation came.
pub fn first_initiation_sent(messages: &[HandshakeMessage], since: Instant) -> Option<bool> {
    messages
        .iter()
        .find(|m| m.at >= since && m.kind == INITIATION)
        .map(|m| m.sent)
}

/// The WireGuard handshake message type of an IPv4 or IPv6 packet from or
/// to UDP `port`, if it is one.
fn handshake_kind(packet: &[u8], port: u16) -> Option<u8> {
    let version = packet.first()? >> 4;
    let (proto, udp) = match version {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            (*packet.get(9)?, (fragment == 0).then_some(ihl)?)
        }
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    if proto != 17 {
        return None;
    }
    let sport = u16::from_be_bytes([*packet.get(udp)?, *packet.get(udp + 1)?]);
    let dport = u16::from_be_bytes([*packet.get(udp + 2)?, *packet.get(udp + 3)?]);
    let kind = *packet.get(udp + 8)?;
    (sport == port || dport == port)
        .then_some(kind)
        .filter(|k| *k == INITIATION || *k == RESPONSE)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn v4_udp(sport: u16, dport: u16, kind: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 4];
        p[0] = 0x45;
        p[9] = 17;
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[28] = kind;
        p
    }

    #[test]
    fn handshake_messages_are_told_from_the_rest() {
        let cases = [
            ("initiation to the port", v4_udp(40000, 51820, 1), Some(1)),
            ("response from the port", v4_udp(51820, 40000, 2), Some(2)),
            ("transport data", v4_udp(51820, 40000, 4), None),
            ("another port", v4_udp(40000, 51821, 1), None),
            ("truncated", v4_udp(40000, 51820, 1)[..25].to_vec(), None),
        ];
        for (name, packet, expected) in cases {
            assert_eq!(handshake_kind(&packet, 51820), expected, "{name}");
        }
        let mut tcp = v4_udp(40000, 51820, 1);
        tcp[9] = 6;
        assert_eq!(handshake_kind(&tcp, 51820), None);
    }

    #[test]
    fn the_first_initiation_after_a_moment_tells_who_started() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let messages = [
            HandshakeMessage {
                at: at(0),
                kind: INITIATION,
                sent: true,
            },
            HandshakeMessage {
                at: at(10),
                kind: RESPONSE,
                sent: false,
            },
            HandshakeMessage {
                at: at(500),
                kind: INITIATION,
                sent: false,
            },
        ];
        assert_eq!(first_initiation_sent(&messages, at(0)), Some(true));
        assert_eq!(first_initiation_sent(&messages, at(1)), Some(false));
        assert_eq!(first_initiation_sent(&messages, at(501)), None);
    }
}
