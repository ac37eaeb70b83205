//! Following a configuration directory: applied, edited, broken, removed, duplicated.

use super::*;

fn synced(dir: &TempDir) -> TestController {
    let mut c = controller_with(None, Some(dir.0.clone()));
    c.sync_config();
    c
}

#[test]
fn each_file_is_applied_and_owns_its_gateways() {
    let dir = TempDir::new("config");
    let sava = dir.write("sava.yaml", SAVA);
    dir.write("other.yml", OTHER);
    let c = synced(&dir);
    assert_eq!(c.dataplane().names(), ["other", "sava"]);
    assert_eq!(c.from_config.get("sava"), Some(&sava));
    assert!(c.config_errors.is_empty());
}

#[test]
fn an_edited_file_is_applied_again_and_an_unedited_one_left_alone() {
    let dir = TempDir::new("config");
    dir.write("sava.yaml", SAVA);
    dir.write("other.yaml", OTHER);
    let mut c = synced(&dir);
    // A change made by hand to a file's gateway survives an edit of another file.
    apply(&mut c, &weight_doc("sava", &[("sava:1.1.0", "40%")])).unwrap();
    dir.write(
        "other.yaml",
        &OTHER
            .replace("weight: 50%\n    targets: [10.1.1.1:80]", "weight: 70%\n    targets: [10.1.1.1:80]")
            .replace("weight: 50%", "weight: 30%"),
    );
    c.sync_config();
    assert_eq!(live_weights(&c, "other"), w(&[("a", 7000), ("b", 3000)]));
    assert_eq!(live_weights(&c, "sava")["sava:1.1.0"], 4000);
}

#[test]
fn a_broken_file_changes_nothing_and_is_reported() {
    let dir = TempDir::new("config");
    let sava = dir.write("sava.yaml", SAVA);
    let mut c = synced(&dir);
    dir.write("sava.yaml", &SAVA.replace("10.0.0.10", "10.0.0.300"));
    c.sync_config();
    assert_eq!(live_weights(&c, "sava")["sava:1.1.0"], 1000, "the old gateway keeps serving");
    assert!(c.config_errors[&sava].contains("sava.yaml:3:"), "{:?}", c.config_errors);
    let Answer::Gateways(list) = c.handle(Op::List).unwrap().answer else { panic!("a list") };
    assert!(list.notes[0].starts_with("configuration file") && list.notes[0].contains("not applied"), "{:?}", list.notes);
    dir.write("sava.yaml", SAVA);
    c.sync_config();
    assert!(c.config_errors.is_empty());
}

#[test]
fn a_removed_file_removes_its_gateways_only() {
    let dir = TempDir::new("config");
    let other = dir.write("other.yaml", OTHER);
    dir.write("sava.yaml", SAVA);
    let mut c = synced(&dir);
    apply(&mut c, &OTHER.replace("name: other", "name: by-hand").replace("10.0.0.20", "10.0.0.21")).unwrap();
    std::fs::remove_file(other).unwrap();
    c.sync_config();
    assert_eq!(c.dataplane().names(), ["by-hand", "sava"]);
    assert!(event_messages(&c).iter().any(|e| e == "config: gateway deleted"));
}

#[test]
fn a_gateway_defined_twice_is_refused_in_the_later_file() {
    let dir = TempDir::new("config");
    dir.write("a.yaml", SAVA);
    let b = dir.write("b.yaml", &SAVA.replace("weight: 90%", "weight: 50%").replace("weight: 10%", "weight: 50%"));
    let c = synced(&dir);
    assert_eq!(live_weights(&c, "sava")["sava:1.1.0"], 1000, "the first file wins");
    assert!(c.config_errors[&b].contains("gateway sava is already defined in"), "{:?}", c.config_errors);
}

#[test]
fn hidden_files_in_the_directory_are_not_read() {
    let dir = TempDir::new("config");
    dir.write(".sava.yaml", SAVA);
    dir.write("#notes.yaml~", "not yaml: [");
    let c = synced(&dir);
    assert!(c.dataplane().names().is_empty() && c.config_errors.is_empty());
}
