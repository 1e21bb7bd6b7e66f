//! The parts of a JID as written in an attribute, without parsing or normalising it:
//! for routing decisions on raw addresses (the router, fan-out), where the full JID
//! rules (stringprep, length limits) are the endpoints' business.

/// The domain part: between the first `@` (before any `/`) and the first `/`.
pub fn domain(jid: &str) -> &str {
    let bare = bare(jid);
    bare.split_once('@').map_or(bare, |(_, d)| d)
}

/// The bare JID: everything before the first `/`.
pub fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parts() {
        assert_eq!(super::domain("a@b/c@d"), "b");
        assert_eq!(super::domain("b/c"), "b");
        assert_eq!(super::bare("a@b/c/d"), "a@b");
        assert_eq!(super::bare("b"), "b");
    }
}
