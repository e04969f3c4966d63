//! `miniapp-gateway learn`: turn what `report` mode recorded into whitelist entries.
//!
//! The rollout an operator follows: put an app in `action = "report"`, let it run, then read
//! the access log back. Every line with `decision: report` for a host that was not on the
//! app's list names a host the app really used; `learn` prints, per app and channel, the
//! entries that would have let those tunnels through, sorted and deduplicated, ready to review
//! and paste. It generalizes to `*.domain` only for the domains the operator names.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::BufRead;

use serde::Deserialize;

use crate::policy::{Channel, Host, normalize_host, parse_host};

/// The access log fields `learn` reads; everything else on the line is ignored.
#[derive(Deserialize)]
struct Line {
    app: Option<String>,
    channel: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    decision: String,
    reason: String,
}

/// What was learned: per app, per channel, the entries and how many tunnels each covers.
#[derive(Debug, Default)]
pub struct Learned {
    apps: BTreeMap<String, BTreeMap<Channel, BTreeMap<String, u64>>>,
    /// Report lines that no entry can cover (IP literals, TLS failures), with their reason.
    skipped: BTreeMap<String, u64>,
    pub lines: u64,
    pub reports: u64,
    pub unreadable: u64,
}

/// Read an access log (JSON lines). `wildcards` are domains under which every host is
/// generalized to `*.domain`.
pub fn learn(log: impl BufRead, wildcards: &[String]) -> std::io::Result<Learned> {
    let wildcards: Vec<String> = wildcards
        .iter()
        .filter_map(|w| normalize_host(w.trim_start_matches("*.")).ok())
        .map(|w| w.into_owned())
        .collect();
    let mut learned = Learned::default();
    for line in log.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        learned.lines += 1;
        let Ok(record) = serde_json::from_str::<Line>(&line) else {
            learned.unreadable += 1;
            continue;
        };
        if record.decision != "report" {
            continue;
        }
        learned.reports += 1;
        if record.reason != "not_whitelisted" {
            *learned.skipped.entry(record.reason).or_default() += 1;
            continue;
        }
        let (Some(app), Some(host), Some(port)) = (record.app, record.host, record.port) else {
            learned.unreadable += 1;
            continue;
        };
        let channel = record.channel.as_deref().and_then(Channel::parse).unwrap_or(Channel::Request);
        let Ok(Host::Name(host)) = parse_host(&host) else {
            *learned.skipped.entry("ip_literal".to_owned()).or_default() += 1;
            continue;
        };
        let pattern = match wildcards.iter().find(|w| host.ends_with(&format!(".{w}"))) {
            Some(domain) => format!("*.{domain}"),
            None => host.into_owned(),
        };
        let entry = if port == 443 { format!("https://{pattern}") } else { format!("https://{pattern}:{port}") };
        *learned.apps.entry(app).or_default().entry(channel).or_default().entry(entry).or_default() += 1;
    }
    Ok(learned)
}

impl Learned {
    /// The learned entries as `[[app]]` tables, with comments saying what each covers.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# learned from {} access log lines: {} report decisions, {} apps",
            self.lines,
            self.reports,
            self.apps.len()
        );
        for (reason, count) in &self.skipped {
            let _ = writeln!(out, "# not learnable: {count} report lines with reason {reason}");
        }
        if self.unreadable > 0 {
            let _ = writeln!(out, "# skipped {} lines that are not access log records", self.unreadable);
        }
        for (app, channels) in &self.apps {
            let _ = writeln!(out, "\n[[app]]\nid = {app:?}");
            for (channel, entries) in channels {
                let key = match channel {
                    Channel::Request => "server_domains",
                    Channel::Webview => "webview_domains",
                };
                let _ = writeln!(out, "{key} = [");
                for (entry, tunnels) in entries {
                    let plural = if *tunnels == 1 { "" } else { "s" };
                    let _ = writeln!(out, "  {:<48} # {tunnels} tunnel{plural}", format!("{entry:?},"));
                }
                let _ = writeln!(out, "]");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"ts":"2026-11-21T05:00:00.000Z","app":"shop","channel":"request","client":"127.0.0.1:1","host":"api.shop.example","port":443,"decision":"allow","reason":"whitelisted","rule":"server_domains[0]","status":200,"upstream":"10.0.0.1:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:01.000Z","app":"shop","channel":"request","client":"127.0.0.1:2","host":"img.cdn.example","port":443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.2:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:02.000Z","app":"shop","channel":"request","client":"127.0.0.1:3","host":"img.cdn.example","port":443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.2:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:03.000Z","app":"shop","channel":"request","client":"127.0.0.1:4","host":"a.static.example","port":8443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.3:8443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:04.000Z","app":"shop","channel":"webview","client":"127.0.0.1:5","host":"m.shop.example","port":443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.4:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:05.000Z","app":"shop","channel":"request","client":"127.0.0.1:6","host":"93.184.216.34","port":443,"decision":"report","reason":"ip_literal","rule":null,"status":200,"upstream":"93.184.216.34:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:06.000Z","app":"news","channel":"request","client":"127.0.0.1:7","host":"feed.news.example","port":443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.5:443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:07.000Z","app":"news","channel":"request","client":"127.0.0.1:8","host":"b.static.example","port":8443,"decision":"report","reason":"not_whitelisted","rule":null,"status":200,"upstream":"10.0.0.3:8443","bytes_up":1,"bytes_down":1,"duration_ms":1,"generation":1}
{"ts":"2026-11-21T05:00:08.000Z","app":"news","channel":"request","client":"127.0.0.1:9","host":"evil.example","port":443,"decision":"deny","reason":"global_deny","rule":"global_deny[0]","status":403,"upstream":null,"bytes_up":0,"bytes_down":0,"duration_ms":0,"generation":1}
not json
"#;

    #[test]
    fn report_lines_become_sorted_deduplicated_entries() {
        let learned = learn(LOG.as_bytes(), &[]).unwrap();
        let expected = r#"# learned from 10 access log lines: 7 report decisions, 2 apps
# not learnable: 1 report lines with reason ip_literal
# skipped 1 lines that are not access log records

[[app]]
id = "news"
server_domains = [
  "https://b.static.example:8443",                 # 1 tunnel
  "https://feed.news.example",                     # 1 tunnel
]

[[app]]
id = "shop"
server_domains = [
  "https://a.static.example:8443",                 # 1 tunnel
  "https://img.cdn.example",                       # 2 tunnels
]
webview_domains = [
  "https://m.shop.example",                        # 1 tunnel
]
"#;
        assert_eq!(learned.to_toml(), expected);
    }

    #[test]
    fn wildcards_only_where_asked() {
        let learned = learn(LOG.as_bytes(), &["static.example".to_owned()]).unwrap();
        let toml = learned.to_toml();
        assert!(toml.contains(r#""https://*.static.example:8443","#), "{toml}");
        assert!(toml.contains(r#""https://img.cdn.example","#), "{toml}");
    }

    #[test]
    fn the_output_is_a_valid_config() {
        let learned = learn(LOG.as_bytes(), &["static.example".to_owned()]).unwrap();
        let config = crate::config::load_str(std::path::Path::new("learned.toml"), learned.to_toml()).unwrap();
        assert_eq!(config.policy.app_count(), 2);
    }
}
