//! The `snapblk` binary: `serve` runs the daemon; every other command is an API client.

use clap::Parser;
use snapblk::control::cli::{fail, run, Cli, Command, KeyCommand};
use snapblk::control::client::{Client, ClientError};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors are exit code 2, and with --json a JSON error like every other.
        Err(e) if e.use_stderr() && std::env::args().any(|a| a == "--json") => {
            let first = e.to_string();
            let sentence = first.lines().next().unwrap_or("bad usage").trim_start_matches("error: ");
            fail(true, &ClientError::Usage(format!("{sentence} (see snapblk --help)")));
        }
        Err(e) => e.exit(),
    };
    // The daemon logs through a thread of its own (see `logging`); CLI commands as they go.
    let queued = if matches!(cli.command, Command::Serve(_)) { snapblk::logging::start().ok() } else { None };
    let (writer, log_writer) = match queued {
        Some((queue, writer)) => (BoxMakeWriter::new(queue), Some(writer)),
        None => (BoxMakeWriter::new(std::io::stderr), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dir = match cli.dir.clone() {
        Some(d) => d,
        // A remote daemon is named by --api.
        None if cli.api.is_some() && !matches!(cli.command, Command::Serve(_)) => Default::default(),
        // `key generate` talks to no daemon.
        None if matches!(cli.command, Command::Key(KeyCommand::Generate)) => Default::default(),
        None => fail(cli.json, &ClientError::Usage("no daemon dir: pass --dir DIR or set SNAPBLK_DIR".into())),
    };
    if let Command::Serve(args) = &cli.command {
        // Closed by default, whatever the caller's umask: everything the daemon creates (its
        // directory, slot files, journal, keys, exports) is its own user's alone; the sockets
        // are opened to their group explicitly (see `daemon`).
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let served = snapblk::daemon::serve(&dir, args);
        drop(log_writer); // writes out the queued lines
        if let Err(e) = served {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            std::process::exit(1);
        }
    };
    let client = match (&cli.api, &cli.token_file) {
        (None, _) => Client::new(&dir),
        (Some(url), Some(token)) => {
            Client::https(url, token, cli.api_ca.as_deref()).unwrap_or_else(|e| fail(cli.json, &e))
        }
        (Some(_), None) => fail(
            cli.json,
            &ClientError::Usage(
                "--api needs --token-file FILE (or SNAPBLK_TOKEN_FILE): the file holding an API token".into(),
            ),
        ),
    };
    if let Err(e) = runtime.block_on(run(client, cli.json, cli.command)) {
        fail(cli.json, &e);
    }
}
