//! Searching the short runs of a tag (between its quotes, up to its end) for a few
//! bytes. Written by hand: those runs are mostly 5-30 bytes, where `memchr`'s set-up per
//! call cost more than the search; the framer and the start-tag reader made a third of
//! the router's instructions per message that way (docs/benchmarks.md, "Framing and
//! start tags eight bytes at a time").

/// Where the first byte of `set` is in `hay`, eight bytes at a time: a byte of the word
/// equal to one of the set makes a zero byte of their XOR, found with the carry trick
/// (the lowest flagged byte is always a true match).
#[inline(always)]
pub fn find_any<const N: usize>(hay: &[u8], set: [u8; N]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let mut words = hay.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let mut found = 0;
        for b in set {
            let x = w ^ (LO * u64::from(b));
            found |= x.wrapping_sub(LO) & !x & HI;
        }
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|b| set.contains(b))
        .map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_any_finds_the_first_byte_of_the_set() {
        // Every length up to three words and every position, over bytes that borrow
        // across the word (0x00, 0x01, 0x80, 0xff) and bytes next to those searched.
        let fill = [0x00, 0x01, 0x3d, 0x3f, 0x80, 0xfe, 0xff, b'a'];
        for len in 0..24 {
            for f in fill {
                for at in 0..=len {
                    let mut hay = vec![f; len];
                    if at < len {
                        hay[at] = b'>';
                    }
                    if at + 1 < len {
                        hay[at + 1] = b'"';
                    }
                    let naive = |set: &[u8]| hay.iter().position(|b| set.contains(b));
                    assert_eq!(find_any(&hay, [b'>']), naive(b">"), "{hay:?}");
                    assert_eq!(find_any(&hay, [b'"']), naive(b"\""), "{hay:?}");
                    assert_eq!(
                        find_any(&hay, [b'>', b'"', b'\'']),
                        naive(b">\"'"),
                        "{hay:?}"
                    );
                }
            }
        }
    }
}
