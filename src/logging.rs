//! The daemon's log, written by a thread of its own.
//!
//! A write to stderr can block: a file on a file system stalled in a journal commit, a full
//! pipe to a slow log collector, a suspended terminal. The thread that logs may be answering
//! a client or holding an engine lock, so it only queues the line; a line that finds the
//! queue full is dropped and counted, never waited for, and the count is reported once the
//! writer catches up.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Lines queued at most (a burst of warnings, about 1 MiB).
const QUEUED_LINES: usize = 4096;

/// A `tracing_subscriber` writer: every event becomes one queued line.
#[derive(Clone)]
pub struct LogQueue {
    tx: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The log's end: dropping it (at exit) waits until what is queued is written, at most
/// [`EXIT_WAIT`] (stderr may be blocked for good).
pub struct LogWriter {
    queue: LogQueue,
}

/// How long the daemon's exit waits for queued lines to be written.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The daemon's queue, once started: [`say`] puts its lines in order with the log's.
static QUEUE: OnceLock<LogQueue> = OnceLock::new();

/// Starts the writer thread. Keep the [`LogWriter`] until the daemon has stopped.
pub fn start() -> std::io::Result<(LogQueue, LogWriter)> {
    let (tx, rx) = sync_channel::<Message>(QUEUED_LINES);
    let queue = LogQueue { tx, dropped: Arc::new(AtomicU64::new(0)) };
    let dropped = queue.dropped.clone();
    std::thread::Builder::new().name("snapblk-log".into()).spawn(move || {
        // Locked per line, not for good: a panic message takes the same lock.
        let err = std::io::stderr();
        for m in rx {
            let mut err = err.lock();
            match m {
                Message::Line(line) => {
                    let _ = err.write_all(&line);
                }
                Message::Flush(done) => {
                    let _ = done.send(());
                }
            }
            let lost = dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let _ = writeln!(err, "snapblk: {lost} log lines dropped (stderr could not keep up)");
            }
        }
    })?;
    let _ = QUEUE.set(queue.clone());
    Ok((queue.clone(), LogWriter { queue }))
}

/// Prints a line of the daemon's own to stderr (ready, stopped), after the log lines queued
/// before it: whoever waits for "serving" then finds every earlier line written. Like a log
/// line, it is dropped if the queue is full (stderr blocked), never waited for.
pub fn say(line: std::fmt::Arguments<'_>) {
    match QUEUE.get() {
        Some(q) => q.push(format!("{line}\n").into_bytes()),
        None => eprintln!("{line}"),
    }
}

impl LogQueue {
    /// Queues a line, or counts it as dropped when the queue is full.
    fn push(&self, line: Vec<u8>) {
        match self.tx.try_send(Message::Line(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        // Waits for room in the queue only as long as for the lines themselves.
        let (done, flushed) = std::sync::mpsc::channel();
        let deadline = std::time::Instant::now() + EXIT_WAIT;
        let mut flush = Message::Flush(done);
        loop {
            match self.queue.tx.try_send(flush) {
                Ok(()) => {
                    let _ = flushed.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
                    return;
                }
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    flush = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
    }
}

/// One event's text, queued when the event is done.
pub struct LogLine {
    buf: Vec<u8>,
    queue: LogQueue,
}

impl Write for LogLine {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.queue.push(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogQueue {
    type Writer = LogLine;
    fn make_writer(&'a self) -> LogLine {
        LogLine { buf: Vec::new(), queue: self.clone() }
    }
}
