//! Client addresses for `tidegate_common::client::ClientKey`, built from
//! whole words so that the compiler writes them with word stores: built
//! byte by byte, an address is first zeroed with a memset call, and read as
//! one 16-byte value it is copied with a memmove call.

/// The IPv4-mapped form of `addr`, the source or destination word as read
/// from an IPv4 header.
#[inline(always)]
pub fn v4_mapped(addr: u32) -> [u8; 16] {
    // `::ffff:a.b.c.d`: eight zero bytes, then 0, 0, 0xff, 0xff, then the address.
    let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    // SAFETY: four words and sixteen bytes have the same size and no
    // invalid values.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([0, 0, mapped, addr]) }
}

/// The IPv6 address at `addr` as two words in the order of its bytes.
///
/// # Safety
/// The sixteen bytes at `addr` must be readable; they may be unaligned.
#[inline(always)]
pub unsafe fn v6_words(addr: *const [u8; 16]) -> [u64; 2] {
    let words = addr.cast::<u64>();
    // SAFETY: the caller's.
    unsafe { [words.read_unaligned(), words.add(1).read_unaligned()] }
}

/// The address of [`v6_words`] as bytes.
#[inline(always)]
pub fn v6_bytes(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: two words and sixteen bytes have the same size and no
    // invalid values.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}
