//! Checks against the host before touching the kernel.

use std::{ffi::CString, fs};

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The interface index of `name`, or one clear error if there is no such interface.
pub fn ifindex(name: &str) -> Result<u32> {
    let c_name = CString::new(name).with_context(|| format!("interface name {name:?} contains a NUL byte"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        bail!("interface {name:?} does not exist (in this network namespace)");
    }
    Ok(index)
}

/// Fails unless this process may load BPF programs and attach XDP (CAP_NET_ADMIN and
/// CAP_BPF or CAP_SYS_ADMIN in its effective set).
pub fn require_bpf_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if !(has(CAP_NET_ADMIN) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))) {
        bail!("insufficient privileges: the agent needs root (CAP_BPF and CAP_NET_ADMIN) to load and attach XDP programs");
    }
    Ok(())
}
