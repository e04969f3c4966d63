//! CONNECT target and host parsing: never panics, and whatever parses is normalized (parsing
//! its own text again gives the same target) and can be decided.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use miniapp_gateway::config;
use miniapp_gateway::policy::{Channel, Host, Policy, normalize_host, parse_authority};

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let text = r#"
[policy]
global_deny = ["*.tracker.example"]
[[app]]
id = "demo"
server_domains = ["api.shop.example", "*.cdn.shop.example", ".help.example", "wss://ws.shop.example"]
"#;
        config::load_str(std::path::Path::new("fuzz.toml"), text.to_owned()).expect("valid").policy
    })
}

fuzz_target!(|input: &[u8]| {
    let Ok(raw) = std::str::from_utf8(input) else { return };
    let Ok(target) = parse_authority(raw) else { return };
    let _ = policy().decide("demo", Channel::Request, &target);
    if let Host::Name(name) = &target.host {
        let again = normalize_host(name).expect("a normalized name normalizes");
        assert_eq!(again.as_ref(), name.as_ref(), "normalization is idempotent");
        assert!(target.is_named_by(Some(name)));
    }
    let text = match &target.host {
        Host::Name(name) => format!("{name}:{}", target.port),
        Host::Ip(ip) if ip.is_ipv6() => format!("[{ip}]:{}", target.port),
        Host::Ip(ip) => format!("{ip}:{}", target.port),
    };
    assert_eq!(parse_authority(&text).expect("its own text parses"), target);
});
