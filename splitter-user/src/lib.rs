//! The agent and CLI as a library: the `splitter` binary is a thin front end, and the
//! fuzz targets (`fuzz/`) drive the same parser, request router and controller.
//!
//! Modules depend one way (docs/ARCHITECTURE.md has the map): `gateway` <- `rollout`,
//! `health`, `config` <- `api` <- `events`, `datapath` <- `state` <- `cluster`, `metrics` <-
//! `controller` <- `control` (HTTP server), `client` (CLI), `validate` <- `agent` <-
//! `decap`.

pub mod agent;
pub mod analysis;
pub mod api;
pub mod attach;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod controller;
pub mod datapath;
pub mod decap;
pub mod events;
pub mod gateway;
pub mod health;
pub mod metrics;
pub mod pin;
pub mod rollout;
pub mod state;
pub mod system;
pub mod tunnel_probe;
pub mod ui;
pub mod validate;
