//! The sandbox core of `ringfence serve`: everything about a sandbox that is not a wire
//! protocol. `manager` owns lifecycles (create through an isolation tier, warm pools,
//! pause/resume, snapshots, forks, recovery after a restart, timeouts); `tier` is the seam
//! each isolation technology implements; `agent_client` multiplexes a sandbox's control
//! channel; `store` keeps keys, sandboxes, events and audit records in SQLite; `observe` and
//! `metrics` count and record; `interp` runs the code interpreter's kernels; `network` holds
//! each sandbox's network and egress policy.
//!
//! No HTTP here: E2B's REST and envd APIs, their error bodies and routing are
//! `ringfence-server`'s, which turns requests into calls on this crate.

#![forbid(unsafe_code)]

pub mod agent_client;
pub mod bounded;
pub mod builder;
pub mod catalog;
pub mod envd;
pub mod error;
pub mod interp;
pub mod live;
pub mod manager;
pub mod metrics;
pub mod network;
pub mod observe;
pub mod phases;
pub mod quota;
pub mod secrets;
pub mod store;
pub mod tier;
pub mod time;
pub mod volumes;
