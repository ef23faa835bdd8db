//! The Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4): every
//! backend walks its own permutation of the table's entries, and the
//! backends take turns, in order of gateway id, claiming the next entry of
//! their permutation that is still free, until the table is full.
//!
//! Everything here is a pure function of the backend ids and the table
//! size, with fixed seeds and integer arithmetic: every director builds the
//! same table from the same set, whatever order it learnt the gateways in
//! and whatever host it runs on. When one of N backends leaves, about 1/N
//! of the entries move (those it held) and almost no others.

/// Seeds of the two hashes of a gateway id that give its permutation.
const OFFSET_SEED: u64 = 0x7469_6465_6761_7465; // "tidegate"
const SKIP_SEED: u64 = 0x6d61_676c_6576_2121; // "maglev!!"

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("table size {0} is not a prime")]
    NotPrime(u32),
    #[error("table size {size} is smaller than the {backends} backends")]
    TooSmall { size: u32, backends: usize },
    #[error("gateway id {0} does not fit a table entry (1 to 255)")]
    BadId(u32),
}

/// The table for backends `ids` (gateway ids 1 to 255, in any order,
/// duplicates ignored) with `size` entries (a prime): the gateway id of
/// each entry, or all zeros for no backend.
pub fn build(ids: &[u32], size: u32) -> Result<Vec<u8>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    let mut ids: Vec<u32> = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if let Some(&bad) = ids.iter().find(|&&id| id == 0 || id > 255) {
        return Err(MaglevError::BadId(bad));
    }
    if ids.len() > size as usize {
        return Err(MaglevError::TooSmall {
            size,
            backends: ids.len(),
        });
    }
    let m = u64::from(size);
    let mut table = vec![0u8; size as usize];
    if ids.is_empty() {
        return Ok(table);
    }
    // (offset, skip, next) per backend; entry j of a permutation is
    // (offset + j * skip) mod size, which visits every entry once because
    // size is prime and 0 < skip < size.
    let mut walks: Vec<(u64, u64, u64)> = ids
        .iter()
        .map(|&id| {
            let offset = mix(u64::from(id) ^ OFFSET_SEED) % m;
            let skip = mix(u64::from(id) ^ SKIP_SEED) % (m - 1) + 1;
            (offset, skip, 0)
        })
        .collect();
    let mut filled = 0u64;
    'fill: loop {
        for (walk, &id) in walks.iter_mut().zip(&ids) {
            let (offset, skip, next) = walk;
            let mut entry = (*offset + *next * *skip) % m;
            while table[entry as usize] != 0 {
                *next += 1;
                entry = (*offset + *next * *skip) % m;
            }
            table[entry as usize] = id as u8;
            *next += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(table)
}

/// Whether `n` is a prime (trial division; sizes are at most a few
/// hundred thousand).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// SplitMix64's finalizer: a fixed, well-mixing function of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const M: u32 = 65537;

    /// Entries held per backend.
    fn shares(table: &[u8]) -> BTreeMap<u8, usize> {
        let mut out = BTreeMap::new();
        for &id in table {
            *out.entry(id).or_default() += 1;
        }
        out
    }

    /// FNV-1a of the table: a fingerprint to compare across hosts.
    fn fingerprint(table: &[u8]) -> u64 {
        table.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn the_same_set_gives_the_same_table_in_any_order() {
        let a = build(&[1, 2, 3, 7], M).unwrap();
        let b = build(&[7, 3, 1, 2], M).unwrap();
        let c = build(&[3, 3, 2, 7, 1, 2], M).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn tables_are_the_same_on_every_host() {
        // Pinned values, computed independently by a Python transcription of
        // the algorithm (arbitrary-precision integers, masked to 64 bits): a
        // change of seed, hash, order or arithmetic, or a platform that
        // computed differently, changes them, and directors built from
        // different code would disagree on picks.
        assert_eq!(
            build(&[1, 2, 3], 13).unwrap(),
            [1, 1, 1, 2, 2, 2, 3, 1, 2, 1, 3, 3, 3]
        );
        assert_eq!(
            fingerprint(&build(&[1, 2, 3], M).unwrap()),
            0x0242_b95d_4d64_b94a
        );
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        for n in [1u32, 2, 3, 5, 10, 50, 255] {
            let ids: Vec<u32> = (1..=n).collect();
            let table = build(&ids, M).unwrap();
            let shares = shares(&table);
            assert_eq!(shares.len(), n as usize, "{n} backends");
            let fair = f64::from(M) / f64::from(n);
            for (id, count) in shares {
                let off = (count as f64 - fair).abs() / fair;
                assert!(off < 0.02, "{n} backends: {id} holds {count}, fair {fair}");
            }
        }
    }

    #[test]
    fn one_leaving_moves_its_entries_and_almost_no_others() {
        for n in [3u32, 4, 5, 8, 10, 20] {
            let ids: Vec<u32> = (1..=n).collect();
            let before = build(&ids, M).unwrap();
            for leaving in [1, n / 2 + 1, n] {
                let rest: Vec<u32> = ids.iter().copied().filter(|&id| id != leaving).collect();
                let after = build(&rest, M).unwrap();
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
                let others = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != leaving as u8 && b != a)
                    .count();
                let fraction = moved as f64 / f64::from(M);
                let ideal = 1.0 / f64::from(n);
                assert!(
                    (fraction - ideal).abs() < 0.01,
                    "{n} backends, {leaving} leaves: {fraction:.4} of the table moved, ideal {ideal:.4}"
                );
                assert!(
                    (others as f64) / f64::from(M) < 0.005,
                    "{n} backends, {leaving} leaves: {others} entries of staying backends moved"
                );
                assert!(!after.contains(&(leaving as u8)));
            }
        }
    }

    #[test]
    fn one_joining_takes_about_its_share() {
        let before = build(&[1, 2, 3], M).unwrap();
        let after = build(&[1, 2, 3, 4], M).unwrap();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let taken = after.iter().filter(|&&id| id == 4).count();
        assert!((moved as f64 / f64::from(M) - 0.25).abs() < 0.01, "{moved}");
        assert!(moved >= taken);
    }

    #[test]
    fn no_backend_gives_an_empty_table() {
        assert_eq!(build(&[], 13).unwrap(), [0; 13]);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(build(&[1], 65536), Err(MaglevError::NotPrime(65536)));
        assert_eq!(build(&[1, 256], 13), Err(MaglevError::BadId(256)));
        assert_eq!(build(&[0], 13), Err(MaglevError::BadId(0)));
        assert_eq!(
            build(&[1, 2, 3], 2),
            Err(MaglevError::TooSmall {
                size: 2,
                backends: 3
            })
        );
    }

    #[test]
    fn primes_are_recognised() {
        let primes: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(65537));
        assert!(!is_prime(65535));
    }
}
