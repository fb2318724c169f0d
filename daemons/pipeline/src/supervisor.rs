//! Runs the daemons and the backbone servers as children the way systemd would: each daemon
//! gets its own `NOTIFY_SOCKET` and start-up waits for its `READY=1` (a server: for its port),
//! logs are streamed with a name prefix (or kept in a file), a crashed child is restarted with
//! backoff, and stopping sends the stop signal and waits for the drain.
//!
//! Every child runs in a process group of its own, so a Ctrl-C at the terminal reaches only
//! the pipeline, which stops the children in dependency order; and every child is sent its
//! stop signal by the kernel when the pipeline dies, even by SIGKILL, so none is left behind.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use rustix::process::{Pid, Signal, kill_process};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    net::UnixDatagram,
    process::{Child, Command},
    sync::Mutex,
};
use tokio_util::sync::CancellationToken;

/// How to start one child.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Restart when it exits with failure (not for one-shot children that may finish).
    pub restart: bool,
    pub ready: Ready,
    /// What asks it to stop cleanly (PostgreSQL: SIGINT, its fast shutdown).
    pub stop_signal: Signal,
    /// `(uid, gid)` to run as.
    pub user: Option<(u32, u32)>,
    /// Working directory.
    pub dir: Option<PathBuf>,
    /// Output to this file instead of the pipeline's stderr.
    pub log: Option<PathBuf>,
}

impl Spec {
    /// A daemon of this workspace: sd-notify readiness, SIGTERM, output on stderr.
    pub fn daemon(name: &'static str, program: PathBuf, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        Self {
            name,
            program,
            args,
            env,
            restart: true,
            ready: Ready::Notify,
            stop_signal: Signal::TERM,
            user: None,
            dir: None,
            log: None,
        }
    }

    /// A backbone server: ready when `addr` accepts connections, output in `log`.
    pub fn server(name: &'static str, program: PathBuf, args: Vec<String>, addr: String, log: PathBuf) -> Self {
        Self {
            ready: Ready::Port(addr),
            log: Some(log),
            ..Self::daemon(name, program, args, Vec::new())
        }
    }
}

/// When a child counts as started.
#[derive(Debug, Clone)]
pub enum Ready {
    /// It sends `READY=1` to its `NOTIFY_SOCKET`.
    Notify,
    /// It accepts TCP connections on this address.
    Port(String),
}

/// A supervised child: started, watched and restarted until [`Supervised::stop`].
pub struct Supervised {
    pub name: &'static str,
    stop_signal: Signal,
    child: Arc<Mutex<Option<Child>>>,
    /// Kept until the child is gone, so its STOPPING=1 has somewhere to go.
    _socket: Arc<UnixDatagram>,
    stopping: CancellationToken,
    watcher: tokio::task::JoinHandle<()>,
}

/// How long a child has to drain after its stop signal before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Stops `children` one after the other (each: [`Supervised::stop`] with a minute's grace) and
/// logs each; whether all exited cleanly.
pub async fn stop_in_order(children: impl IntoIterator<Item = Supervised>) -> bool {
    let mut clean = true;
    for child in children {
        let name = child.name;
        let ok = child.stop(STOP_GRACE).await;
        tracing::info!("{name} stopped{}", if ok { "" } else { " (not cleanly)" });
        clean &= ok;
    }
    clean
}

impl Supervised {
    /// Starts `spec` and waits (up to `timeout`) for it to be ready; `READY=1` comes on a
    /// socket in `notify_dir`.
    pub async fn start(spec: Spec, notify_dir: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let socket_path = notify_dir.join(format!("{}.sock", spec.name));
        let _ = std::fs::remove_file(&socket_path);
        let socket =
            Arc::new(UnixDatagram::bind(&socket_path).with_context(|| format!("binding {}", socket_path.display()))?);
        let child = spawn(&spec, &socket_path)?;
        let child = Arc::new(Mutex::new(Some(child)));
        wait_ready(&socket, &spec, &child, timeout).await?;
        let stopping = CancellationToken::new();
        let (name, stop_signal) = (spec.name, spec.stop_signal);
        let watcher = tokio::spawn(watch(
            spec,
            socket.clone(),
            socket_path,
            child.clone(),
            stopping.clone(),
        ));
        Ok(Self {
            name,
            stop_signal,
            child,
            _socket: socket,
            stopping,
            watcher,
        })
    }

    /// The stop signal, then up to `grace` for a clean exit, then SIGKILL. Returns whether
    /// it exited 0.
    pub async fn stop(self, grace: Duration) -> bool {
        self.stopping.cancel();
        let mut guard = self.child.lock().await;
        let clean = match guard.as_mut() {
            Some(child) => terminate(child, self.stop_signal, grace).await,
            None => true,
        };
        drop(guard);
        let _ = self.watcher.await;
        clean
    }
}

/// Keeps `command`'s child out of the terminal's process group and has the kernel send it
/// `signal` when the pipeline dies. (The kernel watches the thread that forks: children are
/// started from the main thread and the runtime's worker threads, which live as long as the
/// pipeline.)
fn tie_to_pipeline(command: &mut Command, signal: Signal) {
    let pipeline = rustix::process::getpid();
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes two system calls; it
    // allocates nothing and takes no lock.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(signal))?;
            // The pipeline may have died before the line above: then no signal would come.
            if rustix::process::getppid() != Some(pipeline) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

fn spawn(spec: &Spec, notify_socket: &Path) -> anyhow::Result<Child> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        // The children's stderr is ours, not the journal's.
        .env_remove("JOURNAL_STREAM")
        .env_remove("WATCHDOG_USEC")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if matches!(spec.ready, Ready::Notify) {
        command.env("NOTIFY_SOCKET", notify_socket);
    }
    if let Some((uid, gid)) = spec.user {
        command.uid(uid).gid(gid);
    }
    if let Some(dir) = &spec.dir {
        command.current_dir(dir);
    }
    match &spec.log {
        Some(log) => {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
            command.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    tie_to_pipeline(&mut command, spec.stop_signal);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}: {}", spec.name, spec.program.display()))?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(prefix_lines(spec.name, stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(prefix_lines(spec.name, stderr));
    }
    Ok(child)
}

async fn prefix_lines(name: &'static str, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{name:>17} | {line}");
    }
}

async fn wait_ready(
    socket: &UnixDatagram,
    spec: &Spec,
    child: &Mutex<Option<Child>>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let name = spec.name;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            received = socket.recv(&mut buf) => {
                let n = received?;
                if matches!(spec.ready, Ready::Notify) && String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                    return Ok(());
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some(child) = child.lock().await.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        let log = spec.log.as_ref().map(|l| format!("; see {}", l.display())).unwrap_or_default();
                        anyhow::bail!("{name} exited before it was ready: {status}{log}");
                    }
                }
                if let Ready::Port(addr) = &spec.ready {
                    if tokio::net::TcpStream::connect(addr).await.is_ok() {
                        return Ok(());
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("{name} not ready after {timeout:?}");
                }
            }
        }
    }
}

/// Waits for the child to exit; restarts it with backoff when it failed and we are not stopping.
async fn watch(
    spec: Spec,
    socket: Arc<UnixDatagram>,
    socket_path: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    stopping: CancellationToken,
) {
    let mut delay = Duration::from_secs(1);
    loop {
        let status = loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let mut guard = child.lock().await;
                    let Some(running) = guard.as_mut() else { return };
                    if let Ok(Some(status)) = running.try_wait() {
                        *guard = None;
                        break status;
                    }
                }
            }
        };
        if status.success() || !spec.restart {
            eprintln!("{:>17} | exited: {status}", spec.name);
            return;
        }
        eprintln!("{:>17} | crashed ({status}); restarting in {delay:?}", spec.name);
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(30));
        match spawn(&spec, &socket_path) {
            Ok(new_child) => {
                *child.lock().await = Some(new_child);
                if let Err(e) = wait_ready(&socket, &spec, &child, Duration::from_secs(120)).await {
                    eprintln!("{:>17} | {e:#}", spec.name);
                }
            }
            Err(e) => eprintln!("{:>17} | {e:#}", spec.name),
        }
    }
}

/// Sends `signal` and waits up to `grace`, then SIGKILL. True when it exited with status 0.
async fn terminate(child: &mut Child, signal: Signal, grace: Duration) -> bool {
    if let Some(pid) = child.id().and_then(|id| Pid::from_raw(id as i32)) {
        let _ = kill_process(pid, signal);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = child.kill().await;
            false
        }
    }
}
