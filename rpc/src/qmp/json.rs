//! QMP input as QEMU reads it: its JSON lexer, streamer and parser
//! (`qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c`), so that
//! sluice answers a byte stream with the same replies as qemu-storage-daemon.
//!
//! The contract, QEMU's: the lexer cuts tokens (strings in double or single
//! quotes, numbers, lower-case keywords, the six structural characters); a
//! byte no token can take is an error token, after which the lexer skips to
//! the next bracket, control character or `\xFE`/`\xFF` and starts again.
//! The streamer counts brackets and hands the parser every balanced run of
//! tokens (a lone scalar is one); an error token instead yields
//! `JSON parse error, stray '...'` and drops the tokens gathered so far. So a
//! bad token costs one error, and what follows it is still read (`true{...}`
//! gets an error for `true`, then the command is run). The parser builds a
//! [`Q`] (QEMU's QObject: integers as i64, else u64, else double) or the
//! first error with QEMU's words.

use super::writer;

/// A parsed JSON value with QEMU's number kinds and the members' order.
#[derive(Debug, Clone, PartialEq)]
pub enum Q {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer that fits i64.
    Int(i64),
    /// An integer that fits u64 only.
    Uint(u64),
    /// Any other number.
    Double(f64),
    /// A string.
    Str(String),
    /// An array.
    List(Vec<Q>),
    /// An object, members in the order given (keys unique).
    Dict(Vec<(String, Q)>),
}

impl Q {
    /// As a `serde_json` value for the handlers (a number out of `f64`'s
    /// finite range becomes `null`).
    pub fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Q::Null => Value::Null,
            Q::Bool(b) => Value::Bool(*b),
            Q::Int(i) => Value::from(*i),
            Q::Uint(u) => Value::from(*u),
            Q::Double(d) => serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number),
            Q::Str(s) => Value::String(s.clone()),
            Q::List(l) => Value::Array(l.iter().map(Q::to_value).collect()),
            Q::Dict(d) => Value::Object(d.iter().map(|(k, v)| (k.clone(), v.to_value())).collect()),
        }
    }

    /// QEMU's text for it (as qemu-storage-daemon echoes an id).
    pub fn to_qemu_json(&self) -> String {
        let mut out = String::new();
        writer::write_q(&mut out, self);
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    Recovery,
    DqStr,
    DqEsc,
    SqStr,
    SqEsc,
    Zero,
    NonZero,
    Neg,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
    Whitespace,
}

/// What the table says for a state and a byte.
enum Next {
    /// Consume the byte and go to the state.
    Go(St),
    /// The token ended before this byte (the byte is looked at again).
    Emit(Tok),
    /// The token ends with this byte.
    EmitWith(Tok),
    /// Whitespace ended before this byte.
    Skip,
    /// Back to the start before this byte (recovery found a resync point).
    Restart,
    /// The byte makes an error token (it is part of it).
    Error,
}

fn next(st: St, b: u8) -> Next {
    use Next::*;
    let digit = b.is_ascii_digit();
    match st {
        St::Start => match b {
            b'"' => Go(St::DqStr),
            b'\'' => Go(St::SqStr),
            b'0' => Go(St::Zero),
            b'1'..=b'9' => Go(St::NonZero),
            b'-' => Go(St::Neg),
            b'{' => EmitWith(Tok::LCurly),
            b'}' => EmitWith(Tok::RCurly),
            b'[' => EmitWith(Tok::LSquare),
            b']' => EmitWith(Tok::RSquare),
            b':' => EmitWith(Tok::Colon),
            b',' => EmitWith(Tok::Comma),
            b'a'..=b'z' => Go(St::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Go(St::Whitespace),
            _ => Error,
        },
        St::Recovery => match b {
            b'\t' => Go(St::Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' => Restart,
            _ => Go(St::Recovery),
        },
        St::DqStr | St::SqStr => {
            let (quote, esc) = if st == St::DqStr {
                (b'"', St::DqEsc)
            } else {
                (b'\'', St::SqEsc)
            };
            match b {
                _ if b == quote => EmitWith(Tok::Str),
                b'\\' => Go(esc),
                0x20..=0xfd => Go(st),
                _ => Error,
            }
        }
        St::DqEsc => match b {
            0x20..=0xfd => Go(St::DqStr),
            _ => Error,
        },
        St::SqEsc => match b {
            0x20..=0xfd => Go(St::SqStr),
            _ => Error,
        },
        St::Zero => match b {
            b'.' => Go(St::Mantissa),
            b'e' | b'E' => Go(St::ExpE),
            b'0'..=b'9' => Error,
            _ => Emit(Tok::Integer),
        },
        St::NonZero => match b {
            _ if digit => Go(St::NonZero),
            b'.' => Go(St::Mantissa),
            b'e' | b'E' => Go(St::ExpE),
            _ => Emit(Tok::Integer),
        },
        St::Neg => match b {
            b'0' => Go(St::Zero),
            b'1'..=b'9' => Go(St::NonZero),
            _ => Error,
        },
        St::Mantissa => match b {
            _ if digit => Go(St::MantissaDigits),
            _ => Error,
        },
        St::MantissaDigits => match b {
            _ if digit => Go(St::MantissaDigits),
            b'e' | b'E' => Go(St::ExpE),
            _ => Emit(Tok::Float),
        },
        St::ExpE => match b {
            b'-' | b'+' => Go(St::ExpSign),
            _ if digit => Go(St::ExpDigits),
            _ => Error,
        },
        St::ExpSign => match b {
            _ if digit => Go(St::ExpDigits),
            _ => Error,
        },
        St::ExpDigits => match b {
            _ if digit => Go(St::ExpDigits),
            _ => Emit(Tok::Float),
        },
        St::Keyword => match b {
            b'a'..=b'z' => Go(St::Keyword),
            _ => Emit(Tok::Keyword),
        },
        St::Whitespace => match b {
            b' ' | b'\t' | b'\r' | b'\n' => Go(St::Whitespace),
            _ => Skip,
        },
    }
}

/// What the stream yields: a parsed value, or the desc of an error reply.
pub type Item = Result<Q, String>;

/// QEMU's lexer and streamer over a byte stream.
pub struct Stream {
    state: St,
    token: Vec<u8>,
    tokens: Vec<(Tok, Vec<u8>)>,
    size: usize,
    braces: i64,
    brackets: i64,
    /// Most bytes of tokens in one value (QEMU: 64 MiB).
    max: usize,
    /// The message for a value over `max`.
    too_large: String,
}

/// Deepest nesting QEMU accepts.
const MAX_NESTING: i64 = 1024;

/// Most tokens in one value (QEMU's limit).
const MAX_TOKEN_COUNT: usize = 2 << 20;

impl Stream {
    /// A stream refusing values over `max` bytes with the desc `too_large`.
    pub fn new(max: usize, too_large: String) -> Stream {
        Stream {
            state: St::Start,
            token: Vec::new(),
            tokens: Vec::new(),
            size: 0,
            braces: 0,
            brackets: 0,
            max,
            too_large,
        }
    }

    /// Feeds bytes; pushes each value or error completed by them onto `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Item>) {
        for &b in data {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Item>) {
        loop {
            match next(self.state, b) {
                Next::Go(st) => {
                    self.state = st;
                    if st == St::Recovery {
                        self.token.clear();
                    } else {
                        self.token.push(b);
                    }
                    break;
                }
                Next::EmitWith(tok) => {
                    self.token.push(b);
                    let text = std::mem::take(&mut self.token);
                    self.state = St::Start;
                    self.token_done(tok, text, out);
                    break;
                }
                Next::Emit(tok) => {
                    let text = std::mem::take(&mut self.token);
                    self.state = St::Start;
                    self.token_done(tok, text, out);
                }
                Next::Skip | Next::Restart => {
                    self.token.clear();
                    self.state = St::Start;
                }
                Next::Error => {
                    self.token.push(b);
                    let mut text = std::mem::take(&mut self.token);
                    // QEMU formats the token as a C string: it ends at a NUL.
                    if let Some(nul) = text.iter().position(|&c| c == 0) {
                        text.truncate(nul);
                    }
                    self.state = St::Recovery;
                    self.emit(
                        Err(format!(
                            "JSON parse error, stray '{}'",
                            String::from_utf8_lossy(&text)
                        )),
                        out,
                    );
                    break;
                }
            }
        }
        if self.token.len() > self.max {
            // One token alone is over the limit: as QEMU, hand it on as it is.
            self.token.clear();
            self.state = St::Start;
            self.emit(Err(self.too_large.clone()), out);
        }
    }

    fn token_done(&mut self, tok: Tok, text: Vec<u8>, out: &mut Vec<Item>) {
        match tok {
            Tok::LCurly => self.braces += 1,
            Tok::RCurly => self.braces -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.size + text.len() + 1 > self.max {
            return self.emit(Err(self.too_large.clone()), out);
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.emit(Err("JSON nesting depth limit exceeded".into()), out);
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.emit(Err("JSON token count limit exceeded".into()), out);
        }
        self.size += text.len();
        // The parser needs no text for the structural tokens: none is kept.
        let text = match tok {
            Tok::Integer | Tok::Float | Tok::Keyword | Tok::Str => text,
            _ => Vec::new(),
        };
        self.tokens.push((tok, text));
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let tokens = std::mem::take(&mut self.tokens);
        let item = Parser {
            toks: &tokens,
            at: 0,
        }
        .parse();
        self.emit(item, out);
    }

    fn emit(&mut self, item: Item, out: &mut Vec<Item>) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens.clear();
        self.size = 0;
        out.push(item);
    }
}

struct Parser<'a> {
    toks: &'a [(Tok, Vec<u8>)],
    at: usize,
}

type Res<T> = Result<T, String>;

fn err<T>(msg: &str) -> Res<T> {
    Err(format!("JSON parse error, {msg}"))
}

impl Parser<'_> {
    fn parse(mut self) -> Item {
        self.value()
    }

    fn peek(&self) -> Option<Tok> {
        self.toks.get(self.at).map(|t| t.0)
    }

    fn pop(&mut self) -> Res<&(Tok, Vec<u8>)> {
        let t = self.toks.get(self.at);
        self.at += 1;
        t.map_or_else(|| err("premature EOI"), Ok)
    }

    fn value(&mut self) -> Res<Q> {
        match self.peek() {
            None => err("premature EOI"),
            Some(Tok::LCurly) => self.object(),
            Some(Tok::LSquare) => self.array(),
            Some(Tok::Integer | Tok::Float | Tok::Str) => self.literal(),
            Some(Tok::Keyword) => {
                let (_, t) = self.pop()?;
                match &t[..] {
                    b"true" => Ok(Q::Bool(true)),
                    b"false" => Ok(Q::Bool(false)),
                    b"null" => Ok(Q::Null),
                    w => err(&format!("invalid keyword '{}'", String::from_utf8_lossy(w))),
                }
            }
            Some(_) => err("expecting value"),
        }
    }

    fn object(&mut self) -> Res<Q> {
        self.pop()?;
        let mut d: Vec<(String, Q)> = Vec::new();
        if self.peek().is_none() {
            return err("premature EOI");
        }
        if self.peek() == Some(Tok::RCurly) {
            self.pop()?;
            return Ok(Q::Dict(d));
        }
        self.pair(&mut d)?;
        loop {
            match self.pop()?.0 {
                Tok::RCurly => return Ok(Q::Dict(d)),
                Tok::Comma => self.pair(&mut d)?,
                _ => return err("expected separator in dict"),
            }
        }
    }

    fn pair(&mut self, d: &mut Vec<(String, Q)>) -> Res<()> {
        if self.peek().is_none() {
            return err("premature EOI");
        }
        let key = match self.value()? {
            Q::Str(s) => s,
            _ => return err("key is not a string in object"),
        };
        if self.pop()?.0 != Tok::Colon {
            return err("missing : in object pair");
        }
        let v = self.value()?;
        if d.iter().any(|(k, _)| *k == key) {
            return err("duplicate key");
        }
        d.push((key, v));
        Ok(())
    }

    fn array(&mut self) -> Res<Q> {
        self.pop()?;
        let mut l = Vec::new();
        match self.peek() {
            None => return err("premature EOI"),
            Some(Tok::RSquare) => {
                self.pop()?;
                return Ok(Q::List(l));
            }
            Some(_) => {}
        }
        l.push(self.value()?);
        loop {
            match self.pop()?.0 {
                Tok::RSquare => return Ok(Q::List(l)),
                Tok::Comma => l.push(self.value()?),
                _ => return err("expected separator in list"),
            }
        }
    }

    fn literal(&mut self) -> Res<Q> {
        let (tok, text) = self.pop()?;
        let s = String::from_utf8_lossy(text);
        match tok {
            Tok::Str => parse_string(text).map(Q::Str),
            Tok::Integer => Ok(if let Ok(i) = s.parse::<i64>() {
                Q::Int(i)
            } else if let (false, Ok(u)) = (s.starts_with('-'), s.parse::<u64>()) {
                Q::Uint(u)
            } else {
                Q::Double(s.parse::<f64>().unwrap_or(f64::NAN))
            }),
            _ => Ok(Q::Double(s.parse::<f64>().unwrap_or(f64::NAN))),
        }
    }
}

fn hex4(b: &[u8]) -> Option<u32> {
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(&b[..4]).ok()?, 16).ok()
}

/// The text of a string token (quotes included), as QEMU's `parse_string`.
fn parse_string(tok: &[u8]) -> Res<String> {
    let quote = tok[0];
    let body = &tok[1..tok.len() - 1];
    debug_assert_eq!(tok[tok.len() - 1], quote);
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == b'\\' {
            let beg = i;
            let e = body.get(i + 1).copied().unwrap_or(0);
            i += 2;
            match e {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i.min(body.len())..]).map_or(-1i64, i64::from);
                    i += 4;
                    if (0xd800..=0xdbff).contains(&cp) && body.get(i..i + 2) == Some(b"\\u") {
                        let trail = hex4(&body[i + 2..]).map_or(-1i64, i64::from);
                        if (0xdc00..=0xdfff).contains(&trail) {
                            cp = (0x10000 + ((cp & 0x3ff) << 10)) | (trail & 0x3ff);
                            i += 6;
                        } else {
                            cp = -1;
                        }
                    }
                    match u32::try_from(cp).ok().and_then(char::from_u32) {
                        Some(c) => out.push(c),
                        None => {
                            // QEMU prints the escape's bytes as they run on in
                            // the token (its closing quote included), up to NUL.
                            let end = (1 + i).min(tok.len());
                            return err(&format!(
                                "{} is not a valid Unicode character",
                                String::from_utf8_lossy(&tok[1 + beg..end])
                            ));
                        }
                    }
                }
                _ => return err("invalid escape sequence in string"),
            }
            continue;
        }
        // One UTF-8 sequence (QEMU also takes C0 80 for U+0000).
        if body[i..].starts_with(&[0xc0, 0x80]) {
            out.push('\0');
            i += 2;
            continue;
        }
        let len = match b {
            0x00..=0x7f => 1,
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => 0,
        };
        match body
            .get(i..i + len)
            .filter(|_| len > 0)
            .and_then(|s| std::str::from_utf8(s).ok())
        {
            Some(s) => out.push_str(s),
            None => return err("invalid UTF-8 sequence in string"),
        }
        i += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Vec<Item> {
        let mut s = Stream::new(1 << 20, "too large".into());
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    fn e(s: &str) -> Item {
        Err(s.to_string())
    }

    #[test]
    fn recovers_token_by_token_as_qemu() {
        let ok = Q::Dict(vec![("execute".into(), Q::Str("x".into()))]);
        assert_eq!(
            run(b"true{\"execute\":\"x\"}"),
            vec![Ok(Q::Bool(true)), Ok(ok.clone())]
        );
        assert_eq!(
            run(b"]{\"execute\":\"x\"}"),
            vec![e("JSON parse error, expecting value"), Ok(ok.clone())]
        );
        assert_eq!(
            run(b"{\"a\": \"a\x01b\"}\n{'execute':'x'}"),
            vec![
                e("JSON parse error, stray '\"a\u{1}'"),
                e("JSON parse error, expecting value"),
                Ok(ok.clone())
            ]
        );
        assert_eq!(
            run(b"hello\n"),
            vec![e("JSON parse error, invalid keyword 'hello'")]
        );
        assert_eq!(
            run(b"{\"a\":1,,\"b\":2}{\"a\"::1}"),
            vec![
                e("JSON parse error, expecting value"),
                e("JSON parse error, expecting value")
            ]
        );
        assert_eq!(run(b"{x"), vec![], "QEMU waits for the brace");
    }

    #[test]
    fn numbers_as_qemu() {
        let r = run(b"[1, -0, 1e2, 18446744073709551615, 123456789012345678901234567890, 0.1]");
        assert_eq!(
            r,
            vec![Ok(Q::List(vec![
                Q::Int(1),
                Q::Int(0),
                Q::Double(100.0),
                Q::Uint(u64::MAX),
                Q::Double(1.2345678901234568e29),
                Q::Double(0.1)
            ]))]
        );
    }

    #[test]
    fn strings_as_qemu() {
        assert_eq!(
            run(b"[\"\\u00e9\\ud83d\\ude00\\/\", 'it''s']"),
            vec![e("JSON parse error, expected separator in list")]
        );
        assert_eq!(
            run(b"[\"\\u00e9\\ud83d\\ude00\\/\", 'a\"b']"),
            vec![Ok(Q::List(vec![
                Q::Str("\u{e9}\u{1F600}/".into()),
                Q::Str("a\"b".into())
            ]))]
        );
        assert_eq!(
            run(b"[\"\\q\"]"),
            vec![e("JSON parse error, invalid escape sequence in string")]
        );
        assert_eq!(
            run(b"[\"\xe9\"]"),
            vec![e("JSON parse error, invalid UTF-8 sequence in string")]
        );
        assert_eq!(
            run(b"[\"\\ud800x\"]"),
            vec![e(
                "JSON parse error, \\ud800 is not a valid Unicode character"
            )]
        );
    }
}
