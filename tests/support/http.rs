//! A tiny HTTP/1.0 client on `std::net` (in `presenced-procs`, shared with
//! the sandbox): enough for health and monitoring endpoints, without an
//! HTTP client in the dev-dependencies.

pub use presenced_procs::http::{http_get, parse_response};
