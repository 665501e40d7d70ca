//! Supervised server processes on loopback ports, shared by the
//! `presenced sandbox` (which ships in the binary), the integration tests
//! and the benches, so that starting, waiting for, stopping and restarting
//! nats-server, Mosquitto, SeaweedFS and the daemon is written once.
//!
//! - [`Supervised`]: one child process with its log, a readiness wait with
//!   a deadline that fails early when the child exits, graceful stop, kill,
//!   restart, and kill on `Drop`.
//! - [`ports`]: ports for servers that cannot pick their own, and starting
//!   again on fresh ones when a port picked was taken before the server
//!   bound it (nats-server picks its own where it can: `-1`).
//! - [`http`]: a tiny HTTP/1.0 client for health and monitoring endpoints.

pub mod child;
pub mod http;
pub mod ports;

pub use child::{log_tail, read_log, ProcError, Supervised, TAIL_LINES};
pub use http::{http_get, http_status};
pub use ports::{free_port, free_ports, port_taken_in, retry_on_taken_port};
