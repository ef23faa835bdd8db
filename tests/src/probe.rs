//! The VIP probe: the wire format shared by `tidegate-echo` (one per
//! gateway, bound to the VIP) and `tidegate-probe` (on the client), and the
//! prober's summary: who answered each probe, how many were lost, and the
//! longest time the client heard nothing.
//!
//! A probe is `"TGPR"` and a sequence number (u64); the echo answers
//! `"TGEC"`, the same sequence number and its gateway id (u32). All
//! integers are big-endian. The summary is computed by a pure function, so
//! the gap arithmetic is tested without privileges.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What `tidegate-probe` writes to stderr once it has installed its
/// SIGTERM handler and bound its socket: a stop after this line gets a
/// summary.
pub const STARTED: &str = "tidegate-probe: probing";

/// The first bytes of a probe.
pub const PROBE_MAGIC: [u8; 4] = *b"TGPR";
/// The first bytes of an echo reply.
pub const REPLY_MAGIC: [u8; 4] = *b"TGEC";
/// Length of a probe.
pub const PROBE_LEN: usize = 12;
/// Length of an echo reply.
pub const REPLY_LEN: usize = 16;

/// The probe with sequence number `seq`.
pub fn probe(seq: u64) -> [u8; PROBE_LEN] {
    let mut out = [0; PROBE_LEN];
    out[..4].copy_from_slice(&PROBE_MAGIC);
    out[4..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// The sequence number of a probe; `None` for anything else.
pub fn parse_probe(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != PROBE_LEN || bytes[..4] != PROBE_MAGIC {
        return None;
    }
    Some(u64::from_be_bytes(bytes[4..].try_into().ok()?))
}

/// Gateway `gateway`'s answer to probe `seq`.
pub fn reply(seq: u64, gateway: u32) -> [u8; REPLY_LEN] {
    let mut out = [0; REPLY_LEN];
    out[..4].copy_from_slice(&REPLY_MAGIC);
    out[4..12].copy_from_slice(&seq.to_be_bytes());
    out[12..].copy_from_slice(&gateway.to_be_bytes());
    out
}

/// (sequence number, gateway id) of an echo reply; `None` for anything else.
pub fn parse_reply(bytes: &[u8]) -> Option<(u64, u32)> {
    if bytes.len() != REPLY_LEN || bytes[..4] != REPLY_MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
    let gateway = u32::from_be_bytes(bytes[12..].try_into().ok()?);
    Some((seq, gateway))
}

/// One probe sent, and its first answer if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRecord {
    /// When it was sent, since the prober started.
    pub sent: Duration,
    /// The first answer: which gateway, and when it arrived (since start).
    pub answer: Option<(u32, Duration)>,
    /// Answers after the first.
    pub duplicates: u32,
}

/// A stretch of consecutive probes answered by the same gateway (or lost).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRun {
    /// The gateway that answered; `None` for a run of lost probes.
    pub gateway: Option<u32>,
    /// Sequence number of the first probe of the run.
    pub first_seq: u64,
    /// Probes in the run.
    pub count: u64,
    /// When the first probe of the run was sent, in ms since start.
    pub from_ms: f64,
}

/// What the prober prints when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// Unix time the prober started, in ms (the clock of `tidectl status`).
    pub started_unix_ms: u64,
    /// The probe interval.
    pub interval_ms: f64,
    /// Probes sent.
    pub sent: u64,
    /// Probes answered (once or more).
    pub received: u64,
    /// Probes never answered.
    pub lost: u64,
    /// Answers after the first to the same probe.
    pub duplicates: u64,
    /// The longest consecutive run of lost probes.
    pub longest_loss_run: u64,
    /// The longest time without an answer, in ms: between two answers as
    /// they arrived, or from the first probe to the first answer, or from
    /// the last answer to one interval after the last probe.
    pub longest_gap_ms: f64,
    /// When the longest gap began, in ms since start.
    pub longest_gap_from_ms: f64,
    /// The slowest answer, in ms.
    pub max_rtt_ms: f64,
    /// Answers per gateway id.
    pub answers: BTreeMap<u32, u64>,
    /// The gateways that answered, in order, each once per stretch.
    pub sequence: Vec<u32>,
    /// Every stretch of answers by one gateway, and of losses, in order.
    pub runs: Vec<AnswerRun>,
}

impl ProbeSummary {
    /// Summarises `records`, indexed by sequence number, sent `interval`
    /// apart by a prober that started at `started_unix_ms`.
    pub fn compute(records: &[ProbeRecord], interval: Duration, started_unix_ms: u64) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut answers = BTreeMap::new();
        let mut runs: Vec<AnswerRun> = Vec::new();
        let mut received = 0;
        let mut duplicates = 0;
        let mut longest_loss_run = 0;
        let mut loss_run = 0;
        let mut max_rtt = Duration::ZERO;
        for (seq, record) in (0_u64..).zip(records) {
            duplicates += u64::from(record.duplicates);
            let gateway = record.answer.map(|(gateway, at)| {
                received += 1;
                *answers.entry(gateway).or_insert(0) += 1;
                max_rtt = max_rtt.max(at.saturating_sub(record.sent));
                gateway
            });
            if gateway.is_some() {
                loss_run = 0;
            } else {
                loss_run += 1;
                longest_loss_run = longest_loss_run.max(loss_run);
            }
            match runs.last_mut() {
                Some(run) if run.gateway == gateway => run.count += 1,
                _ => runs.push(AnswerRun {
                    gateway,
                    first_seq: seq,
                    count: 1,
                    from_ms: ms(record.sent),
                }),
            }
        }
        let sequence = runs.iter().filter_map(|run| run.gateway).fold(
            Vec::new(),
            |mut sequence: Vec<u32>, gateway| {
                if sequence.last() != Some(&gateway) {
                    sequence.push(gateway);
                }
                sequence
            },
        );

        // The gap: the longest silence between the start of probing, every
        // answer as it arrived, and the end of probing.
        let (longest_gap, gap_from) = match (records.first(), records.last()) {
            (Some(first), Some(last)) => {
                let mut points: Vec<Duration> = records
                    .iter()
                    .filter_map(|r| r.answer.map(|a| a.1))
                    .collect();
                points.sort_unstable();
                let end = (last.sent + interval).max(points.last().copied().unwrap_or_default());
                std::iter::once(first.sent)
                    .chain(points)
                    .chain(std::iter::once(end))
                    .collect::<Vec<_>>()
                    .windows(2)
                    .map(|pair| (pair[1].saturating_sub(pair[0]), pair[0]))
                    .max_by_key(|(gap, _)| *gap)
                    .unwrap_or_default()
            }
            _ => (Duration::ZERO, Duration::ZERO),
        };
        let sent = records.len() as u64;
        Self {
            started_unix_ms,
            interval_ms: ms(interval),
            sent,
            received,
            lost: sent - received,
            duplicates,
            longest_loss_run,
            longest_gap_ms: ms(longest_gap),
            longest_gap_from_ms: ms(gap_from),
            max_rtt_ms: ms(max_rtt),
            answers,
            sequence,
            runs,
        }
    }

    /// Parses the prober's JSON output.
    pub fn parse(json: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        serde_json::from_str(json.trim())
            .with_context(|| format!("parsing the prober's summary {json:?}"))
    }

    /// The runs of lost probes, for messages: `"12 lost from 350.0 ms"`.
    pub fn losses(&self) -> Vec<String> {
        self.runs
            .iter()
            .filter(|run| run.gateway.is_none())
            .map(|run| format!("{} lost from {:.1} ms", run.count, run.from_ms))
            .collect()
    }

    /// A one-line account for test output.
    pub fn brief(&self) -> String {
        format!(
            "{} sent, {} answered, {} lost (longest run {}), longest gap {:.1} ms at {:.1} ms, \
             max rtt {:.1} ms, answers {:?}, sequence {:?}",
            self.sent,
            self.received,
            self.lost,
            self.longest_loss_run,
            self.longest_gap_ms,
            self.longest_gap_from_ms,
            self.max_rtt_ms,
            self.answers,
            self.sequence
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Probe `seq` sent at `seq * 10` ms, answered by `gateway` 1 ms later
    /// (`None`: lost).
    fn on_time(gateways: &[Option<u32>]) -> Vec<ProbeRecord> {
        (0_u64..)
            .zip(gateways)
            .map(|(seq, gateway)| ProbeRecord {
                sent: ms(seq * 10),
                answer: gateway.map(|g| (g, ms(seq * 10 + 1))),
                duplicates: 0,
            })
            .collect()
    }

    #[test]
    fn wire_format_round_trips_and_refuses_strangers() {
        assert_eq!(parse_probe(&probe(7)), Some(7));
        assert_eq!(parse_reply(&reply(7, 3)), Some((7, 3)));
        assert_eq!(&probe(1)[..4], b"TGPR");
        assert_eq!(reply(0x0102, 5)[4..], [0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 5]);
        assert_eq!(parse_probe(&reply(7, 3)), None);
        assert_eq!(parse_reply(&probe(7)), None);
        assert_eq!(parse_probe(&probe(7)[..11]), None);
        assert_eq!(parse_reply(&[0; REPLY_LEN]), None);
    }

    #[test]
    fn no_loss_means_gaps_of_one_interval() {
        let s = ProbeSummary::compute(&on_time(&[Some(1); 100]), INTERVAL, 5);
        assert_eq!((s.sent, s.received, s.lost, s.duplicates), (100, 100, 0, 0));
        assert_eq!(s.started_unix_ms, 5);
        assert!(
            (s.longest_gap_ms - 10.0).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert!((s.max_rtt_ms - 1.0).abs() < 1e-9);
        assert_eq!(s.longest_loss_run, 0);
        assert_eq!(s.answers, BTreeMap::from([(1, 100)]));
        assert_eq!(s.sequence, [1]);
        assert_eq!(s.runs.len(), 1);
    }

    #[test]
    fn an_outage_shows_as_a_gap_a_loss_run_and_a_change_of_gateway() {
        // 30 answered by 3, 40 lost (400 ms), 30 answered by 2.
        let mut gateways = vec![Some(3); 30];
        gateways.extend([None; 40]);
        gateways.extend([Some(2); 30]);
        let s = ProbeSummary::compute(&on_time(&gateways), INTERVAL, 0);
        assert_eq!((s.sent, s.received, s.lost), (100, 60, 40));
        assert_eq!(s.longest_loss_run, 40);
        // Last answer at 291 ms (probe 29), next at 701 ms (probe 70).
        assert!(
            (s.longest_gap_ms - 410.0).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert!((s.longest_gap_from_ms - 291.0).abs() < 1e-9);
        assert_eq!(s.sequence, [3, 2]);
        assert_eq!(s.answers, BTreeMap::from([(2, 30), (3, 30)]));
        let runs: Vec<(Option<u32>, u64, u64)> = s
            .runs
            .iter()
            .map(|r| (r.gateway, r.first_seq, r.count))
            .collect();
        assert_eq!(runs, [(Some(3), 0, 30), (None, 30, 40), (Some(2), 70, 30)]);
        assert!((s.runs[1].from_ms - 300.0).abs() < 1e-9);
        assert_eq!(s.losses(), ["40 lost from 300.0 ms"]);
    }

    #[test]
    fn late_answers_count_by_arrival_not_by_sending() {
        // Probes 10..=14 waited (queued) and were answered together at
        // 400 ms while later probes were answered on time: the longest
        // silence is from 91 ms (probe 9) to 151 ms (probe 15).
        let mut records = on_time(&[Some(1); 50]);
        for record in &mut records[10..15] {
            record.answer = Some((2, ms(400)));
        }
        let s = ProbeSummary::compute(&records, INTERVAL, 0);
        assert_eq!(s.lost, 0);
        assert!(
            (s.longest_gap_ms - 60.0).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert!((s.max_rtt_ms - 300.0).abs() < 1e-9);
        assert_eq!(s.sequence, [1, 2, 1]);
    }

    #[test]
    fn losses_at_either_end_are_gaps_too() {
        let mut gateways = vec![None; 20];
        gateways.extend([Some(1); 10]);
        let s = ProbeSummary::compute(&on_time(&gateways), INTERVAL, 0);
        // From the first probe (0 ms) to the first answer (201 ms).
        assert!(
            (s.longest_gap_ms - 201.0).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert!(s.longest_gap_from_ms.abs() < 1e-9);

        let mut gateways = vec![Some(1); 10];
        gateways.extend([None; 50]);
        let s = ProbeSummary::compute(&on_time(&gateways), INTERVAL, 0);
        // From the last answer (91 ms) to one interval after the last probe
        // (590 + 10 ms).
        assert!(
            (s.longest_gap_ms - 509.0).abs() < 1e-9,
            "{}",
            s.longest_gap_ms
        );
        assert_eq!(s.sequence, [1]);
        assert_eq!(s.runs.last().unwrap().gateway, None);
    }

    #[test]
    fn duplicates_and_an_empty_run_are_counted() {
        let mut records = on_time(&[Some(1), Some(2), Some(1)]);
        records[1].duplicates = 2;
        let s = ProbeSummary::compute(&records, INTERVAL, 0);
        assert_eq!(s.duplicates, 2);
        assert_eq!(s.sequence, [1, 2, 1]);

        let s = ProbeSummary::compute(&[], INTERVAL, 0);
        assert_eq!((s.sent, s.received, s.lost), (0, 0, 0));
        assert!(s.longest_gap_ms.abs() < 1e-9);
        assert!(s.runs.is_empty());
    }

    #[test]
    fn the_summary_survives_json() {
        let s = ProbeSummary::compute(&on_time(&[Some(1), None, Some(4)]), INTERVAL, 9);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"answers\":{\"1\":1,\"4\":1}"), "{json}");
        assert_eq!(ProbeSummary::parse(&json).unwrap(), s);
    }
}
