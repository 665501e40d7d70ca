//! Sending one command to the site's engine over `cmd.<site>.presence.<zone>`
//! and saying what came back: shared by `presenced cmd` and the status
//! page's override form, so both send the same request and read the reply
//! the same way.

use crate::engine::command::{Reply, Request};
use crate::naming::Site;
use anyhow::Context as _;
use std::time::Duration;

/// Sends `request` for `zone` and waits for the reply.
pub async fn send(
    client: &async_nats::Client,
    site: &Site,
    zone: &str,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let subject = site.cmd_subject(zone);
    let body = serde_json::to_vec(request)?;
    let answer = tokio::time::timeout(timeout, client.request(subject.clone(), body.into())).await;
    let msg = match answer {
        Err(_) => anyhow::bail!(
            "no reply on {subject} within {}: the command may or may not have been applied; check with `presenced get {zone}`",
            humantime::format_duration(timeout)
        ),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => anyhow::bail!(
            "nobody answers commands on {subject}: is `presenced run` (with the engine) up for site {site}?"
        ),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => anyhow::bail!(
            "no reply on {subject}: the command may or may not have been applied; check with `presenced get {zone}`"
        ),
        Ok(r) => r.with_context(|| format!("request on {subject}"))?,
    };
    serde_json::from_slice(&msg.payload).with_context(|| {
        format!(
            "reply on {subject} is not a command reply: {:?}",
            String::from_utf8_lossy(&msg.payload)
        )
    })
}

/// One line for an operator.
pub fn describe(reply: &Reply) -> String {
    let zone = reply.zone.as_deref().unwrap_or("?");
    if let Some(e) = &reply.error {
        return format!("{zone}: refused ({}): {}", e.kind.as_str(), e.message);
    }
    let state = reply.state.map_or("?", |s| s.as_str());
    let held = match &reply.manual {
        Some(m) => format!(
            ", held until {} by {}{}",
            m.until,
            m.by,
            m.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        None => ", no override".to_owned(),
    };
    let unchanged = if reply.changed == Some(false) {
        " (nothing to do)"
    } else {
        ""
    };
    format!(
        "{zone}: {state}{held}; confidence {:.1}%; rev {}{unchanged}",
        reply.confidence.unwrap_or(0.0) * 100.0,
        reply.revision.unwrap_or(0)
    )
}
