//! Every config in docs/DEPLOY.md, loaded as the daemons load theirs at
//! start: each fenced block marked `deploy:gateway`, `deploy:core` or
//! `deploy:edge` is written to a file, with `/etc/tidegate/` mapped to a
//! temporary directory holding the keys and certificates the page makes,
//! and validated by the daemon's own loader. With the `privileged` feature
//! (root, nftables and nginx installed) the `deploy:nftables` rulesets go
//! through `nft -c` and the `deploy:nginx` site through `nginx -t`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use tidegate_tests::pki::TestPki;

/// The page, from the workspace root.
fn doc_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/DEPLOY.md")
}

/// What a marked block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gateway,
    Core,
    Edge,
    Nftables,
    Nginx,
}

impl Kind {
    fn from_marker(marker: &str) -> Option<Self> {
        Some(match marker {
            "deploy:gateway" => Self::Gateway,
            "deploy:core" => Self::Core,
            "deploy:edge" => Self::Edge,
            "deploy:nftables" => Self::Nftables,
            "deploy:nginx" => Self::Nginx,
            _ => return None,
        })
    }
}

/// One fenced block of the page.
#[derive(Debug)]
struct Block {
    /// The line of its opening fence (1-based).
    line: usize,
    /// The info string's first word (`toml`, `sh`...).
    lang: String,
    /// Its `deploy:` marker, if it has one.
    kind: Option<Kind>,
    text: String,
}

/// Every fenced block of `doc`, indented or not. A `deploy:` marker that
/// names no known kind is an error, and so is a config (TOML, nftables,
/// nginx) without a marker: nothing the page shows as a config goes
/// unchecked.
fn blocks(doc: &str) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (index, line) in doc.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(info) = trimmed.strip_prefix("```") {
            match open.take() {
                None => {
                    let mut words = info.split_whitespace();
                    let lang = words.next().unwrap_or("").to_owned();
                    let mut kind = None;
                    for word in words {
                        if word.starts_with("deploy:") {
                            kind = Some(Kind::from_marker(word).with_context(|| {
                                format!("line {}: unknown marker {word}", index + 1)
                            })?);
                        }
                    }
                    let block = Block {
                        line: index + 1,
                        lang,
                        kind,
                        text: String::new(),
                    };
                    open = Some((block, indent));
                }
                Some((block, _)) => blocks.push(block),
            }
        } else if let Some((block, indent)) = &mut open {
            block
                .text
                .push_str(line.get(*indent..).unwrap_or(line.trim_start()));
            block.text.push('\n');
        }
    }
    if let Some((block, _)) = open {
        bail!("line {}: a fenced block is never closed", block.line);
    }
    for block in &blocks {
        if block.kind.is_none() && ["toml", "nft", "nginx"].contains(&block.lang.as_str()) {
            bail!(
                "line {}: a {} block without a deploy: marker would go unchecked",
                block.line,
                block.lang
            );
        }
    }
    Ok(blocks)
}

/// The page's marked blocks of `kind`; none is an error.
fn marked(kind: Kind) -> Result<Vec<Block>> {
    let path = doc_path();
    let doc =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let found: Vec<Block> = blocks(&doc)?
        .into_iter()
        .filter(|b| b.kind == Some(kind))
        .collect();
    ensure!(
        !found.is_empty(),
        "{} has no block marked {kind:?}",
        path.display()
    );
    Ok(found)
}

/// A stand-in for the hosts' `/etc/tidegate/`: the files the page makes
/// there (the WireGuard and HA keys, the CA's certificates for Core, the
/// gateways and the Edge, nginx's certificate), in a temporary directory.
struct Etc {
    dir: tempfile::TempDir,
}

impl Etc {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        // `wg genkey`: 32 bytes of base64 (any 32 bytes are a key).
        let key = base64::engine::general_purpose::STANDARD.encode([0x5a; 32]);
        std::fs::write(root.join("wg0.key"), format!("{key}\n"))?;
        // `openssl rand -base64 32`.
        std::fs::write(
            root.join("ha.key"),
            "bm90IGEgcmVhbCBrZXkgYnV0IGxvbmcgZW5vdWdoIQ==\n",
        )?;
        // `tidegate-core init` and `tidegate-core issue`: the CA and its
        // certificates in /etc/tidegate/pki, as the page copies them.
        let pki = TestPki::new(root, "pki")?;
        for identity in ["core", "gw-a", "gw-b", "edge-1"] {
            pki.issue(identity)?;
        }
        // nginx's certificate (a public CA's, on a real host).
        TestPki::new(root, "tls")?.issue("vpn.example.com")?;
        Ok(Self { dir })
    }

    /// `text` with every `/etc/tidegate/` path pointing here instead: the
    /// one place the page's paths are rewritten.
    fn on_test_host(&self, text: &str) -> String {
        text.replace("/etc/tidegate/", &format!("{}/", self.dir.path().display()))
    }

    /// Writes `block` (with paths mapped) to a file of its own.
    fn write(&self, block: &Block) -> Result<PathBuf> {
        let path = self
            .dir
            .path()
            .join(format!("deploy-line-{}.{}", block.line, block.lang));
        std::fs::write(&path, self.on_test_host(&block.text))?;
        Ok(path)
    }
}

/// What `tidegate-gateway --check` and the start run on `file`
/// ([`preflight::check`]: every section, the rules between them, the link
/// certificates `[core]` names); the start's warnings fail it too.
fn check_gateway(file: &Path) -> Result<()> {
    use tidegate_gateway::{
        config::Overrides,
        preflight::{self, PreflightError},
    };
    let checked = preflight::check(file, Overrides::default())
        .map_err(|errors| anyhow::anyhow!(PreflightError::lines(&errors).join("; ")))?;
    // A deployment guide's configs draw no warning either.
    ensure!(
        checked.warnings.is_empty(),
        "warnings: {}",
        checked
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

/// What `tidegate-core check` and the start run on `file`: `Config::load`,
/// then its CA, certificate and key ([`tidegate_core::daemon::load_pki`]).
fn check_core(file: &Path) -> Result<()> {
    use tidegate_core::config::{Config, Overrides};
    let config = Config::load(file, Overrides::default())?;
    tidegate_core::daemon::load_pki(&config)?;
    Ok(())
}

/// The Edge's start-up validation of `file`: `Config::load`, then its CA,
/// certificate and key, checked for its identity as its link server does.
fn check_edge(file: &Path) -> Result<()> {
    use tidegate_edge::config::{Config, Overrides};
    let config = Config::load(file, Overrides::default())?;
    tidegate_proto::tls::Pki::load_as(
        &config.ca_file,
        &config.cert_file,
        &config.key_file,
        Some(&config.identity),
    )?;
    Ok(())
}

/// Runs `check` on every block of `kind`, naming the failing one.
fn check_all(kind: Kind, check: fn(&Path) -> Result<()>) -> Result<()> {
    let etc = Etc::new()?;
    for block in marked(kind)? {
        let file = etc.write(&block)?;
        check(&file).with_context(|| {
            format!(
                "docs/DEPLOY.md line {}: the {kind:?} config does not load",
                block.line
            )
        })?;
    }
    Ok(())
}

/// Fails with the whole error chain, which names the file and the field.
fn verdict(result: Result<()>) {
    if let Err(error) = result {
        panic!("{error:#}");
    }
}

#[test]
fn gateway_configs_load() {
    verdict(check_all(Kind::Gateway, check_gateway));
}

#[test]
fn core_configs_load() {
    verdict(check_all(Kind::Core, check_core));
}

#[test]
fn edge_configs_load() {
    verdict(check_all(Kind::Edge, check_edge));
}

#[test]
fn unmarked_configs_and_unknown_markers_are_refused() {
    let unmarked = "text\n```toml\na = 1\n```\n";
    assert!(blocks(unmarked).is_err());
    let unknown = "```toml deploy:gatway\na = 1\n```\n";
    let error = format!("{:#}", blocks(unknown).unwrap_err());
    assert!(error.contains("deploy:gatway"), "{error}");
    let indented = "* a list\n\n  ```sh\n  tidectl status\n  ```\n```toml deploy:core\n```\n";
    let found = blocks(indented).unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].text, "tidectl status\n");
    assert_eq!(found[1].kind, Some(Kind::Core));
}

#[test]
fn a_wrong_field_fails_naming_it() {
    // The check that the page's blocks pass must refuse a misspelt one.
    let etc = Etc::new().unwrap();
    let block = &marked(Kind::Gateway).unwrap()[0];
    let bad = Block {
        line: block.line,
        lang: block.lang.clone(),
        kind: block.kind,
        text: block.text.replace("priority =", "priorty ="),
    };
    let error = format!(
        "{:#}",
        check_gateway(&etc.write(&bad).unwrap()).unwrap_err()
    );
    assert!(error.contains("priorty"), "{error}");
}

#[cfg(feature = "privileged")]
mod privileged {
    use std::process::Command;

    use super::*;

    /// `nft -c`: parsed and checked by the kernel's nftables, not applied.
    fn check_nftables(file: &Path) -> Result<()> {
        let output = Command::new("nft")
            .arg("-c")
            .arg("-f")
            .arg(file)
            .output()
            .context("running nft (install nftables)")?;
        ensure!(
            output.status.success(),
            "nft -c -f {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    /// `nginx -t` of the site inside a minimal main config of its own.
    fn check_nginx(file: &Path) -> Result<()> {
        let dir = file.parent().context("the site's directory")?;
        let main = dir.join("nginx.conf");
        let error_log = dir.join("nginx-error.log");
        std::fs::write(
            &main,
            format!(
                "pid {}/nginx.pid;\nerror_log {};\nevents {{}}\nhttp {{\n    include {};\n}}\n",
                dir.display(),
                error_log.display(),
                file.display()
            ),
        )?;
        let output = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&main)
            .output()
            .context("running nginx (install nginx)")?;
        ensure!(
            output.status.success(),
            "nginx -t -c {}: {}",
            main.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }

    #[test]
    fn nftables_rulesets_check() {
        verdict(check_all(Kind::Nftables, check_nftables));
    }

    #[test]
    fn nginx_site_checks() {
        verdict(check_all(Kind::Nginx, check_nginx));
    }
}
