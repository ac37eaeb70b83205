//! Getting a datapath running: attached fresh, adopted from the pins an earlier agent left
//! (the same build), or upgraded in place (another build of the same map layout: the new
//! program takes over the pinned maps and replaces the old one on every interface with
//! one `bpf_link_update` each, so no flow is lost). Pins of another layout are refused
//! with what differs, and nothing changes.

use std::mem::size_of;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, MapInfo},
    programs::{
        links::{FdLink, PinnedLink},
        ProgramInfo, Xdp, XdpMode,
    },
    Ebpf,
};
use log::info;
use splitter_common::{
    map_names,
    maps::{
        BucketTable, DatapathInfo, FlowEntry, FlowKey, GatewayCounters, GatewayKey, GatewayState, SourcePool, TargetCounters, TargetEntry,
    },
    LAYOUT_VERSION, PROGRAM_NAME,
};

use crate::{
    datapath::{load_object, Limits, Maps},
    pin::Pins,
};

/// How the datapath came to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum How {
    /// Loaded and attached by this agent.
    Attached,
    /// Taken over as it was: the pinned program is this agent's own build.
    Adopted,
    /// The pinned maps taken over, the program replaced by this agent's.
    Upgraded { from_build: Option<u64>, from_program: u32 },
}

/// The running datapath: its maps, program, build, and what keeps it attached.
pub struct Running {
    pub maps: Maps,
    pub program_id: u32,
    pub build_id: u64,
    pub how: How,
    /// The loaded object, when this agent loaded the program (ephemeral links live in it).
    pub ebpf: Option<Ebpf>,
}

/// The build id of an eBPF object: a digest of its bytes (FNV-1a, 64 bits).
pub fn build_id(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// `build` as operators see it (16 hex digits).
pub fn describe_build(build: u64) -> String {
    format!("{build:016x}")
}

/// Key and value sizes of each map of this agent's layout.
fn expected_sizes(name: &str) -> Option<(usize, usize)> {
    Some(match name {
        map_names::GATEWAYS => (size_of::<GatewayKey>(), size_of::<GatewayState>()),
        map_names::BUCKET_TABLES => (4, size_of::<BucketTable>()),
        map_names::TARGETS => (4, size_of::<TargetEntry>()),
        map_names::CONNTRACK | map_names::HALF_OPEN => (size_of::<FlowKey>(), size_of::<FlowEntry>()),
        map_names::TARGET_COUNTERS => (4, size_of::<TargetCounters>()),
        map_names::GATEWAY_COUNTERS => (4, size_of::<GatewayCounters>()),
        map_names::PACKET_COUNTERS | map_names::FORWARD_EVENTS | map_names::FLOW_EVENTS => (4, 8),
        map_names::SOURCE_POOLS => (4, size_of::<SourcePool>()),
        map_names::TARGET_OUTCOMES => (4, size_of::<splitter_common::maps::TargetOutcomes>()),
        map_names::DATAPATH_INFO => (4, size_of::<DatapathInfo>()),
        map_names::ADDRESS_FILTER => (4, size_of::<splitter_common::maps::AddressFilter>()),
        map_names::DSR_SOURCES => (4, size_of::<splitter_common::maps::DsrSource>()),
        map_names::DNAT_REPLIES => (size_of::<GatewayKey>(), size_of::<splitter_common::maps::DnatReply>()),
        map_names::GATEWAYS6 => (size_of::<splitter_common::maps::GatewayKey6>(), size_of::<GatewayState>()),
        map_names::TARGETS6 => (4, size_of::<splitter_common::maps::TargetEntry6>()),
        map_names::CONNTRACK6 | map_names::HALF_OPEN6 => {
            (size_of::<splitter_common::maps::FlowKey6>(), size_of::<splitter_common::maps::FlowEntry6>())
        }
        map_names::DSR_SOURCES6 => (4, size_of::<splitter_common::maps::DsrSource6>()),
        map_names::DNAT_REPLIES6 => (size_of::<splitter_common::maps::GatewayKey6>(), size_of::<splitter_common::maps::DnatReply6>()),
        map_names::PORT_CHOICES => (size_of::<FlowKey>(), size_of::<u32>()),
        map_names::PORT_CHOICES6 => (size_of::<splitter_common::maps::FlowKey6>(), size_of::<u32>()),
        _ => return None,
    })
}

/// What the pinned datapath says it is (none from an agent that did not record it).
fn pinned_info(pins: &Pins) -> Option<DatapathInfo> {
    let path = pins.map(map_names::DATAPATH_INFO);
    let data = MapData::from_pin(&path).ok()?;
    let map: aya::maps::Array<MapData, DatapathInfo> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    map.get(&0, 0).ok().filter(|i| i.layout_version != 0)
}

/// Refuses pins whose maps another layout made: the new program would read and write them
/// as its own and corrupt the flows they hold.
fn check_layout(pins: &Pins, pinned: Option<&DatapathInfo>) -> Result<()> {
    let mut differences = Vec::new();
    for name in map_names::PINNED {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).with_context(|| format!("reading pinned map {}", path.display()))?;
        let Some((key, value)) = expected_sizes(name) else { continue };
        let (pinned_key, pinned_value) = (info.key_size() as usize, info.value_size() as usize);
        if (pinned_key, pinned_value) != (key, value) {
            differences.push(format!(
                "{name} holds {pinned_key}-byte keys and {pinned_value}-byte values where this agent's have {key} and {value}"
            ));
        }
    }
    let version = pinned.map_or(1, |i| i.layout_version);
    if differences.is_empty() && version == LAYOUT_VERSION {
        return Ok(());
    }
    if differences.is_empty() {
        differences.push(format!("it says it is of layout version {version}"));
    }
    bail!(
        "the datapath pinned under {} was made with another map layout than this agent's (version {LAYOUT_VERSION}): {}; \
         taking those maps over would corrupt the flows they hold, so nothing was changed and the running datapath keeps \
         forwarding; run an agent of that layout, or `splitter agent --cleanup` (which drops established connections) and start again",
        pins.dir().display(),
        differences.join("; ")
    )
}

/// Gets the datapath running on `ifaces`: with `pins`, adopted or upgraded from what an
/// earlier agent left, else attached fresh and pinned; without, attached for this agent's
/// life.
pub fn run(object: &[u8], ifaces: &[String], mode: XdpMode, limits: Limits, pins: Option<&Pins>, log_level: u8) -> Result<Running> {
    let build_id = build_id(object);
    let info = DatapathInfo { layout_version: LAYOUT_VERSION, _pad: 0, build_id };
    let Some(pins) = pins else {
        let mut ebpf = load_object(object, limits, log_level, None)?;
        let program = load_program(&mut ebpf)?;
        for iface in ifaces {
            program.attach(iface, mode).with_context(|| format!("attaching XDP to {iface}"))?;
        }
        let program_id = program.info().map(|i| i.id()).unwrap_or(0);
        let mut maps = Maps::take(&mut ebpf)?;
        maps.record_datapath(info)?;
        return Ok(Running { maps, program_id, build_id, how: How::Attached, ebpf: Some(ebpf) });
    };
    if pins.has_datapath(ifaces) {
        let pinned = pinned_info(pins);
        check_layout(pins, pinned.as_ref())?;
        let running_program = ProgramInfo::from_pin(pins.program()).map(|i| i.id()).unwrap_or(0);
        // The pinned maps, and those this build added, created and pinned.
        let mut ebpf = load_object(object, limits, log_level, Some(pins))?;
        if pinned.is_some_and(|p| p.build_id == build_id) {
            let mut maps = Maps::take(&mut ebpf)?;
            maps.record_datapath(info)?;
            return Ok(Running { maps, program_id: running_program, build_id, how: How::Adopted, ebpf: None });
        }
        let program = load_program(&mut ebpf)?;
        for iface in ifaces {
            let pinned_link = PinnedLink::from_pin(pins.link(iface)).with_context(|| format!("opening the pinned link of {iface}"))?;
            let fd_link: FdLink = pinned_link.into();
            let link =
                aya::programs::xdp::XdpLink::try_from(fd_link).with_context(|| format!("the pinned link of {iface} is not an XDP link"))?;
            // One atomic replacement per interface: packets see the old program or the new.
            let id = program.attach_to_link(link).with_context(|| format!("replacing the program on {iface}"))?;
            // The link stays pinned; this agent keeps no handle on it.
            drop(program.take_link(id)?);
        }
        std::fs::remove_file(pins.program()).with_context(|| format!("unpinning the old program at {}", pins.program().display()))?;
        program.pin(pins.program()).context("pinning the new program")?;
        let program_id = program.info().map(|i| i.id()).unwrap_or(0);
        let mut maps = Maps::take(&mut ebpf)?;
        maps.record_datapath(info)?;
        info!(
            "upgraded the datapath under {}: program {running_program} (build {}) replaced by {program_id} (build {}), maps kept",
            pins.dir().display(),
            pinned.map_or("unknown".into(), |p| describe_build(p.build_id)),
            describe_build(build_id)
        );
        let how = How::Upgraded { from_build: pinned.map(|p| p.build_id), from_program: running_program };
        return Ok(Running { maps, program_id, build_id, how, ebpf: Some(ebpf) });
    }
    pins.remove_all()?;
    let maps_dir = pins.map(map_names::GATEWAYS).parent().map(std::path::Path::to_path_buf).unwrap_or_else(|| pins.dir().to_path_buf());
    std::fs::create_dir_all(&maps_dir).with_context(|| format!("creating {}", maps_dir.display()))?;
    let mut ebpf = load_object(object, limits, log_level, Some(pins))?;
    let program = load_program(&mut ebpf)?;
    program.pin(pins.program()).context("pinning the program")?;
    for iface in ifaces {
        let link_id = program.attach(iface, mode).with_context(|| format!("attaching XDP to {iface}"))?;
        let link: FdLink = program.take_link(link_id)?.try_into().context("the XDP link is not a bpf_link")?;
        link.pin(pins.link(iface)).with_context(|| format!("pinning the link of {iface}"))?;
    }
    let program_id = program.info().map(|i| i.id()).unwrap_or(0);
    let mut maps = Maps::take(&mut ebpf)?;
    maps.record_datapath(info)?;
    Ok(Running { maps, program_id, build_id, how: How::Attached, ebpf: Some(ebpf) })
}

fn load_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program: &mut Xdp = ebpf.program_mut(PROGRAM_NAME).context("the eBPF object has no XDP program named splitter")?.try_into()?;
    program.load().context("loading the XDP program into the kernel")?;
    Ok(program)
}
