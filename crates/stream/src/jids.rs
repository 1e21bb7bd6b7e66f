//! Addresses parsed lately, kept by their text. The same few JIDs come back in every
//! packet (in sm: a session's full JID in each session packet from c2s, the recipient's
//! in each stanza its sender's task hands over, the sender's again when the recipient's
//! task reads it; in c2s: the `to` of each stanza a client sends), and `jid`'s parse
//! (stringprep and IDNA on each part) costs about 1 100 instructions each time, four
//! times per lone message in sm and once in c2s (docs/benchmarks.md, "Addresses parsed
//! once"). A hit costs a hash, a comparison and the clone of one string.
//!
//! Only successful parses are kept, under the exact text parsed, so an answer is what
//! `Jid::new` gives for that text. The cache is per thread (a runtime may have several),
//! bounded, and forgets the least recently used entry first.

use std::cell::RefCell;
use std::num::NonZeroUsize;

use jid::{Error, FullJid, Jid};
use lru::LruCache;

/// Entries per thread: more than the addresses a busy second's messages name; about
/// 25 KiB for addresses of ordinary length, under 100 KiB with every text at [`LONGEST`].
const ENTRIES: NonZeroUsize = NonZeroUsize::new(256).expect("not zero");

/// The longest text kept: longer ones (a JID may be 3 071 bytes) are parsed each time,
/// so the cache stays small.
const LONGEST: usize = 128;

thread_local! {
    static RECENT: RefCell<LruCache<Box<str>, Jid>> = RefCell::new(LruCache::new(ENTRIES));
}

/// `Jid::new(text)`, from the cache when `text` was parsed lately.
pub fn parse(text: &str) -> Result<Jid, Error> {
    if text.len() > LONGEST {
        return Jid::new(text);
    }
    if let Some(jid) = RECENT.with_borrow_mut(|recent| recent.get(text).cloned()) {
        return Ok(jid);
    }
    let jid = Jid::new(text)?;
    RECENT.with_borrow_mut(|recent| recent.put(text.into(), jid.clone()));
    Ok(jid)
}

/// `FullJid::new(text)`, from the cache when `text` was parsed lately.
pub fn parse_full(text: &str) -> Result<FullJid, Error> {
    parse(text)?.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_jid_does() {
        for text in [
            "alice@localhost/phone",
            "Alice@LocalHost/Phone",
            "localhost",
            "bob@localhost",
            "@localhost",
            "alice@",
            "a@b/",
            "",
            "juliet@example.com/\u{2168}",
            "ünicode@exämple.org/ressource",
        ] {
            // Twice: the second answer comes from the cache when the first parse worked.
            for _ in 0..2 {
                assert_eq!(
                    parse(text).map_err(|e| e.to_string()),
                    Jid::new(text).map_err(|e| e.to_string()),
                    "{text:?}"
                );
                assert_eq!(
                    parse_full(text).map_err(|e| e.to_string()),
                    FullJid::new(text).map_err(|e| e.to_string()),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn keeps_at_most_its_entries() {
        for i in 0..ENTRIES.get() * 3 {
            parse(&format!("user{i}@localhost/r")).unwrap();
        }
        RECENT.with_borrow(|recent| assert_eq!(recent.len(), ENTRIES.get()));
        let long = format!("{}@localhost", "a".repeat(LONGEST));
        assert!(parse(&long).is_ok());
        RECENT.with_borrow(|recent| assert!(!recent.contains(long.as_str())));
    }
}
