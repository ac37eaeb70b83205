//! Following the configuration path: each file is validated and applied on its own (like
//! a PUT); a broken file changes nothing and is reported; gateways whose file no longer
//! defines them are removed.

use std::{collections::BTreeMap, path::PathBuf};

use log::{error, info};

use super::Controller;
use crate::{config, datapath::Dataplane};

impl<D: Dataplane> Controller<D> {
    pub fn sync_config(&mut self) {
        let Some(path) = self.settings.config.clone() else { return };
        let (files, scan_error) = match config::scan(&path, &mut BTreeMap::new()) {
            Ok(files) => (files, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        // Gateway -> the file that defines it after this sync.
        let mut defined: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut broken: BTreeMap<PathBuf, String> = BTreeMap::new();
        if let Some(e) = scan_error {
            // The directory cannot be read: nothing it defined is removed.
            broken.insert(path.clone(), e.to_string());
            defined = self.from_config.clone();
        }
        for file in &files {
            let names = file.gateway_names();
            let result = match &file.documents {
                Err(e) => Err(e.to_string()),
                // A file applied before and unchanged since stays as it is live: a rollout
                // may have moved its weights, and an edit of another file must not undo that.
                Ok(_)
                    if self.applied_texts.get(&file.path) == Some(&file.text) && names.iter().all(|n| self.configured.contains_key(n)) =>
                {
                    Ok(())
                }
                Ok(_) => {
                    let origin = file.path.display().to_string();
                    match self.apply_text(&origin, &file.text, None, Some(&file.path)) {
                        Ok(_) => {
                            self.applied_texts.insert(file.path.clone(), file.text.clone());
                            self.unsaved = true;
                            Ok(())
                        }
                        Err(e) => Err(e.message),
                    }
                }
            };
            match result {
                Ok(()) => {
                    for n in names {
                        defined.insert(n, file.path.clone());
                    }
                }
                Err(why) => {
                    broken.insert(file.path.clone(), why);
                    // Its gateways stay as they are: not removed below either.
                    for (n, f) in &self.from_config {
                        if f == &file.path {
                            defined.insert(n.clone(), f.clone());
                        }
                    }
                }
            }
        }
        for (file, err) in &broken {
            if self.config_errors.get(file) != Some(err) {
                error!("configuration file not applied, nothing changed: {err}");
            }
        }
        for file in self.config_errors.keys() {
            if !broken.contains_key(file) {
                info!("configuration file {} is valid again", file.display());
            }
        }
        self.config_errors = broken;
        let gone: Vec<String> = self.from_config.keys().filter(|n| !defined.contains_key(*n)).cloned().collect();
        for name in gone {
            info!("gateway {name}: its configuration file no longer defines it; removing");
            if let Err(e) = self.delete(&name) {
                error!("gateway {name}: not removed: {e}");
            }
        }
        if self.from_config != defined {
            self.from_config = defined;
            self.unsaved = true;
        }
    }
}
