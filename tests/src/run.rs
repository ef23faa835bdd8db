//! Per-run identity: a short unique id, the names derived from it, a
//! temporary directory for configs, keys and logs, and a BPF filesystem
//! for the daemons' pinned links.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use tempfile::TempDir;

/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Prefix of every interface name the harness creates.
pub const IFNAME_PREFIX: &str = "tg";

/// Length of a run id in characters (base 36).
pub const RUN_ID_LEN: usize = 8;

/// Longest suffix [`Run::ifname`] accepts so that names fit in
/// [`MAX_IFNAME_LEN`].
pub const MAX_IFNAME_SUFFIX_LEN: usize = MAX_IFNAME_LEN - IFNAME_PREFIX.len() - RUN_ID_LEN;

impl Drop for Run {
    /// Unmounts the run's BPF filesystem (releasing any link still pinned
    /// there) before the directory goes.
    fn drop(&mut self) {
        let mounted = self.bpffs.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = mounted.take()
            && let Err(err) = umount2(&path, MntFlags::MNT_DETACH)
        {
            eprintln!("warning: unmounting {}: {err}", path.display());
        }
    }
}

/// Counter that makes ids unique between runs of the same process.
static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One run of a topology: its unique id and its temporary directory.
///
/// The directory (configs, keys, process logs, control sockets) is removed
/// when the `Run` is dropped, so a topology should drop it last.
#[derive(Debug)]
pub struct Run {
    id: String,
    /// The run's BPF filesystem, once mounted.
    bpffs: Mutex<Option<PathBuf>>,
    dir: TempDir,
}

impl Run {
    /// Creates a run with a fresh id and a temporary directory named after it.
    pub fn new() -> Result<Self> {
        let id = new_run_id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("tidegate-{id}-"))
            .tempdir()
            .context("creating the run's temporary directory")?;
        Ok(Self {
            id,
            bpffs: Mutex::new(None),
            dir,
        })
    }

    /// A BPF filesystem of the run's own, mounted in this (the root) mount
    /// namespace on first use, where the daemons pin their XDP links: a pin
    /// there outlives a daemon that dies, and the mount goes with the run.
    pub fn bpffs(&self) -> Result<PathBuf> {
        let mut mounted = self.bpffs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = mounted.as_ref() {
            return Ok(path.clone());
        }
        let path = self.dir().join("bpf");
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a BPF filesystem on {}", path.display()))?;
        *mounted = Some(path.clone());
        Ok(path)
    }

    /// The run id: [`RUN_ID_LEN`] lowercase base-36 characters.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An interface name unique to this run: `tg<id><suffix>`.
    ///
    /// # Panics
    /// If `suffix` is longer than [`MAX_IFNAME_SUFFIX_LEN`] or is not made of
    /// ASCII lowercase letters and digits: the suffix is a constant in the
    /// calling code, so this is a programming error.
    pub fn ifname(&self, suffix: &str) -> String {
        assert!(
            suffix.len() <= MAX_IFNAME_SUFFIX_LEN,
            "interface suffix {suffix:?} is longer than {MAX_IFNAME_SUFFIX_LEN} characters"
        );
        assert!(
            suffix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "interface suffix {suffix:?} must be lowercase ASCII letters and digits"
        );
        format!("{IFNAME_PREFIX}{}{suffix}", self.id)
    }

    /// A network namespace name unique to this run: `tidegate-<id>-<role>`.
    pub fn netns_name(&self, role: &str) -> String {
        format!("tidegate-{}-{role}", self.id)
    }
}

/// A run id from the pid, a process-wide counter and the time.
///
/// The value packs the pid (22 bits: Linux pids are below 2^22), the counter
/// (10 bits) and the time in seconds (9 bits) into 41 bits, which fit in 8
/// base-36 digits. Two live processes never share a pid and one process
/// hands out 1024 ids before the counter wraps, so ids of concurrent runs
/// differ; the time bits separate a run from leftovers of an earlier process
/// that had the same pid.
fn new_run_id() -> String {
    let pid = u64::from(std::process::id()) & ((1 << 22) - 1);
    let counter = u64::from(RUN_COUNTER.fetch_add(1, Ordering::Relaxed)) & ((1 << 10) - 1);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        & ((1 << 9) - 1);
    base36((pid << 19) | (counter << 9) | secs, RUN_ID_LEN)
}

/// `value` in lowercase base 36, left-padded with zeros to `width` digits.
fn base36(mut value: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        let digit = usize::try_from(value % 36).unwrap_or(0);
        *slot = DIGITS[digit];
        value /= 36;
    }
    assert_eq!(value, 0, "value does not fit in {width} base-36 digits");
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn base36_pads_and_encodes() {
        assert_eq!(base36(0, 4), "0000");
        assert_eq!(base36(35, 2), "0z");
        assert_eq!(base36(36, 2), "10");
        assert_eq!(base36((1 << 41) - 1, RUN_ID_LEN), "s27to3cv");
    }

    #[test]
    fn largest_packed_id_fits_in_run_id_len() {
        // 36^8 > 2^41: the packed pid/counter/time value always fits.
        assert!(36_u64.pow(u32::try_from(RUN_ID_LEN).unwrap()) > 1 << 41);
    }

    #[test]
    fn run_ids_are_unique_and_names_fit() {
        let runs: Vec<Run> = (0..50).map(|_| Run::new().unwrap()).collect();
        let ids: HashSet<&str> = runs.iter().map(Run::id).collect();
        assert_eq!(ids.len(), runs.len(), "run ids repeat: {ids:?}");
        for run in &runs {
            assert_eq!(run.id().len(), RUN_ID_LEN);
            let longest = run.ifname(&"x".repeat(MAX_IFNAME_SUFFIX_LEN));
            assert_eq!(longest.len(), MAX_IFNAME_LEN, "{longest}");
            assert!(run.dir().is_dir());
            assert!(run.netns_name("client").contains(run.id()));
        }
    }

    #[test]
    #[should_panic(expected = "longer than")]
    fn too_long_suffix_panics() {
        let run = Run::new().unwrap();
        let _ = run.ifname(&"x".repeat(MAX_IFNAME_SUFFIX_LEN + 1));
    }
}
