//! `snapblk serve`: owns the directory, opens the engine, serves NBD (unix socket, and TCP on
//! a loopback address when asked) and the control API, and shuts down cleanly on
//! SIGTERM/SIGINT.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::fcntl::{Flock, FlockArg};
use snapblk_nbd::{serve_connection, ServerConfig, Tls};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::attach::Attachments;
use crate::control::api::router;
use crate::control::cli::ServeArgs;
use crate::engine::{Engine, ErrorKind};
use crate::frontend::{widen_send_buffer, NbdCatalog};
use crate::service::{Service, Status};
use crate::store::StoreService;
use crate::tls::{nbd_tls, nbd_tls_mode, NbdTlsMode, TlsFiles};
use crate::units::{parse_duration, parse_size};

/// At most one warning about refused NBD connections per this interval.
const REFUSED_WARNING_INTERVAL: Duration = Duration::from_secs(10);

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

/// Binds a unix socket, replacing a stale socket file (safe: we hold the directory lock). It is
/// created under the daemon's umask (077: its user only), then opened to `group` (mode 0660)
/// — its user's group when none is given, which DIR's 0700 keeps out anyway.
fn bind_unix(path: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove stale socket {}", path.display())),
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    listener.set_nonblocking(true)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// The group `--socket-group` names (a name or a numeric id).
fn socket_group(name: Option<&str>) -> anyhow::Result<Option<nix::unistd::Gid>> {
    let Some(name) = name else { return Ok(None) };
    if let Ok(id) = name.parse::<u32>() {
        return Ok(Some(nix::unistd::Gid::from_raw(id)));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid)),
        Ok(None) => bail!("--socket-group {name}: no such group; create it (groupadd {name}) or name an existing one"),
        Err(e) => bail!("--socket-group {name}: cannot look the group up: {e}"),
    }
}

/// The daemon directory is its user's alone (0700), or searchable by the socket group (0710)
/// so its members can reach the sockets — and nothing else: every file in it is 0600.
fn secure_dir(dir: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if group.is_some() { 0o710 } else { 0o700 };
    if let Some(gid) = group {
        nix::unistd::chown(dir, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {gid}", dir.display()))?;
    }
    let old =
        std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?.permissions().mode() & 0o777;
    if old != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
        if old & !mode != 0 {
            tracing::warn!(dir = %dir.display(), old = format!("{old:03o}"), new = format!("{mode:03o}"), "the daemon directory was open to other users; restricted it");
        }
    }
    Ok(())
}

/// What `--FLAG HOST:PORT` asks to listen on: the argument as given, and every address HOST
/// (an IP address or a host name) resolves to.
#[derive(Debug)]
struct Listen {
    arg: String,
    addrs: Vec<SocketAddr>,
}

/// `--FLAG HOST:PORT` resolved, with every address checked to be loopback (`refusal` says why
/// anything else is refused, given what was asked for); `None` when absent or `none`.
fn listen_address(
    flag: &str,
    listen: Option<&str>,
    example_port: u16,
    refusal: Option<&dyn Fn(&str) -> String>,
) -> anyhow::Result<Option<Listen>> {
    let Some(listen) = listen.map(str::trim).filter(|a| *a != "none") else {
        return Ok(None);
    };
    let usage = || {
        anyhow!("{flag} takes HOST:PORT, e.g. 127.0.0.1:{example_port} or localhost:{example_port} (got '{listen}')")
    };
    let Some((host, port)) = listen.rsplit_once(':') else { return Err(usage()) };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(usage());
    }
    let addrs: Vec<SocketAddr> = match listen.parse::<SocketAddr>() {
        Ok(addr) => vec![addr],
        Err(_) => listen
            .to_socket_addrs()
            .map_err(|e| anyhow!("{flag} {listen}: cannot resolve '{host}' ({e}); give a loopback address, e.g. 127.0.0.1:{example_port}"))?
            .collect(),
    };
    if addrs.is_empty() {
        bail!(
            "{flag} {listen}: '{host}' resolves to no address; give a loopback address, e.g. 127.0.0.1:{example_port}"
        );
    }
    let listen = Listen { arg: listen.to_string(), addrs };
    match refusal {
        Some(refusal) => loopback_only(listen, refusal).map(Some),
        None => Ok(Some(listen)),
    }
}

/// The addresses, if all are loopback; else `refusal` of the argument (and of the address it
/// resolved to, for a host name).
fn loopback_only(listen: Listen, refusal: impl Fn(&str) -> String) -> anyhow::Result<Listen> {
    if let Some(outside) = listen.addrs.iter().find(|a| !a.ip().is_loopback()) {
        let asked =
            if outside.to_string() == listen.arg { listen.arg.clone() } else { format!("{} ({outside})", listen.arg) };
        bail!("{}", refusal(&asked));
    }
    Ok(listen)
}

/// The TCP address to serve NBD on (`--nbd-listen`), if any. Without TLS required, loopback
/// addresses only: anyone who can connect could read and write every volume, which on
/// loopback means this machine's users (and SSH tunnels), as with the unix socket. With TLS
/// required (`tls_required`), any address: every client goes through the TLS handshake.
fn nbd_tcp_address(listen: Option<&str>, dir: &Path, tls_required: bool) -> anyhow::Result<Option<Listen>> {
    if tls_required {
        return listen_address("--nbd-listen", listen, 10809, None);
    }
    let refusal = |asked: &str| {
        format!(
            "refusing --nbd-listen {asked}: without TLS required, NBD on a non-loopback address would give every \
             host that can reach it full read/write access to every volume; configure TLS with --tls-cert FILE \
             --tls-key FILE (and --tls-ca FILE for client certificates) and --nbd-tls require (the default with \
             a certificate), or use the unix socket {}, or a loopback address (127.0.0.1:PORT) reached through an \
             SSH tunnel",
            dir.join("nbd.sock").display()
        )
    };
    listen_address("--nbd-listen", listen, 10809, Some(&refusal))
}

/// The address to serve metrics on (`--metrics-listen`), if any: loopback addresses only, for
/// the same reason as NBD: the endpoint has no TLS or authentication, and it names every
/// volume, snapshot and policy and shows how busy each is.
fn metrics_address(listen: Option<&str>) -> anyhow::Result<Option<Listen>> {
    let refusal = |asked: &str| {
        format!(
            "refusing --metrics-listen {asked}: the metrics endpoint is served without TLS or authentication and \
             names every volume, snapshot and policy, so it listens on loopback addresses only; use one \
             (e.g. 127.0.0.1:9100) and scrape it from this machine or through an SSH tunnel"
        )
    };
    listen_address("--metrics-listen", listen, 9100, Some(&refusal))
}

/// Binds a TCP listener on the first of the addresses that works.
fn bind_tcp(flag: &str, listen: &Listen) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(listen.addrs.as_slice()).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "; another program (another snapblk daemon?) listens there: stop it or choose another port"
        } else {
            ""
        };
        anyhow!("cannot listen on {} ({flag}): {e}{hint}", listen.arg)
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Longest path a unix socket can be bound to (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The unix sockets `DIR/nbd.sock` and `DIR/control.sock` must fit in `sun_path`; checked
/// before the directory is created, so a daemon that cannot bind them leaves nothing behind.
fn check_socket_paths(dir: &Path) -> anyhow::Result<()> {
    let path = std::path::absolute(dir)?.join("control.sock");
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        bail!(
            "the daemon directory's path is too long for its sockets: {} is {len} bytes, a unix socket path \
             takes at most {MAX_SOCKET_PATH}; use a shorter --dir",
            path.display()
        );
    }
    Ok(())
}

fn handshake_timeout(arg: &str) -> anyhow::Result<Duration> {
    let t = parse_duration(arg).map_err(|e| anyhow!("--handshake-timeout: {e}"))?;
    if t.is_zero() {
        bail!("--handshake-timeout must be more than 0 (got '{arg}')");
    }
    Ok(t)
}

pub fn serve(dir: &Path, args: &ServeArgs) -> anyhow::Result<()> {
    let default_volume = args.default_volume.as_deref().map(parse_default_volume).transpose()?;
    let tls_files =
        TlsFiles { cert: args.tls_cert.as_deref(), key: args.tls_key.as_deref(), ca: args.tls_ca.as_deref() };
    let tls_mode = nbd_tls_mode(args.nbd_tls, &tls_files)?;
    let tcp = nbd_tcp_address(args.nbd_listen.as_deref(), dir, tls_mode == NbdTlsMode::Require)?;
    let metrics = metrics_address(args.metrics_listen.as_deref())?;
    // The HTTPS API: any address (TLS and a token on every request), never without TLS.
    let api = listen_address("--api-listen", args.api_listen.as_deref(), 8443, None)?;
    let api_tls = match (&api, tls_files.cert, tls_files.key) {
        (None, _, _) => None,
        (Some(_), Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key, None)?),
        (Some(_), _, _) => bail!(
            "--api-listen serves the control API over HTTPS only (bearer tokens must not travel in clear): add --tls-cert FILE --tls-key FILE"
        ),
    };
    // The EBS direct API: over HTTPS with a certificate (any address), else loopback only.
    let ebs = match (tls_files.cert, tls_files.key) {
        (Some(_), Some(_)) => listen_address("--ebs-listen", args.ebs_listen.as_deref(), 9000, None)?,
        _ => {
            let refusal = |asked: &str| {
                format!(
                    "refusing --ebs-listen {asked}: without TLS the EBS API's requests (block data and signed \
                     headers) would cross the network in clear; add --tls-cert FILE --tls-key FILE for HTTPS, or use a \
                     loopback address (127.0.0.1:PORT)"
                )
            };
            listen_address("--ebs-listen", args.ebs_listen.as_deref(), 9000, Some(&refusal))?
        }
    };
    let ebs_tls = match (&ebs, tls_files.cert, tls_files.key) {
        (Some(_), Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key, None)?),
        _ => None,
    };
    let config = ServerConfig {
        handshake_timeout: handshake_timeout(&args.handshake_timeout)?,
        tls: nbd_tls(tls_mode, &tls_files)?,
        ..ServerConfig::default()
    };
    let slots = Arc::new(ConnectionSlots::new(args.max_connections));
    let group = socket_group(args.socket_group.as_deref())?;
    // Everything that can fail without the directory fails before it is touched: a daemon
    // that cannot serve (a port in use) leaves no volume, socket or file behind.
    check_socket_paths(dir)?;
    let listeners = Listeners {
        nbd_tcp: tcp.map(|l| bind_tcp("--nbd-listen", &l)).transpose()?,
        metrics: metrics.map(|l| bind_tcp("--metrics-listen", &l)).transpose()?,
        api: match (api, api_tls) {
            (Some(l), Some(tls)) => Some((bind_tcp("--api-listen", &l)?, tls)),
            _ => None,
        },
        ebs: ebs.map(|l| bind_tcp("--ebs-listen", &l)).transpose()?.map(|l| (l, ebs_tls)),
    };
    crate::fsutil::create_dir_all_durable(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    // Locked first: a second daemon on this directory changes nothing of the first's.
    let _lock = lock_dir(&dir)?;
    secure_dir(&dir, group)?;
    let sockets = UnixSockets::bind(&dir, group)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(dir, listeners, sockets, default_volume, config, slots))
}

/// The TCP listeners, bound before anything else.
struct Listeners {
    nbd_tcp: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
    /// The HTTPS control API, with its TLS configuration.
    api: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// The EBS direct API, with its TLS configuration if served over HTTPS.
    ebs: Option<(std::net::TcpListener, Option<Arc<rustls::ServerConfig>>)>,
}

/// The unix sockets `DIR/nbd.sock` and `DIR/control.sock`, bound before the engine opens; their
/// files are removed when the daemon stops or fails to start.
struct UnixSockets {
    nbd: Option<std::os::unix::net::UnixListener>,
    control: Option<std::os::unix::net::UnixListener>,
    nbd_path: PathBuf,
    control_path: PathBuf,
}

impl UnixSockets {
    fn bind(dir: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixSockets> {
        let (nbd_path, control_path) = (dir.join("nbd.sock"), dir.join("control.sock"));
        let mut sockets = UnixSockets { nbd: None, control: None, nbd_path, control_path };
        sockets.nbd = Some(bind_unix(&sockets.nbd_path, group)?);
        sockets.control = Some(bind_unix(&sockets.control_path, group)?);
        Ok(sockets)
    }
}

impl Drop for UnixSockets {
    fn drop(&mut self) {
        for p in [&self.nbd_path, &self.control_path] {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn run(
    dir: PathBuf,
    listeners: Listeners,
    mut sockets: UnixSockets,
    default_volume: Option<(String, u64)>,
    config: ServerConfig,
    slots: Arc<ConnectionSlots>,
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
    let config = Arc::new(config);
    // Devices a previous daemon attached to the kernel: taken back before serving (ublk user
    // recovery, kernel NBD reconfigure), so their I/O resumes.
    let attachments = Arc::new(Attachments::new(engine.clone(), tokio::runtime::Handle::current(), config.clone()));
    {
        let a = attachments.clone();
        tokio::task::spawn_blocking(move || a.restore()).await?;
    }
    let (nbd_path, control_path) = (sockets.nbd_path.clone(), sockets.control_path.clone());
    let nbd_unix = UnixListener::from_std(sockets.nbd.take().expect("bound"))?;
    let nbd_tcp = listeners.nbd_tcp.map(TcpListener::from_std).transpose()?;
    // The bound address (a requested port 0 becomes the actual port).
    let tcp = match &nbd_tcp {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let metrics = listeners.metrics.map(TcpListener::from_std).transpose()?;
    // Shown in the ready line: a requested port 0 becomes the actual port.
    let metrics_note = match &metrics {
        Some(l) => format!("; metrics: http://{}/metrics", l.local_addr()?),
        None => String::new(),
    };
    let control = sockets.control.take().expect("bound");
    let status = Status {
        version: env!("CARGO_PKG_VERSION").into(),
        dir: dir.clone(),
        pid: std::process::id(),
        nbd_socket: nbd_path.clone(),
        nbd_tcp: tcp.map(|a| a.to_string()),
        api: listeners.api.as_ref().and_then(|(l, _)| l.local_addr().ok()).map(|a| a.to_string()),
    };
    let service = Service::new(engine.clone(), store.clone(), attachments.clone(), status)?;
    service.start();
    let catalog = Arc::new(NbdCatalog::new(service.clone(), false));

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (catalog, config, slots) = (catalog.clone(), config.clone(), slots.clone());
        tasks.spawn(async move {
            loop {
                match nbd_unix.accept().await {
                    // Over the cap: dropped, i.e. closed at once.
                    Ok((s, _)) => match slots.admit() {
                        Some(slot) => {
                            widen_send_buffer(s.as_fd());
                            spawn_connection(s, catalog.clone(), config.clone(), "unix".into(), slot)
                        }
                        None => drop(s),
                    },
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    if let Some(listener) = nbd_tcp {
        let (catalog, config, slots) =
            (Arc::new(NbdCatalog::new(service.clone(), true)), config.clone(), slots.clone());
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) => match slots.admit() {
                        Some(slot) => {
                            let _ = s.set_nodelay(true);
                            spawn_connection(s, catalog.clone(), config.clone(), peer.to_string(), slot)
                        }
                        None => drop(s),
                    },
                    Err(e) => accept_failed(e).await,
                }
            }
        });
    }
    if let Some(listener) = metrics {
        tasks.spawn(crate::metrics::serve(listener, service.clone()));
    }
    let app = router(service.clone());
    let api_note = match listeners.api {
        Some((listener, tls)) => {
            let listener = TcpListener::from_std(listener)?;
            let note = format!("; api: https://{}", listener.local_addr()?);
            tasks.spawn(crate::control::https::serve(listener, tls, app.clone()));
            note
        }
        None => String::new(),
    };
    let ebs_note = match listeners.ebs {
        Some((listener, tls)) => {
            let api = crate::ebs::EbsApi::new(service.clone(), &store.config.ebs_api).map_err(|e| anyhow!("{e}"))?;
            let listener = TcpListener::from_std(listener)?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let note = format!("; ebs: {scheme}://{}", listener.local_addr()?);
            tasks.spawn(crate::ebs::serve(listener, tls, Arc::new(api)));
            note
        }
        None => String::new(),
    };
    let stop_control = serve_control(control, app)?;

    let tls_note = match &config.tls {
        Tls::Off => "",
        Tls::On(_) => ", TLS on",
        Tls::Require(_) => ", TLS required",
    };
    let tcp_note = tcp.map_or(String::new(), |a| format!(", {a}")) + tls_note;
    crate::logging::say(format_args!(
        "snapblk: serving {} (nbd: {}{tcp_note}; control: {}{metrics_note}{api_note}{ebs_note})",
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
    drop(sockets);
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
    const CONTROL_NICE: i32 = -10;
    if let Err(error) = snapblk_ublk::sys::set_thread_nice(CONTROL_NICE) {
        tracing::debug!(%error, "control thread keeps the default priority");
    }
}

/// The cap on NBD client connections (`--max-connections`), over all listeners. A connection
/// over it is closed at once: a flood of connections cannot take every file descriptor the
/// daemon may open (the control API, the store and the engine need some), and each connection
/// holds at most its bounded buffers (`ServerConfig::max_buffered`).
struct ConnectionSlots {
    slots: Arc<Semaphore>,
    max: u32,
    refused: parking_lot::Mutex<Refused>,
}

/// Refusals not reported yet, and when the last warning was.
struct Refused {
    count: u64,
    warned: Option<Instant>,
}

impl ConnectionSlots {
    fn new(max: u32) -> ConnectionSlots {
        ConnectionSlots {
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            refused: parking_lot::Mutex::new(Refused { count: 0, warned: None }),
        }
    }

    /// A slot for a new connection, held as long as it is served; None over the cap.
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                self.refused();
                None
            }
        }
    }

    /// Counts a refusal; warns at most once per [`REFUSED_WARNING_INTERVAL`], with the count.
    fn refused(&self) {
        let mut r = self.refused.lock();
        r.count += 1;
        let now = Instant::now();
        if r.warned.is_none_or(|t| now.duration_since(t) >= REFUSED_WARNING_INTERVAL) {
            tracing::warn!(
                "refused {} NBD connection(s): {} are open, the most --max-connections allows (this warning \
                 repeats at most every {} s)",
                r.count,
                self.max,
                REFUSED_WARNING_INTERVAL.as_secs()
            );
            r.count = 0;
            r.warned = Some(now);
        }
    }
}

fn spawn_connection<S>(
    stream: S,
    catalog: Arc<NbdCatalog>,
    config: Arc<ServerConfig>,
    peer: String,
    slot: OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        tracing::debug!(peer, "NBD connection");
        if let Err(e) = serve_connection(stream, catalog, &config).await {
            tracing::info!(peer, error = %e, "NBD connection ended with an error");
        }
        drop(slot);
    });
}

/// Accept errors (e.g. out of file descriptors) are logged and retried after a pause.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The addresses a `--FLAG` argument resolved to (None: off).
    fn addrs(listen: anyhow::Result<Option<Listen>>) -> Option<Vec<SocketAddr>> {
        listen.unwrap().map(|l| l.addrs)
    }

    #[test]
    fn nbd_tcp_is_off_by_default_and_loopback_only_without_tls_required() {
        let dir = Path::new("/srv/d");
        for tls in [false, true] {
            assert_eq!(addrs(nbd_tcp_address(None, dir, tls)), None);
            assert_eq!(addrs(nbd_tcp_address(Some("none"), dir, tls)), None);
        }
        for (arg, want) in
            [("127.0.0.1:10809", "127.0.0.1:10809"), ("127.1.2.3:0", "127.1.2.3:0"), ("[::1]:10809", "[::1]:10809")]
        {
            assert_eq!(addrs(nbd_tcp_address(Some(arg), dir, false)), Some(vec![want.parse().unwrap()]), "{arg}");
        }
        for arg in ["0.0.0.0:10809", "[::]:10809", "10.0.0.5:10809", "[::ffff:10.0.0.5]:10809"] {
            let e = nbd_tcp_address(Some(arg), dir, false).unwrap_err().to_string();
            assert!(
                e.contains(arg)
                    && e.contains("--tls-cert FILE --tls-key FILE")
                    && e.contains("--nbd-tls require")
                    && e.contains("/srv/d/nbd.sock")
                    && !e.contains('\n'),
                "{arg}: {e}"
            );
            // With TLS required, any address is accepted (not bound here).
            assert_eq!(addrs(nbd_tcp_address(Some(arg), dir, true)), Some(vec![arg.parse().unwrap()]), "{arg}");
        }
        for arg in ["10809", "127.0.0.1", ":10809", "localhost:port", "localhost:70000"] {
            for tls in [false, true] {
                let e = nbd_tcp_address(Some(arg), dir, tls).unwrap_err().to_string();
                assert!(e.contains("--nbd-listen takes HOST:PORT, e.g. 127.0.0.1:10809"), "{arg}: {e}");
            }
        }
        let e = nbd_tcp_address(Some("no-such-host.invalid:10809"), dir, false).unwrap_err().to_string();
        assert!(e.contains("cannot resolve 'no-such-host.invalid'") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn a_non_loopback_nbd_listen_follows_the_tls_mode_the_flags_give() {
        // The decision `serve` makes: TLS required (the default with a certificate) allows it.
        let dir = Path::new("/srv/d");
        let p = Path::new("/etc/snapblk/cert.pem");
        let with_cert = TlsFiles { cert: Some(p), key: Some(p), ca: None };
        let allowed = |mode: Option<NbdTlsMode>, files: &TlsFiles<'_>| {
            let required = nbd_tls_mode(mode, files).unwrap() == NbdTlsMode::Require;
            nbd_tcp_address(Some("10.0.0.5:10809"), dir, required).is_ok()
        };
        assert!(allowed(None, &with_cert));
        assert!(allowed(Some(NbdTlsMode::Require), &with_cert));
        assert!(!allowed(Some(NbdTlsMode::On), &with_cert));
        assert!(!allowed(Some(NbdTlsMode::Off), &with_cert));
        assert!(!allowed(None, &TlsFiles::default()));
    }

    #[test]
    fn a_host_name_is_accepted_when_every_address_it_resolves_to_is_loopback() {
        let dir = Path::new("/srv/d");
        // Whatever this machine's resolver says localhost is, it is loopback only.
        let resolved = addrs(nbd_tcp_address(Some("localhost:10812"), dir, false)).unwrap();
        assert!(!resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback() && a.port() == 10812));
        let resolved = addrs(metrics_address(Some("localhost:9100"))).unwrap();
        assert!(!resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback() && a.port() == 9100));
        // A name with any address outside loopback is refused, naming that address.
        let listen = Listen {
            arg: "db-host:10809".into(),
            addrs: vec!["127.0.0.1:10809".parse().unwrap(), "10.0.0.5:10809".parse().unwrap()],
        };
        let e = loopback_only(listen, |asked| format!("refusing --nbd-listen {asked}")).unwrap_err().to_string();
        assert_eq!(e, "refusing --nbd-listen db-host:10809 (10.0.0.5:10809)");
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_only() {
        assert_eq!(addrs(metrics_address(None)), None);
        assert_eq!(addrs(metrics_address(Some("none"))), None);
        for (arg, want) in [("127.0.0.1:9100", "127.0.0.1:9100"), ("[::1]:0", "[::1]:0")] {
            assert_eq!(addrs(metrics_address(Some(arg))), Some(vec![want.parse().unwrap()]), "{arg}");
        }
        for arg in ["0.0.0.0:9100", "[::]:9100", "192.168.1.5:9100"] {
            let e = metrics_address(Some(arg)).unwrap_err().to_string();
            assert!(
                e.starts_with("refusing --metrics-listen") && e.contains("loopback") && !e.contains('\n'),
                "{arg}: {e}"
            );
        }
        let e = metrics_address(Some("9100")).unwrap_err().to_string();
        assert!(e.contains("--metrics-listen takes HOST:PORT") && e.contains("e.g. 127.0.0.1:9100"), "{e}");
    }

    #[test]
    fn connections_over_the_cap_are_refused_until_a_slot_is_given_back() {
        let slots = ConnectionSlots::new(2);
        let (a, _b) = (slots.admit().unwrap(), slots.admit().unwrap());
        assert!(slots.admit().is_none());
        assert!(slots.admit().is_none());
        assert_eq!(slots.refused.lock().count, 1, "the first refusal warns, the second is counted");
        drop(a);
        assert!(slots.admit().is_some());
    }
}
