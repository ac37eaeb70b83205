//! Types and pure logic shared by the kernel program (`splitter-ebpf`) and the agent
//! (`splitter-user`).
//!
//! Everything here is `no_std` so the kernel program can use it; host-only helpers sit
//! behind the `alloc`/`user` features. Shared map values are `#[repr(C)]`, `Pod`, without
//! padding, and carry a size assertion.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod bench_tcp;
pub mod conntrack;
pub mod counters;
pub mod csum;
pub mod flow;
pub mod maps;
pub mod table;

pub use counters::{ForwardEvent, PacketClass};

/// Name of the XDP program inside the object.
pub const PROGRAM_NAME: &str = "splitter";

/// Asserts at compile time that a shared type has the size the other side expects.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
