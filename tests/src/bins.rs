//! Locating the project's own binaries (`tidegate-gateway`, `tidectl`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Environment variable naming the directory that holds our binaries;
/// `cargo xtask` sets it.
pub const BIN_DIR_ENV: &str = "TIDEGATE_BIN_DIR";

/// The directory holding our binaries: `$TIDEGATE_BIN_DIR` if set, else the
/// cargo profile directory this executable was built into (`target/debug`
/// for a test in `target/debug/deps`, or the directory of a binary such as
/// the lab in `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    profile_dir_of(&exe)
}

/// The cargo profile directory of an executable at `exe`.
fn profile_dir_of(exe: &Path) -> Result<PathBuf> {
    let parent = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if parent.file_name().is_some_and(|name| name == "deps") {
        return parent
            .parent()
            .map(Path::to_path_buf)
            .with_context(|| format!("{} has no parent directory", parent.display()));
    }
    Ok(parent.to_path_buf())
}

/// The path of our binary `name`, or an error saying how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{name} not found in {} (set {BIN_DIR_ENV} or build it with `cargo xtask test` / `cargo xtask build`)",
            dir.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_dir_of_test_and_binary() {
        assert_eq!(
            profile_dir_of(Path::new("/w/target/debug/deps/shield-0123abcd")).unwrap(),
            Path::new("/w/target/debug")
        );
        assert_eq!(
            profile_dir_of(Path::new("/w/target/release/tidegate-lab")).unwrap(),
            Path::new("/w/target/release")
        );
    }

    #[test]
    fn missing_binary_names_the_build_command() {
        let err = binary("tidegate-no-such-binary").unwrap_err().to_string();
        assert!(err.contains("tidegate-no-such-binary"), "{err}");
        assert!(err.contains("cargo xtask build"), "{err}");
    }
}
