//! The LD2410 decoder on arbitrary bytes, fed in two pieces at a split
//! point taken from the input: it must never panic, and it must never hold
//! more than one frame's worth of bytes once drained.
#![no_main]

use libfuzzer_sys::fuzz_target;
use presenced::sources::ld2410::{Decoder, Event, MAX_DATA_LEN, MAX_GARBAGE};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(bytes.len());
    let mut d = Decoder::new();
    for piece in [&bytes[..cut], &bytes[cut..]] {
        d.push(piece);
        while let Some(ev) = d.next_event() {
            if let Event::Rejected(r) = ev {
                assert!(!r.reason.is_empty());
            }
        }
    }
    assert!(d.buffered() <= MAX_GARBAGE + 10 + MAX_DATA_LEN);
});
