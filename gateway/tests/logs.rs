//! `tidegate-gateway --log-format json` writes every log line as a JSON object.

use std::process::Command;

/// Each stderr line of a run that fails at its config is one JSON object
/// with a level and a message, and the message names the file.
#[test]
fn json_log_lines() {
    let missing = "/nonexistent/tidegate-logs-test.toml";
    let out = Command::new(env!("CARGO_BIN_EXE_tidegate-gateway"))
        .args(["--log-format", "json", "--config", missing])
        .env_remove("RUST_LOG")
        .output()
        .expect("running tidegate-gateway");
    assert!(!out.status.success(), "a missing config must fail");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 logs");
    assert!(!stderr.trim().is_empty(), "no log line");
    for line in stderr.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(event["level"].is_string(), "no level: {line}");
        assert!(event["fields"]["message"].is_string(), "no message: {line}");
    }
    assert!(
        stderr.contains(missing),
        "the error names no file: {stderr}"
    );
}
