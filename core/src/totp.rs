//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP, HMAC-SHA1,
//! 30 s steps, 6 digits: what authenticator apps use), with one use per
//! code.

use hmac::{Hmac, Mac as _};
use sha1::Sha1;

/// Length of a code.
pub const DIGITS: usize = 6;
/// Seconds per time step.
pub const STEP_S: i64 = 30;
/// Bytes of a generated secret (160 bits, as RFC 4226 recommends).
pub const SECRET_BYTES: usize = 20;

/// The HOTP value of `secret` at `counter`, with `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(&counter.to_be_bytes());
    let hash = mac.finalize().into_bytes();
    let offset = usize::from(hash[19] & 0x0f);
    let binary = u32::from_be_bytes([
        hash[offset] & 0x7f,
        hash[offset + 1],
        hash[offset + 2],
        hash[offset + 3],
    ]);
    binary % 10u32.pow(digits)
}

/// The time step a Unix time (seconds) falls in.
pub fn step_at(unix_s: i64) -> i64 {
    unix_s.div_euclid(STEP_S)
}

/// The 6-digit code for a step, as an app shows it.
pub fn code_at(secret: &[u8], step: i64) -> String {
    format!(
        "{:0width$}",
        hotp(secret, step as u64, DIGITS as u32),
        width = DIGITS
    )
}

/// What a submitted code turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Right, for this step (to be recorded as used).
    Valid { step: i64 },
    /// Right, but for a step at or before the last one used: a replay.
    Replayed,
    /// Not the code of any step in the window.
    Wrong,
}

/// Why a code was not even checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("a code is {DIGITS} digits, got {0:?}")]
    Format(String),
}

/// Checks `code` against the steps from `skew` before to `skew` after the
/// one `now_unix_s` falls in. A code of a step at or before `last_used` is a
/// replay (RFC 6238 §5.2): each code, and every code before it, works once.
pub fn check(
    secret: &[u8],
    code: &str,
    now_unix_s: i64,
    last_used: i64,
    skew: i64,
) -> Result<Check, CodeError> {
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CodeError::Format(code.chars().take(16).collect()));
    }
    let now = step_at(now_unix_s);
    let mut replayed = false;
    // Newest first, so a code that is both old and current counts as current.
    for step in (now - skew..=now + skew).rev() {
        if step < 0 || !constant_time_eq(code_at(secret, step).as_bytes(), code.as_bytes()) {
            continue;
        }
        if step > last_used {
            return Ok(Check::Valid { step });
        }
        replayed = true;
    }
    Ok(if replayed {
        Check::Replayed
    } else {
        Check::Wrong
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new secret.
pub fn generate_secret() -> [u8; SECRET_BYTES] {
    crate::random()
}

/// The secret as authenticator apps take it: base32 without padding.
pub fn secret_base32(secret: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(secret)
}

/// A secret from its base32 form (as [`secret_base32`] writes it; case and
/// padding are forgiven).
pub fn secret_from_base32(text: &str) -> Option<Vec<u8>> {
    let text: String = text
        .trim()
        .trim_end_matches('=')
        .to_ascii_uppercase()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    data_encoding::BASE32_NOPAD.decode(text.as_bytes()).ok()
}

/// The `otpauth://` URI an app scans from a QR code.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let issuer = percent_encode(issuer);
    format!(
        "otpauth://totp/{issuer}:{}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_S}",
        percent_encode(account),
        secret_base32(secret),
    )
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc_4226_hotp_vectors() {
        let expect = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, want) in expect.into_iter().enumerate() {
            assert_eq!(
                hotp(RFC_SECRET, counter as u64, 6),
                want,
                "counter {counter}"
            );
        }
    }

    #[test]
    fn rfc_6238_sha1_vectors() {
        for (time, want) in [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(hotp(RFC_SECRET, step_at(time) as u64, 8), want, "T={time}");
        }
        assert_eq!(code_at(RFC_SECRET, step_at(59)), "287082");
    }

    #[test]
    fn codes_of_the_window_pass_once() {
        let now = 1_700_000_000;
        let step = step_at(now);
        let code = code_at(RFC_SECRET, step);
        assert_eq!(
            check(RFC_SECRET, &code, now, 0, 1),
            Ok(Check::Valid { step })
        );
        // The same code again, once recorded, is a replay.
        assert_eq!(check(RFC_SECRET, &code, now, step, 1), Ok(Check::Replayed));
        // The previous step's code still passes within the skew...
        let previous = code_at(RFC_SECRET, step - 1);
        assert_eq!(
            check(RFC_SECRET, &previous, now, 0, 1),
            Ok(Check::Valid { step: step - 1 })
        );
        // ...but not once a later code was used.
        assert_eq!(
            check(RFC_SECRET, &previous, now, step, 1),
            Ok(Check::Replayed)
        );
        // Two steps back is outside a skew of one.
        let old = code_at(RFC_SECRET, step - 2);
        assert_eq!(check(RFC_SECRET, &old, now, 0, 1), Ok(Check::Wrong));
        let next = code_at(RFC_SECRET, step + 1);
        assert_eq!(
            check(RFC_SECRET, &next, now, 0, 1),
            Ok(Check::Valid { step: step + 1 })
        );
        assert_eq!(check(RFC_SECRET, &next, now, 0, 0), Ok(Check::Wrong));
    }

    #[test]
    fn malformed_codes_are_refused_before_checking() {
        for bad in ["", "12345", "1234567", "12a456", "１２３４５６"] {
            assert!(check(RFC_SECRET, bad, 0, 0, 1).is_err(), "{bad:?}");
        }
        assert!(check(RFC_SECRET, " 287082\n", 59, 0, 1).is_ok());
    }

    #[test]
    fn uri_carries_the_base32_secret() {
        assert_eq!(
            secret_base32(RFC_SECRET),
            "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
        );
        assert_eq!(
            otpauth_uri("Tidegate", "alice smith", RFC_SECRET),
            "otpauth://totp/Tidegate:alice%20smith?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Tidegate&algorithm=SHA1&digits=6&period=30"
        );
    }
}
