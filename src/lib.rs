//! snapblk: a userspace block-device server with instant redirect-on-write snapshots.
//!
//! A request flows front end (`snapblk-nbd`, `snapblk-ublk` via [`frontend`]) → volume handle
//! ([`engine::VolumeHandle`]) → engine (maps, slots, journal). Snapshots go on to the object
//! store ([`store`]: upload, verify, export, GC). [`attach`] keeps the volumes attached to the
//! kernel (ublk, kernel NBD). [`control`] is the HTTP/JSON API and CLI;
//! [`daemon`] ties them together.

pub mod attach;
pub mod clock;
pub mod codec;
pub mod control;
pub mod daemon;
pub mod ebs;
pub mod engine;
pub mod frontend;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod http1;
pub mod jobs;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod service;
pub mod statelog;
pub mod store;
pub mod tls;
pub mod units;
