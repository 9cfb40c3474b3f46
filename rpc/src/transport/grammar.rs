//! A streaming check of JSON's grammar (RFC 8259, as `serde_json` reads it),
//! one byte at a time, for the framing of JSON-RPC requests.
//!
//! The contract: fed the bytes of one top-level object or array in order,
//! [`Grammar::step`] answers [`Step::More`] while they can still become valid
//! JSON, [`Step::Done`] at the byte that closes the value, and
//! [`Step::Bad`] at the first byte after which no continuation can be valid
//! (a bare word, a value where a member name belongs, a misplaced `,` or `:`,
//! a control byte or invalid UTF-8 in a string, mismatched brackets, nesting
//! deeper than [`MAX_DEPTH`]). It keeps O(depth) state and never looks back,
//! so a server can answer a hopeless request at once instead of waiting for a
//! closing bracket that will never come. What it cannot see (surrogates in
//! `\u` escapes, numbers out of range) is left to the parser of the complete
//! value.

/// Deepest nesting accepted (`serde_json`'s own recursion limit).
pub const MAX_DEPTH: usize = 128;

/// The answer to one byte.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Still a possible prefix of a valid value.
    More,
    /// This byte closed the top-level value.
    Done,
    /// No continuation can be valid; why, for the error reply.
    Bad(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A value (after `:` or `,` in an array).
    Value,
    /// A value or `]` (just after `[`).
    ValueOrClose,
    /// A member name or `}` (just after `{`).
    KeyOrClose,
    /// A member name (after `,` in an object).
    Key,
    /// `:` after a member name.
    Colon,
    /// `,` or the closing bracket after a value.
    SepOrClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Structural,
    /// Inside a string; `key` when it is a member name.
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Escape {
        key: bool,
    },
    /// Inside `\uXXXX`: hex digits still wanted.
    Hex {
        key: bool,
        left: u8,
    },
    /// Inside a multi-byte UTF-8 sequence: continuation bytes still wanted and
    /// the range the next one must fall in.
    Utf8 {
        key: bool,
        left: u8,
        lo: u8,
        hi: u8,
    },
    Number(Num),
    /// Inside `true`, `false` or `null`: the word and how much of it was seen.
    Word {
        word: &'static [u8],
        at: u8,
    },
}

/// The state of one value being checked.
#[derive(Debug)]
pub struct Grammar {
    /// Open containers, innermost last: `true` for an object.
    stack: Vec<bool>,
    expect: Expect,
    lex: Lex,
}

fn show(b: u8) -> String {
    if b.is_ascii_graphic() || b == b' ' {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

impl Grammar {
    /// The state after the opening bracket (`b'{'` or `b'['`) of a top-level value.
    pub fn open(first: u8) -> Grammar {
        let obj = first == b'{';
        Grammar {
            stack: vec![obj],
            expect: if obj {
                Expect::KeyOrClose
            } else {
                Expect::ValueOrClose
            },
            lex: Lex::Structural,
        }
    }

    /// A scalar or container just ended.
    fn value_done(&mut self) -> Step {
        if self.stack.is_empty() {
            Step::Done
        } else {
            self.expect = Expect::SepOrClose;
            Step::More
        }
    }

    fn string_done(&mut self, key: bool) -> Step {
        self.lex = Lex::Structural;
        if key {
            self.expect = Expect::Colon;
            Step::More
        } else {
            self.value_done()
        }
    }

    /// Feeds one byte.
    pub fn step(&mut self, b: u8) -> Step {
        match self.lex {
            Lex::Structural => self.structural(b),
            Lex::Str { key } => match b {
                b'"' => self.string_done(key),
                b'\\' => {
                    self.lex = Lex::Escape { key };
                    Step::More
                }
                0x00..=0x1f => Step::Bad(format!("control character {} in a string", show(b))),
                0x20..=0x7f => Step::More,
                _ => {
                    let (left, lo, hi) = match b {
                        0xc2..=0xdf => (1, 0x80, 0xbf),
                        0xe0 => (2, 0xa0, 0xbf),
                        0xe1..=0xec | 0xee..=0xef => (2, 0x80, 0xbf),
                        0xed => (2, 0x80, 0x9f),
                        0xf0 => (3, 0x90, 0xbf),
                        0xf1..=0xf3 => (3, 0x80, 0xbf),
                        0xf4 => (3, 0x80, 0x8f),
                        _ => return Step::Bad(format!("invalid UTF-8 ({}) in a string", show(b))),
                    };
                    self.lex = Lex::Utf8 { key, left, lo, hi };
                    Step::More
                }
            },
            Lex::Utf8 { key, left, lo, hi } => {
                if !(lo..=hi).contains(&b) {
                    return Step::Bad(format!("invalid UTF-8 ({}) in a string", show(b)));
                }
                self.lex = if left == 1 {
                    Lex::Str { key }
                } else {
                    Lex::Utf8 {
                        key,
                        left: left - 1,
                        lo: 0x80,
                        hi: 0xbf,
                    }
                };
                Step::More
            }
            Lex::Escape { key } => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                    self.lex = Lex::Str { key };
                    Step::More
                }
                b'u' => {
                    self.lex = Lex::Hex { key, left: 4 };
                    Step::More
                }
                _ => Step::Bad(format!("invalid escape '\\' {} in a string", show(b))),
            },
            Lex::Hex { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return Step::Bad(format!(
                        "invalid \\u escape: {} is not a hex digit",
                        show(b)
                    ));
                }
                self.lex = if left == 1 {
                    Lex::Str { key }
                } else {
                    Lex::Hex {
                        key,
                        left: left - 1,
                    }
                };
                Step::More
            }
            Lex::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                if let Some(next) = next {
                    self.lex = Lex::Number(next);
                    return Step::More;
                }
                if !n.complete() {
                    return Step::Bad(format!("{} in a number", show(b)));
                }
                // The number ended: this byte belongs to what follows it.
                self.lex = Lex::Structural;
                match self.value_done() {
                    Step::More => self.structural(b),
                    other => other,
                }
            }
            Lex::Word { word, at } => {
                if word[at as usize] != b {
                    return Step::Bad(format!(
                        "{} where '{}' was expected",
                        show(b),
                        String::from_utf8_lossy(word)
                    ));
                }
                if at as usize + 1 == word.len() {
                    self.lex = Lex::Structural;
                    return self.value_done();
                }
                self.lex = Lex::Word { word, at: at + 1 };
                Step::More
            }
        }
    }

    fn structural(&mut self, b: u8) -> Step {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return Step::More;
        }
        let in_obj = self.stack.last().copied().unwrap_or(false);
        match self.expect {
            Expect::Value | Expect::ValueOrClose => {
                let lex = match b {
                    b'{' | b'[' => {
                        if self.stack.len() >= MAX_DEPTH {
                            return Step::Bad(format!("nesting deeper than {MAX_DEPTH}"));
                        }
                        self.stack.push(b == b'{');
                        self.expect = if b == b'{' {
                            Expect::KeyOrClose
                        } else {
                            Expect::ValueOrClose
                        };
                        return Step::More;
                    }
                    b']' if self.expect == Expect::ValueOrClose => {
                        self.stack.pop();
                        return self.value_done();
                    }
                    b'"' => Lex::Str { key: false },
                    b'-' => Lex::Number(Num::Minus),
                    b'0' => Lex::Number(Num::Zero),
                    b'1'..=b'9' => Lex::Number(Num::Int),
                    b't' => Lex::Word {
                        word: b"true",
                        at: 1,
                    },
                    b'f' => Lex::Word {
                        word: b"false",
                        at: 1,
                    },
                    b'n' => Lex::Word {
                        word: b"null",
                        at: 1,
                    },
                    _ => return Step::Bad(format!("{} where a value was expected", show(b))),
                };
                self.lex = lex;
                Step::More
            }
            Expect::KeyOrClose | Expect::Key => match b {
                b'"' => {
                    self.lex = Lex::Str { key: true };
                    Step::More
                }
                b'}' if self.expect == Expect::KeyOrClose => {
                    self.stack.pop();
                    self.value_done()
                }
                _ => Step::Bad(format!(
                    "{} where a member name (a string) was expected",
                    show(b)
                )),
            },
            Expect::Colon => match b {
                b':' => {
                    self.expect = Expect::Value;
                    Step::More
                }
                _ => Step::Bad(format!("{} where ':' was expected", show(b))),
            },
            Expect::SepOrClose => match (b, in_obj) {
                (b',', true) => {
                    self.expect = Expect::Key;
                    Step::More
                }
                (b',', false) => {
                    self.expect = Expect::Value;
                    Step::More
                }
                (b'}', true) | (b']', false) => {
                    self.stack.pop();
                    self.value_done()
                }
                (_, true) => Step::Bad(format!("{} where ',' or '}}' was expected", show(b))),
                (_, false) => Step::Bad(format!("{} where ',' or ']' was expected", show(b))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text`; the index and answer of the first byte that is not `More`.
    fn run(text: &[u8]) -> Option<(usize, Step)> {
        let mut g = Grammar::open(text[0]);
        for (i, &b) in text.iter().enumerate().skip(1) {
            match g.step(b) {
                Step::More => {}
                s => return Some((i, s)),
            }
        }
        None
    }

    #[test]
    fn valid_values_end_at_their_bracket() {
        for t in [
            &br#"{"a": [1, -0.5e+3, true, false, null, "x\"\u00e9\n"], "b": {}}"#[..],
            b"[]",
            b"[[], {}, 0, 10, 1E5]",
            "{\"k\u{e9}\u{1F600}\": \"\u{800}\u{ffff}\"}".as_bytes(),
        ] {
            assert_eq!(
                run(t),
                Some((t.len() - 1, Step::Done)),
                "{}",
                String::from_utf8_lossy(t)
            );
        }
    }

    #[test]
    fn hopeless_input_is_bad_at_the_offending_byte() {
        for (t, at) in [
            (&b"{x"[..], 1),
            (br#"{"jsonrpc":"2.0","id":1,{{{"#, 24),
            (br#"{"params":{"a":[}}"#, 16),
            (b"{,", 1),
            (br#"{"a"::1}"#, 5),
            (br#"{"a":1,}"#, 7),
            (b"[1,,2]", 3),
            (b"[1 2]", 3),
            (b"{\"a\x01", 3),
            (b"{\"a\xff", 3),
            (b"{\"a\xc3(", 4),
            (b"{\"a\xed\xa0\x80", 4),
            (b"[tru]", 4),
            (b"[01]", 2),
            (b"[1.]", 3),
            (b"[-]", 2),
            (b"[\"\\x\"]", 3),
            (b"[\"\\u12g4\"]", 6),
        ] {
            match run(t) {
                Some((i, Step::Bad(_))) if i == at => {}
                other => panic!("{}: {other:?}", String::from_utf8_lossy(t)),
            }
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let mut t = vec![b'['; MAX_DEPTH + 1];
        t.push(b']');
        assert!(matches!(run(&t), Some((i, Step::Bad(_))) if i == MAX_DEPTH));
    }
}
