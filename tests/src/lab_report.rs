//! The lab's report: what each client's probes saw in a stretch of time,
//! the figures of every step as a text table, and an SVG picture of every
//! client's answers over the run with the events marked. Pure: fed with
//! the probers' summaries, tested without privileges.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::probe::ProbeSummary;

/// What one client's probes saw between two instants.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Probes sent in the window.
    pub sent: u64,
    /// Of those, lost.
    pub lost: u64,
    /// The longest silence a loss run touching the window made: one
    /// interval per lost probe, plus the one before the next answer.
    pub longest_gap_ms: f64,
    /// The gateways that answered, in order, each once per stretch.
    pub answered_by: Vec<u32>,
}

impl Window {
    /// What `summary` saw from `from_unix_ms` to `to_unix_ms`.
    pub fn of(summary: &ProbeSummary, from_unix_ms: u64, to_unix_ms: u64) -> Self {
        let start = summary.started_unix_ms as f64;
        let interval = summary.interval_ms;
        let (from, to) = (from_unix_ms as f64, to_unix_ms as f64);
        let mut window = Self {
            sent: 0,
            lost: 0,
            longest_gap_ms: 0.0,
            answered_by: Vec::new(),
        };
        for run in &summary.runs {
            let run_from = start + run.from_ms;
            let run_to = run_from + run.count as f64 * interval;
            if run_to <= from || run_from >= to {
                continue;
            }
            // The run's probes sent inside the window.
            let first = ((from - run_from) / interval).ceil().max(0.0) as u64;
            let past = ((to - run_from) / interval).ceil().min(run.count as f64) as u64;
            let inside = past.saturating_sub(first);
            window.sent += inside;
            match run.gateway {
                None => {
                    window.lost += inside;
                    let gap = (run.count + 1) as f64 * interval;
                    window.longest_gap_ms = window.longest_gap_ms.max(gap);
                }
                Some(gateway) => {
                    if inside > 0 && window.answered_by.last() != Some(&gateway) {
                        window.answered_by.push(gateway);
                    }
                }
            }
        }
        window
    }
}

/// One line of the final table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    pub step: String,
    pub what: String,
    pub value: String,
}

impl Figure {
    pub fn new(step: &str, what: &str, value: impl Into<String>) -> Self {
        Self {
            step: step.to_owned(),
            what: what.to_owned(),
            value: value.into(),
        }
    }
}

/// The figures as an aligned text table, the step named once per group.
pub fn table(figures: &[Figure]) -> String {
    let step_width = figures
        .iter()
        .map(|f| f.step.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let what_width = figures
        .iter()
        .map(|f| f.what.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<step_width$}  {:<what_width$}  value",
        "step", "figure"
    );
    let _ = writeln!(
        out,
        "{}  {}  {}",
        "-".repeat(step_width),
        "-".repeat(what_width),
        "-".repeat(5)
    );
    let mut last_step = None;
    for figure in figures {
        let step = if last_step == Some(&figure.step) {
            ""
        } else {
            figure.step.as_str()
        };
        last_step = Some(&figure.step);
        let _ = writeln!(
            out,
            "{step:<step_width$}  {:<what_width$}  {}",
            figure.what, figure.value
        );
    }
    out
}

/// One client's row in the picture.
#[derive(Debug, Clone)]
pub struct Lane {
    pub label: String,
    pub summary: ProbeSummary,
}

/// An event marked across the picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub at_unix_ms: u64,
    pub label: String,
}

/// Colours of the gateways that answer, by gateway number (cycled).
const COLOURS: [&str; 6] = [
    "#4c78a8", "#59a14f", "#b07aa1", "#f28e2b", "#76b7b2", "#edc948",
];
/// Lost probes.
const LOST: &str = "#e15759";
const LABEL_WIDTH: f64 = 120.0;
const PLOT_WIDTH: f64 = 960.0;
const LANE_HEIGHT: f64 = 14.0;
const LANE_GAP: f64 = 3.0;
const TOP: f64 = 60.0;

fn colour(gateway: u32) -> &'static str {
    COLOURS[gateway.saturating_sub(1) as usize % COLOURS.len()]
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The picture: one lane per client, coloured by the gateway answering
/// its probes, red where they were lost, blank where nothing probed; a
/// dashed line per event; a time axis in seconds; a legend naming the
/// gateways (`names`: number to name).
pub fn svg(title: &str, lanes: &[Lane], marks: &[Mark], names: &BTreeMap<u32, String>) -> String {
    let begin = lanes
        .iter()
        .map(|l| l.summary.started_unix_ms)
        .chain(marks.iter().map(|m| m.at_unix_ms))
        .min()
        .unwrap_or(0) as f64;
    let end = lanes
        .iter()
        .map(|l| {
            let s = &l.summary;
            s.started_unix_ms as f64 + s.sent as f64 * s.interval_ms
        })
        .chain(marks.iter().map(|m| m.at_unix_ms as f64))
        .fold(begin + 1.0, f64::max);
    let span = end - begin;
    let x = |unix_ms: f64| LABEL_WIDTH + (unix_ms - begin) / span * PLOT_WIDTH;
    let lanes_height = lanes.len() as f64 * (LANE_HEIGHT + LANE_GAP);
    let axis_y = TOP + lanes_height + 6.0;
    let legend_y = axis_y + 34.0;
    let height = legend_y + 20.0;
    let width = LABEL_WIDTH + PLOT_WIDTH + 20.0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="8" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (row, lane) in lanes.iter().enumerate() {
        let y = TOP + row as f64 * (LANE_HEIGHT + LANE_GAP);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_WIDTH - 6.0,
            y + LANE_HEIGHT - 3.0,
            escape(&lane.label)
        );
        let s = &lane.summary;
        for run in &s.runs {
            let from = s.started_unix_ms as f64 + run.from_ms;
            let to = from + run.count as f64 * s.interval_ms;
            let (fill, what) = match run.gateway {
                Some(g) => (
                    colour(g),
                    names
                        .get(&g)
                        .cloned()
                        .unwrap_or_else(|| format!("gateway {g}")),
                ),
                None => (LOST, "lost".to_owned()),
            };
            let _ = writeln!(
                out,
                r#"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{LANE_HEIGHT}" fill="{fill}"><title>{}: {} probes, {:.0} ms</title></rect>"#,
                x(from),
                (x(to) - x(from)).max(0.5),
                escape(&what),
                run.count,
                run.count as f64 * s.interval_ms
            );
        }
    }
    // The time axis: a tick every few seconds.
    let step_s = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0]
        .into_iter()
        .find(|s| span / 1000.0 / s <= 15.0)
        .unwrap_or(120.0);
    let _ = writeln!(
        out,
        r##"<line x1="{LABEL_WIDTH}" y1="{axis_y:.1}" x2="{:.1}" y2="{axis_y:.1}" stroke="#333"/>"##,
        LABEL_WIDTH + PLOT_WIDTH
    );
    let mut tick = 0.0;
    while tick * 1000.0 <= span {
        let tx = x(begin + tick * 1000.0);
        let _ = writeln!(
            out,
            r##"<line x1="{tx:.1}" y1="{axis_y:.1}" x2="{tx:.1}" y2="{:.1}" stroke="#333"/><text x="{tx:.1}" y="{:.1}" text-anchor="middle">{tick:.0} s</text>"##,
            axis_y + 4.0,
            axis_y + 16.0
        );
        tick += step_s;
    }
    // The events, their labels staggered over three rows.
    for (i, mark) in marks.iter().enumerate() {
        let mx = x(mark.at_unix_ms as f64);
        let ty = TOP - 28.0 + (i % 3) as f64 * 12.0;
        // Labels near the right edge end at their line.
        let (tx, anchor) = if mx > LABEL_WIDTH + 0.8 * PLOT_WIDTH {
            (mx - 2.0, "end")
        } else {
            (mx + 2.0, "start")
        };
        let _ = writeln!(
            out,
            r##"<line x1="{mx:.1}" y1="{:.1}" x2="{mx:.1}" y2="{axis_y:.1}" stroke="#222" stroke-dasharray="4 3"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="{anchor}">{}</text>"##,
            ty + 2.0,
            escape(&mark.label)
        );
    }
    // The legend.
    let mut lx = LABEL_WIDTH;
    let entries = names
        .iter()
        .map(|(g, name)| (colour(*g), name.as_str()))
        .chain(std::iter::once((LOST, "lost")));
    for (fill, name) in entries {
        let _ = writeln!(
            out,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{fill}"/><text x="{:.1}" y="{legend_y:.1}">{}</text>"#,
            legend_y - 10.0,
            lx + 16.0,
            escape(name)
        );
        lx += 30.0 + name.len() as f64 * 7.0;
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ProbeRecord;
    use std::time::Duration;

    const START: u64 = 1_700_000_000_000;

    /// Probes every 10 ms: `pattern` gives each one's answering gateway
    /// (0: lost).
    fn summary(pattern: &[u32]) -> ProbeSummary {
        let records: Vec<ProbeRecord> = pattern
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                let sent = Duration::from_millis(10 * i as u64);
                ProbeRecord {
                    sent,
                    answer: (g > 0).then_some((g, sent + Duration::from_millis(1))),
                    duplicates: 0,
                }
            })
            .collect();
        ProbeSummary::compute(&records, Duration::from_millis(10), START)
    }

    #[test]
    fn a_window_counts_only_its_own_probes() {
        // 10 answered by 1, 5 lost, 10 answered by 2.
        let pattern: Vec<u32> = [vec![1; 10], vec![0; 5], vec![2; 10]].concat();
        let s = summary(&pattern);
        let cases = [
            // (from, to) in ms since start -> (sent, lost, gap, answered by)
            ((0, 250), (25, 5, 60.0, vec![1, 2])),
            ((0, 100), (10, 0, 0.0, vec![1])),
            ((100, 150), (5, 5, 60.0, vec![])),
            ((120, 200), (8, 3, 60.0, vec![2])),
            ((150, 250), (10, 0, 0.0, vec![2])),
            ((300, 400), (0, 0, 0.0, vec![])),
        ];
        for ((from, to), (sent, lost, gap, by)) in cases {
            let w = Window::of(&s, START + from, START + to);
            assert_eq!(
                (w.sent, w.lost, w.longest_gap_ms, w.answered_by),
                (sent, lost, gap, by),
                "window {from}..{to}"
            );
        }
    }

    #[test]
    fn the_table_aligns_and_names_each_step_once() {
        let text = table(&[
            Figure::new("crash", "detection", "310 ms"),
            Figure::new("crash", "worst gap", "620 ms"),
            Figure::new("drain", "lost", "0"),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "step   figure     value");
        assert_eq!(lines[2], "crash  detection  310 ms");
        assert_eq!(lines[3], "       worst gap  620 ms");
        assert_eq!(lines[4], "drain  lost       0");
    }

    #[test]
    fn the_picture_draws_every_run_event_and_gateway() {
        let lanes = vec![
            Lane {
                label: "user<1>".into(),
                summary: summary(&[1, 1, 0, 0, 2]),
            },
            Lane {
                label: "user2".into(),
                summary: summary(&[2, 2, 2, 2, 2]),
            },
        ];
        let marks = vec![Mark {
            at_unix_ms: START + 20,
            label: "gw1 crashed".into(),
        }];
        let names = BTreeMap::from([(1, "gw1".to_owned()), (2, "gw2".to_owned())]);
        let picture = svg("lab & run", &lanes, &marks, &names);
        assert!(picture.starts_with("<svg "));
        assert!(picture.trim_end().ends_with("</svg>"));
        // Three runs in the first lane, one in the second.
        assert_eq!(picture.matches("<rect x=").count(), 4 + 3, "{picture}");
        assert_eq!(
            picture.matches(LOST).count(),
            2,
            "a lost run and its legend"
        );
        assert!(picture.contains("gw1 crashed"));
        assert!(picture.contains("user&lt;1&gt;") && picture.contains("lab &amp; run"));
        assert!(picture.contains(">gw2</text>"));
    }
}
