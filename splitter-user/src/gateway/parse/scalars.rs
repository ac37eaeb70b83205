//! Scalar values of gateway documents: names, weights, targets, ports, and the rule that
//! shares the rest of 100% among routes without a weight.

use std::net::IpAddr;

use crate::gateway::{Protocol, Target, FULL_WEIGHT};

/// Longest gateway or route name, in bytes.
pub const MAX_NAME_BYTES: usize = 253;

/// Checks a gateway or route name; the message says what is wrong with it.
pub fn check_name(text: &str) -> Result<(), String> {
    let shown = || text.escape_default().to_string();
    if text.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("name `{}` contains white space or control characters", shown()));
    }
    if text.len() > MAX_NAME_BYTES {
        return Err(format!(
            "name `{}...` is {} bytes long, longer than the limit of {MAX_NAME_BYTES}",
            text.chars().take(32).collect::<String>(),
            text.len()
        ));
    }
    const SHAPE: &str = "names are segments separated by single slashes, like sava/sava/port";
    if text.starts_with('/') {
        return Err(format!("name `{}` starts with `/`: {SHAPE}", shown()));
    }
    if text.ends_with('/') {
        return Err(format!("name `{}` ends with `/`: {SHAPE}", shown()));
    }
    for segment in text.split('/') {
        match segment {
            "" => return Err(format!("name `{}` has an empty segment (`//`): {SHAPE}", shown())),
            "." | ".." => return Err(format!("name `{}` has a `{segment}` segment: {SHAPE}, none of them `.` or `..`", shown())),
            _ => {}
        }
    }
    Ok(())
}

/// Parses a weight: `90%`, `90`, `10.5%`, `0.01%`; returns hundredths of a percent.
pub fn parse_weight(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let number = trimmed.strip_suffix('%').unwrap_or(trimmed).trim_end();
    if number.starts_with('-') {
        return Err(format!("weight cannot be negative: `{trimmed}`"));
    }
    let not_a_weight = || format!("`{trimmed}` is not a weight: expected a percentage like 90%, 90 or 10.5%");
    let (whole, decimals) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(decimals) || (number.contains('.') && decimals.is_empty()) {
        return Err(not_a_weight());
    }
    if decimals.len() > 2 {
        return Err(format!("`{trimmed}` has more than two decimals: the finest weight step is 0.01%"));
    }
    let whole = whole.trim_start_matches('0');
    if whole.len() > 3 {
        return Err(format!("weight {trimmed} is more than 100%"));
    }
    let whole: u32 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| not_a_weight())? };
    let hundredths: u32 = format!("{decimals:0<2}").parse().map_err(|_| not_a_weight())?;
    let weight = whole * 100 + hundredths;
    if weight > FULL_WEIGHT {
        return Err(format!("weight {trimmed} is more than 100%"));
    }
    Ok(weight)
}

/// Writes a weight in hundredths of a percent as `90%`, `10.5%` or `0.01%`.
pub fn format_weight(hundredths: u32) -> String {
    let whole = hundredths / 100;
    match hundredths % 100 {
        0 => format!("{whole}%"),
        fraction if fraction % 10 == 0 => format!("{whole}.{}%", fraction / 10),
        fraction => format!("{whole}.{fraction:02}%"),
    }
}

/// Parses `IPV4:PORT` or `[IPV6]:PORT`.
pub(in crate::gateway) fn parse_target(text: &str) -> Result<Target, String> {
    let usage = || format!("`{text}` is not a target: expected IPV4:PORT like 10.1.0.11:8080 or [IPV6]:PORT like [2001:db8::11]:8080");
    let (address, port) = text.trim().rsplit_once(':').ok_or_else(usage)?;
    let addr: IpAddr = match address.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse().map_err(|_| usage())?),
        None => IpAddr::V4(address.parse().map_err(|_| usage())?),
    };
    check_unicast(addr).map_err(|why| format!("`{text}`: {why}"))?;
    let port = parse_port_number(port).map_err(|why| format!("`{text}`: {why}"))?;
    Ok(Target { addr, port })
}

pub(super) fn parse_port_number(text: &str) -> Result<u16, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a port number"));
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(format!("port {text} is out of range 1-65535")),
    }
}

/// Refuses addresses that cannot be one host: unspecified, broadcast, multicast.
pub(super) fn check_unicast(addr: impl Into<IpAddr>) -> Result<(), String> {
    let addr = addr.into();
    let broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || broadcast || addr.is_multicast() {
        Err(format!("{addr} is not a unicast address"))
    } else {
        Ok(())
    }
}

/// Parses a gateway port: `9050`, `9050/tcp`, `9050/udp` or `9050/http` (TCP at L4).
pub(super) fn parse_port_spec(text: &str) -> Result<(u16, Protocol), String> {
    let (number, protocol) = match text.split_once('/') {
        Some((number, protocol)) => (number, Some(protocol)),
        None => (text, None),
    };
    let port = parse_port_number(number.trim()).map_err(|why| format!("{why} (expected PORT or PORT/PROTO like 9050/http)"))?;
    let protocol = match protocol.map(str::trim) {
        None | Some("tcp") => Protocol::Tcp,
        Some("http") => Protocol::Http,
        Some("udp") => Protocol::Udp,
        Some(other) => return Err(format!("unknown protocol `{other}`: expected tcp, udp or http")),
    };
    Ok((port, protocol))
}

/// The weights in effect, in the order of `names` (which must be sorted): explicit weights
/// as given, and the routes without one share what is left equally; the hundredths that do
/// not divide evenly go one each to the first of them by name.
///
/// `complete` says the routes are all of the gateway's: if they all have a weight, the
/// weights must then add up to exactly 100%. Errors are the message only.
pub(in crate::gateway) fn effective_weights(names: &[&str], weights: &[Option<u32>], complete: bool) -> Result<Vec<u32>, String> {
    debug_assert!(names.windows(2).all(|pair| pair[0] <= pair[1]));
    let total: u32 = weights.iter().flatten().sum();
    if total > FULL_WEIGHT {
        return Err(format!("the weights add up to {}, more than 100%", format_weight(total)));
    }
    let unweighted = weights.iter().filter(|weight| weight.is_none()).count() as u32;
    if unweighted == 0 {
        if complete && total != FULL_WEIGHT {
            return Err(format!(
                "every route has a weight and they add up to {}; they must add up to 100% \
                 (or leave one route without a weight to take the rest)",
                format_weight(total)
            ));
        }
        return Ok(weights.iter().map(|weight| weight.unwrap_or(0)).collect());
    }
    let rest = FULL_WEIGHT - total;
    let mut leftover = rest % unweighted;
    Ok(weights
        .iter()
        .map(|weight| match weight {
            Some(weight) => *weight,
            None => {
                let extra = u32::from(leftover > 0);
                leftover -= extra;
                rest / unweighted + extra
            }
        })
        .collect())
}
