//! Malformed WireGuard datagrams for the shield, and a paced UDP sender.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};

/// Size of a handshake initiation (type 1).
pub const INITIATION_LEN: usize = 148;
/// Size of a handshake response (type 2).
pub const RESPONSE_LEN: usize = 92;
/// Size of a cookie reply (type 3).
pub const COOKIE_REPLY_LEN: usize = 64;
/// Size of an empty transport message (type 4, a keepalive); longer ones
/// grow in 16-byte steps.
pub const TRANSPORT_MIN_LEN: usize = 32;

/// Datagrams sent back to back before [`send_paced`] pauses.
pub const PACE_BATCH: u32 = 32;

/// Pause after every [`PACE_BATCH`] datagrams, so that veth queues never
/// overflow and every datagram reaches the XDP program.
pub const PACE_PAUSE: Duration = Duration::from_millis(1);

/// One kind of malformed datagram and the drop counter it must land in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong with it, for messages.
    pub name: &'static str,
    /// The gateway's drop counter for it.
    pub counter: &'static str,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// A WireGuard-like message of `len` bytes: `msg_type`, three zero reserved
/// bytes, then a non-zero filler so that only the header decides.
fn message(msg_type: u8, len: usize) -> Vec<u8> {
    let mut payload: Vec<u8> = (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
        .collect();
    payload[..4].copy_from_slice(&[msg_type, 0, 0, 0]);
    payload
}

/// The malformed kinds the shield must drop, each with exactly one defect:
/// unknown types 5 and 0, an initiation one byte short, a transport message
/// one byte over a 16-byte boundary, and a valid-size transport message with
/// a non-zero reserved byte.
pub fn malformed_kinds() -> Vec<Malformed> {
    let mut reserved = message(4, TRANSPORT_MIN_LEN);
    reserved[1] = 1;
    vec![
        Malformed {
            name: "type 5",
            counter: "bad-type",
            payload: message(5, TRANSPORT_MIN_LEN),
        },
        Malformed {
            name: "type 0",
            counter: "bad-type",
            payload: message(0, INITIATION_LEN),
        },
        Malformed {
            name: "initiation of 147 bytes",
            counter: "bad-length",
            payload: message(1, INITIATION_LEN - 1),
        },
        Malformed {
            name: "transport of 33 bytes",
            counter: "bad-length",
            payload: message(4, TRANSPORT_MIN_LEN + 1),
        },
        Malformed {
            name: "transport with reserved byte 1 = 1",
            counter: "bad-reserved",
            payload: reserved,
        },
    ]
}

/// Sends `payload` to `target` `count` times from `socket`, pausing
/// [`PACE_PAUSE`] after every [`PACE_BATCH`] datagrams. Returns the number
/// sent (always `count`; any send error is returned instead).
pub fn send_paced(
    socket: &UdpSocket,
    target: SocketAddr,
    payload: &[u8],
    count: u32,
) -> Result<u32> {
    for i in 0..count {
        let sent = socket
            .send_to(payload, target)
            .with_context(|| format!("sending datagram {} of {count} to {target}", i + 1))?;
        anyhow::ensure!(
            sent == payload.len(),
            "sent {sent} of {} bytes to {target}",
            payload.len()
        );
        if (i + 1) % PACE_BATCH == 0 {
            std::thread::sleep(PACE_PAUSE);
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_exactly_one_defect() {
        let kinds = malformed_kinds();
        let valid_len = |t: u8, len: usize| match t {
            1 => len == INITIATION_LEN,
            2 => len == RESPONSE_LEN,
            3 => len == COOKIE_REPLY_LEN,
            4 => len >= TRANSPORT_MIN_LEN && (len - TRANSPORT_MIN_LEN).is_multiple_of(16),
            _ => true,
        };
        for kind in &kinds {
            let p = &kind.payload;
            let type_ok = (1..=4).contains(&p[0]);
            let len_ok = valid_len(p[0], p.len());
            let reserved_ok = p[1..4] == [0, 0, 0];
            let defects = [!type_ok, !len_ok, !reserved_ok]
                .iter()
                .filter(|d| **d)
                .count();
            assert_eq!(defects, 1, "{}: {p:?}", kind.name);
            let expected = if !type_ok {
                "bad-type"
            } else if !len_ok {
                "bad-length"
            } else {
                "bad-reserved"
            };
            assert_eq!(kind.counter, expected, "{}", kind.name);
        }
        let counters: Vec<&str> = kinds.iter().map(|k| k.counter).collect();
        for counter in ["bad-type", "bad-length", "bad-reserved"] {
            assert!(counters.contains(&counter), "no kind for {counter}");
        }
    }

    #[test]
    fn send_paced_delivers_every_datagram() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = send_paced(&tx, rx.local_addr().unwrap(), b"abc", 40).unwrap();
        assert_eq!(sent, 40);
        let mut buf = [0_u8; 16];
        for _ in 0..40 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"abc");
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }
}
