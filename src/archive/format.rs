//! The snapshot file format, version 1: pure encoding and decoding.
//!
//! A snapshot object is one gzip stream (so `zcat` opens it for
//! inspection). Decompressed it is:
//!
//! ```text
//! magic "PRSNAP\r\n" (8 bytes) | format version u32 BE | frame*
//! frame = kind u8 | length u32 BE | body (length bytes)
//!   'H' header   JSON  {site, created, presenced_version, buckets, events_since}
//!   'S' section  JSON  {name, kind: "kv" | "stream"}      starts a bucket
//!   'R' record   binary: revision u64 | created_ns i64 | op u8 | key_len u16 | key | value
//!                op: 0 put, 1 delete, 2 purge (KV delete markers are kept, so a
//!                restored bucket lists deleted keys as the original does)
//!   'E' end      JSON  {sections: [{name, records, last_sequence}]}
//! ```
//!
//! Records belong to the section before them; in a KV section the key is the
//! KV key and the revision its revision, in a stream section (EVENTS) the
//! key is the subject and the revision the stream sequence. Records of a
//! section are in revision order. The end frame makes a truncated file an
//! error even when the gzip stream happens to end cleanly. A reader refuses
//! versions it does not know.
//!
//! The decoder is push-based (bytes in, items out) so the I/O shell can
//! feed it from the object store or an S3 body without buffering the
//! whole object and without a blocking thread.

use serde::{Deserialize, Serialize};
use std::io::Write;

pub const MAGIC: &[u8; 8] = b"PRSNAP\r\n";
pub const VERSION: u32 = 1;
/// Frames larger than this are refused as corrupt: KV values are small
/// (the server's default max payload is 1 MiB).
pub const MAX_FRAME: usize = 64 << 20;

/// What a snapshot is of; first frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub site: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub presenced_version: String,
    pub buckets: Vec<String>,
    /// Start of the EVENTS window (RFC 3339), when events are included.
    #[serde(default)]
    pub events_since: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SectionKind {
    Kv,
    Stream,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub kind: SectionKind,
}

/// What a record did to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Delete,
    Purge,
}

impl Op {
    fn byte(self) -> u8 {
        match self {
            Op::Put => 0,
            Op::Delete => 1,
            Op::Purge => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Op> {
        match b {
            0 => Some(Op::Put),
            1 => Some(Op::Delete),
            2 => Some(Op::Purge),
            _ => None,
        }
    }
}

/// One key (or stream message) with its revision and write time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub op: Op,
    pub revision: u64,
    /// When the server stored it, Unix nanoseconds.
    pub created_ns: i64,
    pub value: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSummary {
    pub name: String,
    pub records: u64,
    /// Highest stream sequence the section saw (0 for an empty bucket).
    pub last_sequence: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub sections: Vec<SectionSummary>,
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Header(Header),
    Section(Section),
    Record(Record),
    End(Trailer),
}

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a presenced snapshot: bad magic at byte 0 of the decompressed content")]
    Magic,
    #[error("snapshot format version {0} is not supported (this presenced reads {VERSION})")]
    Version(u32),
    #[error("corrupt snapshot at decompressed byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("snapshot is truncated: {0}")]
    Truncated(String),
    #[error("gzip: {0}")]
    Gzip(#[source] std::io::Error),
    #[error("cannot encode snapshot: {0}")]
    Encode(#[source] std::io::Error),
}

/// Writes a snapshot into `W` (compressed). The caller drains `W` as it
/// grows, so memory stays bounded by what it keeps there.
pub struct Encoder<W: Write> {
    gz: flate2::write::GzEncoder<W>,
}

impl<W: Write> Encoder<W> {
    pub fn new(out: W, header: &Header) -> Result<Self, FormatError> {
        // Level 6 is gzip's default: most of the size gain of 9 at a
        // fraction of its time.
        let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
        gz.write_all(MAGIC).map_err(FormatError::Encode)?;
        gz.write_all(&VERSION.to_be_bytes())
            .map_err(FormatError::Encode)?;
        let mut e = Encoder { gz };
        e.json(b'H', header)?;
        Ok(e)
    }

    fn frame(&mut self, kind: u8, body: &[&[u8]]) -> Result<(), FormatError> {
        let len: usize = body.iter().map(|b| b.len()).sum();
        if len > MAX_FRAME {
            return Err(FormatError::Encode(std::io::Error::other(format!(
                "frame of {len} bytes is over the {MAX_FRAME} byte limit"
            ))));
        }
        self.gz.write_all(&[kind]).map_err(FormatError::Encode)?;
        self.gz
            .write_all(&(len as u32).to_be_bytes())
            .map_err(FormatError::Encode)?;
        for b in body {
            self.gz.write_all(b).map_err(FormatError::Encode)?;
        }
        Ok(())
    }

    fn json<T: Serialize>(&mut self, kind: u8, v: &T) -> Result<(), FormatError> {
        let body = serde_json::to_vec(v).map_err(|e| FormatError::Encode(e.into()))?;
        self.frame(kind, &[&body])
    }

    pub fn section(&mut self, s: &Section) -> Result<(), FormatError> {
        self.json(b'S', s)
    }

    pub fn record(&mut self, r: &Record) -> Result<(), FormatError> {
        let key = r.key.as_bytes();
        let key_len = u16::try_from(key.len()).map_err(|_| {
            FormatError::Encode(std::io::Error::other(format!(
                "key of {} bytes is too long",
                key.len()
            )))
        })?;
        self.frame(
            b'R',
            &[
                &r.revision.to_be_bytes(),
                &r.created_ns.to_be_bytes(),
                &[r.op.byte()],
                &key_len.to_be_bytes(),
                key,
                &r.value,
            ],
        )
    }

    /// The output sink, to drain what was compressed so far.
    pub fn sink(&mut self) -> &mut W {
        self.gz.get_mut()
    }

    /// Writes the end frame and the gzip trailer; returns the sink.
    pub fn finish(mut self, trailer: &Trailer) -> Result<W, FormatError> {
        self.json(b'E', trailer)?;
        self.gz.finish().map_err(FormatError::Encode)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    Preamble,
    Frames,
    Ended,
}

/// Push decoder: [`Decoder::push`] compressed bytes, then take
/// [`Decoder::next_item`] items until `None`; [`Decoder::finish`] at the end.
pub struct Decoder {
    gz: flate2::write::GzDecoder<Vec<u8>>,
    /// Bytes of the decompressed buffer already parsed.
    pos: usize,
    /// Decompressed bytes dropped from the buffer so far (for offsets).
    dropped: u64,
    stage: Stage,
    /// Compressed bytes pushed so far (for errors).
    pushed: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            gz: flate2::write::GzDecoder::new(Vec::with_capacity(256 << 10)),
            pos: 0,
            dropped: 0,
            stage: Stage::Preamble,
            pushed: 0,
        }
    }

    pub fn push(&mut self, compressed: &[u8]) -> Result<(), FormatError> {
        let mut rest = compressed;
        while !rest.is_empty() {
            let n = self.gz.write(rest).map_err(FormatError::Gzip)?;
            if n == 0 {
                return Err(FormatError::Corrupt {
                    offset: self.offset(),
                    what: format!(
                        "data after the end of the gzip stream (compressed byte {})",
                        self.pushed
                    ),
                });
            }
            self.pushed += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn offset(&self) -> u64 {
        self.dropped + self.pos as u64
    }

    fn corrupt(&self, what: impl Into<String>) -> FormatError {
        FormatError::Corrupt {
            offset: self.offset(),
            what: what.into(),
        }
    }

    /// The next complete item, or `None` until more bytes are pushed.
    pub fn next_item(&mut self) -> Result<Option<Item>, FormatError> {
        self.compact();
        let buf = self.gz.get_ref();
        let avail = &buf[self.pos..];
        match self.stage {
            Stage::Ended => {
                if avail.is_empty() {
                    Ok(None)
                } else {
                    Err(self.corrupt("data after the end frame"))
                }
            }
            Stage::Preamble => {
                if avail.len() < 12 {
                    return Ok(None);
                }
                if &avail[..8] != MAGIC {
                    return Err(FormatError::Magic);
                }
                let version = u32::from_be_bytes([avail[8], avail[9], avail[10], avail[11]]);
                if version != VERSION {
                    return Err(FormatError::Version(version));
                }
                self.pos += 12;
                self.stage = Stage::Frames;
                self.next_item()
            }
            Stage::Frames => {
                if avail.len() < 5 {
                    return Ok(None);
                }
                let kind = avail[0];
                let len = u32::from_be_bytes([avail[1], avail[2], avail[3], avail[4]]) as usize;
                if len > MAX_FRAME {
                    return Err(self.corrupt(format!("frame of {len} bytes is over the limit")));
                }
                if avail.len() < 5 + len {
                    return Ok(None);
                }
                let body = &avail[5..5 + len];
                let item = match kind {
                    b'H' => Item::Header(self.parse_json(body, "header")?),
                    b'S' => Item::Section(self.parse_json(body, "section")?),
                    b'E' => Item::End(self.parse_json(body, "end")?),
                    b'R' => Item::Record(self.parse_record(body)?),
                    other => return Err(self.corrupt(format!("unknown frame kind {other:#04x}"))),
                };
                if matches!(item, Item::End(_)) {
                    self.stage = Stage::Ended;
                }
                self.pos += 5 + len;
                Ok(Some(item))
            }
        }
    }

    fn parse_json<T: serde::de::DeserializeOwned>(
        &self,
        body: &[u8],
        what: &str,
    ) -> Result<T, FormatError> {
        serde_json::from_slice(body).map_err(|e| self.corrupt(format!("{what} frame: {e}")))
    }

    fn parse_record(&self, body: &[u8]) -> Result<Record, FormatError> {
        const FIXED: usize = 19;
        if body.len() < FIXED {
            return Err(self.corrupt("record frame shorter than its fixed fields"));
        }
        let revision = u64::from_be_bytes(body[0..8].try_into().unwrap_or([0; 8]));
        let created_ns = i64::from_be_bytes(body[8..16].try_into().unwrap_or([0; 8]));
        let op = Op::from_byte(body[16])
            .ok_or_else(|| self.corrupt(format!("unknown record operation {}", body[16])))?;
        let key_len = u16::from_be_bytes([body[17], body[18]]) as usize;
        if body.len() < FIXED + key_len {
            return Err(self.corrupt("record key runs past the frame"));
        }
        let key = std::str::from_utf8(&body[FIXED..FIXED + key_len])
            .map_err(|_| self.corrupt("record key is not UTF-8"))?
            .to_owned();
        Ok(Record {
            key,
            op,
            revision,
            created_ns,
            value: body[FIXED + key_len..].to_vec(),
        })
    }

    /// Drops parsed bytes once they are a good part of the buffer.
    fn compact(&mut self) {
        if self.pos > (256 << 10) {
            let pos = self.pos;
            self.gz.get_mut().drain(..pos);
            self.dropped += pos as u64;
            self.pos = 0;
        }
    }

    /// No more input: flushes what the gzip decoder still holds, so the
    /// last items can be taken with [`Decoder::next_item`].
    pub fn close(&mut self) -> Result<(), FormatError> {
        self.gz.try_finish().map_err(FormatError::Gzip)
    }

    /// Checks that the gzip stream and the frames ended together.
    pub fn finish(mut self) -> Result<(), FormatError> {
        self.close()?;
        if self.next_item()?.is_some() || self.stage != Stage::Ended {
            return Err(FormatError::Truncated(format!(
                "no end frame after {} decompressed bytes",
                self.offset()
            )));
        }
        Ok(())
    }
}

/// Decodes a whole snapshot held in memory (tests, small tools).
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Item>, FormatError> {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4096) {
        d.push(chunk)?;
        while let Some(item) = d.next_item()? {
            out.push(item);
        }
    }
    d.close()?;
    while let Some(item) = d.next_item()? {
        out.push(item);
    }
    d.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            site: "home".into(),
            created: "2026-11-30T01:58:00.123Z".into(),
            presenced_version: "0.1.0".into(),
            buckets: vec!["presence".into()],
            events_since: None,
        }
    }

    fn sample(n: u64) -> Vec<u8> {
        let mut e = Encoder::new(Vec::new(), &header()).unwrap();
        e.section(&Section {
            name: "presence".into(),
            kind: SectionKind::Kv,
        })
        .unwrap();
        for i in 0..n {
            e.record(&Record {
                key: format!("zone-{i}"),
                op: if i % 10 == 9 { Op::Delete } else { Op::Put },
                revision: i + 1,
                created_ns: 1_700_000_000_000_000_000 + i as i64,
                value: format!("{{\"v\":1,\"i\":{i}}}").into_bytes(),
            })
            .unwrap();
        }
        e.finish(&Trailer {
            sections: vec![SectionSummary {
                name: "presence".into(),
                records: n,
                last_sequence: n,
            }],
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample(1000);
        let items = decode_all(&bytes).unwrap();
        assert_eq!(items.len(), 1 + 1 + 1000 + 1);
        assert_eq!(items[0], Item::Header(header()));
        match &items[502] {
            Item::Record(r) => {
                assert_eq!(r.key, "zone-500");
                assert_eq!(r.revision, 501);
                assert_eq!(r.value, b"{\"v\":1,\"i\":500}");
                assert_eq!(r.op, Op::Put);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(items.last(), Some(Item::End(t)) if t.sections[0].records == 1000));
        assert!(matches!(&items[11], Item::Record(r) if r.op == Op::Delete && r.key == "zone-9"));
    }

    #[test]
    fn empty_value_and_byte_at_a_time() {
        let mut e = Encoder::new(Vec::new(), &header()).unwrap();
        e.record(&Record {
            key: "k".into(),
            op: Op::Purge,
            revision: 7,
            created_ns: -5,
            value: vec![],
        })
        .unwrap();
        let bytes = e.finish(&Trailer::default()).unwrap();
        let mut d = Decoder::new();
        let mut items = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b)).unwrap();
            while let Some(i) = d.next_item().unwrap() {
                items.push(i);
            }
        }
        d.close().unwrap();
        while let Some(i) = d.next_item().unwrap() {
            items.push(i);
        }
        d.finish().unwrap();
        assert_eq!(items.len(), 3);
        assert!(
            matches!(&items[1], Item::Record(r) if r.value.is_empty() && r.created_ns == -5 && r.op == Op::Purge)
        );
    }

    #[test]
    fn truncation_is_an_error() {
        let bytes = sample(100);
        let cut = &bytes[..bytes.len() - 20];
        assert!(decode_all(cut).is_err());
    }

    #[test]
    fn corruption_is_an_error() {
        let mut bytes = sample(100);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        assert!(decode_all(&bytes).is_err());
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let mut bytes = sample(3);
        bytes.extend_from_slice(b"junk");
        let e = decode_all(&bytes).unwrap_err().to_string();
        assert!(e.contains("after the end"), "{e}");
    }

    #[test]
    fn unknown_version_and_magic_are_refused() {
        let mut raw = Vec::new();
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&9u32.to_be_bytes());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let bytes = gz.finish().unwrap();
        assert!(matches!(decode_all(&bytes), Err(FormatError::Version(9))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"NOTSNAP!\0\0\0\x01").unwrap();
        let bytes = gz.finish().unwrap();
        assert!(matches!(decode_all(&bytes), Err(FormatError::Magic)));
    }
}
