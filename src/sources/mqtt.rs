//! MQTT source (rumqttc).
