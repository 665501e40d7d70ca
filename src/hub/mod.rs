//! The hub side of a site: its mirrors on the 3-node hub cluster, their
//! health as the site sees it, and the nudge that makes them resume at once
//! after a leafnode link comes back.
//!
//! - [`mirrors`]: which mirrors a site has and provisioning them.
//! - [`health`]: lag, last contact and stall of each mirror (pure), plus
//!   the poller that reads them through the leaf link.
//! - [`catchup`]: the nudge after a link's return.
//! - [`config`]: the `[hub]` section and its checks.

pub mod catchup;
pub mod config;
pub mod health;
pub mod link;
pub mod mirrors;
