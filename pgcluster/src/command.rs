//! Runs PostgreSQL's tools as the cluster's user, optionally inside a
//! network namespace, and turns failures into errors that name the command.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::ClusterError;

/// How every command of one cluster is run.
#[derive(Debug)]
pub(crate) struct Runner {
    /// PostgreSQL's binaries.
    pub bindir: PathBuf,
    /// Run through `runuser -u postgres --` (this process is root).
    pub as_postgres: bool,
    /// The working directory: the cluster's own, which its user can enter.
    pub dir: PathBuf,
}

impl Runner {
    /// `tool` from [`Runner::bindir`] with `args`, as the cluster's user,
    /// under `ip netns exec netns` when given.
    pub fn command<I, S>(&self, tool: &str, args: I, netns: Option<&str>) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut line: Vec<OsString> = Vec::new();
        if let Some(netns) = netns {
            line.extend(["ip", "netns", "exec", netns].map(OsString::from));
        }
        if self.as_postgres {
            line.extend(["runuser", "-u", "postgres", "--"].map(OsString::from));
        }
        line.push(self.bindir.join(tool).into_os_string());
        line.extend(args.into_iter().map(Into::into));
        let mut command = Command::new(&line[0]);
        command
            .args(&line[1..])
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        // The cluster is named by explicit flags only: a PGHOST, PGPORT or
        // PGDATA from the caller's environment must not redirect a tool.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
    }
}

/// Runs `command` to completion; its standard output on success, else an
/// error with the command line and what it printed.
pub(crate) fn run(command: &mut Command) -> Result<String, ClusterError> {
    let output = command.output().map_err(|source| ClusterError::Spawn {
        command: display(command),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut said = stderr.trim().to_owned();
    if said.is_empty() {
        said = stdout.trim().to_owned();
    }
    Err(ClusterError::Command {
        command: display(command),
        status: output.status,
        stderr: said,
    })
}

/// The command line as a shell would show it.
pub(crate) fn display(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| {
            let part = part.to_string_lossy();
            if part.is_empty() || part.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", part.replace('\'', r"'\''"))
            } else {
                part.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `lines` lines of the file at `path`, or why it could not be read.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(could not read it: {error})"),
    }
}
