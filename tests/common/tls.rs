//! Certificates for TLS tests, made with the `openssl` command in a directory laid out the way
//! QEMU and libnbd read them: `server/` (ca-cert.pem, server-cert.pem, server-key.pem) and one
//! client directory per client (ca-cert.pem, client-cert.pem, client-key.pem).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

pub struct Certs {
    pub root: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").args(args).current_dir(dir));
}

/// A new key (EC P-256) and signing request for `subject`, signed by `ca` with the
/// extensions `ext`: `work/NAME-cert.pem` and `work/NAME-key.pem`.
fn leaf(work: &Path, name: &str, ca: &str, subject: &str, ext: &str) {
    let ext_file = format!("{name}.ext");
    std::fs::write(work.join(&ext_file), ext).unwrap();
    let (key, csr, cert) = (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}-cert.pem"));
    openssl(
        work,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    );
    let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
    openssl(
        work,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    );
}

impl Certs {
    /// In `root` (created): a CA, a server certificate for localhost and 127.0.0.1, a client
    /// certificate of "alice" signed by the CA (`client-alice/`), one of "mallory" signed by
    /// another CA (`client-mallory/`), and `client-anonymous/` with the CA only.
    pub fn make(root: &Path) -> Certs {
        let work = root.join("work");
        std::fs::create_dir_all(&work).unwrap();
        for ca in ["ca", "other-ca"] {
            let (key, cert, subject) =
                (format!("{ca}-key.pem"), format!("{ca}-cert.pem"), format!("/CN=snapblk test {ca}"));
            openssl(
                &work,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-keyout",
                    &key,
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-subj",
                    &subject,
                ],
            );
        }
        let server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        leaf(&work, "server", "ca", "/CN=localhost", server_ext);
        let alice_ext = "subjectAltName=DNS:alice.example,email:alice@example.com\nextendedKeyUsage=clientAuth\n";
        leaf(&work, "alice", "ca", "/CN=alice", alice_ext);
        leaf(&work, "mallory", "other-ca", "/CN=mallory", "extendedKeyUsage=clientAuth\n");
        let certs = Certs { root: root.to_path_buf() };
        let copy = |from: &str, dir: &str, to: &str| {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(work.join(from), d.join(to)).unwrap();
        };
        copy("ca-cert.pem", "server", "ca-cert.pem");
        copy("server-cert.pem", "server", "server-cert.pem");
        copy("server-key.pem", "server", "server-key.pem");
        for client in ["alice", "mallory"] {
            let dir = format!("client-{client}");
            copy("ca-cert.pem", &dir, "ca-cert.pem");
            copy(&format!("{client}-cert.pem"), &dir, "client-cert.pem");
            copy(&format!("{client}-key.pem"), &dir, "client-key.pem");
        }
        copy("ca-cert.pem", "client-anonymous", "ca-cert.pem");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(certs.server_key(), std::fs::Permissions::from_mode(0o600)).unwrap();
        certs
    }

    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server/server-cert.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.root.join("server/server-key.pem")
    }

    pub fn ca(&self) -> PathBuf {
        self.root.join("server/ca-cert.pem")
    }

    /// The server side as `serve` flags (with client certificates verified against the CA).
    pub fn serve_args(&self) -> Vec<String> {
        let p = |p: PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            p(self.server_cert()),
            "--tls-key".into(),
            p(self.server_key()),
            "--tls-ca".into(),
            p(self.ca()),
        ]
    }

    /// A client directory: "alice", "mallory" or "anonymous".
    pub fn client(&self, name: &str) -> String {
        self.root.join(format!("client-{name}")).display().to_string()
    }

    /// The server directory (for qemu-nbd's `tls-creds-x509,endpoint=server`).
    pub fn server_dir(&self) -> String {
        self.root.join("server").display().to_string()
    }
}
