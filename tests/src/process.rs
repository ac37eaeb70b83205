//! Child processes that are killed on drop, with their output collected line by line.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed: usize,
}

/// A running child; stdout and stderr lines are collected (stderr lines prefixed with
/// `stderr: `). Killed and reaped on drop.
pub struct Process {
    child: Child,
    output: Arc<(Mutex<Output>, Condvar)>,
}

impl Process {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let output = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        collect(stdout, "", output.clone());
        collect(stderr, "stderr: ", output.clone());
        Ok(Self { child, output })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a line contains `needle`; fails if the process exits or time runs out.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(line) = out.lines.iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            let now = Instant::now();
            if out.closed == 2 || now >= deadline {
                bail!(
                    "no line with {needle:?} ({}); output so far:\n{}",
                    if out.closed == 2 { "process ended" } else { "timed out" },
                    out.lines.join("\n")
                );
            }
            out = cond.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// All lines collected so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.0.lock().unwrap().lines.clone()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child, not yet
        // reaped (reaping happens only in `wait`/drop, which take `self`).
        if unsafe { libc::kill(self.child.id() as i32, sig) } != 0 {
            bail!("kill({}, {sig}): {}", self.child.id(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the process to exit (at most `timeout`, then kills it and fails); returns
    /// its exit code and every output line.
    pub fn wait(mut self, timeout: Duration) -> Result<(i32, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("process {} did not exit within {timeout:?}; output:\n{}", self.child.id(), self.lines().join("\n"));
            }
            thread::sleep(Duration::from_millis(20));
        };
        // Let the readers drain the pipes.
        let (lock, cond) = &*self.output;
        let mut out = lock.lock().unwrap();
        while out.closed < 2 {
            let (o, t) = cond.wait_timeout(out, Duration::from_secs(2)).unwrap();
            out = o;
            if t.timed_out() {
                break;
            }
        }
        Ok((status.code().unwrap_or(-1), out.lines.clone()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(pipe: impl Read + Send + 'static, prefix: &'static str, output: Arc<(Mutex<Output>, Condvar)>) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("SPLITTER_TEST_ECHO").is_some() {
                eprintln!("{prefix}{line}");
            }
            let (lock, cond) = &*output;
            lock.lock().unwrap().lines.push(format!("{prefix}{line}"));
            cond.notify_all();
        }
        let (lock, cond) = &*output;
        lock.lock().unwrap().closed += 1;
        cond.notify_all();
    });
}
