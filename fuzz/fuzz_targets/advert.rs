//! HA adverts as they come off the segment, unsigned and signed with the
//! location's key: decoding never panics, and what decodes encodes back to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate_fuzz::{key, signed};
use tidegate_gateway::ha::advert::Advert;

fuzz_target!(|data: &[u8]| {
    let key = key();
    for bytes in [data.to_vec(), signed(data)] {
        if let Ok(advert) = Advert::decode(&bytes, &key) {
            assert_eq!(advert.encode(&key), bytes, "{advert:?}");
        }
    }
});
