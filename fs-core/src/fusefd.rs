//! FUSE file-descriptor handover: a privileged process (the CSI node plugin) opens
//! `/dev/fuse`, mounts it, keeps a copy of the descriptor and hands it over a unix socket
//! (SCM_RIGHTS) to an unprivileged client (`strata mount --fuse-fd-socket`). When the client
//! dies the kernel connection stays alive (the keeper still holds the descriptor), so a new
//! client can take the same descriptor over and the mount — and every bind mount of it —
//! keeps working.
//!
//! The kernel sends `FUSE_INIT` once per connection. A client that takes over a connection
//! that is already initialised ("resume") serves fuser through a `SOCK_SEQPACKET` pair and a
//! relay: the relay feeds fuser a synthetic `FUSE_INIT`, swallows its reply, then forwards
//! kernel requests to fuser and fuser's replies to the kernel, and asks the kernel
//! (`FUSE_NOTIFY_RESEND`, Linux ≥ 6.9) to queue again the requests the dead client had read
//! but not answered.
//!
//! Socket protocol (one connection per client, kept open while the client lives):
//! - client → keeper: `N` (needs the descriptor) or `H` + the descriptor as SCM_RIGHTS (hands
//!   its copy back to a keeper that restarted and lost its own);
//! - keeper → client, answering `N`: `F` (fresh: the kernel will send `FUSE_INIT`) or `R`
//!   (resume), with SCM_RIGHTS `[/dev/fuse, relay end for fuser, relay end for the relay]`
//!   (the relay pair is made by the keeper, which may raise its buffer sizes past the
//!   unprivileged limit); answering `H`: `A`;
//! - client → keeper: `Y` once its session is serving (the connection is initialised);
//! - end of the connection: the client is gone.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Buffer size of the relay pair (each direction). Requests are at most `max_write` (1 MiB)
/// plus headers; replies at most `max_read` (1 MiB) plus a header.
pub const RELAY_BUFFER: usize = 4 << 20;
/// Largest message the relay moves (fuser reads up to 16 MiB + 4 KiB).
const MAX_MSG: usize = (16 << 20) + 4096;
const FUSE_INIT: u32 = 26;
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `unique` of the synthetic INIT (odd: the kernel only uses odd ids for interrupts of
/// requests, and never for request 0).
const SYNTHETIC_UNIQUE: u64 = 1;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Open `/dev/fuse` and mount a Strata FUSE file system on `mountpoint` with it (needs
/// CAP_SYS_ADMIN). Returns the connection's descriptor; the mount lives as long as any copy
/// of it is open and the mount point is not unmounted.
pub fn mount_fuse(mountpoint: &Path, fsname: &str, read_only: bool) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let dev: OwnedFd = dev.into();
    let meta = std::fs::metadata(mountpoint)?;
    use std::os::unix::fs::MetadataExt;
    let rootmode = meta.mode() & libc::S_IFMT;
    let data = format!(
        "fd={},rootmode={:o},user_id=0,group_id=0,allow_other,default_permissions,max_read={}",
        dev.as_raw_fd(),
        rootmode,
        1 << 20
    );
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| io::Error::other("NUL in path"));
    let src = c(fsname.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(b"fuse.strata")?;
    let data = c(data.as_bytes())?;
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(dev)
}

/// Send `data` with descriptors attached (SCM_RIGHTS).
pub fn send_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut cbuf = vec![0u8; space.max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; the buffers it points to outlive sendmsg.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                std::mem::size_of_val(fds),
            );
        }
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receive a message into `buf` with up to 4 attached descriptors. Returns the bytes read
/// (0 at the end of the connection) and the descriptors.
pub fn recv_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let space = unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut fds = Vec::new();
    // SAFETY: as in send_fds; received descriptors are owned exactly once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n, fds))
    }
}

fn set_buffers(fd: BorrowedFd<'_>, size: usize) {
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        let v = size as libc::c_int;
        let set = |opt| {
            // SAFETY: setsockopt with a c_int value.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            }
        };
        if set(force) != 0 {
            // Unprivileged: capped at net.core.wmem_max / rmem_max.
            set(plain);
        }
    }
}

/// A `SOCK_SEQPACKET` pair for the resume relay, with buffers large enough for a 1 MiB
/// request when the caller may raise them (root), else as large as allowed.
pub fn relay_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair fills the two descriptors on success.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors are new and owned here.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_buffers(a.as_fd(), RELAY_BUFFER);
    set_buffers(b.as_fd(), RELAY_BUFFER);
    Ok((a, b))
}

/// Ask the kernel to queue again every request a previous client read but did not answer
/// (`FUSE_NOTIFY_RESEND`; they come back with bit 63 of `unique` set).
pub fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&16u32.to_ne_bytes());
    h[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a stack buffer.
    let n = unsafe { libc::write(dev.as_raw_fd(), h.as_ptr().cast(), h.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `FUSE_INIT` request as the kernel would send it (protocol 7.40, every capability
/// offered: fuser answers with what it wants, and the answer is dropped).
fn synthetic_init() -> Vec<u8> {
    let mut m = vec![0u8; 40 + 64];
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..8].copy_from_slice(&FUSE_INIT.to_ne_bytes());
    m[8..16].copy_from_slice(&SYNTHETIC_UNIQUE.to_ne_bytes());
    let body = &mut m[40..];
    body[0..4].copy_from_slice(&7u32.to_ne_bytes());
    body[4..8].copy_from_slice(&40u32.to_ne_bytes());
    body[8..12].copy_from_slice(&(1u32 << 20).to_ne_bytes());
    body[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
    body[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
    m
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reads into a buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // ENOENT: the request was interrupted before it was read; retry.
            Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
            _ => return Err(e),
        }
    }
}

fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: writes a buffer of the given length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// The relay of a resumed session: `dev` is the kernel connection, `peer` the relay's end of
/// the pair whose other end fuser serves. Call before `fuser::Session::from_fd` on the other
/// end (which waits for the synthetic INIT this sends). Returns the relay's threads; they end
/// when the kernel connection ends (unmount) or fuser closes its end.
pub fn start_relay(dev: Arc<OwnedFd>, peer: OwnedFd) -> io::Result<std::thread::JoinHandle<()>> {
    let peer = Arc::new(peer);
    std::thread::Builder::new()
        .name("fuse-relay".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_MSG];
            let init = synthetic_init();
            if let Err(e) = write_fd(peer.as_raw_fd(), &init) {
                tracing::error!(error = %e, "relay: sending the synthetic INIT failed");
                return;
            }
            match read_fd(peer.as_raw_fd(), &mut buf) {
                Ok(n) if n >= 16 => {
                    let err = i32::from_ne_bytes(buf[4..8].try_into().unwrap_or([0; 4]));
                    if err != 0 {
                        tracing::error!(errno = -err, "relay: the session refused INIT");
                        return;
                    }
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(error = %e, "relay: reading the INIT reply failed");
                    return;
                }
            }
            match notify_resend(dev.as_fd()) {
                Ok(()) => tracing::info!("resumed FUSE connection; unanswered requests re-queued"),
                Err(e) => tracing::warn!(error = %e,
                    "FUSE_NOTIFY_RESEND failed (Linux < 6.9?): requests the previous client read but did not answer stay pending"),
            }
            let replies = {
                let (dev, peer) = (dev.clone(), peer.clone());
                std::thread::Builder::new()
                    .name("fuse-relay-out".into())
                    .spawn(move || {
                        let mut buf = vec![0u8; MAX_MSG];
                        loop {
                            match read_fd(peer.as_raw_fd(), &mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    // ENOENT: the request was interrupted meanwhile.
                                    if let Err(e) = write_fd(dev.as_raw_fd(), &buf[..n])
                                        && e.raw_os_error() == Some(libc::ENODEV)
                                    {
                                        return;
                                    }
                                }
                            }
                        }
                    })
            };
            // Requests: kernel → fuser.
            loop {
                match read_fd(dev.as_raw_fd(), &mut buf) {
                    Ok(n) if n > 0 => {
                        if let Err(e) = write_fd(peer.as_raw_fd(), &buf[..n]) {
                            tracing::error!(error = %e, len = n, "relay: forwarding a request failed");
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        if e.raw_os_error() != Some(libc::ENODEV) {
                            tracing::error!(error = %e, "relay: reading /dev/fuse failed");
                        }
                        break;
                    }
                }
            }
            // SAFETY: shutdown on a socket we own; wakes fuser's readers and the reply thread.
            unsafe { libc::shutdown(peer.as_raw_fd(), libc::SHUT_RDWR) };
            if let Ok(t) = replies {
                let _ = t.join();
            }
        })
}

/// What a client received from the keeper.
pub struct Handover {
    /// The kernel connection.
    pub dev: OwnedFd,
    /// The connection was initialised by an earlier client: serve it through the relay.
    pub resume: bool,
    /// The relay pair made by the keeper (fuser's end, relay's end), when resuming.
    pub relay: Option<(OwnedFd, OwnedFd)>,
    /// The connection to the keeper (stays open while this client lives).
    pub conn: UnixStream,
}

/// Whether SIGTERM, SIGINT or SIGHUP is pending for this thread (the mount client blocks
/// them until its signal thread runs, so a wait before that must look for them itself).
fn termination_pending() -> bool {
    // SAFETY: sigpending fills a zero-initialized sigset; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set) == 0
            && [libc::SIGTERM, libc::SIGINT, libc::SIGHUP]
                .iter()
                .any(|&s| libc::sigismember(&set, s) == 1)
    }
}

/// Client: connect to the keeper at `path` and take the FUSE descriptor. Waits up to
/// `timeout` for the socket, but not past a termination signal (a mount Pod deleted while
/// its client waits must not wait out its grace period).
pub fn take(path: &Path, timeout: Duration) -> io::Result<Handover> {
    let start = Instant::now();
    let conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(_) if termination_pending() => {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "termination signal while waiting for the descriptor",
                ));
            }
            Err(e) if start.elapsed() < timeout => {
                tracing::debug!(error = %e, path = %path.display(), "waiting for the FUSE fd socket");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    (&conn).write_all(b"N")?;
    let mut buf = [0u8; 16];
    let (n, mut fds) = recv_fds(&conn, &mut buf)?;
    if n == 0 || fds.is_empty() {
        return Err(io::Error::other(
            "the FUSE fd keeper closed the connection without a descriptor",
        ));
    }
    let resume = buf[0] == b'R';
    let dev = fds.remove(0);
    let relay = if fds.len() >= 2 {
        let b = fds.remove(1);
        let a = fds.remove(0);
        Some((a, b))
    } else {
        None
    };
    Ok(Handover {
        dev,
        resume,
        relay,
        conn,
    })
}

/// Client: tell the keeper the session is serving, then watch the connection; if the keeper
/// goes away (restart), reconnect and hand it a copy of the descriptor so that it can give it
/// to the next client should this one die.
pub fn serve_keeper(handover_conn: UnixStream, path: PathBuf, dev: Arc<OwnedFd>) {
    let _ = std::thread::Builder::new()
        .name("fd-keeper".into())
        .spawn(move || {
            let mut conn = handover_conn;
            let _ = conn.write_all(b"Y");
            loop {
                let mut b = [0u8; 1];
                // Blocks until the keeper closes the connection.
                while matches!(conn.read(&mut b), Ok(n) if n > 0) {}
                tracing::warn!(path = %path.display(), "FUSE fd keeper went away; handing the descriptor back when it returns");
                conn = loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let Ok(c) = UnixStream::connect(&path) else {
                        continue;
                    };
                    if send_fds(&c, b"H", &[dev.as_raw_fd()]).is_ok() {
                        let mut ack = [0u8; 1];
                        if matches!((&c).read(&mut ack), Ok(1)) && ack[0] == b'A' {
                            break c;
                        }
                    }
                };
                tracing::info!(path = %path.display(), "FUSE descriptor handed back to the keeper");
            }
        });
}

struct KeeperState {
    dev: Mutex<Option<Arc<OwnedFd>>>,
    initialised: AtomicBool,
    clients: AtomicUsize,
    stop: AtomicBool,
}

/// Keeper side (the node plugin): holds the descriptor of a mount and hands it to clients
/// connecting to a unix socket.
pub struct FdKeeper {
    state: Arc<KeeperState>,
    path: PathBuf,
}

impl FdKeeper {
    /// Listen on `path` (replaced if it exists). `dev` is `None` after a restart that lost the
    /// descriptor: a live client then hands its copy back.
    pub fn start(path: &Path, dev: Option<OwnedFd>, initialised: bool) -> io::Result<FdKeeper> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let state = Arc::new(KeeperState {
            dev: Mutex::new(dev.map(Arc::new)),
            initialised: AtomicBool::new(initialised),
            clients: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        std::thread::Builder::new()
            .name("fd-keeper".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    let _ = std::thread::Builder::new()
                        .name("fd-keeper-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(&st, conn) {
                                tracing::warn!(error = %e, "FUSE fd handover failed");
                            }
                        });
                }
            })?;
        Ok(FdKeeper {
            state,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Does the keeper hold the descriptor?
    pub fn has_fd(&self) -> bool {
        self.state.dev.lock().is_some()
    }

    /// Number of clients connected now.
    pub fn clients(&self) -> usize {
        self.state.clients.load(Ordering::SeqCst)
    }

    /// Has a client ever completed the INIT handshake of this connection?
    pub fn initialised(&self) -> bool {
        self.state.initialised.load(Ordering::SeqCst)
    }

    /// Wait until a client is connected and serving.
    pub fn wait_serving(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.initialised() && self.clients() > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stop listening and drop the keeper's copy of the descriptor.
    pub fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        self.state.dev.lock().take();
    }
}

impl Drop for FdKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_client(st: &KeeperState, conn: UnixStream) -> io::Result<()> {
    let mut buf = [0u8; 16];
    let (n, mut fds) = recv_fds(&conn, &mut buf)?;
    if n == 0 || st.stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    match buf[0] {
        b'N' => {
            let Some(dev) = st.dev.lock().clone() else {
                return Err(io::Error::other(
                    "a client asked for the FUSE descriptor but this keeper has none",
                ));
            };
            // One client at a time: a new one (a replacement mount Pod, a restarted
            // process) gets the descriptor only once the previous one is gone, so that two
            // clients never serve the same connection.
            while st
                .clients
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                if st.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let resume = st.initialised.load(Ordering::SeqCst);
            let sent = relay_pair().and_then(|(a, b)| {
                let tag: &[u8] = if resume { b"R" } else { b"F" };
                send_fds(&conn, tag, &[dev.as_raw_fd(), a.as_raw_fd(), b.as_raw_fd()])
            });
            if let Err(e) = sent {
                st.clients.fetch_sub(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        b'H' => {
            if let Some(fd) = fds.pop() {
                let mut d = st.dev.lock();
                if d.is_none() {
                    *d = Some(Arc::new(fd));
                }
                st.initialised.store(true, Ordering::SeqCst);
            }
            (&conn).write_all(b"A")?;
            st.clients.fetch_add(1, Ordering::SeqCst);
        }
        _ => return Err(io::Error::other("unknown handover request")),
    }
    let mut b = [0u8; 1];
    loop {
        match (&conn).read(&mut b) {
            Ok(1) if b[0] == b'Y' => st.initialised.store(true, Ordering::SeqCst),
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    st.clients.fetch_sub(1, Ordering::SeqCst);
    Ok(())
}

// ---- Supervisor of a descriptor client (`strata mount --supervise`)
//
// In a mount Pod the client is the container's only process; when it dies, kubelet restarts
// the container only after its crash back-off (10 s, 20 s, 40 s … 5 min). The supervisor is
// the container's process instead: it starts the client again at once (the new client takes
// the same descriptor from the keeper and resumes the connection), and passes termination
// signals on so that deleting the Pod stays quick.

/// Restart delays of a supervised client: `min` after a quick exit, doubling up to `max`;
/// back to `min` after a run of at least `stable`.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
    pub stable: Duration,
    next: Duration,
    /// Exits in a row that came within `stable` of their start.
    quick_exits: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, stable: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            stable,
            next: min,
            quick_exits: 0,
        }
    }

    /// Record an exit of a run that lasted `ran`; returns the delay before the next start.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.stable {
            self.next = self.min;
            self.quick_exits = 0;
        } else {
            self.quick_exits += 1;
        }
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Exits in a row, each within `stable` of its start.
    pub fn quick_exits(&self) -> u32 {
        self.quick_exits
    }
}

/// Pid of the supervised child (0: none), for the signal handler.
static SUPERVISED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Termination signal received by the supervisor (0: none).
static SUPERVISOR_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    SUPERVISOR_SIGNAL.store(sig, Ordering::SeqCst);
    let pid = SUPERVISED.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Exit status of a child as a shell reports it (128 + signal when killed).
fn exit_code(s: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code()
        .or_else(|| s.signal().map(|n| 128 + n))
        .unwrap_or(1)
}

/// Run the command `make` builds, and again each time it fails, after `backoff`'s delay (a
/// clean exit, code 0, means the client's mount is gone and ends the supervision too),
/// until SIGTERM, SIGINT or SIGHUP (passed on to the running command, whose exit then ends
/// the supervision) or until `max_quick_exits` exits in a row came each within
/// `backoff.stable` of their start (0: never give up; giving up hands restarts over to
/// kubelet, whose status then shows the crash loop). Returns the exit code for the
/// supervisor: the command's last one (0 when stopped by a signal with no command running).
pub fn supervise(
    mut make: impl FnMut() -> std::process::Command,
    mut backoff: Backoff,
    max_quick_exits: u32,
) -> i32 {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only touches atomics and calls kill.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let stopped = || SUPERVISOR_SIGNAL.load(Ordering::SeqCst) != 0;
    let mut last = 0;
    loop {
        if stopped() {
            return last;
        }
        let started = Instant::now();
        let mut child = match make().spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "supervisor: cannot start the client");
                return 127;
            }
        };
        SUPERVISED.store(child.id() as i32, Ordering::SeqCst);
        // A signal that came between the spawn and the store above was not passed on.
        let sig = SUPERVISOR_SIGNAL.load(Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: signal to our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        let status = child.wait();
        SUPERVISED.store(0, Ordering::SeqCst);
        last = match status {
            Ok(s) => exit_code(s),
            Err(e) => {
                tracing::error!(error = %e, "supervisor: waiting for the client failed");
                1
            }
        };
        if stopped() {
            tracing::info!(
                code = last,
                "supervisor: client ended after a termination signal"
            );
            return last;
        }
        if last == 0 {
            // A client exits 0 only when its FUSE connection ended (the node plugin unmounted
            // the volume): there is nothing left to serve, and a new client would only wait
            // for a descriptor that will not come.
            tracing::info!("supervisor: the client ended cleanly (its mount is gone); stopping");
            return 0;
        }
        let ran = started.elapsed();
        let delay = backoff.after_exit(ran);
        if max_quick_exits > 0 && backoff.quick_exits() >= max_quick_exits {
            tracing::error!(
                code = last,
                exits = backoff.quick_exits(),
                "supervisor: the client keeps exiting; giving up"
            );
            return if last == 0 { 1 } else { last };
        }
        tracing::warn!(
            code = last,
            ran_seconds = ran.as_secs_f64(),
            restart_in_seconds = delay.as_secs_f64(),
            "supervisor: client exited; starting it again"
        );
        let until = Instant::now() + delay;
        while Instant::now() < until && !stopped() {
            std::thread::sleep(Duration::from_millis(10).min(delay));
        }
    }
}

#[cfg(test)]
mod supervisor_tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_stable_run() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(2000), Duration::from_secs(10));
        let quick = ms(50);
        let delays: Vec<_> = (0..6).map(|_| b.after_exit(quick)).collect();
        assert_eq!(
            delays,
            [ms(200), ms(400), ms(800), ms(1600), ms(2000), ms(2000)]
        );
        assert_eq!(b.quick_exits(), 6);
        assert_eq!(b.after_exit(Duration::from_secs(11)), ms(200));
        assert_eq!(b.quick_exits(), 0);
        assert_eq!(b.after_exit(quick), ms(400));
    }

    #[test]
    fn a_client_waiting_for_the_socket_stops_at_a_termination_signal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fd.sock");
        let started = std::thread::spawn(move || {
            crate::mount::block_signals();
            // SAFETY: a signal to this very thread, which blocks it: it stays pending.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
            let t = Instant::now();
            let r = take(&path, Duration::from_secs(20));
            (r.map(|h| h.resume), t.elapsed())
        });
        let (r, took) = started.join().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert!(
            took < Duration::from_secs(2),
            "waited {took:?} past SIGTERM"
        );
    }

    #[test]
    fn the_keeper_hands_the_descriptor_to_one_client_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let dev = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let k = FdKeeper::start(&dir.path().join("fd.sock"), Some(dev), false).unwrap();
        let first = take(k.path(), Duration::from_secs(5)).unwrap();
        assert!(!first.resume);
        (&first.conn).write_all(b"Y").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = k.path().to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(take(&path, Duration::from_secs(5)).map(|h| (h.resume, h.conn)));
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(600)).is_err(),
            "a second client got the descriptor while the first one serves"
        );
        assert_eq!(k.clients(), 1);
        drop(first);
        let (resume, _conn) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the second client waits for the first one only")
            .unwrap();
        assert!(resume, "the connection was initialised by the first client");
        assert_eq!(k.clients(), 1);
    }
}
