//! miniapp-gateway: a CONNECT proxy that enforces per-miniapp domain whitelists.
//!
//! A connection arrives on a listener in [`proxy`], takes a `max_connections` permit and is
//! served as HTTP/1.1. A CONNECT's target is parsed and normalized ([`policy::target`]), the
//! asking app and channel are established ([`identity`]), and the pure [`policy`] decides
//! against one immutable snapshot of the [`config`]. Only then does the proxy resolve and
//! connect ([`proxy::upstream`]), answer `200`, and splice bytes ([`proxy::tunnel`]). Every
//! decision, allowed or refused, leaves one line in the [`access_log`].
//!
//! Beside the hot path, the [`admin`] listener serves metrics, health and the management
//! API. App edits go to a [`store`] (recorded in the [`audit`] log) and reach the proxy only
//! through [`reload`], which validates a new snapshot beside the running one, swaps it in, and
//! re-decides the open tunnels it may refuse. The proxy's refusals are kept per app in
//! [`decisions`] and, with app changes and reloads, published on [`events`], which the admin
//! listener streams to the web console it serves. The admin listener also serves [`scopes`]:
//! the platforms' consent rules for device and user-data APIs, which miniapp containers ask
//! about before such calls, with consent records that outlive reloads and restarts.

pub mod access_log;
pub mod admin;
pub mod apps_cmd;
pub mod audit;
pub mod config;
pub mod decisions;
pub mod events;
pub mod identity;
pub mod learn;
pub mod metrics;
pub mod pg;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod replica;
pub mod scopes;
pub mod store;
pub mod throttle;
pub mod tls;
