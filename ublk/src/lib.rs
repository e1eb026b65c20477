//! Kernel-facing block front ends for snapblk. This crate is the only place that talks to the
//! kernel's block drivers:
//!
//! - [`ublk`]: `/dev/ublkbN` devices through `/dev/ublk-control` (via `libublk`): one thread per
//!   hardware queue, each serving its requests through its own [`BlockTarget`];
//! - [`nbd_kernel`]: the kernel NBD driver configured over generic netlink (connect,
//!   reconfigure after a restart, disconnect), with sockets the caller serves itself.
//!
//! It knows nothing of volumes, snapshots or files: the caller implements [`BlockTarget`] for
//! whatever it serves. Every `unsafe` block of the project lives in this crate (the workspace
//! denies `unsafe_code` everywhere else), each with a `SAFETY:` comment; [`sys`] holds the
//! system calls the other crates need that no safe wrapper offers.

// The kernel interfaces here are raw system calls: the one crate that may use `unsafe`.
#![allow(unsafe_code)]

pub mod nbd_kernel;
pub mod sys;
mod target;
pub mod ublk;

pub use target::{decode, BlockTarget, Op, TargetError};
