//! Splits a byte stream into JSON texts without needing a delimiter.
//!
//! SPDK's Python client sends pretty-printed requests with no trailing newline,
//! several per connection, and QMP clients may do the same. The [`Splitter`]
//! scans the bytes once, tracking nesting and strings, and yields each complete
//! top-level object or array; it never buffers more than `max` bytes of one
//! request (the rest of an oversized request is skipped, not stored).

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
}

/// Incremental splitter of concatenated JSON objects/arrays.
pub struct Splitter {
    buf: Vec<u8>,
    /// Next byte of `buf` to scan.
    pos: usize,
    /// Whether a value is open (its bytes start at `buf[0]`).
    open: bool,
    depth: usize,
    in_str: bool,
    esc: bool,
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
            pos: 0,
            open: false,
            depth: 0,
            in_str: false,
            esc: false,
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

    /// The next complete frame, if the buffered bytes hold one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if self.pos >= self.buf.len() {
                if !self.open || self.skipping {
                    self.buf.clear();
                    self.pos = 0;
                }
                return None;
            }
            if self.discard_line {
                match self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.buf.drain(..self.pos + i + 1);
                        self.pos = 0;
                        self.discard_line = false;
                        continue;
                    }
                    None => {
                        self.buf.clear();
                        self.pos = 0;
                        return None;
                    }
                }
            }
            if !self.open {
                // Skip whitespace between values.
                let ws = self.buf[self.pos..]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                self.pos += ws;
                if self.pos >= self.buf.len() {
                    continue;
                }
                let b = self.buf[self.pos];
                if b != b'{' && b != b'[' {
                    self.buf.drain(..self.pos);
                    self.pos = 0;
                    self.discard_line = true;
                    return Some(Frame::Garbage { byte: b });
                }
                self.buf.drain(..self.pos);
                self.pos = 1;
                self.open = true;
                self.depth = 1;
                self.in_str = false;
                self.esc = false;
                continue;
            }
            if let Some(end) = self.scan() {
                // `end` is the index just past the closing bracket.
                self.open = false;
                if self.skipping {
                    self.skipping = false;
                    self.buf.drain(..end);
                    self.pos = 0;
                    continue;
                }
                let rest = self.buf.split_off(end);
                let value = std::mem::replace(&mut self.buf, rest);
                self.pos = 0;
                return Some(Frame::Value(value));
            }
            // The value is still open and every buffered byte was scanned.
            if self.skipping {
                self.buf.clear();
                self.pos = 0;
                return None;
            }
            if self.buf.len() > self.max {
                // Report now; the next call scans (and drops) the rest in skipping mode.
                self.skipping = true;
                return Some(Frame::TooLarge);
            }
            return None;
        }
    }

    /// Scans from `pos`; returns the end of the open value if it closes.
    fn scan(&mut self) -> Option<usize> {
        let limit = if self.skipping {
            self.buf.len()
        } else {
            self.buf.len().min(self.max)
        };
        let mut i = self.pos;
        while i < limit {
            let b = self.buf[i];
            i += 1;
            if self.in_str {
                if self.esc {
                    self.esc = false;
                } else if b == b'\\' {
                    self.esc = true;
                } else if b == b'"' {
                    self.in_str = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.pos = i;
                        return Some(i);
                    }
                }
                _ => {}
            }
        }
        self.pos = i;
        None
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
        s.feed(b"0123456789\"");
        assert_eq!(all(&mut s), vec![Frame::TooLarge]);
        s.feed(&[b'x'; 1000]);
        assert_eq!(all(&mut s), vec![]);
        assert!(s.buf.len() < 100, "skipped bytes are not kept");
        s.feed(b"}{\"ok\":1}");
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
    fn garbage_drops_the_line() {
        let mut s = Splitter::new(1 << 20);
        s.feed(b"hello {\"no\": 1}\n{\"yes\": 1}");
        assert_eq!(
            all(&mut s),
            vec![Frame::Garbage { byte: b'h' }, val("{\"yes\": 1}")]
        );
    }
}
