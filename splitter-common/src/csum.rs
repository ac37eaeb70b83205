//! Incremental Internet checksum updates (RFC 1624), for rewriting addresses and ports
//! without summing the whole packet.
//!
//! Values are taken exactly as stored in the header (read as native integers): the
//! one's-complement sum is byte-order independent (RFC 1071 §2(B)), so a checksum read,
//! updated and written back the same way stays correct on any host.

/// An accumulated checksum difference: the one's-complement sum of `~old + new` words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CsumDelta(u64);

impl CsumDelta {
    pub const fn new() -> Self {
        Self(0)
    }

    /// Records that a 16-bit field changed from `old` to `new`.
    #[inline(always)]
    pub const fn replace16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Records that a 32-bit field changed from `old` to `new` (two 16-bit words).
    #[inline(always)]
    pub const fn replace32(self, old: u32, new: u32) -> Self {
        self.replace16(old as u16, new as u16).replace16((old >> 16) as u16, (new >> 16) as u16)
    }

    /// The checksum `check` updated by this delta: `~(~check + delta)`, folded.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u64 + self.0)
    }

    /// Like `apply` for a UDP checksum: zero means "no checksum" and stays zero, and a
    /// computed zero is sent as 0xffff (RFC 768).
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            c => c,
        }
    }
}

/// The one's-complement sum of `bytes` as native-order 16-bit words (a trailing odd byte
/// is left out: callers sum even lengths), to fold into a full checksum.
#[inline(always)]
pub const fn sum_words(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    sum
}

/// Folds a wide one's-complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u64) -> u16 {
    // Four rounds always suffice for a 64-bit accumulator; a fixed count keeps the
    // verifier happy.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: the full checksum of `words` (native-order 16-bit words).
    fn full(words: &[u16]) -> u16 {
        !fold(words.iter().map(|&w| w as u64).sum())
    }

    #[test]
    fn sum_words_is_the_sum_of_native_words() {
        let bytes = [0x45u8, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06];
        let words: std::vec::Vec<u16> = bytes.chunks(2).map(|c| u16::from_ne_bytes([c[0], c[1]])).collect();
        assert_eq!(!fold(sum_words(&bytes)), full(&words));
        assert_eq!(sum_words(&bytes[..9]), sum_words(&bytes[..8]), "a trailing odd byte is left out");
    }

    proptest! {
        #[test]
        fn incremental_equals_full_recompute(
            mut words in proptest::collection::vec(any::<u16>(), 2..64),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u16>()), 1..8),
        ) {
            let mut check = full(&words);
            let mut delta = CsumDelta::new();
            for (index, new) in changes {
                let i = index.index(words.len());
                delta = delta.replace16(words[i], new);
                words[i] = new;
            }
            check = delta.apply(check);
            // 0x0000 and 0xffff are the same number in one's complement.
            let want = full(&words);
            prop_assert!(check == want || (check == 0xffff && want == 0) || (check == 0 && want == 0xffff));
        }

        #[test]
        fn replace32_is_two_words(old in any::<u32>(), new in any::<u32>(), check in any::<u16>()) {
            let a = CsumDelta::new().replace32(old, new).apply(check);
            let b = CsumDelta::new().replace16(old as u16, new as u16).replace16((old >> 16) as u16, (new >> 16) as u16).apply(check);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(CsumDelta::new().replace32(1, 2).apply_udp(0), 0);
    }
}
