//! A domain list compiled for lookup.
//!
//! Entries are stored in one hash map keyed by the normalized name they are anchored on. A
//! lookup hashes the host itself and then each of its parent suffixes (`a.b.c`, `b.c`, `c`),
//! so its cost grows with the number of labels in the host, never with the number of entries
//! or apps; a mask of the label counts the anchors have skips the suffixes no entry can be
//! anchored on (lists name two- to four-label domains, hosts are often longer). Keys are
//! whole names, which is what keeps matching on label boundaries. The maps hash with foldhash
//! (seeded per process): keys come from the operator's config, lookups from clients, and a
//! lookup never inserts, so a fast hash is safe here.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::entry::{Entry, Pattern};

/// One list (an app's server or web-view domains, or a global list), ready for matching.
#[derive(Debug, Clone, Default)]
pub struct DomainList {
    entries: Vec<Entry>,
    by_anchor: HashMap<Box<str>, Vec<u16>, RandomState>,
    /// Bit `n` is set when some anchor has `n` labels (a DNS name has at most 127).
    anchor_labels: u128,
}

fn label_count(name: &str) -> usize {
    name.bytes().filter(|&b| b == b'.').count() + 1
}

impl DomainList {
    /// Build a list; entry indexes are positions in `entries` (what `rule` reports).
    pub fn new(entries: Vec<Entry>) -> Self {
        let mut by_anchor: HashMap<Box<str>, Vec<u16>, RandomState> =
            HashMap::with_capacity_and_hasher(entries.len(), RandomState::default());
        let mut anchor_labels = 0;
        for (index, entry) in entries.iter().enumerate() {
            let index = u16::try_from(index).expect("domain lists are validated to be short");
            let anchor = entry.pattern.anchor();
            anchor_labels |= 1u128 << label_count(anchor).min(127);
            by_anchor.entry(anchor.into()).or_default().push(index);
        }
        DomainList { entries, by_anchor, anchor_labels }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index of the most specific entry that covers `host:port`, if any. `host` must be
    /// normalized (see [`super::host::normalize_host`]).
    pub fn find(&self, host: &str, port: u16) -> Option<u16> {
        if self.by_anchor.is_empty() {
            return None;
        }
        let mut labels = label_count(host).min(127);
        if self.has_anchors_of(labels) {
            let found = self.find_at(host, port, |p| matches!(p, Pattern::Exact(_) | Pattern::Domain(_)));
            if found.is_some() {
                return found;
            }
        }
        let mut rest = host;
        while let Some(dot) = rest.as_bytes().iter().position(|&b| b == b'.') {
            rest = &rest[dot + 1..];
            labels = labels.saturating_sub(1);
            if labels < self.anchor_labels.trailing_zeros() as usize {
                break; // shorter than every anchor
            }
            if self.has_anchors_of(labels) {
                let found = self.find_at(rest, port, |p| matches!(p, Pattern::Subdomains(_) | Pattern::Domain(_)));
                if found.is_some() {
                    return found;
                }
            }
        }
        None
    }

    fn has_anchors_of(&self, labels: usize) -> bool {
        self.anchor_labels & (1u128 << labels) != 0
    }

    fn find_at(&self, anchor: &str, port: u16, kind: impl Fn(&Pattern) -> bool) -> Option<u16> {
        self.by_anchor.get(anchor)?.iter().copied().find(|&index| {
            let entry = &self.entries[usize::from(index)];
            kind(&entry.pattern) && entry.ports.allows(port)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::entry::parse_entry;

    fn list(raw: &[&str]) -> DomainList {
        DomainList::new(raw.iter().map(|r| parse_entry(r).unwrap()).collect())
    }

    #[test]
    fn exact_entries_match_only_their_host_and_port() {
        let l = list(&["https://api.shop.example", "img.shop.example:8443"]);
        assert_eq!(l.find("api.shop.example", 443), Some(0));
        assert_eq!(l.find("api.shop.example", 8443), None);
        assert_eq!(l.find("img.shop.example", 8443), Some(1));
        assert_eq!(l.find("img.shop.example", 443), None);
        assert_eq!(l.find("x.api.shop.example", 443), None);
        assert_eq!(l.find("shop.example", 443), None);
    }

    #[test]
    fn subdomain_wildcards_stop_at_label_boundaries() {
        let l = list(&["*.shop.example"]);
        assert_eq!(l.find("a.shop.example", 443), Some(0));
        assert_eq!(l.find("a.b.c.shop.example", 443), Some(0));
        assert_eq!(l.find("shop.example", 443), None);
        assert_eq!(l.find("evilshop.example", 443), None);
        assert_eq!(l.find("shop.example.evil.net", 443), None);
        assert_eq!(l.find("a.shop.example", 8443), None);
    }

    #[test]
    fn dot_entries_cover_the_domain_and_its_subdomains() {
        let l = list(&[".shop.example"]);
        assert_eq!(l.find("shop.example", 443), Some(0));
        assert_eq!(l.find("a.b.shop.example", 443), Some(0));
        assert_eq!(l.find("evilshop.example", 443), None);
    }

    #[test]
    fn websocket_entries_take_any_port() {
        let l = list(&["wss://ws.shop.example"]);
        assert_eq!(l.find("ws.shop.example", 1), Some(0));
        assert_eq!(l.find("ws.shop.example", 65535), Some(0));
        assert_eq!(l.find("x.ws.shop.example", 443), None);
    }

    #[test]
    fn anchors_of_any_label_count_are_found_from_hosts_of_any_length() {
        let l = list(&["*.example", "*.b.c.d.example", "x.y.example"]);
        assert_eq!(l.find("a.example", 443), Some(0));
        assert_eq!(l.find("x.y.example", 443), Some(2));
        assert_eq!(l.find("z.x.y.example", 443), Some(0));
        assert_eq!(l.find("a.b.c.d.example", 443), Some(1));
        assert_eq!(l.find("q.a.b.c.d.example", 443), Some(1));
        assert_eq!(l.find("q.a.c.d.example", 443), Some(0));
        assert_eq!(l.find("example", 443), None);
        let deep = format!("{}example", "a.".repeat(120));
        assert_eq!(l.find(&deep, 443), Some(0));
        assert_eq!(list(&["*.b.c.d.example"]).find("e.c.d.example", 443), None);
    }

    #[test]
    fn the_most_specific_entry_is_reported() {
        let l = list(&["*.shop.example", "api.shop.example", ".api.shop.example:8443"]);
        assert_eq!(l.find("api.shop.example", 443), Some(1));
        assert_eq!(l.find("api.shop.example", 8443), Some(2));
        assert_eq!(l.find("x.api.shop.example", 8443), Some(2));
        assert_eq!(l.find("x.api.shop.example", 443), Some(0));
    }
}
