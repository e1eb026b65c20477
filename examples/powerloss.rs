//! The guest side of the power-loss soak (`scripts/soak --power-loss N`, docs/SOAK.md).
//!
//! Runs inside the VM next to the real `snapblk serve`, talking NBD over the daemon's unix
//! socket, the control API for snapshots and the CLI for listings, and streams a record of every step to a serial port the
//! host keeps in a file (`--records /dev/ttyS1`). The host kills the VM at a random moment
//! and checks, from the next boot's `check` output, every write a FLUSH or FUA covered and
//! every durable snapshot against those records (tests/py/powerloss.py).
//!
//!   powerloss check --dir D --records DEV           dump every volume and snapshot
//!   powerloss run --dir D --records DEV --seed S --boot K --daemon-pid P   workload until killed
//!   ... run --claim-unflushed                       the soak's self-check (below)
//!
//! A record line is written (and drained to the host, `tcdrain`) *before* a request that can
//! change data is sent (`w`, `f`, `s`, `d`: intent) and again *after* its answer (`W`, `F`,
//! `S`, `D`: acknowledged), so the host knows every write that may be on the disk and every
//! acknowledgement it may rely on. A lost tail of records only makes the check weaker.
//!
//! `--claim-unflushed` records writes as FUA and FLUSHes as done without asking the daemon for
//! either: the host must then find flushed writes lost (`scripts/soak --power-loss N
//! --self-check`), which shows the soak can fail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios;
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"PWRLOSS\0";
/// Volumes the workload uses: name, cluster size. 8 MiB each: a whole read stays quick
/// under TCG.
const VOLUMES: [(&str, &str); 2] = [("v0", "64K"), ("v1", "4K")];
const VOLUME_SIZE: &str = "8M";
const HOT_BLOCKS: u64 = 256;
const MAX_SNAPSHOTS: usize = 3;

/// What a block written by write `id` at block `block` holds: the two numbers, then a fill
/// derived from both, so a read tells which write it holds or that it is torn or misplaced.
fn content(id: u64, block: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_add(1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    while b.len() < BLOCK {
        // xorshift64*: cheap, and enough to tell one write's fill from another's
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        b.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    b
}

/// The write id a block holds (0 for zeros), or why it holds none.
fn decode(blk: &[u8], block: u64) -> std::result::Result<u64, String> {
    if blk.iter().all(|&x| x == 0) {
        return Ok(0);
    }
    if blk.len() != BLOCK {
        return Err(format!("a partial block of {} bytes", blk.len()));
    }
    if &blk[..8] != MAGIC {
        return Err(format!("data no write produced ({:02x?})", &blk[..16]));
    }
    let id = u64::from_le_bytes(blk[8..16].try_into().unwrap_or_default());
    let home = u64::from_le_bytes(blk[16..24].try_into().unwrap_or_default());
    if home != block {
        return Err(format!("write {id} of block {home} (misplaced)"));
    }
    if blk != content(id, block).as_slice() {
        return Err(format!("write {id}, torn"));
    }
    Ok(id)
}

/// The record stream: one line per step, on its way to the host before `line` returns.
/// (A regular file works too, for trying the tool outside the VM.)
struct Records {
    file: File,
    tty: bool,
}

impl Records {
    fn open(path: &Path) -> Result<Self> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOCTTY.bits())
            .open(path)
            .with_context(|| format!("opening the record port {}", path.display()))?;
        // Raw mode: no newline translation, no echo; bytes go out as written.
        let tty = match termios::tcgetattr(&f) {
            Ok(mut t) => {
                termios::cfmakeraw(&mut t);
                termios::tcsetattr(&f, termios::SetArg::TCSANOW, &t).context("setting the record port raw")?;
                true
            }
            Err(_) => false,
        };
        Ok(Records { file: f, tty })
    }

    fn line(&mut self, text: &str) -> Result<()> {
        self.file.write_all(format!("{text}\n").as_bytes()).context("writing a record")?;
        // Until the UART is empty: the host has the line before anything it describes happens.
        if self.tty {
            termios::tcdrain(&self.file).context("draining the record port")?;
        }
        Ok(())
    }
}

/// A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one request at a time).
struct Nbd {
    sock: UnixStream,
    size: u64,
    cookie: u64,
}

const NBD_FLAG_FUA: u16 = 1;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;

impl Nbd {
    fn connect(socket: &Path, export: &str) -> Result<Self> {
        let mut sock = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello).context("reading the NBD greeting")?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            bail!("the server did not greet with fixed newstyle NBD");
        }
        let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
        // FIXED_NEWSTYLE, and NO_ZEROES when offered
        sock.write_all(&(1u32 | u32::from(server_flags & 2)).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut head = [0u8; 20];
            sock.read_exact(&mut head).context("reading an option reply")?;
            let kind = u32::from_be_bytes(head[12..16].try_into()?);
            let len = u32::from_be_bytes(head[16..20].try_into()?) as usize;
            if len > 1 << 20 {
                bail!("option reply of {len} bytes");
            }
            let mut data = vec![0u8; len];
            sock.read_exact(&mut data)?;
            match kind {
                1 => break, // NBD_REP_ACK
                3 if data.len() >= 12 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into()?))
                }
                3 => {}
                _ if kind & 0x8000_0000 != 0 => {
                    bail!("export '{export}' refused ({kind:#x}): {}", String::from_utf8_lossy(&data))
                }
                _ => bail!("unexpected option reply {kind:#x}"),
            }
        }
        let size = size.context("the server sent no export size")?;
        Ok(Nbd { sock, size, cookie: 0 })
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8], into: &mut [u8]) -> Result<()> {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.sock.write_all(&req).context("sending an NBD request")?;
        let mut reply = [0u8; 16];
        self.sock.read_exact(&mut reply).context("reading an NBD reply")?;
        if reply[..4] != 0x6744_6698u32.to_be_bytes() || reply[8..16] != self.cookie.to_be_bytes() {
            bail!("malformed NBD reply");
        }
        let error = u32::from_be_bytes(reply[4..8].try_into()?);
        if error != 0 {
            bail!("NBD request {kind} at {offset} failed with error {error}");
        }
        self.sock.read_exact(into).context("reading NBD read data")?;
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { NBD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_WRITE, flags, offset, data.len() as u32, data, &mut [])
    }

    fn flush(&mut self) -> Result<()> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    fn read(&mut self, offset: u64, into: &mut [u8]) -> Result<()> {
        let len = into.len() as u32;
        self.request(NBD_CMD_READ, 0, offset, len, &[], into)
    }
}

struct Daemon {
    bin: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    /// Runs the CLI with `--json`; its stdout, or an error with its stderr.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--json")
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!("snapblk {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One request to the control API (what the CLI sends, without starting a process for
    /// it: under TCG that costs more than the request). Fails unless the answer is 2xx.
    fn api(&self, method: &str, path: &str, body: &str) -> Result<()> {
        let what = format!("{method} {path}");
        let mut sock =
            UnixStream::connect(self.dir.join("control.sock")).with_context(|| format!("{what}: connecting"))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: snapblk\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(request.as_bytes()).with_context(|| format!("{what}: sending"))?;
        let mut answer = Vec::new();
        sock.read_to_end(&mut answer).with_context(|| format!("{what}: reading the answer"))?;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.split(' ').nth(1).unwrap_or("");
        if !status.starts_with('2') {
            bail!("{what} answered: {}", answer.split("\r\n\r\n").nth(1).unwrap_or(&answer).trim());
        }
        Ok(())
    }

    fn list(&self, what: &str) -> Result<Vec<serde_json::Value>> {
        let text = self.cli(&[what, "list"])?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{what} list: not JSON"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// (volume, snapshot) names, as listed.
    fn snapshots(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .list("snapshot")?
            .iter()
            .filter_map(|s| Some((s["volume"].as_str()?.to_string(), s["name"].as_str()?.to_string())))
            .collect())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    /// A clean restart: SIGTERM (the daemon makes everything it acknowledged durable and
    /// writes a checkpoint), then a new `snapblk serve`, our child, logging to our stderr
    /// (the console). `running` is the daemon to stop: init's (by pid) or an earlier child.
    fn restart(&self, running: &mut Running) -> Result<()> {
        match running {
            Running::Init(pid) => {
                kill(Pid::from_raw(*pid), Signal::SIGTERM).context("SIGTERM to the daemon")?;
                // Not our child: it is gone once /proc says so, or shows a zombie.
                let stat = format!("/proc/{pid}/stat");
                for _ in 0..600 {
                    match std::fs::read_to_string(&stat) {
                        Ok(text) if !text.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        _ => break,
                    }
                }
            }
            Running::Child(child) => {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).context("SIGTERM to the daemon")?;
                let status = child.wait().context("waiting for the daemon to stop")?;
                if !status.success() {
                    bail!("the daemon stopped with {status} after SIGTERM");
                }
            }
        }
        let child = Command::new(&self.bin)
            .args(["serve", "--nbd-listen", "none", "--dir"])
            .arg(&self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .context("starting snapblk serve")?;
        *running = Running::Child(child);
        for _ in 0..1200 {
            if self.cli(&["status"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the restarted daemon did not answer within 120 s")
    }
}

/// The daemon the workload talks to.
enum Running {
    /// Started by init (scripts/vm/power-init).
    Init(i32),
    Child(Child),
}

/// Every volume and snapshot, read whole: `VOL`, `SNAP`, then per export a `DUMP` line of
/// runs `ID*COUNT` (0: zeros, `x`: a block holding no write, with a `BAD` line saying why);
/// then `snapshot verify` of every snapshot whose upload is complete (`VERIFIED`; a problem,
/// or an upload in state `failed`, stops the check).
fn check(d: &Daemon, rec: &mut Records) -> Result<()> {
    let vols: Vec<String> = d.list("volume")?.iter().filter_map(|v| Some(v["name"].as_str()?.to_string())).collect();
    let snaps = d.snapshots()?;
    let mut exports = Vec::new();
    for v in &vols {
        rec.line(&format!("VOL {v}"))?;
        exports.push(v.clone());
    }
    for (v, s) in &snaps {
        rec.line(&format!("SNAP {v} {s}"))?;
        exports.push(format!("{v}@{s}"));
    }
    let mut buf = vec![0u8; 1 << 20];
    for export in exports {
        let mut nbd = Nbd::connect(&d.socket(), &export)?;
        let mut runs: Vec<(String, u64)> = Vec::new();
        let mut offset = 0;
        while offset < nbd.size {
            let n = (nbd.size - offset).min(buf.len() as u64) as usize;
            nbd.read(offset, &mut buf[..n])?;
            for (i, blk) in buf[..n].chunks(BLOCK).enumerate() {
                let block = offset / BLOCK as u64 + i as u64;
                let value = match decode(blk, block) {
                    Ok(id) => id.to_string(),
                    Err(why) => {
                        rec.line(&format!("BAD {export} {block} {why}"))?;
                        "x".to_string()
                    }
                };
                match runs.last_mut() {
                    Some((v, count)) if *v == value => *count += 1,
                    _ => runs.push((value, 1)),
                }
            }
            offset += n as u64;
        }
        let text: Vec<String> = runs.iter().map(|(v, c)| format!("{v}*{c}")).collect();
        rec.line(&format!("DUMP {export} {}", text.join(",")))?;
    }
    for s in d.list("snapshot")? {
        let name = format!("{}@{}", s["volume"].as_str().unwrap_or("?"), s["name"].as_str().unwrap_or("?"));
        match s["upload"]["state"].as_str() {
            Some("available") => {
                let out: serde_json::Value = serde_json::from_str(&d.cli(&["snapshot", "verify", &name])?)
                    .with_context(|| format!("snapshot verify {name}: not JSON"))?;
                if out["problems"].as_array().is_some_and(|p| !p.is_empty()) {
                    bail!("snapshot verify {name} found problems: {}", out["problems"]);
                }
                rec.line(&format!("VERIFIED {name}"))?;
            }
            Some("failed") => bail!("the upload of {name} failed: {}", s["upload"]),
            _ => {}
        }
    }
    rec.line("CHECKED")
}

/// Random writes (with and without FUA), FLUSHes, snapshot creates (`--durable` and not)
/// and deletes on the volumes, and now and then a clean restart of the daemon (SIGTERM: it
/// writes a checkpoint), until the host kills the VM.
fn run(d: &Daemon, rec: &mut Records, seed: u64, boot: u64, mut running: Running, claim_unflushed: bool) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(boot));
    let listed: Vec<String> = d.list("volume")?.iter().filter_map(|v| Some(v["name"].as_str()?.to_string())).collect();
    for (name, cluster) in VOLUMES {
        if !listed.iter().any(|v| v == name) {
            // Set-up, before the host arms the kill: the FLUSH makes the create durable.
            d.cli(&["volume", "create", name, "--size", VOLUME_SIZE, "--cluster-size", cluster])?;
            let mut nbd = Nbd::connect(&d.socket(), name)?;
            nbd.flush()?;
            rec.line(&format!("NEWVOL {name} {}", nbd.size / BLOCK as u64))?;
        }
    }
    let connect_all =
        || -> Result<Vec<Nbd>> { VOLUMES.iter().map(|(name, _)| Nbd::connect(&d.socket(), name)).collect() };
    let mut conns = connect_all()?;
    let mut snaps: Vec<Vec<String>> = vec![Vec::new(); VOLUMES.len()];
    for (v, s) in d.snapshots()? {
        if let Some(i) = VOLUMES.iter().position(|(name, _)| *name == v) {
            snaps[i].push(s);
        }
    }
    rec.line("START")?;
    // Write ids are unique over the whole run: the boot number is their high part.
    let mut next_id = boot * 1_000_000 + 1;
    let mut next_snap = 0;
    loop {
        let i = rng.gen_range(0..VOLUMES.len());
        let vol = VOLUMES[i].0;
        let nbd = &mut conns[i];
        let blocks = nbd.size / BLOCK as u64;
        // (the self-check only writes and "flushes": a snapshot would make its writes durable)
        let roll = rng.gen_range(0..if claim_unflushed { 82 } else { 100 });
        if roll < 65 {
            let count = rng.gen_range(1..=8u64);
            let span = if rng.gen_bool(0.7) { HOT_BLOCKS } else { blocks };
            let first = rng.gen_range(0..span - count);
            let fua = claim_unflushed || rng.gen_bool(0.12);
            let id = next_id;
            next_id += 1;
            let mut data = Vec::with_capacity(count as usize * BLOCK);
            for b in first..first + count {
                data.extend_from_slice(&content(id, b));
            }
            rec.line(&format!("w {id} {vol} {first} {count} {}", u8::from(fua)))?;
            nbd.write(first * BLOCK as u64, &data, fua && !claim_unflushed)?;
            rec.line(&format!("W {id}"))?;
        } else if roll < 82 {
            rec.line(&format!("f {vol}"))?;
            if !claim_unflushed {
                nbd.flush()?;
            }
            rec.line(&format!("F {vol}"))?;
        } else if roll < 89 && snaps[i].len() < MAX_SNAPSHOTS {
            let name = format!("b{boot}s{next_snap}");
            next_snap += 1;
            let durable = rng.gen_bool(0.5);
            rec.line(&format!("s {vol} {name} {}", u8::from(durable)))?;
            d.api(
                "POST",
                &format!("/v1/volumes/{vol}/snapshots"),
                &format!(r#"{{"name": "{name}", "durable": {durable}}}"#),
            )?;
            rec.line(&format!("S {vol} {name}"))?;
            snaps[i].push(name);
        } else if roll == 94 && !claim_unflushed {
            rec.line("r")?;
            drop(std::mem::take(&mut conns));
            d.restart(&mut running)?;
            conns = connect_all()?;
            rec.line("R")?;
        } else if roll < 94 && !snaps[i].is_empty() {
            let at = rng.gen_range(0..snaps[i].len());
            let name = snaps[i].remove(at);
            rec.line(&format!("d {vol} {name}"))?;
            d.api("DELETE", &format!("/v1/snapshots/{vol}@{name}"), "")?;
            rec.line(&format!("D {vol} {name}"))?;
        } else {
            // idle: background commits, uploads and releases run
            std::thread::sleep(Duration::from_millis(rng.gen_range(1..50)));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = main_with(&args) {
        eprintln!("powerloss: {e:#}");
        std::process::exit(1);
    }
}

fn main_with(args: &[String]) -> Result<()> {
    const USAGE: &str = "usage: powerloss check|run --dir D --records DEV [--seed S --boot K] [--bin SNAPBLK]";
    let mode = args.get(1).context(USAGE)?;
    let opt = |name: &str| -> Option<&str> {
        let at = args.iter().position(|a| a == name)?;
        args.get(at + 1).map(String::as_str)
    };
    let number = |name: &str| -> Result<u64> {
        let text = opt(name).with_context(|| format!("{name} is required; {USAGE}"))?;
        text.parse().with_context(|| format!("{name} {text}: not a number"))
    };
    let d = Daemon {
        bin: PathBuf::from(opt("--bin").unwrap_or("/bin/snapblk")),
        dir: PathBuf::from(opt("--dir").context(USAGE)?),
    };
    let mut rec = Records::open(Path::new(opt("--records").context(USAGE)?))?;
    let result = match mode.as_str() {
        "check" => check(&d, &mut rec),
        "run" => {
            let claim_unflushed = args.iter().any(|a| a == "--claim-unflushed");
            let daemon = i32::try_from(number("--daemon-pid")?).context("--daemon-pid: not a pid")?;
            run(&d, &mut rec, number("--seed")?, number("--boot")?, Running::Init(daemon), claim_unflushed)
        }
        _ => bail!("{USAGE}"),
    };
    if let Err(e) = &result {
        // The host takes a check or workload that stopped by itself as a failure, with this reason.
        rec.line(&format!("ERROR {e:#}"))?;
    }
    result
}
