//! Decision tests: every branch of [`Policy::decide`], and property tests of the matcher.

use proptest::prelude::*;

use super::*;

fn list(raw: &[&str]) -> DomainList {
    DomainList::new(raw.iter().map(|r| parse_entry(r).unwrap()).collect())
}

fn app(id: &str, action: Action, server: &[&str], webview: &[&str]) -> App {
    App {
        id: id.into(),
        name: None,
        token: None,
        action,
        server_domains: list(server),
        webview_domains: list(webview),
        api_whitelist: HashSet::new(),
        api_entries: Vec::new(),
        platform: crate::scopes::rules::Platform::Mpaas,
        secret: None,
    }
}

fn policy(unknown_app: Option<&str>) -> Policy {
    Policy::new(
        [
            app("demo", Action::Enforce, &["https://api.shop.example", "*.cdn.shop.example"], &[".shop.example"]),
            app("watch", Action::Report, &["api.shop.example"], &[]),
            app("free", Action::Open, &["api.shop.example"], &[]),
        ]
        .map(Arc::new),
        GlobalRules {
            global_deny: list(&["bad.shop.example", "*.tracker.example"]),
            global_allow: list(&["status.example"]),
            unknown_app: unknown_app.map(Into::into),
            block_private_addresses: true,
            resolve: HashMap::new(),
        },
    )
}

fn target(raw: &str) -> Target<'_> {
    parse_authority(raw).unwrap()
}

fn decide(p: &Policy, app: &str, channel: Channel, raw: &str) -> (Verdict, Reason, Option<String>) {
    let d = p.decide(app, channel, &target(raw));
    (d.verdict, d.reason, d.rule.map(|r| r.to_string()))
}

#[test]
fn whitelisted_hosts_are_allowed_with_their_rule() {
    let p = policy(None);
    let got = decide(&p, "demo", Channel::Request, "api.shop.example:443");
    assert_eq!(got, (Verdict::Allow, Reason::Whitelisted, Some("server_domains[0]".into())));
    let got = decide(&p, "demo", Channel::Request, "a.b.cdn.shop.example:443");
    assert_eq!(got, (Verdict::Allow, Reason::Whitelisted, Some("server_domains[1]".into())));
}

#[test]
fn channels_never_stand_in_for_each_other() {
    let p = policy(None);
    assert_eq!(decide(&p, "demo", Channel::Webview, "api.shop.example:443").1, Reason::Whitelisted);
    assert_eq!(decide(&p, "demo", Channel::Request, "shop.example:443").1, Reason::NotWhitelisted);
    assert_eq!(decide(&p, "demo", Channel::Webview, "shop.example:443").1, Reason::Whitelisted);
    assert_eq!(decide(&p, "demo", Channel::Webview, "x.cdn.shop.example:8443").1, Reason::NotWhitelisted);
}

#[test]
fn refusals_carry_their_reason() {
    let p = policy(None);
    assert_eq!(decide(&p, "demo", Channel::Request, "evil.example:443"), (Verdict::Deny, Reason::NotWhitelisted, None));
    assert_eq!(decide(&p, "demo", Channel::Request, "api.shop.example:8443").1, Reason::NotWhitelisted);
    assert_eq!(decide(&p, "demo", Channel::Request, "93.184.216.34:443").1, Reason::IpLiteral);
    assert_eq!(decide(&p, "demo", Channel::Request, "[2606:4700::1]:443").1, Reason::IpLiteral);
    assert_eq!(decide(&p, "nobody", Channel::Request, "api.shop.example:443").1, Reason::UnknownApp);
}

#[test]
fn global_deny_beats_every_allow_and_every_action() {
    let p = policy(None);
    for app in ["demo", "watch", "free"] {
        let got = decide(&p, app, Channel::Request, "x.tracker.example:443");
        assert_eq!(got, (Verdict::Deny, Reason::GlobalDeny, Some("global_deny[1]".into())), "{app}");
    }
    assert_eq!(decide(&p, "demo", Channel::Webview, "bad.shop.example:443").1, Reason::GlobalDeny);
}

#[test]
fn global_allow_applies_after_the_apps_lists() {
    let p = policy(None);
    let got = decide(&p, "demo", Channel::Webview, "status.example:443");
    assert_eq!(got, (Verdict::Allow, Reason::GlobalAllow, Some("global_allow[0]".into())));
}

#[test]
fn actions_relax_only_the_apps_own_lists() {
    let p = policy(None);
    assert_eq!(
        decide(&p, "watch", Channel::Request, "evil.example:443"),
        (Verdict::Report, Reason::NotWhitelisted, None)
    );
    assert_eq!(decide(&p, "watch", Channel::Request, "10.0.0.1:443"), (Verdict::Report, Reason::IpLiteral, None));
    assert_eq!(decide(&p, "watch", Channel::Request, "api.shop.example:443").1, Reason::Whitelisted);
    assert_eq!(decide(&p, "free", Channel::Request, "evil.example:443"), (Verdict::Allow, Reason::Open, None));
    assert_eq!(decide(&p, "free", Channel::Request, "api.shop.example:443").1, Reason::Whitelisted);
}

#[test]
fn unknown_apps_fall_back_when_configured() {
    let p = policy(Some("demo"));
    let d = p.decide("stranger", Channel::Request, &target("api.shop.example:443"));
    assert_eq!((d.verdict, d.reason), (Verdict::Allow, Reason::Whitelisted));
    assert_eq!(d.app.map(|a| &*a.id), Some("demo"));
    assert_eq!(decide(&p, "stranger", Channel::Request, "evil.example:443").1, Reason::NotWhitelisted);
}

#[test]
fn normalized_spellings_match() {
    let p = policy(None);
    for raw in ["API.SHOP.EXAMPLE:443", "api.shop.example.:443", "Api.Shop.Example.:443"] {
        assert_eq!(decide(&p, "demo", Channel::Request, raw).1, Reason::Whitelisted, "{raw}");
    }
    for raw in ["api.shop.example.evil.net:443", "evilapi.shop.example:443", "cdn.shop.example:443"] {
        assert_eq!(decide(&p, "demo", Channel::Request, raw).1, Reason::NotWhitelisted, "{raw}");
    }
}

#[test]
fn resolve_overrides_prefer_a_port_specific_key() {
    let mut p = policy(None);
    let ip = "127.0.0.1".parse().unwrap();
    p.rules.resolve.insert(
        "api.shop.example".into(),
        vec![(None, ResolveOverride { ip, port: Some(9443) }), (Some(8443), ResolveOverride { ip, port: None })],
    );
    assert_eq!(p.resolve_override("api.shop.example", 443), Some("127.0.0.1:9443".parse().unwrap()));
    assert_eq!(p.resolve_override("api.shop.example", 8443), Some("127.0.0.1:8443".parse().unwrap()));
    assert_eq!(p.resolve_override("img.shop.example", 443), None);
}

#[test]
fn urls_are_decided_like_connects() {
    let p = policy(None);
    let (d, shown) = p.decide_url("demo", Channel::Request, "https://API.shop.example/path?q=1").unwrap();
    assert_eq!((d.reason, shown.as_str()), (Reason::Whitelisted, "api.shop.example:443"));
    let (d, _) = p.decide_url("demo", Channel::Request, "http://api.shop.example/").unwrap();
    assert_eq!((d.verdict, d.reason), (Verdict::Deny, Reason::HttpsRequired));
    let (d, shown) = p.decide_url("demo", Channel::Webview, "https://bücher.shop.example:443/").unwrap();
    assert_eq!((d.reason, shown.as_str()), (Reason::Whitelisted, "xn--bcher-kva.shop.example:443"));
    let (d, _) = p.decide_url("demo", Channel::Request, "https://127.1/").unwrap();
    assert_eq!(d.reason, Reason::IpLiteral);
    assert!(p.decide_url("demo", Channel::Request, "https://u:p@api.shop.example/").is_err());
    assert!(p.decide_url("demo", Channel::Request, "not a url").is_err());
}

#[test]
fn api_calls_follow_the_api_whitelist_and_the_action() {
    let mut apps = vec![
        app("demo", Action::Enforce, &[], &[]),
        app("watch", Action::Report, &[], &[]),
        app("free", Action::Open, &[], &[]),
    ];
    apps[0].api_whitelist.insert("shop.pay".into());
    let p = Policy::new(apps.into_iter().map(Arc::new), policy(None).rules.clone());
    assert_eq!(p.decide_api("demo", "shop.pay"), Some((Verdict::Allow, ApiReason::ApiWhitelisted)));
    assert_eq!(p.decide_api("demo", "shop.refund"), Some((Verdict::Deny, ApiReason::ApiNotWhitelisted)));
    assert_eq!(p.decide_api("watch", "shop.refund"), Some((Verdict::Report, ApiReason::ApiNotWhitelisted)));
    assert_eq!(p.decide_api("free", "anything"), Some((Verdict::Allow, ApiReason::Open)));
    assert_eq!(p.decide_api("stranger", "shop.pay"), None);
}

#[test]
fn the_first_record_must_be_a_client_hello_for_the_connect_host() {
    let t = target("api.shop.example:443");
    let allowed = (Verdict::Allow, Reason::Whitelisted);
    let named = FirstRecord::ClientHello(Some("API.shop.example"));
    assert_eq!(after_first_record(allowed, Action::Enforce, &t, named), allowed);
    let fronted = FirstRecord::ClientHello(Some("cdn.shop.example"));
    assert_eq!(after_first_record(allowed, Action::Enforce, &t, fronted), (Verdict::Deny, Reason::SniMismatch));
    let no_sni = FirstRecord::ClientHello(None);
    assert_eq!(after_first_record(allowed, Action::Open, &t, no_sni), (Verdict::Deny, Reason::SniMismatch));
    assert_eq!(after_first_record(allowed, Action::Enforce, &t, FirstRecord::NotTls), (Verdict::Deny, Reason::NotTls));
    // report mode records the failure, or keeps the refusal it already recorded
    assert_eq!(after_first_record(allowed, Action::Report, &t, FirstRecord::NotTls), (Verdict::Report, Reason::NotTls));
    let reported = (Verdict::Report, Reason::NotWhitelisted);
    assert_eq!(after_first_record(reported, Action::Report, &t, FirstRecord::NotTls), reported);
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn name() -> impl Strategy<Value = String> {
    // A letter-only last label keeps the names out of IPv4 and `localhost` territory.
    (prop::collection::vec(label(), 0..4), "[a-z]{1,6}").prop_map(|(mut labels, tld)| {
        labels.push(tld);
        labels.join(".")
    })
}

proptest! {
    #[test]
    fn normalization_is_idempotent(raw in "[a-zA-Z0-9.üé-]{1,40}") {
        if let Ok(once) = normalize_host(&raw) {
            let twice = normalize_host(&once).unwrap();
            prop_assert_eq!(once.as_ref(), twice.as_ref());
        }
    }

    #[test]
    fn subdomain_wildcards_only_match_proper_subdomains(anchor in name(), host in name()) {
        let l = list(&[&format!("*.{anchor}")]);
        let matched = l.find(&host, 443).is_some();
        prop_assert_eq!(matched, host.ends_with(&format!(".{anchor}")));
    }

    #[test]
    fn dot_entries_match_the_domain_or_proper_subdomains(anchor in name(), host in name()) {
        let l = list(&[&format!(".{anchor}")]);
        let matched = l.find(&host, 443).is_some();
        prop_assert_eq!(matched, host == anchor || host.ends_with(&format!(".{anchor}")));
    }

    #[test]
    fn exact_entries_match_only_themselves(entry in name(), host in name(), port in 1u16..) {
        let l = list(&[&format!("{entry}:{port}")]);
        prop_assert_eq!(l.find(&host, port).is_some(), host == entry);
        prop_assert_eq!(l.find(&entry, port.wrapping_add(1).max(1)).is_some(), port.wrapping_add(1).max(1) == port);
    }

    #[test]
    fn hostile_targets_never_panic(raw in "\\PC{0,80}") {
        if let Ok(t) = parse_authority(&raw) {
            let p = policy(Some("demo"));
            let _ = p.decide("demo", Channel::Request, &t);
            if let Host::Name(n) = &t.host {
                prop_assert!(normalize_host(n).is_ok());
            }
        }
    }
}
