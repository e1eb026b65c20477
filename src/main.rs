//! The `snapblk` binary: `serve` runs the daemon; every other command is an API client.

use clap::Parser;
use snapblk::control::cli::{exit_code, run, Cli, Command, KeyCommand};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dir = match cli.dir.clone() {
        Some(d) => d,
        // `key generate` talks to no daemon.
        None if matches!(cli.command, Command::Key(KeyCommand::Generate)) => Default::default(),
        None => {
            eprintln!("error: no daemon dir: pass --dir DIR or set SNAPBLK_DIR");
            std::process::exit(1);
        }
    };
    if let Command::Serve(args) = &cli.command {
        if let Err(e) = snapblk::daemon::serve(&dir, args) {
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
    if let Err(e) = runtime.block_on(run(&dir, cli.json, cli.command)) {
        eprintln!("error: {e}");
        std::process::exit(exit_code(&e));
    }
}
