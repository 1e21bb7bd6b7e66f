//! Start tags read by hand. Every process reads the head of every packet (its name and
//! addressing), and storage the head of every archived item; quick-xml's reader, set
//! up per tag, spent about 6 000 instructions on one: a third of the router's
//! instructions per message (docs/benchmarks.md, "Framing and start tags eight bytes at
//! a time"). A stanza's full check stays quick-xml's, where it comes in (`validate`).

use std::ops::Range;

use crate::scan::find_any;

/// A start tag read by hand: `<` name, then (space, name, `=`, quoted value)*, then `>`
/// or `/>`; names and values as places in the input, values raw (escaped). Lenient
/// about name characters and not checking UTF-8 (callers check the tag once): for
/// input already checked well-formed where it came in.
pub struct StartTag<'a> {
    s: &'a [u8],
    at: usize,
    /// One past the tag's `>`, and whether it was `/>`, once read.
    end: (u32, bool),
}

/// A place in the bytes given to [`StartTag::new`].
pub type Span = Range<u32>;

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Why a start tag could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TagError(pub &'static str);

impl<'a> StartTag<'a> {
    /// The tag at the start of `s` and the span of its name.
    pub fn new(s: &'a [u8]) -> Result<(StartTag<'a>, Span), TagError> {
        if s.first() != Some(&b'<') || matches!(s.get(1), Some(b'?' | b'!' | b'/')) {
            return Err(TagError("expected an element"));
        }
        let len = s[1..]
            .iter()
            .position(|&b| is_space(b) || b == b'/' || b == b'>')
            .unwrap_or(s.len() - 1);
        if len == 0
            || s[1..1 + len]
                .iter()
                .any(|b| matches!(b, b'"' | b'\'' | b'<' | b'='))
        {
            return Err(TagError("bad start tag: no name"));
        }
        let tag = StartTag {
            s,
            at: 1 + len,
            end: (0, false),
        };
        Ok((tag, 1..1 + len as u32))
    }

    /// One past the tag's `>`, and whether it ended in `/>`: known once
    /// [`StartTag::next_attribute`] returned `None`.
    pub fn end(&self) -> (u32, bool) {
        self.end
    }

    fn skip_space(&mut self) {
        while self.s.get(self.at).is_some_and(|&b| is_space(b)) {
            self.at += 1;
        }
    }

    /// The next attribute's name and raw value, or `None` at the end of the tag (then
    /// `end` is set).
    pub fn next_attribute(&mut self) -> Result<Option<(Span, Span)>, TagError> {
        self.skip_space();
        match self.s.get(self.at) {
            None => return Err(TagError("bad start tag: it does not end")),
            Some(b'>') => {
                self.end = (self.at as u32 + 1, false);
                return Ok(None);
            }
            Some(b'/') if self.s.get(self.at + 1) == Some(&b'>') => {
                self.end = (self.at as u32 + 2, true);
                return Ok(None);
            }
            Some(b'/' | b'=' | b'"' | b'\'') => {
                return Err(TagError("bad start tag: an attribute without a name"))
            }
            Some(_) => {}
        }
        let key = self.at;
        while self.s.get(self.at).is_some_and(|&b| {
            !is_space(b) && !matches!(b, b'=' | b'>' | b'/' | b'"' | b'\'' | b'<')
        }) {
            self.at += 1;
        }
        let key = key as u32..self.at as u32;
        self.skip_space();
        if self.s.get(self.at) != Some(&b'=') {
            return Err(TagError("bad start tag: an attribute without a value"));
        }
        self.at += 1;
        self.skip_space();
        let quote = match self.s.get(self.at) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => return Err(TagError("bad start tag: an attribute value without quotes")),
        };
        let value = self.at + 1;
        let Some(len) = find_any(&self.s[value..], [quote]) else {
            return Err(TagError("bad start tag: an attribute value does not end"));
        };
        self.at = value + len + 1;
        Ok(Some((key, value as u32..(value + len) as u32)))
    }
}
