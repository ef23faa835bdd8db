//! Running short external commands (`ip`, `wg`, `ping`, `tidectl`) with a
//! time limit, capturing their output.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Time limit for configuration commands (`ip`, `wg`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// How often [`run_bounded`] checks whether the command has finished.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The result of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// `Ok(stdout)` if the command exited 0, else an error with its status,
    /// stdout and stderr.
    pub fn into_success(self) -> Result<String> {
        if self.status.success() {
            return Ok(self.stdout);
        }
        let mut msg = format!("`{}` failed ({})", self.command, self.status);
        for (label, text) in [("stderr", &self.stderr), ("stdout", &self.stdout)] {
            let text = text.trim();
            if !text.is_empty() {
                let _ = write!(msg, "\n{label}:\n{text}");
            }
        }
        bail!(msg)
    }
}

/// The command line of `cmd` as one string, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion, killing it if it takes longer than `timeout`
/// (stretched to the machine's speed, see [`crate::pace`]).
///
/// Standard input is closed; standard output and error are captured. An
/// error means the command could not start or was killed on timeout; a
/// non-zero exit is returned as a [`CmdOutput`] for the caller to judge.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    run_with_input(cmd, None, timeout)
}

/// Like [`run_bounded`], but writes `input` to the command's standard input
/// (then closes it) instead of leaving it closed.
pub fn run_with_input(
    cmd: &mut Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<CmdOutput> {
    let command = describe(cmd);
    let timeout = crate::pace::stretch(timeout);
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{command}`"))?;
    if let (Some(input), Some(mut pipe)) = (input, child.stdin.take()) {
        // A writer thread: a command that never reads cannot block us, and
        // the pipe closes when the thread ends.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let start = Instant::now();
    let max_polls = timeout.as_millis() / POLL_INTERVAL.as_millis() + 1;
    let mut status = None;
    for _ in 0..max_polls {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for `{command}`"))?
        {
            status = Some(s);
            break;
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let Some(status) = status else {
        // Our own child, not yet reaped: the pid cannot have been reused.
        let _ = child.kill();
        let _ = child.wait();
        let out = join(stdout);
        let err = join(stderr);
        bail!(
            "`{command}` did not finish within {timeout:?} and was killed\nstdout:\n{}\nstderr:\n{}",
            out.trim(),
            err.trim()
        );
    };
    Ok(CmdOutput {
        command,
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// Runs `cmd` with `timeout` and returns its stdout, or an error naming the
/// command with its output if it failed.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    run_bounded(cmd, timeout)?.into_success()
}

/// Reads a pipe to its end on a separate thread so that a chatty command
/// never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    })
}

/// The text a [`drain`] thread collected.
fn join(handle: Option<JoinHandle<Vec<u8>>>) -> String {
    handle
        .and_then(|h| h.join().ok())
        .map(|buf| String::from_utf8_lossy(&buf).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run_bounded(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.status.code(), Some(3));
        let err = out.into_success().unwrap_err().to_string();
        assert!(err.contains("sh -c echo out"), "{err}");
        assert!(err.contains("err"), "{err}");
    }

    #[test]
    fn kills_a_command_that_overruns() {
        let start = Instant::now();
        let err = run_bounded(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not finish within"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn feeds_standard_input() {
        let out = run_with_input(
            &mut Command::new("cat"),
            Some(b"fed\n".to_vec()),
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.stdout, "fed\n");
    }

    #[test]
    fn run_ok_returns_stdout() {
        assert_eq!(
            run_ok(Command::new("echo").arg("hello"), DEFAULT_TIMEOUT).unwrap(),
            "hello\n"
        );
    }
}
