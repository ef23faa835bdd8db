//! `tidectl`: the operator's command line for a Tidegate gateway.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tidegate_common::stats::Counter;
use tidegate_gateway::{
    config::DEFAULT_CONTROL_SOCKET,
    control::{CountersReply, Reply, Request, client},
    error_chain,
    xdp::PacketCount,
};

/// Operate a Tidegate gateway through its local control socket (root only).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The gateway daemon's control socket.
    #[arg(long, env = "TIDEGATE_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The XDP shield's packet counters, by verdict and reason.
    Counters {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidectl: {}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Counters { json } => {
            let Reply::Counters(reply) = client::request(&cli.socket, &Request::Counters)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", counters_table(&reply));
            }
        }
    }
    Ok(())
}

fn counters_table(reply: &CountersReply) -> String {
    use std::fmt::Write as _;

    let mut out = format!(
        "XDP shield on {} ({} mode)\n\n",
        reply.interface, reply.xdp_mode
    );
    let row = |out: &mut String, verdict: &str, name: &str, count: PacketCount| {
        let _ = writeln!(
            out,
            "{verdict:<8} {name:<16} {:>14} {:>16}",
            count.packets, count.bytes
        );
    };
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:>14} {:>16}",
        "VERDICT", "COUNTER", "PACKETS", "BYTES"
    );
    for counter in Counter::ALL {
        let verdict = counter.verdict().name();
        row(
            &mut out,
            verdict,
            counter.name(),
            reply.snapshot.get(counter),
        );
    }
    out.push('\n');
    let totals = &reply.snapshot.totals;
    row(&mut out, "total", "pass", totals.pass);
    row(&mut out, "total", "drop", totals.drop);
    row(&mut out, "total", "aborted", totals.aborted);
    row(&mut out, "total", "wireguard", totals.wireguard);
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use tidegate_gateway::xdp::{AttachMode, CounterSnapshot};

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn table_lists_every_counter_and_the_totals() {
        let snapshot = CounterSnapshot::from_values(Counter::ALL.iter().map(|&c| {
            let n = c as u64 + 1;
            (
                c,
                PacketCount {
                    packets: n,
                    bytes: n * 100,
                },
            )
        }));
        let table = counters_table(&CountersReply {
            interface: "eth0".into(),
            xdp_mode: AttachMode::Driver,
            snapshot,
        });
        assert!(table.starts_with("XDP shield on eth0 (driver mode)"));
        for counter in Counter::ALL {
            assert!(table.contains(counter.name()), "{table}");
        }
        let bad_type = table.lines().find(|l| l.contains("bad-type")).unwrap();
        assert_eq!(
            bad_type.split_whitespace().collect::<Vec<_>>(),
            ["drop", "bad-type", "9", "900"]
        );
    }
}
