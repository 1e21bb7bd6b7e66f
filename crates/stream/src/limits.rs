/// Limits applied to every stream the project parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest stanza (or stream header), in bytes, including its markup.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside one stanza; the stanza's own element is depth 1.
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 64,
        }
    }
}
