//! Protocol abuse (tests/py/abuse.py): bad requests get the right error codes, broken
//! connections are dropped, and the daemon keeps serving a well-behaved client throughout.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn bad_requests_get_the_right_errors_and_other_clients_keep_being_served() {
    if !require_libnbd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&tmp.path().join("d"));
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    d.cli_ok(&["snapshot", "create", "vol", "--name", "s1"]);
    let out = run(Command::new(PYTHON).args([&py("abuse.py"), &d.socket(), "vol", "vol@s1"]), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "abuse.py failed:\n{}{}\ndaemon log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        d.log()
    );
    assert!(text(&out.stdout).contains("all abuse cases handled"));
    assert!(d.is_running(), "the daemon died");
    assert!(!d.log().contains("panicked"), "the daemon panicked:\n{}", d.log());
    // And it still serves new clients.
    d.cli_ok(&["volume", "show", "vol"]);
}
