//! Requests of a site to the hub's JetStream API through the site's
//! leafnode link (`$JS.hub.API...`), answered on inboxes that name the
//! site.
//!
//! The hub grants each site's leafnode identity only the API subjects of
//! its own mirrors and only answers on `_INBOX.*.hub-<site>.>`
//! (`naming::leaf::hub_replies`), so a leaf neither asks about another
//! site's mirrors nor draws the answers to another site's requests, even
//! where two sites use the same service names (and so the same inbox
//! prefixes).

use crate::naming::{self, Site};
use async_nats::jetstream::{response::Response, stream};
use std::time::Duration;

/// The hub as one site reaches it.
#[derive(Clone)]
pub struct HubLink {
    client: async_nats::Client,
    site: Site,
    timeout: Duration,
}

impl HubLink {
    pub fn new(client: async_nats::Client, site: Site, timeout: Duration) -> HubLink {
        HubLink {
            client,
            site,
            timeout,
        }
    }

    /// A fresh inbox of this connection with the site's token before its
    /// last token: `_INBOX.<service>.hub-<site>.<id>`.
    fn inbox(&self) -> String {
        let inbox = self.client.new_inbox();
        let token = naming::leaf::hub_reply_token(&self.site);
        match inbox.rsplit_once('.') {
            Some((head, id)) => format!("{head}.{token}.{id}"),
            None => format!("{inbox}.{token}"),
        }
    }

    /// One request to the hub's API (`api` after `$JS.hub.API.`), its
    /// JSON answer parsed.
    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        api: &str,
        body: &serde_json::Value,
    ) -> Result<T, String> {
        let subject = format!("{}.{api}", naming::domain_api_prefix(naming::HUB_DOMAIN));
        let request = async_nats::Request::new()
            .payload(body.to_string().into())
            .inbox(self.inbox())
            .timeout(Some(self.timeout));
        let msg = self
            .client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| format!("{subject}: {e}"))?;
        match serde_json::from_slice::<Response<T>>(&msg.payload) {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Err { error }) => Err(format!("{subject}: {error}")),
            Err(e) => Err(format!("{subject}: unreadable answer: {e}")),
        }
    }

    /// Stream info of a hub stream (a mirror of this site).
    pub async fn stream_info(&self, stream: &str) -> Result<stream::Info, String> {
        self.request(&format!("STREAM.INFO.{stream}"), &serde_json::json!({}))
            .await
    }
}
