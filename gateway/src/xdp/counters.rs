//! Counter snapshots: per-CPU values summed, grouped by verdict.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidegate_common::stats::{Counter, Counters, Verdict};

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketCount {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCount {
    fn add(&mut self, other: PacketCount) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Totals per verdict, and the well-formed WireGuard messages passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub pass: PacketCount,
    pub drop: PacketCount,
    pub aborted: PacketCount,
    /// Sent back out to another gateway (steered by the director, or handed
    /// on during a handover).
    #[serde(default)]
    pub tx: PacketCount,
    /// The four WireGuard message counters and the steered and handed-on
    /// ones together: what the shield let through to a service.
    pub wireguard: PacketCount,
}

/// Every counter, summed over CPUs, keyed by [`Counter::name`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    pub counters: BTreeMap<String, PacketCount>,
    pub totals: Totals,
}

impl CounterSnapshot {
    /// Builds a snapshot from one summed value per counter, in index order.
    pub fn from_values(values: impl IntoIterator<Item = (Counter, PacketCount)>) -> Self {
        let mut snapshot = Self::default();
        for (counter, count) in values {
            let total = match counter.verdict() {
                Verdict::Pass => &mut snapshot.totals.pass,
                Verdict::Drop => &mut snapshot.totals.drop,
                Verdict::Aborted => &mut snapshot.totals.aborted,
                Verdict::Tx => &mut snapshot.totals.tx,
            };
            total.add(count);
            if counter.is_wireguard() || counter.verdict() == Verdict::Tx {
                snapshot.totals.wireguard.add(count);
            }
            snapshot.counters.insert(counter.name().to_owned(), count);
        }
        snapshot
    }

    /// Builds a snapshot from every CPU's counters, summed.
    pub fn from_cpus<'a>(cpus: impl IntoIterator<Item = &'a Counters>) -> Self {
        let mut sums = [PacketCount::default(); Counter::ALL.len()];
        for cpu in cpus {
            for (sum, value) in sums.iter_mut().zip(&cpu.by_counter) {
                sum.add(PacketCount {
                    packets: value.packets,
                    bytes: value.bytes,
                });
            }
        }
        Self::from_values(Counter::ALL.iter().copied().zip(sums))
    }

    /// The value of one counter (zero if absent).
    pub fn get(&self, counter: Counter) -> PacketCount {
        self.counters
            .get(counter.name())
            .copied()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_group_counters_by_verdict() {
        let snapshot = CounterSnapshot::from_values(Counter::ALL.iter().map(|&c| {
            (
                c,
                PacketCount {
                    packets: 1,
                    bytes: 100,
                },
            )
        }));
        assert_eq!(snapshot.totals.pass.packets, 8);
        assert_eq!(snapshot.totals.drop.packets, 10);
        assert_eq!(snapshot.totals.aborted.packets, 1);
        assert_eq!(snapshot.totals.tx.packets, 2);
        assert_eq!(snapshot.totals.wireguard.packets, 6);
        assert_eq!(snapshot.get(Counter::BadType).bytes, 100);
    }

    #[test]
    fn cpus_are_summed_per_counter() {
        let mut one = Counters::ZERO;
        one.by_counter[Counter::Transport as usize].packets = 2;
        one.by_counter[Counter::Transport as usize].bytes = 200;
        let mut two = Counters::ZERO;
        two.by_counter[Counter::Transport as usize].packets = 3;
        two.by_counter[Counter::BadType as usize].packets = 1;
        let snapshot = CounterSnapshot::from_cpus([&one, &Counters::ZERO, &two]);
        assert_eq!(
            snapshot.get(Counter::Transport),
            PacketCount {
                packets: 5,
                bytes: 200
            }
        );
        assert_eq!(snapshot.totals.drop.packets, 1);
        assert_eq!(snapshot.totals.pass.packets, 5);
    }
}
