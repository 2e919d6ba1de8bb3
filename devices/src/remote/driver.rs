//! The session driver of [`super::RemoteLayers`]: one task that owns the TLS stream and the
//! sans-IO [`DeviceSession`], takes jobs (requests, key registrations) from any number of
//! caller threads, keeps up to the negotiated `max_in_flight` requests outstanding on the one
//! session, and routes each answer to its caller by request id (TDM-REQ-8: responses MAY
//! arrive in any order relative to other in-flight requests; nothing here relies on order).
//!
//! Time: the session's own deadline ([`DeviceSession::poll_timeout`]) is honoured; the device's
//! `request_timeout_ms` (TDM-TIME-3) is the caller's I/O timeout, so a cloud that stops
//! answering fails every request in flight with [`DeviceError::Timeout`] instead of hanging.
//! A cloud that closes or drops the connection fails every request in flight with the typed
//! cause ([`DeviceError::Closed`] with its code, [`DeviceError::Io`]).
//!
//! After the session ended (idle timeout, a restarted cloud, a dropped connection), the next
//! job reconnects once and registers the session's key again before it is sent; a job whose
//! reconnect fails gets that error.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tandem_he::ParameterSet;
use tandem_protocol::{
    DeviceEvent, DeviceSession, ErrorCode, OutputMode, RequestPayload, ResponsePayload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

use super::RemoteStats;
use crate::conn::{Conn, ConnectParams};
use crate::DeviceError;

/// Where and how to connect (kept for reconnects).
pub(super) struct Target {
    pub addr: SocketAddr,
    pub server_name: String,
    pub tls: Arc<tandem_tls::rustls::ClientConfig>,
    pub model_id: String,
    pub model_digest: [u8; 32],
    pub param_sets: Vec<u16>,
    pub io_timeout: Duration,
    /// Most requests kept in flight (the negotiated `max_in_flight` caps it further).
    pub max_in_flight: usize,
}

/// What a caller asks the driver for.
pub(super) enum Job {
    /// An `InferRequest`; answered with the reply payload.
    Request {
        layer_id: u32,
        batch: u16,
        payload: RequestPayload,
        reply: std_mpsc::Sender<Result<ResponsePayload, DeviceError>>,
    },
    /// A `KeyRegister`, answered with the frame bytes sent once the cloud's `KeyAck` arrived;
    /// remembered and sent again after a reconnect.
    Key {
        key_id: [u8; 32],
        mode: OutputMode,
        blob: Vec<u8>,
        reply: std_mpsc::Sender<Result<usize, DeviceError>>,
    },
}

/// Why the session ended: copied into the error of every job it fails.
#[derive(Debug, Clone)]
enum Fatal {
    Closed(ErrorCode),
    Timeout,
    Io(std::io::ErrorKind, String),
}

impl Fatal {
    fn error(&self) -> DeviceError {
        match self {
            Fatal::Closed(c) => DeviceError::Closed(*c),
            Fatal::Timeout => DeviceError::Timeout,
            Fatal::Io(kind, msg) => DeviceError::Io(std::io::Error::new(*kind, msg.clone())),
        }
    }

    fn of(e: &DeviceError) -> Fatal {
        match e {
            DeviceError::Closed(c) => Fatal::Closed(*c),
            DeviceError::Timeout => Fatal::Timeout,
            DeviceError::Io(io) => Fatal::Io(io.kind(), io.to_string()),
            other => Fatal::Io(std::io::ErrorKind::Other, other.to_string()),
        }
    }
}

/// Where a key registration's outcome goes (frame bytes sent, or the error).
type KeyReply = std_mpsc::Sender<Result<usize, DeviceError>>;

/// A request sent and not yet answered.
struct Waiting {
    reply: std_mpsc::Sender<Result<ResponsePayload, DeviceError>>,
    sent: Instant,
}

/// An established connection: the TLS stream after the handshake, the session, the limit.
pub(super) type Opened = (TlsStream<TcpStream>, DeviceSession, ParameterSet, usize);

/// One established session. Reads happen in the driver's loop; writes in a task of their own
/// fed with whole frames, so a large request being written never stops the driver from
/// reading answers (neither side can block the other with full socket buffers).
struct Live {
    reader: ReadHalf<TlsStream<TcpStream>>,
    frames: mpsc::UnboundedSender<Vec<u8>>,
    writer: tokio::task::JoinHandle<std::io::Result<()>>,
    session: DeviceSession,
    in_flight: HashMap<u64, Waiting>,
    /// Registrations awaiting their KeyAck: key id, caller, frame bytes sent.
    keys: Vec<([u8; 32], KeyReply, usize)>,
    max_in_flight: usize,
}

impl Live {
    /// Splits the stream and starts its writer task (inside the driver's runtime).
    fn start(opened: Opened) -> Live {
        let (stream, session, _params, max_in_flight) = opened;
        let (reader, mut w) = tokio::io::split(stream);
        let (frames, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                w.write_all(&frame).await?;
                if rx.is_empty() {
                    w.flush().await?;
                }
            }
            w.shutdown().await
        });
        Live {
            reader,
            frames,
            writer,
            session,
            in_flight: HashMap::new(),
            keys: Vec::new(),
            max_in_flight,
        }
    }

    /// Hands every frame the session queued to the writer; returns their bytes.
    fn queue_out(&mut self) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(frame) = self.session.poll_transmit() {
            n += frame.len();
            self.frames.send(frame).map_err(|_| {
                DeviceError::Io(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the connection's writer stopped",
                ))
            })?;
        }
        Ok(n)
    }
}

fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// TCP connect, TLS handshake, protocol handshake ([`Conn::open`], each bounded by the I/O
/// timeout, which is also the device's `request_timeout_ms`); the negotiated parameter set
/// must be one this build implements.
pub(super) async fn open(t: &Target, epoch: Instant) -> Result<Opened, DeviceError> {
    let conn = Conn::open(ConnectParams {
        addr: t.addr,
        server_name: &t.server_name,
        tls: t.tls.clone(),
        model_id: &t.model_id,
        model_digest: t.model_digest,
        param_sets: &t.param_sets,
        io_timeout: t.io_timeout,
        epoch,
        request_timeout_ms: Some(u64::try_from(t.io_timeout.as_millis()).unwrap_or(u64::MAX)),
    })
    .await?;
    let (stream, session, params, negotiated) = conn.into_parts();
    let max = usize::from(negotiated).min(t.max_in_flight).max(1);
    Ok((stream, session, params, max))
}

/// The driver's state.
pub(super) struct Driver {
    pub target: Target,
    pub epoch: Instant,
    pub stats: Arc<Mutex<RemoteStats>>,
    pub open: Arc<AtomicBool>,
    /// The key registered on this session (sent again after a reconnect).
    registered: Option<([u8; 32], OutputMode, Vec<u8>)>,
    /// The first connection, opened before the driver's thread started.
    first: Option<Opened>,
    live: Option<Live>,
    queue: VecDeque<Job>,
}

impl Driver {
    /// A driver over an established connection.
    pub fn new(
        target: Target,
        epoch: Instant,
        conn: Opened,
        stats: Arc<Mutex<RemoteStats>>,
        open: Arc<AtomicBool>,
    ) -> Self {
        Driver {
            target,
            epoch,
            stats,
            open,
            registered: None,
            first: Some(conn),
            live: None,
            queue: VecDeque::new(),
        }
    }

    /// Runs until every job sender is dropped; then closes the session cleanly.
    pub async fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        self.live = self.first.take().map(Live::start);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.start_jobs();
            let Some(live) = self.live.as_mut() else {
                // No session: a waiting or the next job reconnects.
                if self.queue.is_empty() {
                    match jobs.recv().await {
                        Some(job) => self.queue.push_back(job),
                        None => return,
                    }
                }
                self.reconnect().await;
                continue;
            };
            let deadline = live
                .session
                .poll_timeout()
                .map(|ms| self.epoch + Duration::from_millis(ms));
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => self.queue.push_back(job),
                    None => {
                        live.session.close(ErrorCode::NoError);
                        let _ = live.queue_out();
                        self.end(&Fatal::Closed(ErrorCode::NoError)).await;
                        return;
                    }
                },
                r = live.reader.read(&mut buf) => match r {
                    Ok(0) => {
                        self.handle_events();
                        self.end(&Fatal::Io(
                            std::io::ErrorKind::UnexpectedEof,
                            "the cloud closed the connection".into(),
                        ))
                        .await;
                    }
                    Ok(n) => {
                        lock(&self.stats).bytes_down += n as u64;
                        let now = now_ms(self.epoch);
                        let _ = live
                            .session
                            .handle_input(buf.get(..n).unwrap_or_default(), now);
                        // Whatever the session queued in reply (e.g. its Close) goes out.
                        let _ = live.queue_out();
                        self.handle_events();
                    }
                    Err(e) => {
                        self.handle_events();
                        self.end(&Fatal::Io(e.kind(), e.to_string())).await;
                    }
                },
                r = &mut live.writer => {
                    let why = match r {
                        Ok(Err(e)) => Fatal::Io(e.kind(), e.to_string()),
                        _ => Fatal::Io(
                            std::io::ErrorKind::BrokenPipe,
                            "the connection's writer stopped".into(),
                        ),
                    };
                    // The writer already finished: nothing to wait for.
                    drop(self.end_now(&why));
                },
                () = sleep => {
                    live.session.handle_timeout(now_ms(self.epoch));
                    let _ = live.queue_out();
                    self.handle_events();
                }
            }
            if self.live.as_ref().is_some_and(|l| l.session.is_closed()) {
                self.end(&Fatal::Closed(ErrorCode::NoError)).await;
            }
        }
    }

    /// Sends queued jobs while the session has room for more requests in flight.
    fn start_jobs(&mut self) {
        loop {
            let Some(live) = self.live.as_mut() else {
                return;
            };
            if live.in_flight.len() >= live.max_in_flight {
                return;
            }
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let now = now_ms(self.epoch);
            let sent = match job {
                Job::Request {
                    layer_id,
                    batch,
                    payload,
                    reply,
                } => {
                    let id = match live.session.send_request(layer_id, batch, payload, now) {
                        Ok(id) => id,
                        Err(e) => {
                            let _ = reply.send(Err(DeviceError::Protocol(e)));
                            continue;
                        }
                    };
                    live.in_flight.insert(
                        id,
                        Waiting {
                            reply,
                            sent: Instant::now(),
                        },
                    );
                    let r = live.queue_out();
                    if let Ok(n) = r {
                        let mut s = lock(&self.stats);
                        s.bytes_up += n as u64;
                        s.max_in_flight = s.max_in_flight.max(live.in_flight.len() as u64);
                    }
                    r
                }
                Job::Key {
                    key_id,
                    mode,
                    blob,
                    reply,
                } => {
                    if let Err(e) = live.session.register_key(key_id, mode, blob.clone(), now) {
                        let _ = reply.send(Err(DeviceError::Protocol(e)));
                        continue;
                    }
                    let r = live.queue_out();
                    if let Ok(n) = r {
                        live.keys.push((key_id, reply, n));
                        lock(&self.stats).key_upload_bytes += n as u64;
                        self.registered = Some((key_id, mode, blob));
                    }
                    r
                }
            };
            if let Err(e) = sent {
                // The writer is gone: the session ends; the job just queued fails with it.
                self.end_now(&Fatal::of(&e));
            }
        }
    }

    /// Routes the session's events to the jobs waiting for them.
    fn handle_events(&mut self) {
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let mut fatal = None;
        while let Some(ev) = live.session.poll_event() {
            match ev {
                DeviceEvent::Response {
                    request_id,
                    payload,
                    cloud_eval_us,
                    ..
                } => {
                    if let Some(w) = live.in_flight.remove(&request_id) {
                        let mut s = lock(&self.stats);
                        s.round_trips += 1;
                        s.wait_s += w.sent.elapsed().as_secs_f64();
                        // Advisory (TDM-EVAL-2): counted, never trusted for anything else;
                        // absent (v1 peer) or 0 means not measured.
                        if let Some(us) = cloud_eval_us.filter(|&us| us > 0) {
                            s.cloud_eval_s += f64::from(us) * 1e-6;
                            s.cloud_eval_reports += 1;
                        }
                        drop(s);
                        let _ = w.reply.send(Ok(payload));
                    }
                }
                DeviceEvent::RequestFailed { request_id, code } => {
                    if let Some(w) = live.in_flight.remove(&request_id) {
                        let mut s = lock(&self.stats);
                        s.round_trips += 1;
                        s.wait_s += w.sent.elapsed().as_secs_f64();
                        drop(s);
                        let _ = w.reply.send(Err(DeviceError::Refused(code)));
                    }
                }
                DeviceEvent::KeyAccepted { key_id } => {
                    if let Some(i) = live.keys.iter().position(|(k, _, _)| *k == key_id) {
                        let (_, reply, sent) = live.keys.remove(i);
                        let _ = reply.send(Ok(sent));
                    }
                }
                DeviceEvent::Closed { code, by_peer } => {
                    // The device's own IdleTimeout with requests in flight: the cloud did not
                    // answer within request_timeout_ms (TDM-TIME-3).
                    fatal = Some(if !by_peer && code == ErrorCode::IdleTimeout {
                        Fatal::Timeout
                    } else {
                        Fatal::Closed(code)
                    });
                }
                DeviceEvent::Connected(_) => {}
            }
        }
        if let Some(f) = fatal {
            self.end_now(&f);
        }
    }

    /// Ends the session: every request and key registration in flight fails with `why`; the
    /// writer is left to send what it holds (e.g. a Close) and stop.
    fn end_now(&mut self, why: &Fatal) -> Option<tokio::task::JoinHandle<std::io::Result<()>>> {
        self.open.store(false, Ordering::Relaxed);
        let live = self.live.take()?;
        for (_, w) in live.in_flight {
            let _ = w.reply.send(Err(why.error()));
        }
        for (_, reply, _) in live.keys {
            let _ = reply.send(Err(why.error()));
        }
        drop(live.frames);
        Some(live.writer)
    }

    /// [`Driver::end_now`], then lets the writer finish (bounded by the I/O timeout).
    async fn end(&mut self, why: &Fatal) {
        if let Some(writer) = self.end_now(why) {
            let _ = tokio::time::timeout(self.target.io_timeout, writer).await;
        }
    }

    /// Opens a new session and queues the remembered key's registration first (requests
    /// naming it are answered after the cloud's decision, TDM-KEY-8; a refusal closes the
    /// session and fails them). If the connection fails, the queued jobs fail with its error.
    async fn reconnect(&mut self) {
        match open(&self.target, self.epoch).await {
            Ok(opened) => {
                self.live = Some(Live::start(opened));
                lock(&self.stats).reconnects += 1;
                self.open.store(true, Ordering::Relaxed);
                tracing::info!("session to the cloud re-established");
                if let Some((key_id, mode, blob)) = self.registered.clone() {
                    // Nobody waits for this acknowledgement: the receiver is dropped.
                    let (reply, _) = std_mpsc::channel();
                    self.queue.push_front(Job::Key {
                        key_id,
                        mode,
                        blob,
                        reply,
                    });
                }
            }
            Err(e) => {
                let fatal = Fatal::of(&e);
                for job in self.queue.drain(..) {
                    match job {
                        Job::Request { reply, .. } => {
                            let _ = reply.send(Err(fatal.error()));
                        }
                        Job::Key { reply, .. } => {
                            let _ = reply.send(Err(fatal.error()));
                        }
                    }
                }
            }
        }
    }
}
