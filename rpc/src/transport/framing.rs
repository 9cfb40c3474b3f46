//! Splits a byte stream into JSON texts without needing a delimiter.
//!
//! SPDK's Python client sends pretty-printed requests with no trailing newline,
//! several per connection, and QMP clients may do the same. The [`Splitter`]
//! scans the bytes once, checking JSON's grammar as it goes ([`Grammar`]), and
//! yields each complete top-level object or array; it never buffers more than
//! `max` bytes of one request (the rest of an oversized request is skipped, not
//! stored). At the first byte after which the open request can never become
//! valid JSON it yields [`Frame::Invalid`] and then nothing more: the stream
//! cannot be resynchronised, the server answers and closes.

use super::grammar::{Grammar, Step};

/// One unit cut from the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one complete top-level object or array (not yet validated).
    Value(Vec<u8>),
    /// A request that exceeded the size limit; its bytes were discarded. Reported
    /// once, as soon as the limit is crossed.
    TooLarge,
    /// Bytes that cannot start a JSON object or array. The splitter has dropped
    /// the rest of that line; `byte` is the first offending byte.
    Garbage { byte: u8 },
    /// An open request that can never become valid JSON: `at` is the offset of
    /// the offending byte in the request, `why` says what was wrong. Nothing
    /// follows it.
    Invalid { at: usize, why: String },
}

/// Incremental splitter of concatenated JSON objects/arrays.
///
/// Consumed bytes are dropped once per [`Splitter::next_frame`] round (when it
/// returns `None`), not per value, so many pipelined requests in one read cost
/// linear time.
pub struct Splitter {
    buf: Vec<u8>,
    /// Start of the bytes not consumed yet (the open value starts here).
    head: usize,
    /// Next byte to scan.
    pos: usize,
    /// Whether a value is open.
    open: bool,
    /// The grammar state of the open value.
    grammar: Grammar,
    /// An invalid request was reported: the stream is over.
    failed: bool,
    /// Dropping the rest of an oversized value.
    skipping: bool,
    /// Dropping bytes until the end of the line after garbage.
    discard_line: bool,
    max: usize,
}

impl Splitter {
    /// A splitter that refuses values larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            head: 0,
            pos: 0,
            open: false,
            grammar: Grammar::open(b'['),
            failed: false,
            skipping: false,
            discard_line: false,
            max: max.max(2),
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether a value has started but not finished (a truncated request at EOF).
    pub fn has_partial(&self) -> bool {
        self.open && !self.skipping
    }

    /// Drops the consumed bytes.
    fn compact(&mut self) {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.pos -= self.head;
            self.head = 0;
        }
    }

    /// The next complete frame, if the buffered bytes hold one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        if self.failed {
            self.buf.clear();
            self.head = 0;
            self.pos = 0;
            return None;
        }
        loop {
            if self.pos >= self.buf.len() {
                if !self.open || self.skipping {
                    self.head = self.buf.len();
                }
                self.compact();
                return None;
            }
            if self.discard_line {
                match self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.pos += i + 1;
                        self.discard_line = false;
                    }
                    None => self.pos = self.buf.len(),
                }
                self.head = self.pos;
                continue;
            }
            if !self.open {
                // Skip whitespace between values.
                let ws = self.buf[self.pos..]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                self.pos += ws;
                self.head = self.pos;
                if self.pos >= self.buf.len() {
                    continue;
                }
                let b = self.buf[self.pos];
                if b != b'{' && b != b'[' {
                    self.discard_line = true;
                    return Some(Frame::Garbage { byte: b });
                }
                self.pos += 1;
                self.open = true;
                self.grammar = Grammar::open(b);
                continue;
            }
            let scanned = match self.scan() {
                Ok(end) => end,
                Err((at, why)) => {
                    self.failed = true;
                    self.open = false;
                    return Some(Frame::Invalid { at, why });
                }
            };
            if let Some(end) = scanned {
                // `end` is the index just past the closing bracket.
                self.open = false;
                let start = std::mem::replace(&mut self.head, end);
                if self.skipping {
                    self.skipping = false;
                    continue;
                }
                return Some(Frame::Value(self.buf[start..end].to_vec()));
            }
            // The value is still open and every byte up to the limit was scanned.
            if self.skipping {
                continue;
            }
            if self.buf.len() - self.head > self.max {
                // Report now; the next call scans (and drops) the rest in skipping mode.
                self.skipping = true;
                return Some(Frame::TooLarge);
            }
            self.compact();
            return None;
        }
    }

    /// Scans from `pos`; returns the end of the open value if it closes, or the
    /// offset (in the request) and reason of the first byte that makes it invalid.
    fn scan(&mut self) -> Result<Option<usize>, (usize, String)> {
        let limit = if self.skipping {
            self.buf.len()
        } else {
            self.buf.len().min(self.head + self.max)
        };
        let mut i = self.pos;
        while i < limit {
            let b = self.buf[i];
            i += 1;
            match self.grammar.step(b) {
                Step::More => {}
                Step::Done => {
                    self.pos = i;
                    return Ok(Some(i));
                }
                Step::Bad(why) => {
                    self.pos = i;
                    // (In skipping mode the head moves; the offset is then within what is kept.)
                    return Err((i - 1 - self.head, why));
                }
            }
        }
        self.pos = i;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &mut Splitter) -> Vec<Frame> {
        std::iter::from_fn(|| s.next_frame()).collect()
    }

    fn val(s: &str) -> Frame {
        Frame::Value(s.as_bytes().to_vec())
    }

    #[test]
    fn concatenated_pretty_values_without_delimiters() {
        let mut s = Splitter::new(1 << 20);
        s.feed(b"{\n  \"a\": \"}{\\\"\",\n  \"b\": [1, {\"c\": 2}]\n}{\"x\":1}  [1,2]\n");
        assert_eq!(
            all(&mut s),
            vec![
                val("{\n  \"a\": \"}{\\\"\",\n  \"b\": [1, {\"c\": 2}]\n}"),
                val("{\"x\":1}"),
                val("[1,2]")
            ]
        );
        assert!(!s.has_partial());
    }

    #[test]
    fn byte_by_byte() {
        let text = "{\"method\": \"a\\\\\", \"p\": {\"q\": \"]\"}} {\"m\": 2}";
        let mut s = Splitter::new(1 << 20);
        let mut out = Vec::new();
        for b in text.bytes() {
            s.feed(&[b]);
            out.extend(all(&mut s));
        }
        assert_eq!(
            out,
            vec![
                val("{\"method\": \"a\\\\\", \"p\": {\"q\": \"]\"}}"),
                val("{\"m\": 2}")
            ]
        );
    }

    #[test]
    fn truncated_value_is_partial() {
        let mut s = Splitter::new(1 << 20);
        s.feed(b"{\"a\": [1, 2");
        assert_eq!(all(&mut s), vec![]);
        assert!(s.has_partial());
        s.feed(b"]}");
        assert_eq!(all(&mut s), vec![val("{\"a\": [1, 2]}")]);
    }

    #[test]
    fn oversized_value_is_skipped_and_stream_resumes() {
        let mut s = Splitter::new(16);
        s.feed(b"{\"a\": \"0123");
        assert_eq!(all(&mut s), vec![]);
        s.feed(b"0123456789");
        assert_eq!(all(&mut s), vec![Frame::TooLarge]);
        s.feed(&[b'x'; 1000]);
        assert_eq!(all(&mut s), vec![]);
        assert!(s.buf.len() < 100, "skipped bytes are not kept");
        assert!(!s.has_partial());
        s.feed(b"\"}{\"ok\":1}");
        assert_eq!(all(&mut s), vec![val("{\"ok\":1}")]);
    }

    #[test]
    fn exactly_max_is_accepted() {
        let mut s = Splitter::new(8);
        s.feed(b"{\"a\":12}{\"a\":123}{}");
        assert_eq!(
            all(&mut s),
            vec![val("{\"a\":12}"), Frame::TooLarge, val("{}")]
        );
    }

    #[test]
    fn many_pipelined_values_in_one_feed() {
        let mut s = Splitter::new(1 << 20);
        let one = b"{\"jsonrpc\":\"2.0\",\"method\":\"m\",\"id\":1}";
        let mut all_bytes = Vec::new();
        for _ in 0..10_000 {
            all_bytes.extend_from_slice(one);
        }
        s.feed(&all_bytes[..all_bytes.len() - 3]);
        let got = all(&mut s);
        assert_eq!(got.len(), 9_999);
        assert!(got.iter().all(|f| *f == Frame::Value(one.to_vec())));
        assert_eq!(s.buf.len(), one.len() - 3, "consumed bytes are dropped");
        s.feed(&all_bytes[all_bytes.len() - 3..]);
        assert_eq!(all(&mut s), vec![Frame::Value(one.to_vec())]);
        assert!(s.buf.is_empty());
    }

    #[test]
    fn hopeless_request_is_invalid_at_once_and_ends_the_stream() {
        let mut s = Splitter::new(1 << 20);
        s.feed(b"{\"a\":1}{\"jsonrpc\":\"2.0\",\"id\":1,{{{");
        let got = all(&mut s);
        assert_eq!(got[0], val("{\"a\":1}"));
        assert!(
            matches!(&got[1], Frame::Invalid { at: 24, .. }),
            "{:?}",
            got[1]
        );
        assert_eq!(got.len(), 2);
        s.feed(b"}}}{\"b\":2}");
        assert_eq!(all(&mut s), vec![], "nothing after an invalid request");
        assert!(!s.has_partial());
    }

    #[test]
    fn garbage_drops_the_line() {
        let mut s = Splitter::new(1 << 20);
        s.feed(b"hello {\"no\": 1}\n{\"yes\": 1}");
        assert_eq!(
            all(&mut s),
            vec![Frame::Garbage { byte: b'h' }, val("{\"yes\": 1}")]
        );
    }
}
