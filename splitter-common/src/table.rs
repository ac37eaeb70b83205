//! The bucket table: a fixed-size array that maps a flow-hash slot to a target.
//!
//! The kernel program picks a new flow's target as `table[hash % BUCKET_TABLE_SIZE]`; the
//! agent builds the table with [`build_bucket_table`] (behind the `alloc` feature) from a
//! gateway's targets and their weights.
//!
//! The builder is weighted rendezvous hashing with exact quotas:
//! - each target's number of slots (its quota) is fixed up front from its weight with the
//!   largest-remainder method, so its share is within one slot (0.01 percentage points) of
//!   its weight;
//! - every (slot, target) pair has a score that depends only on the slot, the target's key
//!   and its share of the total weight. The key fixes a pseudo-random ranking of all slots
//!   (a permutation); the slot a target ranks `r`-th scores the `r`-th exponential quantile,
//!   `-log2(1 - (r + 1/2) / BUCKET_TABLE_SIZE)`, times `total weight / weight`. As when
//!   exponential clocks race at rates proportional to the weights, a slot's lowest score
//!   belongs to each target with a probability equal to its share;
//! - the table is the one assignment that meets the quotas in which no slot and target both
//!   prefer each other to what they got (a stable matching, unique because both sides rank
//!   pairs by the same score). It is what a greedy pass over all pairs from the lowest score
//!   up gives, each slot going to the first target still under its quota, and is computed
//!   by deferred acceptance: every slot starts at its best target, a target above its quota
//!   gives back its worst-scoring slots, and those move on to their next-best target.
//!
//! Changes stay local because a pair's score depends on nothing else: re-weighting targets
//! only rescales their own scores, so the slots that move are those whose best target
//! changes (about the shifted share), and removing a target moves its slots to their
//! next-best targets. Exact quotas cost some extra moves: which targets the moved slots land
//! on is random (a Poisson spread), and a target that ends up above or below its new quota
//! passes slots on to or takes them from others. Measured: with one of N equal targets
//! removed or added, about 0.8 * sqrt(BUCKET_TABLE_SIZE) = 80 slots (0.8% of the table)
//! beyond the removed share whatever N, so the bound of 1.5x the share only holds up to
//! about 45 targets; for a canary weight step at most 0.34% of the table beyond 1.5x the
//! shifted share (see the property tests below, and docs/BENCHMARKS.md).
//!
//! Only the pairs that score under a bound are listed up front: each target walks its
//! ranking while its scaled quantile stays under the bound, about 5.5 pairs per slot in all
//! (some 55,000 pairs) whatever the number of targets. A slot rejected by all its listed
//! pairs scores its pairs with every target from the inverse permutations. This changes the
//! time, not the table: about 0.3 ms for 64 targets; with thousands of targets, quotas of a
//! slot or two make long chains of rejections (about 2.5 ms for 1000 targets, 40 ms from
//! 10000 on).
//!
//! Everything is integer arithmetic over inputs sorted by key: the same targets and weights
//! give the byte-identical table on every node, every run, in whatever order they are passed.

/// Number of slots in every bucket table.
///
/// 10007 is the smallest prime above 10000:
/// - with weights in hundredths of a percent, one 0.01% weight step is about one slot, so
///   the table resolves per-mille weights with a tenfold margin (a target's share is within
///   one slot, 0.01 percentage points, of its weight);
/// - as `u16` entries a table is 20 KB, small enough to rebuild and swap atomically per
///   gateway;
/// - a prime size makes the slot indices a field, so each target's ranking of the slots can
///   be an offset/skip/cube permutation (see `Walk`): multiplying by a non-zero skip is a
///   bijection, and so is cubing because 3 does not divide 10006.
pub const BUCKET_TABLE_SIZE: usize = 10007;

/// Most targets a table can address.
///
/// Entries are `u16` indices into the target list; `u16::MAX` itself is never written, so the
/// kernel may use it as a "no target" sentinel. Targets beyond this many get no slot.
pub const MAX_TABLE_TARGETS: usize = u16::MAX as usize;

/// One target as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableTarget {
    /// Stable identity of the target, the seed of its ranking of the slots; the agent passes
    /// `u64::from(ipv4) << 16 | u64::from(port)`. Keys should be distinct: targets with the
    /// same key rank the slots alike and compete for the same ones.
    pub key: u64,
    /// Relative weight: the target's share of the slots is `weight / sum of weights`. The
    /// agent passes parts per million of the gateway (see `Gateway::weighted_targets`), fine
    /// enough to split e.g. 80% evenly over 3 targets; any unit works. Zero gets no slot.
    pub weight: u32,
}

#[cfg(any(feature = "alloc", test))]
pub use builder::build_bucket_table;

/// A digest of a bucket table and the targets its slots index (64-bit FNV-1a over the
/// slots, then each target's key, little-endian): nodes that built the same table from the
/// same documents show the same value, so operators can check that they agree.
pub fn table_fingerprint(slots: &[u16], targets: &[TableTarget]) -> u64 {
    let bytes = slots.iter().flat_map(|s| s.to_le_bytes()).chain(targets.iter().flat_map(|t| t.key.to_le_bytes()));
    bytes.fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(any(feature = "alloc", test))]
mod builder {
    use alloc::{collections::BinaryHeap, vec, vec::Vec};

    use super::{TableTarget, BUCKET_TABLE_SIZE, MAX_TABLE_TARGETS};

    /// Table size as the `u64` the arithmetic uses.
    const SLOTS: u64 = BUCKET_TABLE_SIZE as u64;

    /// Seeds that make the offset, skip and phase of a target independent hashes of its key.
    const OFFSET_SEED: u64 = 0x6a09_e667_f3bc_c908;
    const SKIP_SEED: u64 = 0xbb67_ae85_84ca_a73b;
    const PHASE_SEED: u64 = 0x3c6e_f372_fe94_f82b;

    /// Fractional bits of [`QUANTILES`].
    const QUANTILE_BITS: u32 = 28;
    /// Fractional bits of a score: `score = quantile * (total / weight) << SCORE_BITS`.
    const SCORE_BITS: u32 = 24;
    /// Largest weight scale, `total / weight << SCORE_BITS`: keeps every score below 2^48
    /// (quantiles are below 2^32). Only a target under a millionth of the total weight is
    /// capped, and such a target gets no slot anyway unless rounding gives it one.
    const MAX_SCALE: u64 = (1 << 44) - 1;
    /// How many pairs to list up front, and how many keys to keep per slot that runs out of
    /// them, for `players` targets: the listing bound, in units of `2^SCORE_BITS` (each slot
    /// has about `bound * ln 2` pairs within it, and none with probability `2^-bound`), and
    /// the run length. Either only changes the time, never the table. Up to a few hundred
    /// targets, most slots end at one of their first few pairs; with more, quotas of a few
    /// slots make long chains of rejections that take slots deeper, where every refill costs
    /// a score for each target.
    fn tuning(players: usize) -> (u64, usize) {
        if players <= 256 {
            (8, 64)
        } else {
            (32, (players / 32).max(64))
        }
    }

    /// No run for a slot.
    const NO_ENTRY: u32 = u32::MAX;
    /// No pair yet. Scores stay below 2^48, so no pair key reaches it.
    const NO_KEY: u64 = u64::MAX;

    /// Builds the bucket table for `targets`: exactly [`BUCKET_TABLE_SIZE`] entries, each an
    /// index into `targets`.
    ///
    /// Each target with a non-zero weight gets `weight / total * BUCKET_TABLE_SIZE` slots,
    /// rounded by the largest-remainder method (ties to the smaller key), so its share is
    /// within 0.01 percentage points of its weight. A zero-weight target gets no slot. With
    /// no target, or only zero weights, the table is empty (the gateway has no target).
    ///
    /// The result depends only on the set of `(key, weight)` pairs, not on their order.
    /// Only the first [`MAX_TABLE_TARGETS`] entries of `targets` are considered.
    pub fn build_bucket_table(targets: &[TableTarget]) -> Vec<u16> {
        let players = players(targets);
        match players.as_slice() {
            [] => Vec::new(),
            [only] => vec![only.index; BUCKET_TABLE_SIZE],
            _ => {
                let (bound, run_length) = tuning(players.len());
                let mut pairs = Pairs::list(&players, bound, run_length);
                assign(&players, &mut pairs).iter().map(|&key| players[position_of(key)].index).collect()
            }
        }
    }

    /// The targets that get slots (non-zero quota), sorted by key so that input order cannot
    /// change the table. Equal (key, weight) pairs are interchangeable; the input index only
    /// orders them.
    fn players(targets: &[TableTarget]) -> Vec<Player> {
        let targets = &targets[..targets.len().min(MAX_TABLE_TARGETS)];
        let mut sorted: Vec<(TableTarget, u16)> =
            targets.iter().zip(0u16..).filter(|(target, _)| target.weight > 0).map(|(target, index)| (*target, index)).collect();
        sorted.sort_unstable();
        let quotas = slot_quotas(&sorted);
        let total: u64 = sorted.iter().zip(&quotas).filter(|(_, &quota)| quota > 0).map(|((target, _), _)| u64::from(target.weight)).sum();
        sorted
            .iter()
            .zip(&quotas)
            .filter(|(_, &quota)| quota > 0)
            .enumerate()
            .map(|(position, ((target, index), &quota))| Player::new(*target, *index, quota, total, position))
            .collect()
    }

    /// Number of slots for each of the (sorted, non-zero weight) targets: proportional to
    /// the weights, adding up to [`BUCKET_TABLE_SIZE`] exactly (largest remainder first,
    /// ties to the smaller key, i.e. the earlier sorted position). Empty when there is
    /// nothing to share.
    fn slot_quotas(sorted: &[(TableTarget, u16)]) -> Vec<u32> {
        let weights: Vec<u64> = sorted.iter().map(|(target, _)| u64::from(target.weight)).collect();
        if weights.iter().all(|&w| w == 0) {
            return Vec::new();
        }
        crate::apportion::largest_remainder(SLOTS, &weights, false).into_iter().map(|quota| quota as u32).collect()
    }

    /// A target with a quota, as the assignment sees it.
    ///
    /// Pairs are compared by key: `score << 16 | position`, i.e. by score and then by the
    /// target's sorted position. A target compares its slots by `score << 16 | slot`. Both
    /// are restrictions of one order of all pairs (score, position, slot), which is what
    /// makes the stable assignment unique.
    struct Player {
        /// The value written into the table: the target's index in the caller's slice.
        index: u16,
        /// Its position among the players (sorted by key), the low 16 bits of its pair keys.
        position: u64,
        quota: u32,
        /// The permutation: rank `r` is slot `offset + skip * (r + phase)^3 (mod SLOTS)`.
        offset: u64,
        /// In `1..SLOTS`.
        skip: u64,
        /// `skip^-1 (mod SLOTS)`.
        inverse_skip: u64,
        phase: u64,
        /// `total / weight << SCORE_BITS`, capped at [`MAX_SCALE`].
        scale: u64,
    }

    impl Player {
        fn new(target: TableTarget, index: u16, quota: u32, total: u64, position: usize) -> Self {
            let skip = mix64(target.key ^ SKIP_SEED) % (SLOTS - 1) + 1;
            // total < 2^48 (at most 2^16 weights below 2^32), so the shift fits in u128.
            let scale = (u128::from(total) << SCORE_BITS) / u128::from(target.weight);
            Self {
                index,
                position: position as u64,
                quota,
                offset: mix64(target.key ^ OFFSET_SEED) % SLOTS,
                skip,
                inverse_skip: u64::from(INVERSES[skip as usize]),
                phase: mix64(target.key ^ PHASE_SEED) % SLOTS,
                scale: scale.min(u128::from(MAX_SCALE)) as u64,
            }
        }

        /// The number of ranks whose score is within `bound`: scores grow with the rank.
        fn ranks_within(&self, bound: u64) -> usize {
            QUANTILES.partition_point(|&quantile| self.score(quantile) <= bound)
        }

        /// The score of the slot this player ranks at `quantile`'s rank.
        fn score(&self, quantile: u32) -> u64 {
            // quantile < 2^32 and scale < 2^44: the score is below 2^48.
            ((u128::from(quantile) * u128::from(self.scale)) >> QUANTILE_BITS) as u64
        }

        /// The key of the pair of this player and the slot it ranks `rank`-th.
        fn key(&self, rank: usize) -> u64 {
            self.score(QUANTILES[rank]) << 16 | self.position
        }

        /// The rank of `slot` in this player's permutation (the inverse of [`Walk`]).
        fn rank_of(&self, slot: usize) -> usize {
            let cube = (slot as u64 + SLOTS - self.offset) * self.inverse_skip % SLOTS;
            ((u64::from(CUBE_ROOTS[cube as usize]) + SLOTS - self.phase) % SLOTS) as usize
        }
    }

    /// A player's permutation, rank after rank: slot `offset + skip * x^3` with
    /// `x = rank + phase`, all modulo SLOTS. The cube is a polynomial in the rank, so the walk
    /// steps with its finite differences (additions only). The cube is what keeps two targets
    /// that happen to draw the same skip from ranking the slots alike with a lag.
    struct Walk {
        slot: u64,
        /// First, second and third differences of `skip * x^3`.
        first: u64,
        second: u64,
        third: u64,
    }

    impl Walk {
        fn new(player: &Player) -> Self {
            let (x, skip) = (player.phase, player.skip);
            // (x + 1)^3 - x^3 = 3x^2 + 3x + 1; its difference is 6x + 6, and then 6.
            Self {
                slot: (player.offset + skip * (x * x % SLOTS * x % SLOTS)) % SLOTS,
                first: skip * ((3 * x * x + 3 * x + 1) % SLOTS) % SLOTS,
                second: skip * ((6 * x + 6) % SLOTS) % SLOTS,
                third: 6 * skip % SLOTS,
            }
        }

        /// The slot at the current rank; moves on to the next rank.
        fn next_slot(&mut self) -> usize {
            let slot = self.slot as usize;
            self.slot = add_mod(self.slot, self.first);
            self.first = add_mod(self.first, self.second);
            self.second = add_mod(self.second, self.third);
            slot
        }
    }

    /// `a + b (mod SLOTS)` for `a, b < SLOTS`.
    fn add_mod(a: u64, b: u64) -> u64 {
        let sum = a + b;
        if sum >= SLOTS {
            sum - SLOTS
        } else {
            sum
        }
    }

    /// The pairs scoring within the listing bound, grouped by slot, and runs of further
    /// pairs for the slots that run out of them.
    struct Pairs {
        /// Slot `s`'s listed keys are `keys[starts[s]..starts[s + 1]]`, in no order.
        starts: Vec<u32>,
        keys: Vec<u64>,
        /// Each slot's lowest listed key, or [`NO_KEY`].
        best: Vec<u64>,
        /// Runs of `run_length` keys, sorted (padded with [`NO_KEY`] when the slot has
        /// fewer pairs left): for a slot that ran out of listed pairs, its lowest keys from
        /// some point on.
        runs: Vec<u64>,
        /// Where each slot's run starts in `runs`, or [`NO_ENTRY`].
        run_starts: Vec<u32>,
        run_length: usize,
    }

    impl Pairs {
        /// Lists the pairs scoring within `bound` (in units of `2^SCORE_BITS`): walks every
        /// player's permutation twice, once to count the pairs of each slot, once to place
        /// their keys.
        fn list(players: &[Player], bound: u64, run_length: usize) -> Self {
            let bound = bound << SCORE_BITS;
            let ends: Vec<usize> = players.iter().map(|player| player.ranks_within(bound)).collect();
            let mut starts = vec![0u32; BUCKET_TABLE_SIZE + 1];
            for (player, &end) in players.iter().zip(&ends) {
                let mut walk = Walk::new(player);
                for _ in 0..end {
                    starts[walk.next_slot() + 1] += 1;
                }
            }
            // A player lists 1 - 2^(-bound * weight / total) of its ranks, at most
            // bound * ln 2 * weight / total: about bound * 0.7 per slot in all, far below
            // 2^32.
            for slot in 0..BUCKET_TABLE_SIZE {
                starts[slot + 1] += starts[slot];
            }
            let mut keys = vec![NO_KEY; starts[BUCKET_TABLE_SIZE] as usize];
            let mut best = vec![NO_KEY; BUCKET_TABLE_SIZE];
            let mut fill: Vec<u32> = starts[..BUCKET_TABLE_SIZE].to_vec();
            for (player, &end) in players.iter().zip(&ends) {
                let mut walk = Walk::new(player);
                for &quantile in &QUANTILES[..end] {
                    let key = player.score(quantile) << 16 | player.position;
                    let slot = walk.next_slot();
                    keys[fill[slot] as usize] = key;
                    fill[slot] += 1;
                    best[slot] = best[slot].min(key);
                }
            }
            Self { starts, keys, best, runs: Vec::new(), run_starts: vec![NO_ENTRY; BUCKET_TABLE_SIZE], run_length }
        }

        /// The lowest key of `slot`'s pairs that is at least `from`, or [`NO_KEY`] if there
        /// is none. Unlisted pairs score above the bound, above every listed one, so a listed
        /// key that qualifies is the answer. Otherwise the slot's run has it, or the run is
        /// refilled from the slot's keys with every target (from the inverse permutations).
        fn next(&mut self, players: &[Player], slot: usize, from: u64) -> u64 {
            let start = self.run_starts[slot];
            if start == NO_ENTRY {
                let listed = &self.keys[self.starts[slot] as usize..self.starts[slot + 1] as usize];
                let next = listed.iter().copied().filter(|&key| key >= from).min().unwrap_or(NO_KEY);
                if next != NO_KEY {
                    return next;
                }
                self.run_starts[slot] = self.runs.len() as u32;
                self.runs.resize(self.runs.len() + self.run_length, NO_KEY);
            } else {
                let run = &self.runs[start as usize..][..self.run_length];
                if let Some(&key) = run.iter().find(|&&key| key >= from && key != NO_KEY) {
                    return key;
                }
            }
            // The run holds the lowest keys from `from` on: any lower key at least as high as
            // a later `from` would be in it too.
            let mut keys: Vec<u64> = players.iter().map(|player| player.key(player.rank_of(slot))).filter(|&key| key >= from).collect();
            if keys.len() > self.run_length {
                keys.select_nth_unstable(self.run_length - 1);
                keys.truncate(self.run_length);
            }
            keys.sort_unstable();
            let run = &mut self.runs[self.run_starts[slot] as usize..][..self.run_length];
            run.fill(NO_KEY);
            run[..keys.len()].copy_from_slice(&keys);
            run[0]
        }
    }

    /// The player position in a pair key.
    fn position_of(key: u64) -> usize {
        (key & 0xffff) as usize
    }

    /// The stable assignment: each slot's pair key (its target is the key's position).
    ///
    /// Deferred acceptance, slots proposing: every slot starts at its best pair; a player
    /// above its quota rejects its worst slot (highest score, then highest slot), which
    /// proposes its next pair, possibly pushing that player above its quota in turn. A slot
    /// is never rejected by every player: that would leave all quotas (which add up to the
    /// table size) filled with other slots.
    fn assign(players: &[Player], pairs: &mut Pairs) -> Vec<u64> {
        let mut assigned: Vec<u64> = pairs.best.clone();
        let mut counts = vec![0u32; players.len()];
        for (slot, key) in assigned.iter_mut().enumerate() {
            if *key == NO_KEY {
                *key = pairs.next(players, slot, 0);
            }
            counts[position_of(*key)] += 1;
        }
        // Each player's slots as `score << 16 | slot` (slot < 2^14), worst on top.
        let mut held: Vec<Vec<u64>> =
            counts.iter().zip(players).map(|(&count, player)| Vec::with_capacity(count.max(player.quota) as usize + 1)).collect();
        for (slot, &key) in assigned.iter().enumerate() {
            held[position_of(key)].push(key >> 16 << 16 | slot as u64);
        }
        let mut held: Vec<BinaryHeap<u64>> = held.into_iter().map(BinaryHeap::from).collect();
        for position in 0..players.len() {
            while held[position].len() > players[position].quota as usize {
                let mut rejected = held[position].pop();
                while let Some(worst) = rejected {
                    let slot = (worst & 0xffff) as usize;
                    let key = pairs.next(players, slot, assigned[slot] + 1);
                    debug_assert_ne!(key, NO_KEY, "slot {slot} rejected by every target");
                    assigned[slot] = key;
                    let to = position_of(key);
                    held[to].push(key >> 16 << 16 | slot as u64);
                    rejected = if held[to].len() > players[to].quota as usize { held[to].pop() } else { None };
                }
            }
        }
        assigned
    }

    /// `QUANTILES[r] = -log2(1 - (r + 1/2) / SLOTS)` with [`QUANTILE_BITS`] fractional bits
    /// (truncated): the exponential quantiles, in bits rather than nats (a common factor
    /// that changes no comparison). Strictly increasing; the last is log2(2 * SLOTS) < 15.
    static QUANTILES: [u32; BUCKET_TABLE_SIZE] = quantiles();

    /// `CUBE_ROOTS[x^3 mod SLOTS] = x`.
    static CUBE_ROOTS: [u16; BUCKET_TABLE_SIZE] = cube_roots();

    /// `INVERSES[x] = x^-1 mod SLOTS` (`INVERSES[0]` unused).
    static INVERSES: [u16; BUCKET_TABLE_SIZE] = inverses();

    const fn quantiles() -> [u32; BUCKET_TABLE_SIZE] {
        let mut table = [0u32; BUCKET_TABLE_SIZE];
        // -log2(1 - (r + 1/2) / SLOTS) = log2(2 SLOTS) - log2(2 SLOTS - 2r - 1).
        let top = log2_q32(2 * SLOTS);
        let mut rank = 0;
        while rank < BUCKET_TABLE_SIZE {
            let quantile = top - log2_q32(2 * SLOTS - 2 * rank as u64 - 1);
            table[rank] = (quantile >> (32 - QUANTILE_BITS)) as u32;
            rank += 1;
        }
        table
    }

    /// log2(x) with 32 fractional bits (truncated), for `1 <= x < 2^62`: the integer part
    /// from the leading zeros, the fraction bit by bit (squaring the mantissa doubles its
    /// logarithm; a square of 2 or more means a 1 bit).
    const fn log2_q32(x: u64) -> u64 {
        let exponent = 63 - x.leading_zeros() as u64;
        // The mantissa x / 2^exponent in [1, 2), with 62 fractional bits.
        let mut mantissa = (x as u128) << (62 - exponent);
        let mut log = exponent << 32;
        let mut bit = 1u64 << 31;
        while bit > 0 {
            mantissa = (mantissa * mantissa) >> 62;
            if mantissa >= 2 << 62 {
                mantissa >>= 1;
                log |= bit;
            }
            bit >>= 1;
        }
        log
    }

    const fn cube_roots() -> [u16; BUCKET_TABLE_SIZE] {
        let mut table = [0u16; BUCKET_TABLE_SIZE];
        let mut x = 0;
        while x < SLOTS {
            table[(x * x % SLOTS * x % SLOTS) as usize] = x as u16;
            x += 1;
        }
        table
    }

    const fn inverses() -> [u16; BUCKET_TABLE_SIZE] {
        let mut table = [0u16; BUCKET_TABLE_SIZE];
        table[1] = 1;
        // SLOTS = (SLOTS / x) * x + SLOTS % x, so x^-1 = -(SLOTS / x) * (SLOTS % x)^-1.
        let mut x = 2;
        while x < SLOTS {
            let product = (SLOTS / x) * table[(SLOTS % x) as usize] as u64 % SLOTS;
            table[x as usize] = ((SLOTS - product) % SLOTS) as u16;
            x += 1;
        }
        table
    }

    /// A 64-bit mixing function (the MurmurHash3 finalizer): spreads target keys, which
    /// often differ in a few low bits (neighbouring addresses, ports), over all 64 bits.
    fn mix64(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^= x >> 33;
        x
    }

    /// Checks of the builder's parts, and of the bound against a build that scores every
    /// pair.
    #[cfg(test)]
    mod tests {
        use alloc::{vec, vec::Vec};

        use proptest::prelude::*;

        use super::*;

        #[test]
        fn quantiles_increase_strictly_from_near_zero_to_log2_of_twice_the_size() {
            assert!(QUANTILES.windows(2).all(|pair| pair[0] < pair[1]));
            // -log2(1 - 1/20014) = 7.2e-5 and log2(20014) = 14.29, in units of 2^-28.
            assert_eq!(QUANTILES[0], 19_350);
            assert_eq!(QUANTILES[BUCKET_TABLE_SIZE - 1] >> QUANTILE_BITS, 14);
        }

        #[test]
        fn cube_roots_and_inverses_invert() {
            for x in 1..SLOTS {
                assert_eq!(u64::from(CUBE_ROOTS[(x * x % SLOTS * x % SLOTS) as usize]), x);
                assert_eq!(x * u64::from(INVERSES[x as usize]) % SLOTS, 1);
            }
            assert_eq!(CUBE_ROOTS[0], 0);
        }

        /// The greedy definition, over every pair: all pairs from the lowest key up, a slot
        /// going to the first target still under its quota.
        fn greedy_over_all_pairs(players: &[Player]) -> Vec<u64> {
            let mut all: Vec<(u64, usize)> = (0..BUCKET_TABLE_SIZE)
                .flat_map(|slot| players.iter().map(move |player| (player.key(player.rank_of(slot)), slot)))
                .collect();
            all.sort_unstable();
            let mut assigned = vec![NO_KEY; BUCKET_TABLE_SIZE];
            let mut room: Vec<u32> = players.iter().map(|player| player.quota).collect();
            for (key, slot) in all {
                if assigned[slot] == NO_KEY && room[position_of(key)] > 0 {
                    assigned[slot] = key;
                    room[position_of(key)] -= 1;
                }
            }
            assigned
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(32))]

            #[test]
            fn a_walk_visits_every_slot_once_in_rank_order(key in any::<u64>()) {
                let target = TableTarget { key, weight: 1 };
                let player = Player::new(target, 0, 1, 1, 0);
                let mut walk = Walk::new(&player);
                let mut seen = vec![false; BUCKET_TABLE_SIZE];
                for rank in 0..BUCKET_TABLE_SIZE {
                    let slot = walk.next_slot();
                    prop_assert!(!seen[slot], "slot {} visited twice", slot);
                    seen[slot] = true;
                    prop_assert_eq!(player.rank_of(slot), rank);
                }
            }

            #[test]
            fn listing_and_runs_change_the_time_not_the_table(
                targets in proptest::collection::btree_map(any::<u64>(), 1u32..=1_000_000, 2..=12)
            ) {
                let targets: Vec<TableTarget> = targets
                    .into_iter()
                    .map(|(key, weight)| TableTarget { key, weight })
                    .collect();
                let players = players(&targets);
                prop_assume!(players.len() >= 2);
                let greedy = greedy_over_all_pairs(&players);
                // As built, with the bound for many targets, and with a tiny bound and runs
                // (most slots refill, some several times).
                for (bound, run_length) in [tuning(players.len()), (32, 64), (1, 2)] {
                    let mut pairs = Pairs::list(&players, bound, run_length);
                    prop_assert_eq!(&assign(&players, &mut pairs), &greedy);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use alloc::{vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_fingerprint_is_the_tables_and_its_targets() {
        let targets = [TableTarget { key: 1 << 16 | 80, weight: 900_000 }, TableTarget { key: 2 << 16 | 80, weight: 100_000 }];
        let slots = build_bucket_table(&targets);
        let fingerprint = table_fingerprint(&slots, &targets);
        assert_eq!(fingerprint, table_fingerprint(&build_bucket_table(&targets), &targets), "built twice, one fingerprint");
        let mut moved = slots.clone();
        moved[17] ^= 1;
        assert_ne!(table_fingerprint(&moved, &targets), fingerprint, "one slot moved");
        let renamed = [targets[0], TableTarget { key: 3 << 16 | 80, ..targets[1] }];
        assert_ne!(table_fingerprint(&slots, &renamed), fingerprint, "another target behind the same slots");
    }

    /// Slots held by each target, by index.
    fn slot_counts(table: &[u16], targets: usize) -> Vec<u64> {
        let mut counts = vec![0u64; targets];
        for &index in table {
            counts[usize::from(index)] += 1;
        }
        counts
    }

    /// The table with each entry replaced by the key of its target: comparable across
    /// differently ordered inputs.
    fn keyed(table: &[u16], targets: &[TableTarget]) -> Vec<u64> {
        table.iter().map(|&index| targets[usize::from(index)].key).collect()
    }

    /// Number of slots whose target (by key) differs between two tables.
    fn moved_slots(before: &[u64], after: &[u64]) -> usize {
        before.iter().zip(after).filter(|(a, b)| a != b).count()
    }

    /// Slots moved between the tables of two target lists.
    fn moved_between(before: &[TableTarget], after: &[TableTarget]) -> usize {
        moved_slots(&keyed(&build_bucket_table(before), before), &keyed(&build_bucket_table(after), after))
    }

    /// What exact quotas may cost beyond 1.5x the ideal when targets come and go or shift
    /// weight: 0.5% of the table. Measured worst cases: 0.34% for the canary step over its
    /// whole input grid at five key bases (150,000 cases); for one of N <= 64 equal targets
    /// removed or added, 111 slots beyond the ideal (mean 78) at N = 64 over 2000 random key
    /// sets, i.e. 0.33% beyond 1.5x the ideal of 156.
    const QUOTA_SLACK: usize = BUCKET_TABLE_SIZE / 200;

    /// Asserts that each target's share of slots is within 0.1 percentage points of its
    /// share of the total weight.
    fn assert_shares_match(table: &[u16], targets: &[TableTarget]) {
        assert_eq!(table.len(), BUCKET_TABLE_SIZE);
        let total: u128 = targets.iter().map(|t| u128::from(t.weight)).sum();
        let slots = BUCKET_TABLE_SIZE as u128;
        for (target, count) in targets.iter().zip(slot_counts(table, targets.len())) {
            // The documented guarantee: the floor or the ceiling of the exact quota
            // weight / total * slots (largest remainders round up).
            let exact = u128::from(target.weight) * slots;
            let (floor, ceil) = (exact / total, exact.div_ceil(total));
            assert!(
                (floor..=ceil).contains(&u128::from(count)),
                "target {target:?} holds {count} slots of {slots}, weight {} of {total}: quota between {floor} and {ceil}",
                target.weight
            );
            if target.weight == 0 {
                assert_eq!(count, 0, "a zero-weight target holds slots");
            }
        }
    }

    /// Targets with distinct keys: neighbouring addresses, like a real deployment.
    fn targets_with_weights(weights: &[u32]) -> Vec<TableTarget> {
        weights.iter().zip(0u64..).map(|(&weight, n)| TableTarget { key: (0x0a01_0000 + n) << 16 | 8080, weight }).collect()
    }

    /// A canary split in parts per million, as the agent passes them: `stable_percent` spread
    /// evenly over `stable_count` targets, the rest over `canary_count` targets, at
    /// neighbouring addresses from `base`.
    fn canary_split(base: u64, stable_count: usize, canary_count: usize, stable_percent: u32) -> Vec<TableTarget> {
        let stable_each = stable_percent * 10_000 / stable_count as u32;
        let canary_each = (100 - stable_percent) * 10_000 / canary_count as u32;
        (0..stable_count + canary_count)
            .map(|n| TableTarget { key: (base + n as u64) << 16 | 8080, weight: if n < stable_count { stable_each } else { canary_each } })
            .collect()
    }

    #[test]
    fn no_targets_or_only_zero_weights_give_an_empty_table() {
        assert!(build_bucket_table(&[]).is_empty());
        assert!(build_bucket_table(&targets_with_weights(&[0, 0, 0])).is_empty());
    }

    #[test]
    fn a_single_target_holds_every_slot() {
        let table = build_bucket_table(&targets_with_weights(&[10000]));
        assert_eq!(table.len(), BUCKET_TABLE_SIZE);
        assert!(table.iter().all(|&index| index == 0));
    }

    #[test]
    fn zero_weight_targets_hold_no_slot() {
        let targets = targets_with_weights(&[0, 9000, 0, 1000]);
        let table = build_bucket_table(&targets);
        let counts = slot_counts(&table, targets.len());
        assert_eq!(counts[0], 0);
        assert_eq!(counts[2], 0);
        assert_shares_match(&table, &targets);
    }

    #[test]
    fn dcos_three_plus_one_at_80_20_splits_80_20() {
        // 80% over three 0.9 instances, in parts per million, and 20% for the 1.0 instance.
        let targets = targets_with_weights(&[266_667, 266_667, 266_666, 200_000]);
        let table = build_bucket_table(&targets);
        assert_shares_match(&table, &targets);
        let counts = slot_counts(&table, targets.len());
        let old: u64 = counts[..3].iter().sum();
        let slots = BUCKET_TABLE_SIZE as u64;
        // 80% of 10007 slots is 8005.6: the three old instances together hold 8005 or 8006.
        assert!((old * 1000).abs_diff(slots * 800) <= slots, "old version holds {old}");
    }

    /// Above 256 targets the builder takes its other branch; its quotas hold the same way.
    #[test]
    fn three_hundred_and_four_thousand_targets_hold_their_quotas() {
        for count in [300u32, 4096] {
            // Uneven weights, deterministic: 1 to 97 parts.
            let weights: Vec<u32> = (0..count).map(|n| 1 + (n * 7919) % 97).collect();
            let targets = targets_with_weights(&weights);
            let table = build_bucket_table(&targets);
            assert_shares_match(&table, &targets);
            assert_eq!(slot_counts(&table, targets.len()).iter().sum::<u64>(), BUCKET_TABLE_SIZE as u64);
        }
    }

    #[test]
    fn one_hundredth_of_a_percent_gets_about_one_slot() {
        let targets = targets_with_weights(&[9999, 1]);
        let counts = slot_counts(&build_bucket_table(&targets), 2);
        assert_eq!(counts[1], 1);
    }

    #[test]
    fn indices_refer_to_the_callers_order() {
        let targets = targets_with_weights(&[7000, 3000]);
        let reversed: Vec<TableTarget> = targets.iter().rev().copied().collect();
        let table = build_bucket_table(&targets);
        let table_reversed = build_bucket_table(&reversed);
        assert_eq!(keyed(&table, &targets), keyed(&table_reversed, &reversed));
        assert_ne!(table, table_reversed, "indices must follow the caller's order");
    }

    #[test]
    fn building_twice_gives_identical_bytes() {
        let targets = targets_with_weights(&[1234, 4321, 2222, 2223]);
        assert_eq!(build_bucket_table(&targets), build_bucket_table(&targets));
    }

    #[test]
    fn a_small_weight_change_moves_about_that_share_of_slots() {
        let slots = BUCKET_TABLE_SIZE;
        for (before, after) in [([9000, 1000], [8000, 2000]), ([9000, 1000], [8900, 1100])] {
            let moved = moved_between(&targets_with_weights(&before), &targets_with_weights(&after));
            // Ideal: exactly the shifted share, (after - before) / 10000 of the slots.
            let ideal = (after[1] - before[1]) as usize * slots / 10000;
            assert!(moved <= ideal * 3 / 2, "{before:?} -> {after:?} moved {moved}, ideal {ideal}");
        }
    }

    /// Regression: with one stable and one canary target, moving 52% -> 49% moved 567 slots
    /// (ideal 300) with the previous builder (proptest seed in
    /// proptest-regressions/table.txt), and 52% -> 55% 368. Over the property test's grid,
    /// a step between two targets now moves 2.9 slots beyond the shifted share on average
    /// (previously 104), at worst 136 for 100 (86% -> 85%; previously 232 for 100).
    #[test]
    fn a_step_between_two_targets_moves_about_the_shifted_share() {
        let base = 0x0a01_0000;
        for (from, to) in [(52, 49), (52, 55), (90, 80)] {
            let moved = moved_between(&canary_split(base, 1, 1, from), &canary_split(base, 1, 1, to));
            let ideal = from.abs_diff(to) as usize * BUCKET_TABLE_SIZE / 100;
            assert!(moved <= ideal + ideal / 20, "{from}% -> {to}% moved {moved}, ideal {ideal}");
        }
    }

    /// Distinct random keys with random weights, at least one of them non-zero.
    fn weighted_targets() -> impl Strategy<Value = Vec<TableTarget>> {
        proptest::collection::btree_map(any::<u64>(), 0u32..=1_000_000, 1..=64)
            .prop_filter("needs a non-zero weight", |targets| targets.values().any(|&w| w > 0))
            .prop_map(|targets| targets.into_iter().map(|(key, weight)| TableTarget { key, weight }).collect())
    }

    /// `count` equal targets with distinct random keys.
    fn equal_targets(count: core::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<TableTarget>> {
        proptest::collection::btree_set(any::<u64>(), count)
            .prop_map(|keys| keys.into_iter().map(|key| TableTarget { key, weight: 1 }).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn shares_are_within_a_tenth_of_a_point(targets in weighted_targets()) {
            let table = build_bucket_table(&targets);
            assert_shares_match(&table, &targets);
        }

        #[test]
        fn input_order_does_not_change_the_table(
            (targets, shuffled) in weighted_targets()
                .prop_flat_map(|targets| (Just(targets.clone()), Just(targets).prop_shuffle()))
        ) {
            let table = build_bucket_table(&targets);
            let table_shuffled = build_bucket_table(&shuffled);
            prop_assert_eq!(keyed(&table, &targets), keyed(&table_shuffled, &shuffled));
        }

        #[test]
        fn removing_one_of_n_equal_targets_moves_few_slots(
            targets in equal_targets(2..=40),
            removed_pick in any::<prop::sample::Index>(),
        ) {
            let mut remaining = targets.clone();
            remaining.remove(removed_pick.index(targets.len()));
            let moved = moved_between(&targets, &remaining);
            // Ideal: only the removed target's slots, 1/N of the table.
            let ideal = BUCKET_TABLE_SIZE / targets.len();
            prop_assert!(moved * 2 <= ideal * 3, "moved {} slots, ideal {}", moved, ideal);
        }

        #[test]
        fn removing_one_of_up_to_64_equal_targets_moves_few_slots(
            targets in equal_targets(2..=64),
            removed_pick in any::<prop::sample::Index>(),
        ) {
            let mut remaining = targets.clone();
            remaining.remove(removed_pick.index(targets.len()));
            let moved = moved_between(&targets, &remaining);
            let ideal = BUCKET_TABLE_SIZE / targets.len();
            let allowed = ideal * 3 / 2 + QUOTA_SLACK;
            prop_assert!(moved <= allowed, "moved {} slots, ideal {}", moved, ideal);
        }

        #[test]
        fn adding_a_target_moves_few_slots(targets in equal_targets(2..=40)) {
            let moved = moved_between(&targets[1..], &targets);
            // Ideal: the newcomer's share, 1/N of the table.
            let ideal = BUCKET_TABLE_SIZE / targets.len();
            prop_assert!(moved * 2 <= ideal * 3, "moved {} slots, ideal {}", moved, ideal);
        }

        #[test]
        fn adding_one_of_up_to_64_targets_moves_few_slots(targets in equal_targets(2..=64)) {
            let moved = moved_between(&targets[1..], &targets);
            let ideal = BUCKET_TABLE_SIZE / targets.len();
            let allowed = ideal * 3 / 2 + QUOTA_SLACK;
            prop_assert!(moved <= allowed, "moved {} slots, ideal {}", moved, ideal);
        }

        #[test]
        fn a_canary_weight_step_moves_about_the_shifted_share(
            stable_count in 1usize..=10,
            canary_count in 1usize..=3,
            stable_percent in 50u32..=99,
            step in 1u32..=20,
            base in 0u64..1 << 32,
        ) {
            let before = canary_split(base, stable_count, canary_count, stable_percent);
            let after = canary_split(base, stable_count, canary_count, stable_percent - step);
            let moved = moved_between(&before, &after);
            // Ideal: the shifted share of the slots.
            let ideal = step as usize * BUCKET_TABLE_SIZE / 100;
            let allowed = ideal * 3 / 2 + QUOTA_SLACK;
            prop_assert!(moved <= allowed, "moved {} slots, ideal {}", moved, ideal);
        }

        #[test]
        fn every_entry_is_a_valid_index(targets in weighted_targets()) {
            let table = build_bucket_table(&targets);
            prop_assert_eq!(table.len(), BUCKET_TABLE_SIZE);
            prop_assert!(table.iter().all(|&index| usize::from(index) < targets.len()));
        }
    }
}
