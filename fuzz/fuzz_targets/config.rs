//! Config validation: arbitrary text is either a config or a list of errors with positions
//! inside the text, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniapp_gateway::config;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if text.contains("apps_dir") || text.contains("[tls]") {
        return; // those read files; the fuzzer stays in memory
    }
    if let Err(errors) = config::load_str(std::path::Path::new("fuzz.toml"), text.to_owned()) {
        let lines = text.lines().count().max(1) + 1;
        for error in errors.0 {
            assert!(error.line >= 1 && error.line <= lines, "{error}");
            assert!(error.col >= 1, "{error}");
        }
    }
});
