//! Manual pages and shell completions, made from a binary's own clap
//! command when it is packaged (each binary has a hidden way to call
//! [`write`]), so that they always match its flags.

use std::{
    io,
    path::{Path, PathBuf},
};

use clap_complete::Shell;

/// The shells a package ships completions for, and where each one's file
/// for `name` goes under the output directory (Debian's paths under
/// `/usr/share`).
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/{}"),
    (Shell::Zsh, "zsh/vendor-completions/_{}"),
    (Shell::Fish, "fish/vendor_completions.d/{}.fish"),
];

/// Writes `cmd`'s manual pages (one per visible subcommand too) to
/// `DIR/man/man1/` and its completions for bash, zsh and fish to their
/// places under `DIR` ([`SHELLS`]); returns every file written.
pub fn write(cmd: clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_owned();
    let man = dir.join("man/man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut written = Vec::new();
    for entry in std::fs::read_dir(&man)? {
        written.push(entry?.path());
    }
    written.sort();
    let mut cmd = cmd;
    for (shell, place) in SHELLS {
        let path = dir.join(place.replace("{}", &name));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::File::create(&path)?;
        clap_complete::generate(shell, &mut cmd, &name, &mut file);
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_and_completions_for_every_visible_subcommand() {
        let cmd = clap::Command::new("demo")
            .about("A demo")
            .subcommand(clap::Command::new("show").about("Show it"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let written = super::write(cmd, dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "man/man1/demo-show.1",
                "man/man1/demo.1",
                "bash-completion/completions/demo",
                "zsh/vendor-completions/_demo",
                "fish/vendor_completions.d/demo.fish",
            ]
        );
        let page = std::fs::read_to_string(dir.path().join("man/man1/demo.1")).unwrap();
        assert!(page.contains("demo\\-show"), "{page}");
        assert!(!page.contains("secret"), "{page}");
        let bash = std::fs::read_to_string(&written[2]).unwrap();
        assert!(bash.contains("complete -F _demo"), "{bash}");
    }
}
