//! Flow hashing: which bucket-table slot a new flow lands in, and which source port a
//! full-NAT flow tries first. The kernel program and the host tests share this code.

use crate::{
    maps::{Address, FlowKeyOf},
    table::BUCKET_TABLE_SIZE,
};

/// A 64-bit finaliser with full avalanche (every input bit flips each output bit with
/// probability about 1/2), so nearby addresses and ports spread over the whole table.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Hash of a flow's 5-tuple (per-flow splitting). IPv6 addresses enter by their
/// [`Address::fold`], so both families take the same path to a slot, on every node alike.
#[inline(always)]
pub fn flow_hash<A: Address>(key: &FlowKeyOf<A>) -> u32 {
    let addrs = ((key.src_addr.fold() as u64) << 32) | key.dst_addr.fold() as u64;
    let rest = ((key.src_port as u64) << 32) | ((key.dst_port as u64) << 16) | key.proto as u64;
    let h = mix64(addrs ^ mix64(rest ^ 0x9e37_79b9_7f4a_7c15));
    (h ^ (h >> 32)) as u32
}

/// Hash of the client address alone (`sticky: client`): every flow of one client lands
/// in the same slot while the table stays the same.
#[inline(always)]
pub fn client_hash<A: Address>(src_addr: A) -> u32 {
    let h = mix64(src_addr.fold() as u64 ^ 0x5851_f42d_4c95_7f2d);
    (h ^ (h >> 32)) as u32
}

/// The bucket-table slot of a hash.
#[inline(always)]
pub const fn bucket_slot(hash: u32) -> u32 {
    hash % BUCKET_TABLE_SIZE as u32
}

/// Source ports a full-NAT flow may take (host order, inclusive): 22768 ports per
/// (source address, target), below the Linux default ephemeral range (32768-60999) so the
/// node's own connections never collide with them.
pub const SNAT_PORT_MIN: u16 = 10000;
pub const SNAT_PORT_MAX: u16 = 32767;
/// Candidate ports tried before a new flow gives up (each is one atomic insert). Closed
/// flows hold their port until the agent's sweep; at 40% of the ports held, 32 tries all
/// fail with probability 0.4^32 (about 2e-13).
pub const SNAT_PORT_TRIES: u32 = 32;

/// The `attempt`-th candidate source port (host order) for a flow with `hash`: a
/// hash-chosen start and a stride that is coprime with the range, so attempts differ.
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32) -> u16 {
    snat_port_in(hash, attempt, SNAT_PORT_MIN, SNAT_PORT_MAX - SNAT_PORT_MIN + 1)
}

/// [`snat_port`] within `port_count` ports from `port_min` (a gateway's own range). The
/// stride is a prime that does not divide the range (4099, or 4093 for a multiple of
/// 4099; no range of at most 65535 ports is a multiple of both), so the first `range`
/// candidates are all different.
#[inline(always)]
pub const fn snat_port_in(hash: u32, attempt: u32, port_min: u16, port_count: u16) -> u16 {
    let range = if port_count == 0 { 1 } else { port_count as u32 };
    let stride = if range.is_multiple_of(4099) { 4093 } else { 4099 };
    let start = (hash >> 8) % range;
    port_min.wrapping_add(((start + attempt * stride) % range) as u16)
}

/// Which of a pool's `count` source addresses candidate `attempt` of a flow uses: spread
/// by the hash's low bits (the port takes the high ones), the same for the same flow.
#[inline(always)]
pub const fn snat_address_index(hash: u32, attempt: u32, count: u32) -> u32 {
    if count == 0 {
        return 0;
    }
    ((hash & 0xff) + attempt) % count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FlowKey, FlowKey6, Ipv6Words};
    use proptest::strategy::Strategy as _;
    use std::vec::Vec;

    fn key6(src: Ipv6Words, sport: u16) -> FlowKey6 {
        let vip = [u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]), 0, 0, u32::from_ne_bytes([0, 0, 0, 0x10])];
        FlowKey6 { src_addr: src, dst_addr: vip, src_port: sport.to_be(), dst_port: 9050u16.to_be(), proto: 6, _pad: 0, _pad_word: 0 }
    }

    /// An IPv6 client (2001:db8:1::N) as the header holds it.
    fn client6(host: u16) -> Ipv6Words {
        let h = host.to_be_bytes();
        [u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]), u32::from_ne_bytes([0, 1, 0, 0]), 0, u32::from_ne_bytes([0, 0, h[0], h[1]])]
    }

    #[test]
    fn ipv6_flows_spread_over_the_table_like_ipv4_ones() {
        let mut bins = [0u32; 20];
        for port in 0..=u16::MAX {
            let slot = bucket_slot(flow_hash(&key6(client6(7), port)));
            bins[(slot as usize * bins.len()) / BUCKET_TABLE_SIZE] += 1;
        }
        let expected = 65536 / 20;
        for (i, &b) in bins.iter().enumerate() {
            assert!(b.abs_diff(expected) < expected * 6 / 100, "bin {i}: {b} vs {expected}");
        }
        let mut bins = [0u32; 10];
        for host in 0..10_000u16 {
            bins[(bucket_slot(client_hash(client6(host))) as usize * 10) / BUCKET_TABLE_SIZE] += 1;
        }
        for b in bins {
            assert!(b.abs_diff(1000) < 100, "{bins:?}");
        }
    }

    /// The IPv4 hash is what it was before IPv6 came (a table built by an older agent
    /// keeps its flows' slots), pinned by two known values.
    #[test]
    fn the_ipv4_hash_is_unchanged() {
        assert_eq!(flow_hash(&key(0x0201_000a, 40_000)), reference_flow_hash(0x0201_000a, 0x0a00_000a, 40_000, 9050, 6));
        assert_eq!(client_hash(0x0201_000au32), {
            let h = mix64(0x0201_000a ^ 0x5851_f42d_4c95_7f2d);
            (h ^ (h >> 32)) as u32
        });
    }

    fn reference_flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        let addrs = (u64::from(src) << 32) | u64::from(dst);
        let rest = (u64::from(sport) << 32) | (u64::from(dport) << 16) | u64::from(proto);
        let h = mix64(addrs ^ mix64(rest ^ 0x9e37_79b9_7f4a_7c15));
        (h ^ (h >> 32)) as u32
    }

    proptest::proptest! {
        /// The IPv6 hash depends on every word of both addresses (two flows differing in
        /// any one word hash apart, bar a 2^-32 collision), and on nothing else than the
        /// key: the same key hashes the same on every call (every node).
        #[test]
        fn ipv6_hash_sees_every_word_and_is_deterministic(src: [u32; 4], dst: [u32; 4], word in 0usize..8, flip in 1u32.., sport: u16) {
            let a = FlowKey6 { src_addr: src, dst_addr: dst, src_port: sport, dst_port: 80, proto: 17, _pad: 0, _pad_word: 0 };
            let mut b = a;
            if word < 4 { b.src_addr[word] ^= flip } else { b.dst_addr[word - 4] ^= flip }
            proptest::prop_assert_eq!(flow_hash(&a), flow_hash(&{ a }));
            proptest::prop_assert_ne!(flow_hash(&a), flow_hash(&b));
        }
    }

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey { src_addr: src, dst_addr: 0x0a00_000a, src_port: sport, dst_port: 9050, proto: 6, _pad: 0, _pad_word: 0 }
    }

    /// Consecutive source ports (the common case: one client,
    /// many connections) spread evenly over 100 bins of the table.
    #[test]
    fn consecutive_ports_spread_evenly_over_the_table() {
        let mut bins = [0u32; 20];
        for port in 0..=u16::MAX {
            let slot = bucket_slot(flow_hash(&key(0x0201_000a, port)));
            bins[(slot as usize * bins.len()) / BUCKET_TABLE_SIZE] += 1;
        }
        // 65536 / 20 per bin; 6% is about 3.5 standard deviations of a uniform spread.
        let expected = 65536 / 20;
        for (i, &b) in bins.iter().enumerate() {
            assert!(b.abs_diff(expected) < expected * 6 / 100, "bin {i}: {b} vs {expected}");
        }
    }

    #[test]
    fn consecutive_client_addresses_spread_evenly() {
        let mut bins = [0u32; 10];
        for i in 0..10_000u32 {
            let addr = u32::from_ne_bytes([10, 1, (i >> 8) as u8, i as u8]);
            bins[(bucket_slot(client_hash(addr)) as usize * 10) / BUCKET_TABLE_SIZE] += 1;
        }
        for b in bins {
            assert!(b.abs_diff(1000) < 100, "{bins:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any gateway range (a source pool's `ports:`): every candidate lies inside it, the
        /// tries are distinct while the range has room for them, and the same flow gets the
        /// same candidates.
        #[test]
        fn snat_candidates_in_any_range_stay_inside_and_differ(
            hash: u32,
            port_min in 1u16..=65535,
            count in proptest::prop_oneof![1u16..=65535, (1u16..=15).prop_map(|k| k * 4099)],
        ) {
            let count = count.min(u16::MAX - port_min + 1);
            let ports: Vec<u16> = (0..SNAT_PORT_TRIES).map(|a| snat_port_in(hash, a, port_min, count)).collect();
            for &p in &ports {
                proptest::prop_assert!(p >= port_min && u32::from(p) < u32::from(port_min) + u32::from(count), "{p} outside {port_min}+{count}");
            }
            let mut distinct = ports.clone();
            distinct.sort_unstable();
            distinct.dedup();
            if u32::from(count) >= SNAT_PORT_TRIES {
                proptest::prop_assert_eq!(distinct.len(), ports.len(), "{:?}", ports);
            }
            let again: Vec<u16> = (0..SNAT_PORT_TRIES).map(|a| snat_port_in(hash, a, port_min, count)).collect();
            proptest::prop_assert_eq!(again, ports);
        }
    }

    #[test]
    fn snat_candidates_stay_in_range_and_differ() {
        for hash in [0, 1, 0xdead_beef, u32::MAX] {
            let ports: Vec<u16> = (0..SNAT_PORT_TRIES).map(|a| snat_port(hash, a)).collect();
            for &p in &ports {
                assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p));
            }
            let mut dedup = ports.clone();
            dedup.sort_unstable();
            dedup.dedup();
            assert_eq!(dedup.len(), ports.len(), "{ports:?}");
        }
    }
}
