//! What each app was recently refused: the proxy's refusals and `report` mode's would-be
//! refusals, grouped by (channel, host, port) with a count, first and last seen, and the last
//! decision and reason. `GET /v1/apps/{id}/decisions` serves it; the console lists it and
//! offers to whitelist what was refused.
//!
//! Kept off the hot path's cost: an allowed request never touches it; a refusal takes one
//! short lock, and allocates only the first time its host (or app) is seen. It is bounded:
//! [`MAX_GROUPS`] hosts per app and [`MAX_APPS`] apps, each full table making room by
//! forgetting what was seen longest ago.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::policy::{Channel, Reason, Verdict};

/// Hosts remembered per app.
pub const MAX_GROUPS: usize = 64;
/// Apps remembered.
pub const MAX_APPS: usize = 1024;

/// One refusal (or would-be refusal) as the proxy made it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    /// The app whose rules decided.
    pub app: &'a str,
    pub channel: Channel,
    pub host: &'a str,
    pub port: u16,
    /// `deny`, or `report` for a would-be refusal.
    pub decision: Verdict,
    pub reason: Reason,
}

/// The refusals of one (channel, host, port) of an app.
#[derive(Debug, Clone)]
pub struct Group {
    pub channel: Channel,
    pub host: Box<str>,
    pub port: u16,
    pub count: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    /// The last decision and reason.
    pub decision: Verdict,
    pub reason: Reason,
}

#[derive(Default)]
struct AppGroups {
    groups: Vec<Group>,
    last_seen: Option<SystemTime>,
}

/// Every app's recent refusals.
#[derive(Default)]
pub struct RecentDecisions {
    apps: Mutex<HashMap<Box<str>, AppGroups, foldhash::fast::RandomState>>,
}

impl RecentDecisions {
    /// Count `refusal`, seen at `now`.
    pub fn note(&self, refusal: &Refusal<'_>, now: SystemTime) {
        let mut apps = self.apps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !apps.contains_key(refusal.app) {
            if apps.len() >= MAX_APPS {
                let oldest = apps.iter().min_by_key(|(_, groups)| groups.last_seen).map(|(app, _)| app.clone());
                if let Some(oldest) = oldest {
                    apps.remove(&oldest);
                }
            }
            apps.insert(refusal.app.into(), AppGroups::default());
        }
        let Some(app) = apps.get_mut(refusal.app) else { return };
        app.last_seen = Some(now);
        let same = |g: &&mut Group| g.channel == refusal.channel && g.port == refusal.port && &*g.host == refusal.host;
        if let Some(group) = app.groups.iter_mut().find(same) {
            group.count += 1;
            group.last_seen = now;
            group.decision = refusal.decision;
            group.reason = refusal.reason;
            return;
        }
        let group = Group {
            channel: refusal.channel,
            host: refusal.host.into(),
            port: refusal.port,
            count: 1,
            first_seen: now,
            last_seen: now,
            decision: refusal.decision,
            reason: refusal.reason,
        };
        if app.groups.len() < MAX_GROUPS {
            app.groups.push(group);
        } else if let Some(oldest) = app.groups.iter_mut().min_by_key(|g| g.last_seen) {
            *oldest = group;
        }
    }

    /// The groups of `app`, last seen first.
    pub fn groups(&self, app: &str) -> Vec<Group> {
        let apps = self.apps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut groups = apps.get(app).map(|app| app.groups.clone()).unwrap_or_default();
        groups.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.host.cmp(&b.host)));
        groups
    }
}

/// A group as the API shows it, with the entries that would let its host through.
#[derive(Debug, Serialize)]
pub struct GroupView {
    pub channel: Channel,
    pub host: String,
    pub port: u16,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub decision: &'static str,
    pub reason: &'static str,
    /// The list the host belongs on: `server_domains` (request) or `webview_domains`.
    pub list: &'static str,
    /// For a host that is not whitelisted: the entry that allows exactly it.
    pub entry: Option<String>,
    /// For a host that is not whitelisted: `*.parent`, unless the parent is a public suffix.
    pub wildcard: Option<String>,
}

impl From<&Group> for GroupView {
    fn from(group: &Group) -> GroupView {
        let allowable = group.reason == Reason::NotWhitelisted;
        GroupView {
            channel: group.channel,
            host: group.host.to_string(),
            port: group.port,
            count: group.count,
            first_seen: humantime::format_rfc3339_millis(group.first_seen).to_string(),
            last_seen: humantime::format_rfc3339_millis(group.last_seen).to_string(),
            decision: group.decision.as_str(),
            reason: group.reason.as_str(),
            list: match group.channel {
                Channel::Request => "server_domains",
                Channel::Webview => "webview_domains",
            },
            entry: allowable.then(|| with_port(&group.host, group.port)),
            wildcard: allowable.then(|| wildcard_parent(&group.host)).flatten().map(|p| with_port(&p, group.port)),
        }
    }
}

/// The entry for `host` on `port`: `https://host` (port 443 only) or `https://host:port`.
fn with_port(host: &str, port: u16) -> String {
    if port == 443 { format!("https://{host}") } else { format!("https://{host}:{port}") }
}

/// `*.parent` for `host`, when `parent` (host without its first label) is not itself a public
/// suffix (the Public Suffix List, private domains included): a wildcard over `co.uk`,
/// `github.io` or `s3.amazonaws.com` would let through every site registered under it.
pub fn wildcard_parent(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let (_, parent) = host.split_once('.')?;
    if !parent.contains('.') || parent.split('.').any(str::is_empty) {
        return None;
    }
    let public = psl::suffix(parent.as_bytes()).is_some_and(|suffix| suffix.as_bytes() == parent.as_bytes());
    (!public).then(|| format!("*.{parent}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::parse_entry;

    fn refusal<'a>(app: &'a str, host: &'a str) -> Refusal<'a> {
        Refusal {
            app,
            channel: Channel::Request,
            host,
            port: 443,
            decision: Verdict::Deny,
            reason: Reason::NotWhitelisted,
        }
    }

    #[test]
    fn refusals_are_grouped_by_channel_host_and_port() {
        let recent = RecentDecisions::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        recent.note(&refusal("demo", "evil.example"), t0);
        recent.note(&refusal("demo", "evil.example"), t0 + Duration::from_secs(1));
        recent.note(&Refusal { port: 8443, ..refusal("demo", "evil.example") }, t0);
        recent.note(&Refusal { channel: Channel::Webview, ..refusal("demo", "evil.example") }, t0);
        recent.note(&refusal("other", "evil.example"), t0);
        let groups = recent.groups("demo");
        assert_eq!(groups.len(), 3);
        assert_eq!((groups[0].port, groups[0].count, groups[0].first_seen), (443, 2, t0));
        assert_eq!(recent.groups("other").len(), 1);
        assert!(recent.groups("nobody").is_empty());
    }

    #[test]
    fn full_tables_forget_what_was_seen_longest_ago() {
        let recent = RecentDecisions::default();
        let t0 = SystemTime::UNIX_EPOCH;
        let hosts: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("h{i}.example")).collect();
        for (i, host) in hosts.iter().enumerate() {
            recent.note(&refusal("demo", host), t0 + Duration::from_secs(i as u64));
        }
        let groups = recent.groups("demo");
        assert_eq!(groups.len(), MAX_GROUPS);
        assert!(groups.iter().all(|g| &*g.host != "h0.example"));
        let apps: Vec<String> = (0..=MAX_APPS).map(|i| format!("app{i}")).collect();
        for (i, app) in apps.iter().enumerate() {
            recent.note(&refusal(app, "x.example"), t0 + Duration::from_secs(100 + i as u64));
        }
        assert!(recent.groups("demo").is_empty(), "the app seen longest ago is forgotten");
        assert_eq!(recent.groups(&apps[MAX_APPS]).len(), 1);
    }

    #[test]
    fn wildcards_are_offered_below_public_suffixes_only() {
        assert_eq!(wildcard_parent("cdn.img.shop.example").as_deref(), Some("*.img.shop.example"));
        assert_eq!(wildcard_parent("api.shop.example").as_deref(), Some("*.shop.example"));
        let public = [
            "shop.example",
            "example",
            "a.co.uk",
            "x.com.cn",
            "me.github.io",
            "10.0.0.1",
            "x.firebaseapp.com",
            "bucket.s3.amazonaws.com",
            "abc.ngrok.io",
            "site.web.app",
        ];
        for host in public {
            assert_eq!(wildcard_parent(host), None, "{host}");
        }
        assert_eq!(wildcard_parent("a.shop.co.uk").as_deref(), Some("*.shop.co.uk"));
    }

    #[test]
    fn the_offered_entries_are_valid_entries() {
        let group = Group {
            channel: Channel::Webview,
            host: "m.shop.example".into(),
            port: 8443,
            count: 1,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            decision: Verdict::Report,
            reason: Reason::NotWhitelisted,
        };
        let view = GroupView::from(&group);
        assert_eq!(view.list, "webview_domains");
        assert_eq!(view.entry.as_deref(), Some("https://m.shop.example:8443"));
        assert_eq!(view.wildcard.as_deref(), Some("https://*.shop.example:8443"));
        for entry in [view.entry.unwrap(), view.wildcard.unwrap()] {
            let parsed = parse_entry(&entry).unwrap_or_else(|e| panic!("{entry}: {e:?}"));
            assert!(parsed.ports.allows(8443) && !parsed.ports.allows(443), "{entry}");
        }
        let refused = GroupView::from(&Group { reason: Reason::PrivateAddress, ..group });
        assert_eq!((refused.entry, refused.wildcard), (None, None), "only a missing entry is offered");
    }
}
