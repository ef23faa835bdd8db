//! Runs tables of frames through the BPF programs with `BPF_PROG_TEST_RUN`
//! and fails once, listing every case whose verdict, frame out or counters
//! were not the expected ones.

use std::{collections::BTreeMap, fmt::Debug};

use aya::{
    TestRunResult,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use tidegate_gateway::xdp::{Datapath, PacketCount};

/// Fails the test unless it runs as root, which loading BPF programs needs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the BPF packet tests load BPF programs and need root: run `cargo xtask test` as root"
    );
}

/// One frame and what the program must do with it.
pub struct Case<D> {
    pub name: String,
    pub input: Vec<u8>,
    pub verdict: u32,
    /// The frame that must come out; `None` where the frame goes no further
    /// and what the program left of it does not matter.
    pub output: Option<Vec<u8>>,
    /// How the counters must move.
    pub counters: D,
}

impl Case<Moved> {
    /// `input` must get `verdict`, be counted under `counter` alone and, if
    /// `output` is given, come out as it.
    pub fn new(
        name: impl Into<String>,
        input: Vec<u8>,
        verdict: u32,
        counter: &str,
        output: Option<Vec<u8>>,
    ) -> Self {
        Self {
            name: name.into(),
            counters: counted(counter, &input),
            input,
            verdict,
            output,
        }
    }
}

/// A kind of program `BPF_PROG_TEST_RUN` runs frames through.
pub trait Program: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult> {
    /// The names of its verdicts, by value.
    const VERDICTS: &[&str];
}

impl Program for Xdp {
    const VERDICTS: &[&str] = &[
        "XDP_ABORTED",
        "XDP_DROP",
        "XDP_PASS",
        "XDP_TX",
        "XDP_REDIRECT",
    ];
}

impl Program for SchedClassifier {
    const VERDICTS: &[&str] = &["TC_ACT_OK", "TC_ACT_RECLASSIFY", "TC_ACT_SHOT"];
}

/// Counters a program keeps, read before and after each case.
pub trait Counters {
    /// How they moved, as a case expects it.
    type Delta: PartialEq + Debug;

    /// How the counters moved from `before` to `self`.
    fn since(&self, before: &Self) -> Self::Delta;
}

/// (name, packets, bytes) of each counter that moved.
pub type Moved = Vec<(String, u64, u64)>;

/// Counters by name, as the shield and the egress guard keep them.
impl Counters for BTreeMap<String, PacketCount> {
    type Delta = Moved;

    fn since(&self, before: &Self) -> Moved {
        self.iter()
            .filter_map(|(name, now)| {
                let was = before.get(name).copied().unwrap_or_default();
                (*now != was).then(|| {
                    (
                        name.clone(),
                        now.packets - was.packets,
                        now.bytes - was.bytes,
                    )
                })
            })
            .collect()
    }
}

/// Two sets of counters read together.
impl<A: Counters, B: Counters> Counters for (A, B) {
    type Delta = (A::Delta, B::Delta);

    fn since(&self, before: &Self) -> Self::Delta {
        (self.0.since(&before.0), self.1.since(&before.1))
    }
}

/// The counter `name` counted `frame`, and no other counter moved.
pub fn counted(name: &str, frame: &[u8]) -> Moved {
    vec![(name.to_owned(), 1, frame.len() as u64)]
}

/// Runs every case in order through `program`, reading `counters` before
/// and after each, and panics at the end if any case went otherwise than
/// expected.
pub fn run<P: Program, C: Counters>(
    program: &P,
    counters: impl Fn() -> C,
    cases: &[Case<C::Delta>],
) {
    let verdict = |value: u32| match P::VERDICTS.get(value as usize) {
        Some(name) => (*name).to_owned(),
        None => value.to_string(),
    };
    let mut failures = Vec::new();
    for case in cases {
        let before = counters();
        let mut output = vec![0u8; case.input.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&case.input),
                data_out: Some(&mut output),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", case.name));
        let moved = counters().since(&before);
        output.truncate(result.data_size_out as usize);

        let mut problems = Vec::new();
        if result.return_value != case.verdict {
            problems.push(format!(
                "verdict {} (want {})",
                verdict(result.return_value),
                verdict(case.verdict)
            ));
        }
        if moved != case.counters {
            problems.push(format!("counters {moved:?} (want {:?})", case.counters));
        }
        if let Some(want) = &case.output
            && output != *want
        {
            problems.push(frame_differences(&output, want));
        }
        if !problems.is_empty() {
            failures.push(format!("  {}: {}", case.name, problems.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Runs every case through the shield of `datapath`, watching its counters.
pub fn run_shield(datapath: &Datapath, cases: &[Case<Moved>]) {
    run(
        datapath.program().unwrap(),
        || datapath.counters().unwrap().counters,
        cases,
    );
}

/// Where the frame that came out differs from the one expected: each run of
/// differing offsets, with the bytes of both there.
fn frame_differences(got: &[u8], want: &[u8]) -> String {
    let offsets: Vec<usize> = (0..got.len().max(want.len()))
        .filter(|&i| got.get(i) != want.get(i))
        .collect();
    let mut message = format!(
        "frame out of {} bytes (want {}) differs",
        got.len(),
        want.len()
    );
    for run in offsets.chunk_by(|a, b| a + 1 == *b) {
        let (start, end) = (run[0], run[run.len() - 1] + 1);
        let bytes = |frame: &[u8]| frame[start.min(frame.len())..end.min(frame.len())].to_vec();
        message += &format!(
            "\n      at {start}..{end}: {:02x?} (want {:02x?})",
            bytes(got),
            bytes(want)
        );
    }
    message
}
