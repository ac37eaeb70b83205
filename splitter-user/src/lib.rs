//! The agent and CLI as a library: the `splitter` binary is a thin front end, and the
//! fuzz targets (`fuzz/`) drive the same parser, request router and service.

pub mod agent;
pub mod canary;
pub mod client;
pub mod control;
pub mod datapath;
pub mod events;
pub mod gateway;
pub mod health;
pub mod metrics;
pub mod pin;
pub mod service;
pub mod system;
