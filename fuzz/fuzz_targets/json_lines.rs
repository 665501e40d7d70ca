//! The JSON-lines splitter and decoder on arbitrary bytes: never a panic,
//! and every rejection names its line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use presenced::sources::serial::{decode_line, LineSplitter};
use presenced::time::Timestamp;
use std::path::Path;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let mut lines = Vec::new();
    LineSplitter::default().push(data, &mut lines);
    for line in &lines {
        let skew = Duration::from_secs(300);
        if let Some(Err(rej)) =
            decode_line("fuzz", Path::new("/dev/fuzz"), &[], line, Timestamp(0), skew)
        {
            assert!(rej.origin.ends_with(&format!("line {}", line.number)));
        }
    }
});
