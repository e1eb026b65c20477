//! `snapblk serve`: owns the directory, opens the engine, serves NBD (unix socket and TCP)
//! and the control API, and shuts down cleanly on SIGTERM/SIGINT.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use snapblk_nbd::{serve_connection, ServerConfig};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::attach::Attachments;
use crate::control::api::{router, Status};
use crate::control::cli::ServeArgs;
use crate::control::size::parse_size;
use crate::engine::{Engine, ErrorKind};
use crate::frontend::{widen_send_buffer, NbdCatalog};
use crate::store::StoreService;

/// Exclusive ownership of a daemon directory: a `flock` on `DIR/snapblk.lock`, which holds
/// the owner's pid. Released when the process exits, however it exits.
fn lock_dir(dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = dir.join("snapblk.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            bail!(
                "another snapblk daemon already owns {} (pid {}); stop it first or use another --dir",
                dir.display(),
                pid.trim()
            );
        }
    };
    lock.set_len(0)?;
    lock.rewind()?;
    write!(lock, "{}", std::process::id())?;
    Ok(lock)
}

fn parse_default_volume(spec: &str) -> anyhow::Result<(String, u64)> {
    let Some((name, size)) = spec.split_once(':') else {
        bail!("--default-volume takes NAME:SIZE, e.g. disk0:10G (got '{spec}')");
    };
    let size = parse_size(size).map_err(anyhow::Error::msg)?;
    Ok((name.to_string(), size))
}

/// Binds a unix socket, replacing a stale socket file (safe: we hold the directory lock).
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

pub fn serve(dir: &Path, args: &ServeArgs) -> anyhow::Result<()> {
    let default_volume = args.default_volume.as_deref().map(parse_default_volume).transpose()?;
    let tcp: Option<std::net::SocketAddr> = match args.nbd_listen.as_str() {
        "none" => None,
        a => Some(a.parse().with_context(|| format!("--nbd-listen takes HOST:PORT or 'none' (got '{a}')"))?),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let _lock = lock_dir(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(dir, tcp, default_volume))
}

async fn run(
    dir: PathBuf,
    tcp: Option<std::net::SocketAddr>,
    default_volume: Option<(String, u64)>,
) -> anyhow::Result<()> {
    let engine = Engine::open(&dir).with_context(|| format!("cannot open the engine in {}", dir.display()))?;
    if let Some((name, size)) = default_volume {
        match engine.volume(&name) {
            Ok(v) if v.size != size => {
                tracing::warn!(
                    name,
                    existing = v.size,
                    requested = size,
                    "default volume exists with another size; keeping it"
                )
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                engine.create_volume(&name, size, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let store = StoreService::open(&dir, engine.clone())
        .with_context(|| format!("cannot open the snapshot store configuration in {}", dir.display()))?;
    store.start();
    let catalog = Arc::new(NbdCatalog::new(engine.clone(), store.clone()));
    let config = Arc::new(ServerConfig::default());
    // Devices a previous daemon attached to the kernel: taken back before serving (ublk user
    // recovery, kernel NBD reconfigure), so their I/O resumes.
    let attachments = Arc::new(Attachments::new(engine.clone(), tokio::runtime::Handle::current(), config.clone()));
    {
        let a = attachments.clone();
        tokio::task::spawn_blocking(move || a.restore()).await?;
    }
    let nbd_path = dir.join("nbd.sock");
    let control_path = dir.join("control.sock");
    let nbd_unix = bind_unix(&nbd_path)?;
    let nbd_tcp = match tcp {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?),
        None => None,
    };
    // The bound address (a requested port 0 becomes the actual port).
    let tcp = match &nbd_tcp {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let control = bind_unix(&control_path)?.into_std()?;
    let status = Status {
        version: env!("CARGO_PKG_VERSION").into(),
        dir: dir.clone(),
        pid: std::process::id(),
        nbd_socket: nbd_path.clone(),
        nbd_tcp: tcp.map(|a| a.to_string()),
    };

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (catalog, config) = (catalog.clone(), config.clone());
        tasks.spawn(async move {
            loop {
                match nbd_unix.accept().await {
                    Ok((s, _)) => {
                        widen_send_buffer(s.as_fd());
                        spawn_connection(s, catalog.clone(), config.clone(), "unix".into())
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    if let Some(listener) = nbd_tcp {
        let (catalog, config) = (catalog.clone(), config.clone());
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => {
                        let _ = s.set_nodelay(true);
                        spawn_connection(s, catalog.clone(), config.clone(), peer.to_string())
                    }
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    let app = router(engine.clone(), store.clone(), attachments.clone(), status);
    let stop_control = serve_control(control, app)?;

    let tcp_note = tcp.map_or(String::new(), |a| format!(", {a}"));
    crate::logging::say(format_args!(
        "snapblk: serving {} (nbd: {}{tcp_note}; control: {})",
        dir.display(),
        nbd_path.display(),
        control_path.display()
    ));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    let _ = stop_control.send(());
    tasks.abort_all();
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown()).await?;
    for p in [&nbd_path, &control_path] {
        let _ = std::fs::remove_file(p);
    }
    let attached = attachments.list();
    if !attached.is_empty() {
        let devices: Vec<String> = attached.iter().map(|a| a.device.display().to_string()).collect();
        crate::logging::say(format_args!(
            "snapblk: {} stay attached and wait for the next daemon on {} (detach volumes to remove them)",
            devices.join(", "),
            dir.display()
        ));
    }
    crate::logging::say(format_args!("snapblk: stopped"));
    Ok(())
}

/// Serves the control API on a thread of its own (a single-threaded runtime): a request, a
/// snapshot create above all, is answered at once instead of queueing behind the NBD
/// connections on the busy data-path workers. Long work still goes elsewhere (blocking
/// threads, jobs on the main runtime). Stops when the returned sender fires or is dropped.
fn serve_control(
    listener: std::os::unix::net::UnixListener,
    app: axum::Router,
) -> anyhow::Result<tokio::sync::oneshot::Sender<()>> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("snapblk-control".into()).spawn(move || {
        raise_priority();
        runtime.block_on(async move {
            let listener = match UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "control API cannot start"),
            };
            tokio::select! {
                r = axum::serve(listener, app) => if let Err(e) = r {
                    tracing::error!(error = %e, "control API stopped");
                },
                _ = stopped => {}
            }
        })
    })?;
    Ok(stop)
}

/// Control requests (a snapshot create above all) should not queue behind the data path for
/// a CPU: the control thread runs at a higher priority than the rest of the daemon, when the
/// daemon may raise it (root, or CAP_SYS_NICE); otherwise at the same one.
fn raise_priority() {
    const CONTROL_NICE: libc::c_int = -10;
    // SAFETY: gettid has no arguments; setpriority takes plain integers (the thread's own id).
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, CONTROL_NICE) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "control thread keeps the default priority");
    }
}

fn spawn_connection<S>(stream: S, catalog: Arc<NbdCatalog>, config: Arc<ServerConfig>, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        tracing::debug!(peer, "NBD connection");
        if let Err(e) = serve_connection(stream, catalog, &config).await {
            tracing::info!(peer, error = %e, "NBD connection ended with an error");
        }
    });
}

/// Accept errors (e.g. out of file descriptors) are logged and retried after a pause.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
