//! A small tmpfs mounted for one run (a gateway's state directory), that a
//! test can fill to the last byte and free again; unmounted on drop, also
//! when the test fails.

use std::fs::{self, File};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Most bytes [`TmpfsMount::fill`] writes before it gives up.
const FILL_LIMIT: u64 = 256 << 20;

/// The filler's name inside the mount.
const FILLER: &str = "filler";

/// A mounted tmpfs.
#[derive(Debug)]
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `bytes` at `path` (created, mode 0700); `path`
    /// must be unique to the run.
    pub fn mount(path: &Path, bytes: u64) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let options = format!("size={bytes},mode=0700");
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting a tmpfs of {bytes} bytes at {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a filler file until the filesystem is full (ENOSPC); returns
    /// how many bytes it took.
    pub fn fill(&self) -> Result<u64> {
        let path = self.path.join(FILLER);
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0u8; 4096];
        let mut written = 0u64;
        while written < FILL_LIMIT {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(written),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
            }
        }
        bail!(
            "{} took {written} bytes without filling up",
            self.path.display()
        )
    }

    /// Removes the filler: the space is free again.
    pub fn free(&self) -> Result<()> {
        let path = self.path.join(FILLER);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }
}

impl Drop for TmpfsMount {
    /// Detaches the mount (a daemon still holding a file in it does not
    /// keep it busy).
    fn drop(&mut self) {
        if let Err(err) = umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("warning: unmounting {}: {err}", self.path.display());
        }
    }
}
