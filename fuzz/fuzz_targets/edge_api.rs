//! The Edge's JSON bodies, as the API reads and checks them before relaying
//! a request: any body is a request or an answer naming what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate_edge::api::{self, ConfigRequest, EnrolRequest, MfaFinishRequest, MfaStartRequest};

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = api::parse::<ConfigRequest>(body) {
        let _ = request.into_kind();
    }
    if let Ok(request) = api::parse::<EnrolRequest>(body) {
        let _ = request.into_kind();
    }
    if let Ok(request) = api::parse::<MfaStartRequest>(body) {
        let _ = request.into_kind();
    }
    if let Ok(request) = api::parse::<MfaFinishRequest>(body) {
        let _ = request.into_kind();
    }
});
