//! NBD over TLS (NBD_OPT_STARTTLS) with the real clients: nbdinfo, nbdcopy (libnbd), qemu-img
//! and qemu-io (QEMU's tls-creds-x509), over the unix socket and TCP on 127.0.0.1, with
//! certificates made by openssl; the modes (`--nbd-tls require|on`), client certificates from
//! another CA, and the startup refusals.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::time::Duration;

use common::tls::Certs;
use common::*;

const MIB: usize = 1 << 20;

fn tools() -> bool {
    ["openssl", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io"].iter().all(|t| require_tool(t))
}

/// Certificates and a daemon with `extra` serve flags (and the TLS flags), volume "vol" (64M).
fn setup(tls_mode: &str, extra: &[&str]) -> (tempfile::TempDir, Certs, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("pki"));
    let mut args: Vec<String> = certs.serve_args();
    args.extend(["--nbd-tls".to_string(), tls_mode.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&tmp.path().join("d"), &args);
    d.cli_ok(&["volume", "create", "vol", "--size", "64M"]);
    (tmp, certs, d)
}

/// `nbds+unix://` URI of an export, with a client certificate directory.
fn tls_unix_uri(d: &Daemon, export: &str, client_dir: &str) -> String {
    format!("nbds+unix:///{export}?socket={}&tls-certificates={client_dir}", d.socket())
}

fn tcp_address(d: &Daemon) -> String {
    let status = d.cli_json(&["status"]);
    status["nbd_tcp"].as_str().unwrap_or_else(|| panic!("no TCP listener: {status}")).to_string()
}

fn tool(program: &str, args: &[&str]) -> Output {
    run(Command::new(program).args(args), TOOL_TIMEOUT)
}

/// QEMU's `--object` for a client certificate directory.
fn qemu_creds(dir: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={dir},endpoint=client")
}

/// qemu-io over TLS; asserts success and that no pattern check failed.
fn qemu_io_tls(creds_dir: &str, image_opts: &str, cmds: &[&str]) -> String {
    let object = qemu_creds(creds_dir);
    let mut args = vec!["--object", &object, "--image-opts"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(image_opts);
    let out = ok("qemu-io", &args);
    let lower = out.to_lowercase();
    assert!(!lower.contains("fail") && !lower.contains("error"), "qemu-io {image_opts} {cmds:?}:\n{out}");
    out
}

#[test]
fn real_clients_work_over_tls_on_the_unix_socket_and_on_tcp() {
    if !tools() {
        return;
    }
    let (tmp, certs, d) = setup("require", &["--nbd-listen", "127.0.0.1:0"]);
    assert!(d.log().contains("TLS required"), "the ready line names the TLS mode:\n{}", d.log());
    let alice = certs.client("alice");
    let tcp = tcp_address(&d);
    let port = tcp.rsplit_once(':').unwrap().1.to_string();

    // nbdinfo, unix socket and TCP.
    for uri in [tls_unix_uri(&d, "vol", &alice), format!("nbds://{tcp}/vol?tls-certificates={alice}")] {
        let info: serde_json::Value = serde_json::from_str(&ok("nbdinfo", &["--json", &uri])).unwrap();
        assert_eq!(info["exports"][0]["export-size"], 64 * MIB as u64, "{uri}: {info}");
    }

    // qemu-img info and qemu-io (write, read back) over both transports.
    let unix_opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol,tls-creds=tls0,tls-hostname=localhost",
        d.socket()
    );
    let tcp_opts =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=vol,tls-creds=tls0");
    let object = qemu_creds(&alice);
    let info = ok("qemu-img", &["info", "--output=json", "--object", &object, "--image-opts", &unix_opts]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 * MIB as u64, "{info}");
    qemu_io_tls(&alice, &unix_opts, &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    qemu_io_tls(&alice, &tcp_opts, &["read -P 0x5a 0 1M", "write -P 0xa5 3M 1M", "read -P 0xa5 3M 1M"]);
    qemu_io_tls(&alice, &unix_opts, &["read -P 0xa5 3M 1M", "read -P 0 1M 2M"]);

    // nbdcopy over TLS: a random image in and out, byte for byte.
    let src = tmp.path().join("src.raw");
    let back = tmp.path().join("back.raw");
    let mut data = vec![0u8; 16 * MIB];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(&src, &data).unwrap();
    let (src_s, back_s) = (src.to_str().unwrap(), back.to_str().unwrap());
    ok("nbdcopy", &["--flush", src_s, &tls_unix_uri(&d, "vol", &alice)]);
    ok("nbdcopy", &[&format!("nbds://{tcp}/vol?tls-certificates={alice}"), back_s]);
    let back = std::fs::read(&back).unwrap();
    assert_eq!(back.len(), 64 * MIB);
    assert!(back[..16 * MIB] == data[..], "nbdcopy over TLS changed the data");
    assert!(back[16 * MIB..].iter().all(|&b| b == 0));
}

/// Sends NBD_OPT_LIST in plaintext on the unix socket; returns the first reply's type.
fn plaintext_list_reply(d: &Daemon) -> u32 {
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    option.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&option).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
    assert_eq!(u32::from_be_bytes(reply[8..12].try_into().unwrap()), 3);
    u32::from_be_bytes(reply[12..16].try_into().unwrap())
}

#[test]
fn plaintext_clients_get_tls_reqd_in_require_mode_and_are_served_in_on_mode() {
    if !tools() {
        return;
    }
    let (_tmp, _certs, d) = setup("require", &[]);
    // libnbd reports NBD_REP_ERR_TLS_REQD as "Operation not supported"; its debug log shows
    // the server's message.
    let out = run(Command::new("nbdinfo").arg(d.nbd_uri("vol")).env("LIBNBD_DEBUG", "1"), TOOL_TIMEOUT);
    assert!(!out.status.success(), "a plaintext nbdinfo was served: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("server error message: this server requires TLS"), "{err}");
    assert_eq!(plaintext_list_reply(&d), 0x8000_0005, "NBD_REP_ERR_TLS_REQD");
    // QEMU names the error.
    let out = tool("qemu-img", &["info", &d.nbd_uri("vol")]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("TLS negotiation required") && err.contains("this server requires TLS"), "{err}");
    drop(d);

    let (_tmp_on, certs_on, d) = setup("on", &[]);
    assert!(d.log().contains("TLS on"), "{}", d.log());
    ok("nbdinfo", &[&d.nbd_uri("vol")]);
    assert_eq!(plaintext_list_reply(&d), 2, "NBD_REP_SERVER: the export is listed");
    qemu_io(&d.nbd_uri("vol"), &["write -P 0x33 0 64k"]);
    ok("nbdinfo", &[&tls_unix_uri(&d, "vol", &certs_on.client("alice"))]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol,tls-creds=tls0,tls-hostname=localhost",
        d.socket()
    );
    qemu_io_tls(&certs_on.client("alice"), &opts, &["read -P 0x33 0 64k"]);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_and_no_certificate_is_allowed() {
    if !tools() {
        return;
    }
    let (_tmp, certs, d) = setup("require", &[]);
    let out = tool("nbdinfo", &[&tls_unix_uri(&d, "vol", &certs.client("mallory"))]);
    assert!(!out.status.success(), "a certificate of another CA was accepted: {}", text(&out.stdout));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol,tls-creds=tls0,tls-hostname=localhost",
        d.socket()
    );
    let object = qemu_creds(&certs.client("mallory"));
    assert!(!tool("qemu-img", &["info", "--object", &object, "--image-opts", &opts]).status.success());
    // Client certificates are optional: a client with the CA only is served.
    ok("nbdinfo", &[&tls_unix_uri(&d, "vol", &certs.client("anonymous"))]);
    ok("nbdinfo", &[&tls_unix_uri(&d, "vol", &certs.client("alice"))]);
    assert!(d.log().contains("TLS handshake failed"), "the refusal is logged:\n{}", d.log());
}

/// `serve` with `args`, expected to fail before it serves: its one-line error.
fn serve_error(dir: &std::path::Path, args: &[&str]) -> String {
    let out = run(
        Command::new(BIN).args(["serve", "--dir"]).arg(dir).args(args).env_remove("SNAPBLK_DIR"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "serve {args:?} started");
    let err = text(&out.stderr);
    assert_one_sentence(&err);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!dir.exists(), "serve {args:?} created its directory before refusing");
    err
}

#[test]
fn serve_refuses_tls_flags_that_do_not_fit_and_bad_certificate_files_naming_them() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("pki"));
    let dir = tmp.path().join("d");
    let (cert, key) = (certs.server_cert(), certs.server_key());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for mode in ["on", "require"] {
        let err = serve_error(&dir, &["--nbd-tls", mode]);
        assert!(err.contains(&format!("--nbd-tls {mode}")) && err.contains("--tls-cert FILE --tls-key FILE"), "{err}");
    }
    let err = serve_error(&dir, &["--tls-cert", cert]);
    assert!(err.contains("--tls-key"), "{err}");
    let missing = tmp.path().join("missing.pem");
    let err = serve_error(&dir, &["--tls-cert", missing.to_str().unwrap(), "--tls-key", key]);
    assert!(err.contains("missing.pem") && err.contains("cannot read"), "{err}");
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let err = serve_error(&dir, &["--tls-cert", junk.to_str().unwrap(), "--tls-key", key]);
    assert!(err.contains("junk.pem") && err.contains("no certificate"), "{err}");
    let err = serve_error(&dir, &["--tls-cert", cert, "--tls-key", junk.to_str().unwrap()]);
    assert!(err.contains("junk.pem") && err.contains("--tls-key"), "{err}");
    let alice_key = certs.root.join("client-alice/client-key.pem");
    let err = serve_error(&dir, &["--tls-cert", cert, "--tls-key", alice_key.to_str().unwrap()]);
    assert!(err.contains("client-key.pem") && err.contains("does not fit"), "{err}");
    let err = serve_error(&dir, &["--tls-cert", cert, "--tls-key", key, "--tls-ca", junk.to_str().unwrap()]);
    assert!(err.contains("--tls-ca") && err.contains("junk.pem"), "{err}");
    // Non-loopback TCP: refused unless TLS is required, with a sentence saying how to set it up.
    for extra in [&[][..], &["--tls-cert", cert, "--tls-key", key, "--nbd-tls", "on"][..]] {
        let mut args = vec!["--nbd-listen", "192.0.2.1:10809"];
        args.extend(extra);
        let err = serve_error(&dir, &args);
        assert!(
            err.contains("192.0.2.1:10809")
                && err.contains("--tls-cert FILE --tls-key FILE")
                && err.contains("--nbd-tls require"),
            "{err}"
        );
    }
}

#[test]
fn a_private_key_readable_by_other_users_is_warned_about() {
    if !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::make(&tmp.path().join("pki"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(certs.server_key(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = certs.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_with(&tmp.path().join("d"), &args);
    assert!(d.log().contains("readable by other users"), "{}", d.log());
}
