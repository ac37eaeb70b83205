//! What a package ships from the CLI itself: `--version` naming the commit, shell
//! completions that complete, and a man page per command.

use std::process::Command;

use splitter_tests::{splitter_bin, testbed::TempDir};

fn splitter(args: &[&str]) -> String {
    let out = Command::new(splitter_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "splitter {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn version_names_the_release_and_the_commit() {
    let version = splitter(&["--version"]);
    let head = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    let commit = match head {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap().trim().to_string(),
        _ => "unknown".to_string(),
    };
    assert_eq!(version.trim(), format!("splitter {} (commit {commit})", env!("CARGO_PKG_VERSION")));
}

#[test]
fn bash_completion_completes_commands_and_their_options() {
    let script = format!(
        "source <({bin} completions bash) || exit 1\n\
         COMP_WORDS=(splitter can); COMP_CWORD=1; _splitter splitter can splitter; echo \"commands: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(splitter canary ap); COMP_CWORD=2; _splitter splitter ap canary; echo \"canary: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(splitter get --); COMP_CWORD=2; _splitter splitter -- get; echo \"get: ${{COMPREPLY[*]}}\"\n",
        bin = splitter_bin().display()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("commands: canary"), "{text}");
    assert!(text.contains("canary: approve"), "{text}");
    assert!(text.contains("--socket") && text.contains("--output"), "{text}");
    for shell in ["zsh", "fish"] {
        assert!(splitter(&["completions", shell]).contains("canary"), "{shell}");
    }
}

#[test]
fn every_command_has_a_man_page() {
    let dir = TempDir::new("man").unwrap();
    splitter(&["man", "--dir", dir.path().to_str().unwrap()]);
    let help = splitter(&["--help"]);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 12, "{help}");
    let main = std::fs::read_to_string(dir.path().join("splitter.1")).unwrap();
    assert!(main.contains(".TH splitter 1"), "{main}");
    for command in commands {
        let page = std::fs::read_to_string(dir.path().join(format!("splitter-{command}.1")))
            .unwrap_or_else(|e| panic!("no man page for {command}: {e}"));
        assert!(page.contains(&format!(".TH splitter-{command} 1")) && page.contains(".SH SYNOPSIS"), "{page}");
        assert!(main.contains(command), "splitter.1 lists {command}");
    }
}
