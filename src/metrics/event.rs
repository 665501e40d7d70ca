//! Named telemetry events: things that happen which an operator both
//! reads in the log and watches on `/metrics` (a reject, a reconnect, a
//! compare-and-set conflict, a failed upload, a component's failure).
//!
//! Each kind is declared once, as a `const` [`Event`] next to the
//! component's metric families (its name, log level and message), and
//! each occurrence is one [`emit!`](crate::emit) that counts it in its
//! counter and writes its log line with the structured fields of this
//! occurrence. A counter bumped without its line, or a line whose words
//! differ from the counter's story, cannot be written that way.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of thing that happens, logged and counted.
///
/// A `const`, so that its level and message are the static metadata
/// `tracing` needs at the call site.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    /// The event's name, logged as the field `event` (grep the log for
    /// `event=engine_kv_conflict`).
    pub name: &'static str,
    /// The level every occurrence is logged at.
    pub level: tracing::Level,
    /// The log line's message.
    pub message: &'static str,
    /// The sample the event is counted in (with its labels, if any), for
    /// the reader of the declaration: `emit!` is handed the counter.
    pub counter: &'static str,
}

/// What an event counts in: a counter ([`crate::metrics::Count`] or any
/// atomic), or a closure for a labelled count a component keeps itself
/// (per mirror, per component).
pub trait Tally {
    fn tally(&self, n: u64);
}

impl Tally for AtomicU64 {
    fn tally(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

impl<F: Fn(u64)> Tally for F {
    fn tally(&self, n: u64) {
        self(n);
    }
}

/// A counter that may be absent (a connection made without metrics).
impl<T: Tally + ?Sized> Tally for Option<&T> {
    fn tally(&self, n: u64) {
        if let Some(t) = self {
            t.tally(n);
        }
    }
}

/// Counts one occurrence of a named [`Event`] and logs it, in one call.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use presenced::{emit, metrics::Event};
///
/// const PRUNED: Event = Event {
///     name: "pruned",
///     level: tracing::Level::INFO,
///     message: "old entries pruned",
///     counter: "presenced_pruned_total",
/// };
/// const REJECTED: Event = Event {
///     name: "rejected",
///     level: tracing::Level::WARN,
///     message: "input rejected",
///     counter: "presenced_rejects_total",
/// };
/// let (pruned, rejects) = (AtomicU64::new(0), AtomicU64::new(0));
/// let gone = ["a", "b", "c"];
/// emit!(PRUNED, &pruned, by = gone.len() as u64; count = gone.len());
/// // Counted every time, logged only when the rate limit lets it through.
/// let due: Option<u64> = None;
/// emit!(REJECTED, &rejects, if due.is_some(); suppressed = due.unwrap_or(0));
/// emit!(REJECTED, &rejects);
/// assert_eq!(pruned.load(Ordering::Relaxed), 3);
/// assert_eq!(rejects.load(Ordering::Relaxed), 2);
/// ```
///
/// The counter goes up by one (or `by = n`) every time; the line is
/// written unless the `if` condition is false (a log rate limit: the
/// count stays exact while the log stays readable). The fields after
/// `;` are `tracing` fields, written after `event = <name>`.
#[macro_export]
macro_rules! emit {
    ($event:path, $count:expr $(, by = $n:expr)? $(, if $when:expr)? $(; $($field:tt)+)?) => {{
        #[allow(unused_imports)]
        use $crate::metrics::Tally as _;
        ($count).tally($crate::emit!(@n $($n)?));
        if true $(&& $when)? {
            ::tracing::event!(
                $event.level,
                event = $event.name,
                $($($field)+ ,)?
                "{}",
                $event.message
            );
        }
    }};
    (@n) => {
        1
    };
    (@n $n:expr) => {
        $n
    };
}

/// The log lines written while `f` runs, as the daemon's formatter
/// writes them (no colours): for tests that an event is logged.
#[cfg(test)]
pub fn captured(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || out.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{counter_name, Collector, Count, Metrics};
    use std::sync::Arc;

    const SOMETHING_BROKE: Event = Event {
        name: "test_something_broke",
        level: tracing::Level::WARN,
        message: "something broke; retrying",
        counter: "presenced_test_breaks_total",
    };

    #[derive(Debug, Default)]
    struct Own {
        breaks: Count,
    }

    impl Collector for Own {
        fn collect(&self, r: &mut prometheus_client::registry::Registry) {
            r.register(
                counter_name(SOMETHING_BROKE.counter),
                "Breaks.",
                self.breaks.clone(),
            );
        }
    }

    /// One emit is one count in the exported counter and one line at the
    /// event's level, with its message, its name and the fields given.
    #[test]
    fn an_emitted_event_is_counted_and_logged() {
        let m = Metrics::default();
        let own = Arc::new(Own::default());
        m.register(own.clone());
        let log = captured(|| {
            crate::emit!(SOMETHING_BROKE, &own.breaks; source = "kitchen", attempt = 3);
        });
        assert!(
            m.render().contains("presenced_test_breaks_total 1\n"),
            "{}",
            m.render()
        );
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "{log}");
        let line = lines[0];
        assert!(line.contains(" WARN "), "{line}");
        assert!(line.contains("something broke; retrying"), "{line}");
        assert!(line.contains("event=\"test_something_broke\""), "{line}");
        assert!(line.contains("source=\"kitchen\""), "{line}");
        assert!(line.contains("attempt=3"), "{line}");
    }

    /// `by` counts several at once; a false `if` still counts but writes
    /// no line; a closure counts wherever the component keeps its count.
    #[test]
    fn counts_by_n_and_when_the_line_is_suppressed() {
        let c = Count::default();
        let seen = AtomicU64::new(0);
        let log = captured(|| {
            crate::emit!(SOMETHING_BROKE, &c, by = 4);
            crate::emit!(SOMETHING_BROKE, &c, if false; source = "hall");
            crate::emit!(SOMETHING_BROKE, |n| seen.tally(n * 10));
            crate::emit!(SOMETHING_BROKE, None::<&AtomicU64>, by = 2);
        });
        assert_eq!(c.load(Ordering::Relaxed), 5);
        assert_eq!(seen.load(Ordering::Relaxed), 10);
        assert_eq!(log.lines().count(), 3, "{log}");
        assert!(!log.contains("hall"), "{log}");
    }
}
