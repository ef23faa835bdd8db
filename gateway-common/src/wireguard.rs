//! WireGuard message framing, as the shield checks it (WireGuard paper, §5.4).

/// Handshake initiation.
pub const MESSAGE_INITIATION: u8 = 1;
/// Handshake response.
pub const MESSAGE_RESPONSE: u8 = 2;
/// Cookie reply, sent under load.
pub const MESSAGE_COOKIE_REPLY: u8 = 3;
/// Transport data.
pub const MESSAGE_TRANSPORT: u8 = 4;

/// Exact length of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Exact length of a handshake response.
pub const RESPONSE_LEN: usize = 92;
/// Exact length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 64;
/// Length of an empty transport message (a keepalive): a 16-byte header and a
/// 16-byte authentication tag. Longer messages grow in 16-byte steps, since
/// WireGuard pads the plaintext to a multiple of 16.
pub const TRANSPORT_MIN_LEN: usize = 32;
/// Step in which transport messages grow.
pub const TRANSPORT_STEP: usize = 16;
