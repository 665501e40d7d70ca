//! The override form: `application/x-www-form-urlencoded` decoding with
//! errors that name the field, and the checks a browser-facing write
//! needs (size before reading, same origin, CSRF token).

use axum::http::{header, HeaderMap};
use std::collections::BTreeMap;

/// Largest form body read: the form has six short fields; anything
/// bigger is not the page's form and is refused before it is read.
pub const MAX_BODY: usize = 4096;

/// Why a post is refused, with the HTTP status it gets.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// 400: the form itself is wrong; names the field.
    #[error("field {field}: {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    /// 400: the body is not a form at all.
    #[error("malformed form body: {0}")]
    Body(String),
    /// 403: not sent by the page itself (token or origin).
    #[error("refused: {0}")]
    Forbidden(String),
    /// 411 / 413: refused before reading.
    #[error("{0}")]
    Length(String),
}

/// Decodes one urlencoded component: `+` is a space, `%XX` a byte; the
/// result must be UTF-8.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape at byte {i}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "not UTF-8".to_owned())
}

/// The fields of a form body; a field given twice is an error (a page
/// never sends that, a forged post might to confuse the checks).
pub fn parse(body: &[u8]) -> Result<BTreeMap<String, String>, FormError> {
    let text = std::str::from_utf8(body).map_err(|_| FormError::Body("not UTF-8".into()))?;
    let mut fields = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k).map_err(|e| FormError::Body(format!("field name {k:?}: {e}")))?;
        let v = decode(v).map_err(|e| FormError::Body(format!("field {k}: {e}")))?;
        if fields.insert(k.clone(), v).is_some() {
            return Err(FormError::Body(format!("field {k} given twice")));
        }
    }
    Ok(fields)
}

/// The length check done before the body is read.
pub fn check_length(headers: &HeaderMap) -> Result<(), FormError> {
    let len = headers
        .get(header::CONTENT_LENGTH)
        .ok_or_else(|| FormError::Length("Content-Length required".into()))?
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| FormError::Length("Content-Length is not a number".into()))?;
    if len > MAX_BODY {
        return Err(FormError::Length(format!(
            "form body of {len} bytes refused: at most {MAX_BODY}"
        )));
    }
    Ok(())
}

/// Same-origin check: a browser sends `Origin` with every form post
/// (older ones at least `Referer`); either must name the host the page
/// was served from. `Sec-Fetch-Site`, when present, must not say
/// cross-site.
pub fn check_origin(headers: &HeaderMap) -> Result<(), FormError> {
    let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
    let host = get(header::HOST).ok_or_else(|| FormError::Forbidden("no Host header".into()))?;
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" && site != "none" {
            return Err(FormError::Forbidden(format!(
                "post from another site (Sec-Fetch-Site: {site})"
            )));
        }
    }
    let ours = [format!("http://{host}"), format!("https://{host}")];
    match (get(header::ORIGIN), get(header::REFERER)) {
        (Some(origin), _) => {
            if ours.iter().any(|o| o == origin) {
                Ok(())
            } else {
                Err(FormError::Forbidden(format!(
                    "post from origin {origin}, not this page's"
                )))
            }
        }
        (None, Some(referer)) => {
            if ours.iter().any(|o| {
                referer
                    .strip_prefix(o.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }) {
                Ok(())
            } else {
                Err(FormError::Forbidden(
                    "post referred by another page, not this one".into(),
                ))
            }
        }
        (None, None) => Err(FormError::Forbidden(
            "post without Origin or Referer: cannot tell it comes from this page".into(),
        )),
    }
}

/// Compares the token without stopping at the first difference.
pub fn token_matches(expected: &str, given: &str) -> bool {
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A fresh random token (hex) for this daemon's lifetime.
pub fn new_token() -> String {
    use std::io::Read;
    let mut buf = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if random.is_err() {
        // No urandom (not Linux): hash what differs between starts.
        use sha2::Digest;
        let seed = format!(
            "{:?}{}{:p}",
            std::time::SystemTime::now(),
            std::process::id(),
            &buf
        );
        buf.copy_from_slice(&sha2::Sha256::digest(seed.as_bytes())[..16]);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn decodes_fields_and_names_the_bad_one() {
        let f = parse(b"zone=living&by=al+ice&reason=caf%C3%A9").unwrap();
        assert_eq!(f["by"], "al ice");
        assert_eq!(f["reason"], "café");
        assert!(matches!(parse(b"zone=%zz"), Err(FormError::Body(m)) if m.contains("zone")));
        assert!(matches!(parse(b"a=1&a=2"), Err(FormError::Body(m)) if m.contains("twice")));
    }

    #[test]
    fn length_is_checked_from_the_header() {
        let mut h = HeaderMap::new();
        assert!(check_length(&h).is_err());
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5000"));
        assert!(matches!(check_length(&h), Err(FormError::Length(m)) if m.contains("5000")));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        assert!(check_length(&h).is_ok());
    }

    #[test]
    fn origin_must_be_the_page_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9464"));
        assert!(check_origin(&h).is_err(), "neither Origin nor Referer");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9464"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(check_origin(&h).is_err());
        h.remove(header::ORIGIN);
        h.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:9464/"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:94640/"),
        );
        assert!(check_origin(&h).is_err(), "a longer port is another origin");
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        h.insert(
            header::REFERER,
            HeaderValue::from_static("http://127.0.0.1:9464/"),
        );
        assert!(check_origin(&h).is_err());
    }

    #[test]
    fn tokens_compare_exactly() {
        let t = new_token();
        assert_eq!(t.len(), 32);
        assert!(token_matches(&t, &t.clone()));
        assert!(!token_matches(&t, &t[..31]));
        assert_ne!(t, new_token());
    }
}
