//! NGINX as a UDP stream proxy in a namespace, the way one would steer
//! WireGuard without XDP: `hash $remote_addr consistent` over the backends,
//! one session per client. The steering benchmark's baseline. Debian's
//! `nginx` and `libnginx-mod-stream` (`cargo xtask bench steer` installs
//! them).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::process::Process;
use crate::wait::{Probe, poll_until};

/// The binary, on PATH.
pub const NGINX_BIN: &str = "nginx";
/// Debian's stream module.
pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";
/// How long NGINX gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy is made of.
#[derive(Debug, Clone)]
pub struct StreamProxy {
    /// Where it listens (UDP).
    pub listen: SocketAddr,
    /// The upstream servers.
    pub backends: Vec<SocketAddr>,
    /// The CPU its one worker runs on.
    pub worker_cpu: usize,
}

impl StreamProxy {
    /// `nginx.conf` for this proxy, with pid file and error log in `dir`.
    pub fn config(&self, dir: &Path) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "load_module {STREAM_MODULE};");
        let _ = writeln!(out, "worker_processes 1;");
        // A mask, rightmost digit CPU 0.
        let mut mask = "1".to_owned();
        mask.push_str(&"0".repeat(self.worker_cpu));
        let _ = writeln!(out, "worker_cpu_affinity {mask};");
        let _ = writeln!(out, "pid {};", dir.join("nginx.pid").display());
        let _ = writeln!(
            out,
            "error_log {} notice;",
            dir.join("nginx-error.log").display()
        );
        let _ = writeln!(out, "events {{ worker_connections 4096; }}");
        let _ = writeln!(out, "stream {{");
        let _ = writeln!(out, "    upstream backends {{");
        let _ = writeln!(out, "        hash $remote_addr consistent;");
        for backend in &self.backends {
            let _ = writeln!(out, "        server {backend};");
        }
        let _ = writeln!(out, "    }}");
        let _ = writeln!(out, "    server {{");
        let _ = writeln!(out, "        listen {} udp;", self.listen);
        let _ = writeln!(out, "        proxy_pass backends;");
        let _ = writeln!(out, "        proxy_timeout 60s;");
        let _ = writeln!(out, "    }}");
        let _ = writeln!(out, "}}");
        out
    }

    /// Writes the config to `dir` and starts NGINX in the foreground in
    /// `netns`; returns once its socket listens.
    pub fn start(&self, netns: &Netns, dir: &Path) -> Result<StreamNginx> {
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, self.config(dir))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut command = netns.command(NGINX_BIN);
        command
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]);
        let mut process = Process::spawn(NGINX_BIN, netns, command, &dir.join("nginx.log"))?;
        let port = self.listen.port();
        let what = format!("nginx to listen on {}", self.listen);
        poll_until(&what, START_TIMEOUT, Duration::from_millis(50), || {
            process.ensure_running()?;
            let out = netns.exec_ok("ss", &["-Hlun", &format!("sport = :{port}")])?;
            Ok(if out.trim().is_empty() {
                Probe::NotYet("no listening socket".into())
            } else {
                Probe::Ready(())
            })
        })?;
        let master = process.pid();
        Ok(StreamNginx {
            process,
            master,
            dir: dir.to_owned(),
        })
    }
}

/// A running NGINX, stopped (SIGTERM to its master) on drop.
#[derive(Debug)]
pub struct StreamNginx {
    process: Process,
    master: u32,
    dir: PathBuf,
}

impl StreamNginx {
    /// The pids of its worker processes: the master's children.
    pub fn workers(&self) -> Result<Vec<u32>> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.master))
            .with_context(|| format!("reading the children of nginx {}", self.master))?;
        let workers: Vec<u32> = children
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("parsing child pids")?;
        if workers.is_empty() {
            bail!("nginx {} has no worker process", self.master);
        }
        Ok(workers)
    }

    /// Its error log, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx-error.log")).unwrap_or_default()
    }

    /// Stops it and returns once it has exited.
    pub fn stop(mut self) -> Result<()> {
        let status = self.process.stop()?;
        if !status.success() {
            bail!("nginx exited {status}: {}", self.error_log());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hashes_clients_over_the_backends() {
        let proxy = StreamProxy {
            listen: "198.51.100.100:51820".parse().unwrap(),
            backends: vec![
                "198.51.100.3:51820".parse().unwrap(),
                "198.51.100.4:51820".parse().unwrap(),
            ],
            worker_cpu: 1,
        };
        let conf = proxy.config(Path::new("/run/x"));
        for line in [
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
            "worker_cpu_affinity 10;",
            "pid /run/x/nginx.pid;",
            "hash $remote_addr consistent;",
            "server 198.51.100.3:51820;",
            "server 198.51.100.4:51820;",
            "listen 198.51.100.100:51820 udp;",
        ] {
            assert!(conf.contains(line), "{line} missing from:\n{conf}");
        }
    }
}
