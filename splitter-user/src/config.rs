//! The configuration path (`--config`, `splitter validate -f`): which files it holds and
//! what they define. One scanner for the agent and `validate`, so both accept the same.
//!
//! A path is a gateway file, or a directory whose `*.yaml` / `*.yml` regular files are read
//! in file-name order (not recursively); hidden files (`.name`, as editors leave them) are
//! skipped. A gateway defined by two files is refused in the later one.

use std::{
    collections::BTreeMap,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
};

use crate::gateway::{self, ConfigError, Document};

/// One configuration file and what it defines, or why it is refused.
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// The file's text (empty when it could not be read).
    pub text: String,
    pub documents: Result<Vec<Document>, ConfigError>,
}

impl ConfigFile {
    /// The gateways the file's documents are about (full or weights-only), when it parsed.
    pub fn gateway_names(&self) -> Vec<String> {
        match &self.documents {
            Ok(documents) => documents.iter().map(|d| d.gateway_name().to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The gateway files under `path`, sorted by file name; nothing when it does not exist.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    if !path.is_dir() {
        return Ok(if path.exists() { vec![path.to_path_buf()] } else { Vec::new() });
    }
    let unreadable = |err: std::io::Error| ConfigError::new(path.display().to_string(), format!("cannot read directory: {err}"));
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(unreadable)? {
        let file = entry.map_err(unreadable)?.path();
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if is_yaml && !name.starts_with('.') && file.is_file() {
            files.push(file);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// Reads and parses every file under `path`, each on its own: a broken file is reported
/// in its entry and the others still count. `defined` carries gateway names across calls
/// (several paths in one `validate`).
pub fn scan(path: &Path, defined: &mut BTreeMap<String, String>) -> Result<Vec<ConfigFile>, ConfigError> {
    let mut out = Vec::new();
    for file in files(path)? {
        let origin = file.display().to_string();
        let (text, documents) = match fs::read_to_string(&file) {
            Ok(text) => {
                let documents = gateway::parse_config_file(&origin, &text, defined);
                (text, documents)
            }
            Err(err) => (String::new(), Err(ConfigError::new(&origin, format!("cannot read: {err}")))),
        };
        out.push(ConfigFile { path: file, text, documents });
    }
    Ok(out)
}

/// A fingerprint of the files under `path` (names and contents), to notice any change.
pub fn fingerprint(path: &Path) -> u64 {
    let mut hasher = DefaultHasher::new();
    for file in files(path).unwrap_or_default() {
        file.hash(&mut hasher);
        fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::FULL_WEIGHT;

    const GATEWAY: &str = "name: g\nport: 80/tcp\nvirtual_address: 10.0.0.1\nroutes:\n  r:\n    targets: [10.0.1.1:80]\n";

    fn dir(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("splitter-config-{}-{}", std::process::id(), rand_suffix()));
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn hidden_and_other_files_are_skipped_and_the_rest_sorted() {
        let d = dir(&[("b.yml", GATEWAY), ("a.yaml", ""), (".a.yaml.swp", ""), (".hidden.yaml", ""), ("notes.txt", "")]);
        let names: Vec<String> = files(&d).unwrap().iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(names, ["a.yaml", "b.yml"]);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_gateway_defined_twice_is_refused_in_the_later_file_with_its_line() {
        let d = dir(&[("a.yaml", GATEWAY), ("b.yaml", &format!("# again\n{GATEWAY}"))]);
        let scanned = scan(&d, &mut BTreeMap::new()).unwrap();
        assert!(scanned[0].documents.is_ok());
        let err = scanned[1].documents.as_ref().unwrap_err().to_string();
        assert!(err.contains("b.yaml:2:") && err.contains("gateway g is already defined in") && err.contains("a.yaml"), "{err}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_broken_file_does_not_reserve_its_names() {
        let d = dir(&[("a.yaml", &format!("{GATEWAY}mode: bogus\n")), ("b.yaml", GATEWAY)]);
        let scanned = scan(&d, &mut BTreeMap::new()).unwrap();
        assert!(scanned[0].documents.is_err());
        assert!(scanned[1].documents.is_ok());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_fingerprint_follows_contents() {
        let d = dir(&[("a.yaml", GATEWAY)]);
        let before = fingerprint(&d);
        fs::write(d.join("a.yaml"), format!("{GATEWAY}# edited\n")).unwrap();
        assert_ne!(before, fingerprint(&d));
        fs::remove_dir_all(d).unwrap();
    }

    fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
    }

    /// Every document under `path`, or the first error.
    fn load_path(path: &Path) -> Result<Vec<(PathBuf, Document)>, ConfigError> {
        let mut out = Vec::new();
        for file in scan(path, &mut BTreeMap::new())? {
            for document in file.documents? {
                out.push((file.path.clone(), document));
            }
        }
        Ok(out)
    }

    #[test]
    fn every_example_in_config_validates() {
        let gateways = load_path(&config_dir()).unwrap_or_else(|err| panic!("{err}"));
        let names: Vec<&str> = gateways.iter().map(|(_, document)| document.gateway_name()).collect();
        for expected in ["sava/sava/port", "simpleservice/port", "qotm", "prod"] {
            assert!(names.contains(&expected), "config/ has no gateway {expected}: {names:?}");
        }
        assert!(gateways.iter().all(|(_, document)| matches!(document, Document::Gateway(_))));

        let updates = load_path(&config_dir().join("updates")).unwrap_or_else(|err| panic!("{err}"));
        assert!(!updates.is_empty());
        for (file, document) in updates {
            let Document::Weights(update) = document else { panic!("{} is not a weights update", file.display()) };
            let (_, target) = gateways
                .iter()
                .find(|(_, document)| document.gateway_name() == update.name)
                .unwrap_or_else(|| panic!("{}: no gateway {} in config/", file.display(), update.name));
            let Document::Gateway(target) = target else { unreachable!("checked above") };
            let updated = target.apply_weights(&update, &file.display().to_string()).unwrap_or_else(|err| panic!("{err}"));
            let total: u32 = updated.routes.iter().map(|route| route.weight).sum();
            assert_eq!(total, FULL_WEIGHT);
        }
    }

    #[test]
    fn a_directory_with_a_gateway_defined_twice_is_refused() {
        let dir = std::env::temp_dir().join(format!("splitter-config-dup-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), GATEWAY).unwrap();
        std::fs::write(dir.join("b.yml"), GATEWAY).unwrap();
        std::fs::write(dir.join("notes.txt"), "not a gateway").unwrap();
        let err = load_path(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(err.line, Some(1));
        assert!(err.origin.ends_with("b.yml"), "{err}");
        assert!(err.message.contains("already defined in") && err.message.contains("a.yaml"), "{err}");
    }
}
