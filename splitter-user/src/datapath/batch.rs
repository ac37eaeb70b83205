//! Reading a whole BPF hash map with `BPF_MAP_LOOKUP_BATCH`: a few system calls for the
//! whole table instead of two per entry, so that expiry and occupancy cost next to nothing
//! even with conntrack full.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use bytemuck::Pod;

/// `BPF_MAP_LOOKUP_BATCH` from the kernel's UAPI.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries read per system call.
pub const BATCH: usize = 4096;

/// The number of entries of the hash map `fd`.
pub fn count<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n = 0;
    for_each::<K, V>(fd, |_, _| n += 1)?;
    Ok(n)
}

/// Calls `f` with every entry of the hash map `fd`, one batch at a time: memory stays at
/// one batch whatever the table holds.
pub fn for_each<K: Pod, V: Pod>(fd: BorrowedFd<'_>, mut f: impl FnMut(&K, &V)) -> io::Result<()> {
    let mut keys = vec![K::zeroed(); BATCH];
    let mut values = vec![V::zeroed(); BATCH];
    // Hash maps use a bucket index (u32) as the batch token; room for a u64 to be safe.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token_in) as u64 },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values and two tokens, all
        // alive for the call; the kernel writes at most `count` entries and the token.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>() as u32) };
        let got = (attr.count as usize).min(BATCH);
        for (k, v) in keys[..got].iter().zip(&values[..got]) {
            f(k, v);
        }
        if rc < 0 {
            let err = io::Error::last_os_error();
            // ENOENT: the last batch (possibly empty) was read.
            if err.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(err);
        }
        token_in = token_out;
        first = false;
    }
}
