//! The HA epoch: the number that opens every (epoch, sequence) pair this
//! gateway sends, new at each daemon start and only ever growing, across
//! restarts and wall-clock steps alike.
//!
//! The other gateways refuse an (epoch, sequence) at or below the last one
//! they accepted from a sender, for as long as they run (the replay guard).
//! An epoch taken from the wall clock alone would repeat or fall after the
//! clock steps back (NTP correcting a fast clock, a wrong RTC at boot): the
//! restarted gateway would go unheard, and, if it outranks the master, take
//! the VIPs over unheard. So the last epoch is kept in the state directory
//! ([`FILE_NAME`]), and the next one is the wall clock in milliseconds or
//! the last one plus one, whichever is higher ([`next`]). It is written
//! durably (a temporary file synced, renamed over the old one, the
//! directory synced) before any advert carries it; a file that cannot be
//! read, parsed or written stops the daemon, since an epoch that might
//! repeat is a hole for replayed adverts.
//!
//! The file is one decimal number and a newline. Without it (a first start,
//! a lost state directory) the epoch is the wall clock, which the others
//! accept if the clock is not behind this gateway's earlier starts; if it
//! is, they refuse its adverts until they restart or the clock passes the
//! old epoch, unless the operator writes the last epoch plus one (each
//! start logs its epoch) into the file.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::sharing::wire::unix_ms;

/// The epoch file's name in the gateway's state directory.
pub const FILE_NAME: &str = "ha-epoch";
/// The longest content a valid file can have: `u64::MAX` and a newline.
const MAX_LEN: usize = 21;

/// The epoch could not be chosen or kept.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("HA epoch file {path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "HA epoch file {path} is corrupt ({reason}): it must hold one decimal number and a \
         newline. Remove it if the wall clock is right (the epoch then comes from the clock), \
         else write the epoch this gateway last used plus one (its log says \"HA epoch\")"
    )]
    Malformed { path: PathBuf, reason: &'static str },
    #[error("HA epoch file {path}: the last epoch {last} leaves no room to grow")]
    Exhausted { path: PathBuf, last: u64 },
}

/// The file's content for `epoch`.
pub fn render(epoch: u64) -> String {
    format!("{epoch}\n")
}

/// The epoch in the file `path` holding `text`.
pub fn parse(path: &Path, text: &str) -> Result<u64, EpochError> {
    let malformed = |reason| EpochError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let digits = text.strip_suffix('\n').ok_or_else(|| {
        malformed(if text.is_empty() {
            "empty"
        } else {
            "no final newline"
        })
    })?;
    if digits.is_empty() {
        return Err(malformed("no number"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("not a decimal number"));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(malformed("a leading zero"));
    }
    digits
        .parse()
        .map_err(|_| malformed("a number too large for 64 bits"))
}

/// The epoch of a start at `now_ms` (Unix ms on the wall clock), after
/// `last` (the epoch of the previous start, if any): the clock, unless it
/// is not above `last`; then `last + 1`.
pub fn next(path: &Path, now_ms: u64, last: Option<u64>) -> Result<u64, EpochError> {
    match last {
        None => Ok(now_ms),
        Some(last) => last
            .checked_add(1)
            .map(|after| after.max(now_ms))
            .ok_or_else(|| EpochError::Exhausted {
                path: path.to_owned(),
                last,
            }),
    }
}

/// The epoch file in `state_dir`.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// What [`advance`] chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advanced {
    /// This start's epoch, on disk now.
    pub epoch: u64,
    /// The previous start's, if the file was there.
    pub last: Option<u64>,
    /// The wall clock it was chosen at (Unix ms).
    pub clock_ms: u64,
}

/// Chooses this start's epoch from the wall clock `now` and the file in
/// `state_dir` (created with the directory, mode 0700, if missing) and
/// writes it there durably. Returns once it is on disk.
pub fn advance(state_dir: &Path, now: SystemTime) -> Result<Advanced, EpochError> {
    let path = path_in(state_dir);
    let io = |op| {
        let path = path.clone();
        move |source| EpochError::Io { op, path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(io("creating its directory"))?;
    let last = match read_bounded(&path) {
        Ok(text) => Some(parse(&path, &text)?),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => return Err(io("reading")(error)),
    };
    let clock_ms = unix_ms(now);
    let epoch = next(&path, clock_ms, last)?;
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating its temporary file"))?;
    file.write_all(render(epoch).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("writing its temporary file"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io("renaming its temporary file over it"))?;
    File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io("syncing its directory"))?;
    Ok(Advanced {
        epoch,
        last,
        clock_ms,
    })
}

/// The file's text, or an `InvalidData` error past [`MAX_LEN`] bytes or
/// if it is not UTF-8.
fn read_bounded(path: &Path) -> io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_LEN as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {MAX_LEN} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PATH: &str = "/var/lib/tidegate/ha-epoch";

    #[test]
    fn next_is_the_clock_unless_it_is_not_above_the_last() {
        struct Case {
            name: &'static str,
            now_ms: u64,
            last: Option<u64>,
            expect: Option<u64>,
        }
        let cases = [
            Case {
                name: "first start: the clock",
                now_ms: 1_700_000_000_000,
                last: None,
                expect: Some(1_700_000_000_000),
            },
            Case {
                name: "first start, clock before 1970: zero",
                now_ms: 0,
                last: None,
                expect: Some(0),
            },
            Case {
                name: "clock ahead of the last: the clock",
                now_ms: 1_700_000_005_000,
                last: Some(1_700_000_000_000),
                expect: Some(1_700_000_005_000),
            },
            Case {
                name: "clock stepped back an hour: last + 1",
                now_ms: 1_699_996_400_000,
                last: Some(1_700_000_000_000),
                expect: Some(1_700_000_000_001),
            },
            Case {
                name: "clock equal to the last: last + 1",
                now_ms: 1_700_000_000_000,
                last: Some(1_700_000_000_000),
                expect: Some(1_700_000_000_001),
            },
            Case {
                name: "clock one above the last: the clock",
                now_ms: 1_700_000_000_001,
                last: Some(1_700_000_000_000),
                expect: Some(1_700_000_000_001),
            },
            Case {
                name: "clock at zero after starts: last + 1",
                now_ms: 0,
                last: Some(5),
                expect: Some(6),
            },
            Case {
                name: "the last possible epoch: no room",
                now_ms: 1_700_000_000_000,
                last: Some(u64::MAX),
                expect: None,
            },
            Case {
                name: "one below the last possible: the last possible",
                now_ms: 0,
                last: Some(u64::MAX - 1),
                expect: Some(u64::MAX),
            },
        ];
        for case in cases {
            let got = next(Path::new(PATH), case.now_ms, case.last);
            match (case.expect, got) {
                (Some(expect), Ok(got)) => assert_eq!(got, expect, "{}", case.name),
                (None, Err(EpochError::Exhausted { last, .. })) => {
                    assert_eq!(Some(last), case.last, "{}", case.name);
                }
                (expect, got) => panic!("{}: expected {expect:?}, got {got:?}", case.name),
            }
        }
    }

    #[test]
    fn parse_takes_one_decimal_number_and_a_newline() {
        let cases: [(&str, Result<u64, &str>); 14] = [
            ("1700000000000\n", Ok(1_700_000_000_000)),
            ("0\n", Ok(0)),
            ("18446744073709551615\n", Ok(u64::MAX)),
            ("", Err("empty")),
            ("\n", Err("no number")),
            ("1700000000000", Err("no final newline")),
            ("1700000000000\n\n", Err("not a decimal number")),
            (" 17\n", Err("not a decimal number")),
            ("+17\n", Err("not a decimal number")),
            ("-17\n", Err("not a decimal number")),
            ("17.5\n", Err("not a decimal number")),
            ("0x11\n", Err("not a decimal number")),
            ("017\n", Err("a leading zero")),
            (
                "18446744073709551616\n",
                Err("a number too large for 64 bits"),
            ),
        ];
        for (text, expect) in cases {
            match (parse(Path::new(PATH), text), expect) {
                (Ok(got), Ok(expect)) => assert_eq!(got, expect, "{text:?}"),
                (Err(EpochError::Malformed { path, reason }), Err(expect)) => {
                    assert_eq!(reason, expect, "{text:?}");
                    assert_eq!(path, Path::new(PATH));
                }
                (got, expect) => panic!("{text:?}: expected {expect:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn what_is_rendered_parses_back() {
        for epoch in [0, 1, 1_700_000_000_000, u64::MAX] {
            assert_eq!(parse(Path::new(PATH), &render(epoch)).unwrap(), epoch);
        }
    }

    #[test]
    fn a_corrupt_file_is_named_in_the_error() {
        let error = parse(Path::new(PATH), "garbage\n").unwrap_err();
        let message = error.to_string();
        assert!(message.contains(PATH), "{message}");
        assert!(message.contains("not a decimal number"), "{message}");
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn advance_grows_across_starts_whatever_the_clock_does() {
        let dir = tempfile::tempdir().unwrap();
        // The directory is created when missing (no [wireguard] made it).
        let state = dir.path().join("state");
        let starts = [
            (1_700_000_000_000, None, 1_700_000_000_000),
            (
                1_700_000_010_000,
                Some(1_700_000_000_000),
                1_700_000_010_000,
            ),
            // The clock stepped back an hour, then did not move.
            (
                1_699_996_410_000,
                Some(1_700_000_010_000),
                1_700_000_010_001,
            ),
            (
                1_699_996_410_000,
                Some(1_700_000_010_001),
                1_700_000_010_002,
            ),
            // It caught up.
            (
                1_700_000_020_000,
                Some(1_700_000_010_002),
                1_700_000_020_000,
            ),
        ];
        for (now, last, epoch) in starts {
            let advanced = advance(&state, at(now)).unwrap();
            let expect = Advanced {
                epoch,
                last,
                clock_ms: now,
            };
            assert_eq!(advanced, expect, "start at {now}");
            let text = fs::read_to_string(path_in(&state)).unwrap();
            assert_eq!(text, render(epoch));
        }
        assert!(!path_in(&state).with_extension("tmp").exists());
    }

    #[test]
    fn advance_refuses_a_corrupt_or_oversized_file_and_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        fs::write(&path, "twelve\n").unwrap();
        match advance(dir.path(), at(1_700_000_000_000)) {
            Err(EpochError::Malformed { path: named, .. }) => assert_eq!(named, path),
            other => panic!("expected Malformed, got {other:?}"),
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "twelve\n");
        fs::write(&path, "1".repeat(40)).unwrap();
        match advance(dir.path(), at(1_700_000_000_000)) {
            Err(EpochError::Io {
                op: "reading",
                path: named,
                source,
            }) => {
                assert_eq!(named, path);
                assert_eq!(source.kind(), io::ErrorKind::InvalidData);
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn advance_fails_naming_the_file_when_it_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        // The state "directory" is a file: nothing can be created in it.
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, "").unwrap();
        let error = advance(&blocker, at(1_700_000_000_000)).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&path_in(&blocker).display().to_string()),
            "{message}"
        );
    }
}
