//! The Unix socket: JSON lines in, JSON lines out, root callers only.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use podshaper_api::proto::{Request, Response};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};
use tracing::{debug, info, warn};

use crate::{Error, State};

/// Where the daemon keeps its socket and pinned state.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub bpffs_root: PathBuf,
    /// Pace senders on this node toward ingress-limited cgroups (a sock_ops program on the
    /// cgroup v2 root while some ingress limit exists); off, ingress is only policed.
    pub peer_pacing: bool,
    /// Where the cgroup v2 hierarchy is; found in /proc/self/mountinfo when not given.
    pub cgroup_root: Option<PathBuf>,
}

impl Options {
    /// Opens the state these options describe (see [`State::open`]).
    pub fn open(&self) -> Result<Arc<Mutex<State>>, Error> {
        let state = State::open(&self.bpffs_root, self.peer_pacing, self.cgroup_root.as_deref())?;
        Ok(Arc::new(Mutex::new(state)))
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Runs the daemon until SIGTERM or SIGINT: serves the socket and ticks the state. Limits stay
/// in force after it returns.
pub async fn run(opts: Options) -> Result<(), Error> {
    // Bound first: a second daemon must not touch the pinned state before it learns the
    // socket is served.
    let server = Server::bind(&opts.socket).await?;
    let state = opts.open()?;
    let stop = shutdown_signal()?;
    tokio::select! {
        () = server.serve(state.clone(), stop) => {}
        () = maintain(state) => {}
    }
    info!("stopped; limits stay in force");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    let mut term = signal(SignalKind::terminate()).map_err(io("install SIGTERM handler".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("install SIGINT handler".into()))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// The daemon's periodic work, for a process that has nothing else to tick it with: calls
/// [`State::tick`] once a second, forever.
pub async fn maintain(state: Arc<Mutex<State>>) {
    let mut ticker = tokio::time::interval(TICK);
    loop {
        ticker.tick().await;
        let state = state.clone();
        // The tick reads every limited cgroup's maps: off the async threads.
        let ticked = tokio::task::spawn_blocking(move || {
            if let Ok(mut s) = state.lock() {
                s.tick();
            }
        });
        if let Err(e) = ticked.await {
            warn!(error = %e, "daemon tick");
        }
    }
}

/// How often the daemon's state wants [`State::tick`].
pub const TICK: Duration = Duration::from_secs(1);

/// The local API's socket, bound: binding fails at once (another daemon serving it, no
/// permission), serving then only ends when told to.
pub struct Server {
    listener: UnixListener,
    socket: PathBuf,
}

impl Server {
    /// Binds `socket` (mode 0600), replacing a stale one; refuses one another daemon serves.
    pub async fn bind(socket: &Path) -> Result<Self, Error> {
        Ok(Self {
            listener: bind(socket).await?,
            socket: socket.to_path_buf(),
        })
    }

    /// Serves requests onto `state` until `stop` resolves, then removes the socket.
    pub async fn serve(self, state: Arc<Mutex<State>>, stop: impl std::future::Future<Output = ()>) {
        info!(socket = %self.socket.display(), "serving");
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => { tokio::spawn(serve_one(stream, state.clone())); }
                    Err(e) => warn!(error = %e, "accept"),
                },
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::AlreadyRunning(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io(format!("remove stale socket {}", path.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    Ok(listener)
}

async fn serve_one(stream: UnixStream, state: Arc<Mutex<State>>) {
    // The socket is 0600, but a process that inherited a descriptor is checked too.
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let resp = if uid != Some(0) && uid != Some(ours) {
            Response::Error {
                message: "permission denied: only root may use the podshaper daemon".into(),
            }
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(req) => {
                    debug!(?req, "request");
                    let state = state.clone();
                    tokio::task::spawn_blocking(move || match state.lock() {
                        Ok(mut s) => s.handle(req),
                        Err(_) => Response::Error {
                            message: "daemon state is poisoned; restart the daemon".into(),
                        },
                    })
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("request failed: {e}"),
                    })
                }
                Err(e) => Response::Error {
                    message: format!("malformed request: {e}"),
                },
            }
        };
        let Ok(mut out) = serde_json::to_string(&resp) else {
            break;
        };
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

/// Sends one request to the daemon at `socket` and returns its answer.
pub async fn call(socket: &Path, req: &Request) -> std::io::Result<Response> {
    let stream = UnixStream::connect(socket).await?;
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let resp = lines.next_line().await?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "daemon closed the connection")
    })?;
    serde_json::from_str(&resp).map_err(std::io::Error::other)
}
