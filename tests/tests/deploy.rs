//! What `deploy/` ships: the Prometheus alert rules pass `promtool check rules` and their
//! own unit tests (`promtool test rules`: each alert fires on the series that should raise
//! it, and only then); the Grafana dashboard is a dashboard; the Debian package built by
//! `cargo xtask package` installs with `dpkg -i`, runs, and purges clean (the group stays).

use std::{path::PathBuf, process::Command};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool (apt package prometheus; `cargo xtask test` installs it)");
    assert!(out.status.success(), "promtool {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
}

#[test]
fn the_grafana_dashboard_has_a_query_per_panel_and_a_gateway_variable() {
    let text = std::fs::read_to_string(deploy().join("grafana/splitter.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| e.contains("splitter_"))), "{panel}");
    }
    let variables: Vec<&str> = dashboard["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(variables, ["datasource", "gateway"]);
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_debian_package_installs_runs_and_purges() {
    if !splitter_tests::privileged("the_debian_package_installs_runs_and_purges") {
        return;
    }
    let deb = std::env::var("SPLITTER_DEB").expect("SPLITTER_DEB names the package: run the tests with `cargo xtask test`");
    // The test installs and purges the package: never over one an operator installed.
    let status = Command::new("dpkg-query").args(["-W", "-f=${Status}", "splitter"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).trim() != "install ok installed",
        "the splitter package is installed on this machine; this test would replace and purge it: run it elsewhere"
    );
    let contents = run("dpkg-deb", &["--contents", &deb]);
    for path in [
        "./usr/bin/splitter",
        "./lib/systemd/system/splitter.service",
        "./etc/splitter/gateways/README",
        "./usr/share/man/man1/splitter.1",
        "./usr/share/man/man1/splitter-weight.1",
        "./usr/share/bash-completion/completions/splitter",
        "./usr/share/zsh/vendor-completions/_splitter",
        "./usr/share/fish/vendor_completions.d/splitter.fish",
        "./usr/share/doc/splitter/examples/sava.yaml",
    ] {
        assert!(contents.lines().any(|l| l.ends_with(path)), "{path} is not in the package:\n{contents}");
    }
    assert!(run("dpkg-deb", &["--field", &deb, "Package"]).trim() == "splitter");

    run("dpkg", &["-i", &deb]);
    let installed = std::panic::catch_unwind(|| {
        let version = run("/usr/bin/splitter", &["--version"]);
        assert!(version.starts_with("splitter ") && version.contains("(commit "), "{version}");
        let examples: Vec<String> = std::fs::read_dir("/usr/share/doc/splitter/examples")
            .unwrap()
            .map(|e| e.unwrap().path().display().to_string())
            .filter(|p| p.ends_with(".yaml"))
            .collect();
        assert!(examples.len() >= 3, "{examples:?}");
        let validated = run("/usr/bin/splitter", &["validate", "-f", "/usr/share/doc/splitter/examples"]);
        assert!(validated.lines().count() >= examples.len() && validated.lines().all(|l| l.contains("ok")), "{validated}");
        assert!(run("getent", &["group", "splitter"]).starts_with("splitter:"), "the package made the socket's group");
        assert!(std::path::Path::new("/etc/splitter/gateways").is_dir());
        let unit = std::fs::read_to_string("/lib/systemd/system/splitter.service").unwrap();
        assert!(unit.contains("ExecStart=/usr/bin/splitter agent") && unit.contains("--socket-group splitter"), "{unit}");
    });
    run("dpkg", &["--purge", "splitter"]);
    assert!(!std::path::Path::new("/usr/bin/splitter").exists(), "purged");
    // The group stays (an operator's members may be in it); the test removes what it made.
    assert!(run("getent", &["group", "splitter"]).starts_with("splitter:"), "the group stays after the purge");
    run("groupdel", &["splitter"]);
    if let Err(panic) = installed {
        std::panic::resume_unwind(panic);
    }
}

/// kubernetes-validate: `SPLITTER_KUBERNETES_VALIDATE`, set by `cargo xtask test` (which
/// installs it from PyPI), else from the PATH.
fn kubernetes_validate(file: &std::path::Path) -> std::process::Output {
    let command = std::env::var_os("SPLITTER_KUBERNETES_VALIDATE").map(PathBuf::from).unwrap_or_else(|| "kubernetes-validate".into());
    Command::new(command).arg("--strict").arg(file).output().expect("kubernetes-validate (PyPI; `cargo xtask test` installs it)")
}

#[test]
fn the_kubernetes_manifests_validate_and_run_the_agent_as_it_is() {
    manifest_validates_and_runs_the_agent(
        "kubernetes/splitter.yaml",
        &["namespace/splitter", "configmap/splitter-gateways", "daemonset/splitter"],
    );
}

#[test]
fn the_kubernetes_manifest_with_etcd_validates_and_runs_the_agent_on_the_store() {
    let kinds =
        ["namespace/splitter", "configmap/splitter-gateways", "service/splitter-etcd", "statefulset/splitter-etcd", "daemonset/splitter"];
    manifest_validates_and_runs_the_agent("kubernetes/splitter-etcd.yaml", &kinds);
    let text = std::fs::read_to_string(deploy().join("kubernetes/splitter-etcd.yaml")).unwrap();
    assert!(text.contains("- --store\n            - etcd://splitter-etcd-0.splitter-etcd.splitter.svc:2379/splitter\n"), "{text}");
}

fn manifest_validates_and_runs_the_agent(file: &str, kinds: &[&str]) {
    let manifest = deploy().join(file);
    let out = kubernetes_validate(&manifest);
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    for kind in kinds {
        assert!(report.contains(&format!("passed for resource {kind}")), "{kind} validated: {report}");
    }
    // The validator does refuse: the same manifest with a misspelled field fails.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let broken = std::env::temp_dir().join(format!("splitter-k8s-{}.yaml", std::process::id()));
    std::fs::write(&broken, text.replace("hostNetwork: true", "hostNetwrk: true")).unwrap();
    let out = kubernetes_validate(&broken);
    let _ = std::fs::remove_file(&broken);
    assert!(!out.status.success(), "a misspelled field is refused");

    // The DaemonSet's arguments are the agent's own flags, and its gateway files validate.
    let docs: Vec<serde_yaml::Value> = text.split("\n---\n").map(|d| serde_yaml::from_str(d).unwrap()).collect();
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(args[0], "agent");
    let help = Command::new(splitter_tests::splitter_bin()).args(["agent", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "splitter agent has no {flag}: {help}");
    }
    let configmap = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let dir = std::env::temp_dir().join(format!("splitter-k8s-gateways-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body) in configmap["data"].as_mapping().unwrap() {
        std::fs::write(dir.join(name.as_str().unwrap()), body.as_str().unwrap()).unwrap();
    }
    let validated = Command::new(splitter_tests::splitter_bin()).arg("validate").arg("-f").arg(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(validated.status.success(), "{}", String::from_utf8_lossy(&validated.stderr));
}
