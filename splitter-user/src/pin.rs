//! Pinned state in bpffs: the XDP program, one link per interface and every map, so the
//! datapath keeps forwarding when the agent stops or crashes, and a new agent adopts it.
//!
//! Layout under the `--bpffs` directory:
//! `prog` (the XDP program), `link-IFNAME` (its attachment to IFNAME), `maps/NAME`.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Map, MapData},
    Ebpf,
};

/// Statfs magic number of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Maps the datapath pins (every map of the object but aya-log's ring buffer).
pub use splitter_common::map_names::PINNED as PINNED_MAPS;

pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// Makes sure `dir` is (on) a BPF filesystem, mounting one if needed: on `dir`
    /// itself, or, where `dir` cannot be created (under a bare `/sys/fs/bpf` in sysfs), on
    /// its nearest existing ancestor, as systemd does for `/sys/fs/bpf`.
    pub fn open(dir: &Path) -> Result<Self> {
        if fs::create_dir_all(dir).is_err() {
            let ancestor = dir.ancestors().skip(1).find(|a| a.is_dir()).context("no existing ancestor")?;
            if !is_bpffs(ancestor)? {
                mount_bpffs(ancestor)?;
            }
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if !is_bpffs(dir)? {
            mount_bpffs(dir)?;
        }
        fs::create_dir_all(dir.join("maps"))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn program(&self) -> PathBuf {
        self.dir.join("prog")
    }

    pub fn link(&self, iface: &str) -> PathBuf {
        self.dir.join(format!("link-{iface}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// True when a previous agent left a datapath here attached to every `iface`.
    pub fn has_datapath(&self, ifaces: &[String]) -> bool {
        self.program().exists()
            && splitter_common::map_names::CORE.iter().all(|m| self.map(m).exists())
            && ifaces.iter().all(|i| self.link(i).exists())
    }

    /// Pins every datapath map of a freshly loaded object.
    pub fn pin_maps(&self, ebpf: &Ebpf) -> Result<()> {
        fs::create_dir_all(self.dir.join("maps"))?;
        for name in PINNED_MAPS {
            let path = self.map(name);
            let _ = fs::remove_file(&path);
            ebpf.map(name)
                .with_context(|| format!("no map {name}"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(())
    }

    /// Opens a pinned map as the given kind of aya map.
    pub fn open_map(&self, name: &str, kind: fn(MapData) -> Map) -> Result<Map> {
        let path = self.map(name);
        let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
        Ok(kind(data))
    }

    /// Removes every pin: links first (which detaches the program), then program and
    /// maps. Returns what was removed.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut links: Vec<PathBuf> = fs::read_dir(&self.dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("link-")))
            .collect();
        links.sort();
        for path in links.into_iter().chain([self.program()]).chain(PINNED_MAPS.iter().map(|m| self.map(m))) {
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
        let _ = fs::remove_dir(self.dir.join("maps"));
        Ok(removed)
    }
}

/// Where [`Pins::open`] would have to mount a BPF filesystem for `dir` (which needs
/// CAP_SYS_ADMIN), or `None` when `dir`, or the nearest existing directory above it, is
/// on one already.
pub fn mount_needed(dir: &Path) -> Option<PathBuf> {
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    let existing = dir.ancestors().find(|a| a.is_dir())?;
    if is_bpffs(existing).unwrap_or(false) {
        return None;
    }
    // Under sysfs the directory cannot be created: the mount goes on the ancestor.
    let in_sysfs = statfs_magic(existing).is_ok_and(|m| m == SYSFS_MAGIC);
    Some(if in_sysfs { existing.to_path_buf() } else { dir.to_path_buf() })
}

fn mount_bpffs(dir: &Path) -> Result<()> {
    let target = CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: all strings are valid and NUL-terminated; no mount data is passed.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("mounting a BPF filesystem on {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> Result<bool> {
    Ok(statfs_magic(dir)? == BPF_FS_MAGIC)
}

/// The file system type (magic number) `dir` is on.
fn statfs_magic(dir: &Path) -> Result<i64> {
    let path = CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid statfs buffer for the call to fill; `path` is NUL-terminated.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        bail!("statfs {}: {}", dir.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}
