//! Requests on the control socket, as the daemon reads them: any line is a
//! request or an error; a request serializes back to one that reads the
//! same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidegate_gateway::control::Request;

fuzz_target!(|line: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<Request>(line) {
        let again = serde_json::to_string(&request).expect("a request serializes");
        let back: Request = serde_json::from_str(&again).expect("what serializes reads back");
        assert_eq!(back, request);
    }
});
