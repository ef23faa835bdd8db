//! A real nginx in front of several Edges, as operators run it: its own
//! config, pid, logs and temp directories in a directory of the run,
//! started inside a namespace, passing each request to one Edge and on to
//! the next when an Edge refuses the connection (a dead Edge costs no
//! request that was not in flight on it).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::http::{self, HttpAnswer};
use crate::netns::Netns;
use crate::process::{LOG_TAIL_LINES, Process};
use crate::wait::{Probe, poll_until};

/// The nginx binary (Debian's `nginx` package; `cargo xtask test` installs it).
pub const NGINX_BIN: &str = "nginx";

/// How long nginx gets to answer on its address.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running nginx.
#[derive(Debug)]
pub struct Nginx {
    process: Process,
    netns: Netns,
    listen: SocketAddr,
    dir: PathBuf,
}

/// An HTTPS listener beside the plain one: its address, certificate and key.
#[derive(Debug, Clone)]
pub struct NginxTls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// nginx's config: one upstream of `edges`, retried on connection errors
/// and time-outs, the client's address in X-Real-IP; HTTPS too with `tls`.
pub fn config(
    dir: &Path,
    listen: SocketAddr,
    edges: &[SocketAddr],
    tls: Option<&NginxTls>,
) -> String {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let mut upstreams = String::new();
    for edge in edges {
        // One failed connection takes an Edge out of the rotation for a
        // while; requests go to the others meanwhile.
        let _ = writeln!(
            upstreams,
            "        server {edge} max_fails=1 fail_timeout=5s;"
        );
    }
    format!(
        "daemon off;\n\
         master_process on;\n\
         user root;\n\
         worker_processes 1;\n\
         pid {pid};\n\
         error_log {error_log} info;\n\
         events {{\n    worker_connections 256;\n}}\n\
         http {{\n\
         \x20   access_log {access_log};\n\
         \x20   client_body_temp_path {tmp}/body;\n\
         \x20   proxy_temp_path {tmp}/proxy;\n\
         \x20   fastcgi_temp_path {tmp}/fastcgi;\n\
         \x20   uwsgi_temp_path {tmp}/uwsgi;\n\
         \x20   scgi_temp_path {tmp}/scgi;\n\
         \x20   upstream edges {{\n{upstreams}    }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         {tls}\
         \x20       location / {{\n\
         \x20           proxy_pass http://edges;\n\
         \x20           proxy_set_header Host $host;\n\
         \x20           proxy_set_header X-Real-IP $remote_addr;\n\
         \x20           proxy_connect_timeout 2s;\n\
         \x20           proxy_read_timeout 30s;\n\
         \x20           proxy_next_upstream error timeout;\n\
         \x20           proxy_next_upstream_tries 0;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        pid = path("nginx.pid"),
        error_log = path("error.log"),
        access_log = path("access.log"),
        tmp = path("tmp"),
        tls = tls.map_or(String::new(), |tls| format!(
            "        listen {} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n",
            tls.listen,
            tls.cert.display(),
            tls.key.display()
        )),
    )
}

impl Nginx {
    /// Writes the config to `dir` (created), starts nginx in `netns` on
    /// `listen` (and HTTPS with `tls`) in front of `edges`, and waits until
    /// it answers.
    pub fn start(
        netns: &Netns,
        dir: &Path,
        listen: SocketAddr,
        edges: &[SocketAddr],
        tls: Option<&NginxTls>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir.join("tmp"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(dir, listen, edges, tls))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut command = netns.command(NGINX_BIN);
        command
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf);
        let process = Process::spawn(NGINX_BIN, netns, command, &dir.join("nginx.out"))?;
        let mut nginx = Self {
            process,
            netns: netns.clone(),
            listen,
            dir: dir.to_owned(),
        };
        nginx.wait_ready()?;
        Ok(nginx)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let addr = self.listen;
        let netns = self.netns.clone();
        let waited = poll_until(
            "nginx to answer",
            READY_TIMEOUT,
            Duration::from_millis(50),
            || {
                self.process.ensure_running()?;
                Ok(match netns.run(move || http::get(addr, "/health"))? {
                    Ok(_) => Probe::Ready(()),
                    Err(error) => Probe::NotYet(format!("{error:#}")),
                })
            },
        );
        waited.map_err(|e| e.context(format!("nginx's error log:\n{}", self.error_log())))
    }

    /// Where nginx listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// A request through nginx, from inside its namespace.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<HttpAnswer> {
        let addr = self.listen;
        let path = path.to_owned();
        let method = method.to_owned();
        let body = body.map(<[u8]>::to_vec);
        self.netns
            .run(move || http::request(addr, &method, &path, body.as_deref(), &[]))?
    }

    /// The last lines of nginx's error log.
    pub fn error_log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// The access log.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// The process (pid).
    pub fn process(&self) -> &Process {
        &self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lists_every_edge_and_retries_connection_errors() {
        let text = config(
            Path::new("/run/x"),
            "127.0.0.1:8080".parse().unwrap(),
            &[
                "127.0.0.1:8081".parse().unwrap(),
                "127.0.0.1:8082".parse().unwrap(),
            ],
            None,
        );
        assert!(text.contains("server 127.0.0.1:8081 max_fails=1"), "{text}");
        assert!(text.contains("server 127.0.0.1:8082 max_fails=1"), "{text}");
        assert!(
            text.contains("proxy_next_upstream error timeout;"),
            "{text}"
        );
        assert!(text.contains("pid /run/x/nginx.pid;"), "{text}");
        assert!(text.contains("listen 127.0.0.1:8080;"), "{text}");
        assert!(text.contains("daemon off;"), "{text}");
        assert!(!text.contains("ssl"), "{text}");
        let tls = NginxTls {
            listen: "198.51.100.60:8443".parse().unwrap(),
            cert: "/run/x/web.pem".into(),
            key: "/run/x/web.key".into(),
        };
        let text = config(
            Path::new("/run/x"),
            "127.0.0.1:8080".parse().unwrap(),
            &[],
            Some(&tls),
        );
        assert!(text.contains("listen 198.51.100.60:8443 ssl;"), "{text}");
        assert!(text.contains("ssl_certificate /run/x/web.pem;"), "{text}");
        assert!(
            text.contains("ssl_certificate_key /run/x/web.key;"),
            "{text}"
        );
    }
}
