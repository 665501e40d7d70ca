//! MQTT topic filters with `+`/`#` and their captures.
