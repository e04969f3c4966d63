//! miniapp-gateway: a CONNECT proxy that enforces per-miniapp domain whitelists.
pub mod policy;
pub mod config;
