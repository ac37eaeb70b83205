//! Checks against the host before touching the kernel, and user and group look-ups.

use std::{
    ffi::{CStr, CString},
    fs,
    path::Path,
};

use anyhow::{bail, Context, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The address this node sends from towards `addr` (what the kernel's routing picks).
pub fn source_towards(addr: std::net::IpAddr) -> std::io::Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect((addr, 9))?;
    Ok(socket.local_addr()?.ip())
}

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

/// The capabilities in this process's effective set, as a bit mask.
fn effective_capabilities() -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("no CapEff line in /proc/self/status")
}

/// What the agent needs the kernel to let it do, and the capabilities that allow it.
/// `mount_on`: a BPF filesystem must be mounted there (the pin directory is not on one).
pub fn missing_capabilities(effective: u64, mount_on: Option<&Path>) -> Vec<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF or CAP_SYS_ADMIN (to load BPF programs and maps)".to_string());
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON or CAP_SYS_ADMIN (for the verifier to accept the XDP program's packet pointer use)".to_string());
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN (to attach XDP programs to interfaces)".to_string());
    }
    if let (Some(dir), false) = (mount_on, has(CAP_SYS_ADMIN)) {
        missing.push(format!(
            "CAP_SYS_ADMIN (to mount a BPF filesystem on {}; or mount one there before starting, or run with --ephemeral)",
            dir.display()
        ));
    }
    missing
}

/// Fails unless this process may load BPF programs and attach XDP, with one line naming
/// every missing capability. `mount_on` as in [`missing_capabilities`].
pub fn require_bpf_privileges(mount_on: Option<&Path>) -> Result<()> {
    let missing = missing_capabilities(effective_capabilities()?, mount_on);
    if !missing.is_empty() {
        bail!(
            "insufficient privileges: the agent lacks {}; run it as root or grant these capabilities (deploy/splitter.service does)",
            missing.join(", and ")
        );
    }
    Ok(())
}

/// The group id of `spec`, a group name or a numeric gid; one clear error for a name no
/// group has.
pub fn resolve_group(spec: &str) -> Result<u32> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(spec).with_context(|| format!("--socket-group {spec:?}: contains a NUL byte"))?;
    // SAFETY: an all-zero group (integers and null pointers) is a valid value to fill.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    loop {
        // SAFETY: every pointer is valid for the call; `buf` is writable for its length.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            bail!("--socket-group {spec}: looking the group up: {}", std::io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            bail!("--socket-group {spec}: no group named {spec:?} (see /etc/group); give an existing group or a numeric gid");
        }
        return Ok(group.gr_gid);
    }
}

/// The name of group `gid`, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    // SAFETY: an all-zero group (integers and null pointers) is a valid value to fill.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: every pointer is valid for the call; `buf` is writable for its length.
    let rc = unsafe { libc::getgrgid_r(gid, &mut group, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success gr_name points at a NUL-terminated string inside `buf`.
    Some(unsafe { CStr::from_ptr(group.gr_name) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN) | (1 << CAP_PERFMON) | (1 << CAP_BPF);

    #[test]
    fn missing_capabilities_are_named() {
        assert!(missing_capabilities(ALL, Some(Path::new("/sys/fs/bpf"))).is_empty());
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON.
        assert!(missing_capabilities((1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN), None).is_empty());
        // Without CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON do, unless a bpffs must be mounted.
        let no_sys_admin = ALL & !(1 << CAP_SYS_ADMIN);
        assert!(missing_capabilities(no_sys_admin, None).is_empty());
        let m = missing_capabilities(no_sys_admin, Some(Path::new("/sys/fs/bpf")));
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_SYS_ADMIN (to mount a BPF filesystem on /sys/fs/bpf"), "{m:?}");
        let m = missing_capabilities(ALL & !(1 << CAP_NET_ADMIN), None);
        assert_eq!(m, vec!["CAP_NET_ADMIN (to attach XDP programs to interfaces)".to_string()]);
        let m = missing_capabilities((1 << CAP_NET_ADMIN) | (1 << CAP_BPF), None);
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_PERFMON or CAP_SYS_ADMIN"), "{m:?}");
        assert_eq!(missing_capabilities(0, Some(Path::new("/x"))).len(), 4);
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("0").unwrap(), 0);
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(group_name(0).as_deref(), Some("root"));
        let err = resolve_group("no-such-group-here").unwrap_err().to_string();
        assert!(err.contains("no group named \"no-such-group-here\""), "{err}");
    }
}
