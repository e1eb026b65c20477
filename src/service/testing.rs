//! Helpers for the operations layer's unit tests: a service on a fresh directory with a manual
//! clock.

use std::sync::Arc;

use super::{Caller, CreateVolume, Service, Status};
use crate::clock::ManualClock;
use crate::engine::Engine;
use crate::policy::{PolicySpec, Retention, Schedule};

pub fn ts(s: &str) -> u64 {
    s.parse::<jiff::Timestamp>().unwrap().as_second() as u64
}

/// A service on `dir`; uploads off (the store is not what these test) plus `config`
/// (more snapblk.toml).
pub fn service(dir: &std::path::Path, clock: Arc<ManualClock>, config: &str) -> Arc<Service> {
    std::fs::write(dir.join("snapblk.toml"), format!("[upload]\nenabled = false\n{config}")).unwrap();
    let engine = Engine::open_with_clock(dir, clock).unwrap();
    let store = crate::store::StoreService::open(dir, engine.clone()).unwrap();
    let attachments = Arc::new(crate::attach::Attachments::new(
        engine.clone(),
        tokio::runtime::Handle::current(),
        Arc::new(snapblk_nbd::ServerConfig::default()),
    ));
    let status = Status {
        version: String::new(),
        dir: dir.to_path_buf(),
        pid: 0,
        nbd_socket: dir.join("nbd.sock"),
        nbd_tcp: None,
        api: None,
    };
    Service::new(engine, store, attachments, status).unwrap()
}

/// A 1 MiB volume named `name`.
pub async fn volume(svc: &Service, name: &str) {
    let req =
        CreateVolume { name: name.into(), size: Some(1 << 20), cluster_size: None, region: None, from_snapshot: None };
    svc.create_volume(&Caller::Local, req).await.unwrap();
}

/// A policy with the defaults but its schedule and retention.
pub fn policy(name: &str, schedule: Schedule, retention: Retention) -> PolicySpec {
    PolicySpec {
        copy_to: None,
        archive_after: None,
        archive_to: None,
        name: name.into(),
        schedule,
        tz: "UTC".into(),
        retention,
        overlap: Default::default(),
        missed: Default::default(),
        skip_if_unchanged: false,
        after_upload: false,
        on_volume_delete: Default::default(),
    }
}

/// An hourly policy keeping the last `keep_last`.
pub fn hourly(name: &str, keep_last: u32) -> PolicySpec {
    let every_hour = Schedule::Every { every: 3600, start: "00:00".into() };
    policy(name, every_hour, Retention { keep_last: Some(keep_last), ..Default::default() })
}
