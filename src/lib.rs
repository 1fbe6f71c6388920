//! sprited: the root daemon of a sprite. See `ARCHITECTURE.md` for the map of
//! which module owns which OS resource.
#![deny(unsafe_code)]

pub mod api;
pub mod archive;
pub mod cgroup;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod config;
pub mod container;
pub mod criu;
pub mod daemon;
pub mod durable;
pub mod exec;
pub mod files;
pub mod fs;
pub mod lifecycle;
pub mod network;
pub mod notify;
pub mod policy;
pub mod ports;
pub mod reaper;
pub mod remote;
pub mod sleep;
pub mod statedir;
pub mod supervisor;
pub mod sys;
pub mod watch;
