//! MQTT source (rumqttc).

use crate::sources::Item;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct MqttStatus {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub received: AtomicU64,
    pub rejected: AtomicU64,
    pub buffer_full: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("mqtt")]
pub struct MqttError;

pub async fn run(
    _source: String,
    _cfg: crate::config::MqttSource,
    _client_id: String,
    _strict: bool,
    _tx: tokio::sync::mpsc::Sender<Item>,
    _status: Arc<MqttStatus>,
    _shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), MqttError> {
    unimplemented!()
}
