//! Splitting a whole into integer parts in proportion to weights: route weights into
//! target shares, the rest of a canary step over the stable routes, shares into table
//! slots. One rule everywhere so the agent, `validate` and the table agree to the unit.

use alloc::vec::Vec;

/// `total` split in proportion to `weights`, by the largest-remainder method: each part is
/// the floor or the ceiling of its exact quota, the parts add up to `total` exactly, and
/// the units left after the floors go to the largest remainders, ties to the earlier
/// position. Weights that are all zero (or none) give every part 0 except when
/// `equal_if_all_zero` is set, in which case the weights count as equal.
///
/// `total * weight` must fit in `u128` (it always does for `u64` inputs).
pub fn largest_remainder(total: u64, weights: &[u64], equal_if_all_zero: bool) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let (weights, sum): (Vec<u128>, u128) = match (sum, equal_if_all_zero) {
        (0, true) => (weights.iter().map(|_| 1).collect(), weights.len() as u128),
        (0, false) => return weights.iter().map(|_| 0).collect(),
        (s, _) => (weights.iter().map(|&w| u128::from(w)).collect(), s),
    };
    if sum == 0 {
        return Vec::new();
    }
    let total = u128::from(total);
    let mut parts: Vec<u64> = weights.iter().map(|w| (total * w / sum) as u64).collect();
    let assigned: u128 = parts.iter().map(|&p| u128::from(p)).sum();
    let leftover = (total - assigned) as usize;
    let mut by_remainder: Vec<(u128, usize)> = weights.iter().enumerate().map(|(position, w)| (total * w % sum, position)).collect();
    // Largest remainder first; equal remainders in position order.
    by_remainder.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    // The remainders add up to leftover * sum with each below sum, so at least `leftover`
    // of them are non-zero: a zero weight never gets a unit here.
    for &(_, position) in by_remainder.iter().take(leftover) {
        parts[position] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn three_ways_of_eighty_percent() {
        assert_eq!(largest_remainder(800_000, &[1, 1, 1], false), [266_667, 266_667, 266_666]);
    }

    #[test]
    fn ties_go_to_the_earlier_position() {
        assert_eq!(largest_remainder(5, &[1, 1], false), [3, 2]);
        assert_eq!(largest_remainder(1, &[0, 1, 1], false), [0, 1, 0]);
    }

    #[test]
    fn all_zero_weights() {
        assert_eq!(largest_remainder(10, &[0, 0], false), [0, 0]);
        assert_eq!(largest_remainder(10, &[0, 0, 0], true), [4, 3, 3]);
        assert!(largest_remainder(10, &[], true).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn parts_add_up_and_stay_within_one_of_the_quota(
            total in 0u64..=u64::from(u32::MAX),
            weights in proptest::collection::vec(0u64..=u64::from(u32::MAX), 1..40),
        ) {
            let parts = largest_remainder(total, &weights, false);
            let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
            prop_assert_eq!(parts.len(), weights.len());
            if sum == 0 {
                prop_assert!(parts.iter().all(|&p| p == 0));
                return Ok(());
            }
            prop_assert_eq!(parts.iter().map(|&p| u128::from(p)).sum::<u128>(), u128::from(total));
            for (&part, &weight) in parts.iter().zip(&weights) {
                let floor = u128::from(total) * u128::from(weight) / sum;
                prop_assert!(u128::from(part) == floor || u128::from(part) == floor + 1);
                if weight == 0 {
                    prop_assert_eq!(part, 0);
                }
            }
        }
    }
}
