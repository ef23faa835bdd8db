//! How every daemon logs: to stderr, as text for people or as JSON lines
//! for a log pipeline, filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// The variable that sets the log format when `--log-format` is not given.
pub const LOG_FORMAT_ENV: &str = "TIDEGATE_LOG_FORMAT";

/// The form of the log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `fields` (the event's, `message` among them) and the spans.
    Json,
}

/// The daemons' logging flag, flattened into each one's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// How log lines are written to stderr: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, env = LOG_FORMAT_ENV, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Installs the process's one subscriber: events at `RUST_LOG`'s levels
/// (`info` when it is unset or invalid) to stderr, in `format`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
}
