//! `tandem-conformance remote`: protocol scenarios against a live cloud over mTLS.
//!
//! Each scenario opens a fresh mutually authenticated TLS 1.3 connection (the device
//! certificate from a `tandem pki init` directory), drives a real [`DeviceSession`] or writes
//! deliberately broken frames, and checks the cloud's answer against `protocol.md`. The
//! channel binding is the connection's own exporter value, so these scenarios cannot be fixed
//! transcripts: the frames are built per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_protocol::{
    samples, DeviceConfig, DeviceEvent, DeviceSession, ErrorCode, Message, NoisedBlock,
    RequestPayload, ResponsePayload,
};
use tandem_tls::rustls::{ClientConnection, StreamOwned};

/// Where and as whom to connect, and which model to ask for.
pub struct Target {
    /// Cloud address.
    pub server: SocketAddr,
    /// Name the cloud certificate must carry.
    pub server_name: String,
    /// `tandem pki init` directory.
    pub pki: std::path::PathBuf,
    /// Device certificate name inside it.
    pub device: String,
    /// Model id the cloud serves.
    pub model_id: String,
    /// That model's digest.
    pub model_digest: [u8; 32],
    /// A cloud layer the model serves: its layer id (manifest index) and input width
    /// (`--layer ID --width N`); the multi-layer request scenarios are skipped without it.
    pub layer: Option<(u32, usize)>,
}

/// Outcome counts.
#[derive(Default)]
pub struct Tally {
    /// Scenarios that behaved as the spec requires.
    pub passed: usize,
    /// Scenarios that did not.
    pub failed: usize,
    /// Scenarios not run (with a printed reason).
    pub skipped: usize,
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(t: &Target) -> Result<(Tls, [u8; 32]), String> {
    let files =
        tandem_tls::ClientFiles::from_pki_dir(&t.pki, &t.device).map_err(|e| e.to_string())?;
    let config = tandem_tls::client_config_from_files(&files).map_err(|e| e.to_string())?;
    let name = tandem_tls::server_name(&t.server_name).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::clone(&config), name).map_err(|e| e.to_string())?;
    let sock =
        TcpStream::connect_timeout(&t.server, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let est = tandem_tls::established(&tls.conn).map_err(|e| e.to_string())?;
    Ok((tls, est.channel_binding))
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Writes `frames`, then feeds whatever the cloud sends into `session` until it reports
/// connected or closed, or the cloud hangs up / goes quiet.
fn exchange(
    tls: &mut Tls,
    session: &mut DeviceSession,
    frames: &[Vec<u8>],
    start: Instant,
) -> Vec<DeviceEvent> {
    let mut events = Vec::new();
    for f in frames {
        if tls.write_all(f).and_then(|_| tls.flush()).is_err() {
            break;
        }
    }
    let mut buf = [0u8; 16 * 1024];
    for _ in 0..64 {
        let n = match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = session.handle_input(&buf[..n], now_ms(start));
        while let Some(out) = session.poll_transmit() {
            let _ = tls.write_all(&out);
        }
        while let Some(e) = session.poll_event() {
            events.push(e);
        }
        if events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Connected(_) | DeviceEvent::Closed { .. }))
        {
            break;
        }
    }
    events
}

fn closed_by_peer_with(events: &[DeviceEvent], codes: &[ErrorCode]) -> Result<(), String> {
    match events
        .iter()
        .find(|e| matches!(e, DeviceEvent::Closed { .. }))
    {
        Some(DeviceEvent::Closed {
            code,
            by_peer: true,
        }) if codes.contains(code) => Ok(()),
        Some(DeviceEvent::Closed { code, by_peer }) => {
            Err(format!("closed with {code:?} (by peer: {by_peer})"))
        }
        _ => Err(format!("no Close from the cloud; events: {events:?}")),
    }
}

/// A scenario: builds its own session and frames on a fresh connection.
type Scenario = fn(&Target) -> Result<(), String>;

fn hello(
    t: &Target,
    config: DeviceConfig,
    binding: Option<[u8; 32]>,
    tamper: impl Fn(&mut Vec<u8>),
) -> Result<Vec<DeviceEvent>, String> {
    let (mut tls, real_binding) = connect(t)?;
    let start = Instant::now();
    let mut s = DeviceSession::new(config, binding.unwrap_or(real_binding), 0)
        .map_err(|e| e.to_string())?;
    let mut frames = Vec::new();
    while let Some(mut f) = s.poll_transmit() {
        tamper(&mut f);
        frames.push(f);
    }
    Ok(exchange(&mut tls, &mut s, &frames, start))
}

// TDM-NEG: a well-formed ClientHello with the connection's binding is answered by ServerHello.
fn handshake_completes(t: &Target) -> Result<(), String> {
    let ev = hello(
        t,
        DeviceConfig::new(t.model_id.clone(), t.model_digest),
        None,
        |_| {},
    )?;
    if ev.iter().any(|e| matches!(e, DeviceEvent::Connected(_))) {
        Ok(())
    } else {
        Err(format!("not connected: {ev:?}"))
    }
}

// TDM-BIND: a ClientHello carrying another connection's binding is refused.
fn wrong_channel_binding_is_refused(t: &Target) -> Result<(), String> {
    let ev = hello(
        t,
        DeviceConfig::new(t.model_id.clone(), t.model_digest),
        Some([0x5a; 32]),
        |_| {},
    )?;
    closed_by_peer_with(&ev, &[ErrorCode::ChannelBindingMismatch])
}

// TDM-MOD: a model digest the cloud does not serve is refused.
fn unknown_model_digest_is_refused(t: &Target) -> Result<(), String> {
    let mut digest = t.model_digest;
    digest[0] ^= 1;
    let ev = hello(
        t,
        DeviceConfig::new(t.model_id.clone(), digest),
        None,
        |_| {},
    )?;
    closed_by_peer_with(&ev, &[ErrorCode::UnknownModel])
}

// TDM-VER: no common protocol version.
fn unsupported_version_is_refused(t: &Target) -> Result<(), String> {
    let mut c = DeviceConfig::new(t.model_id.clone(), t.model_digest);
    c.versions = vec![0x7777];
    let ev = hello(t, c, None, |_| {})?;
    closed_by_peer_with(&ev, &[ErrorCode::UnsupportedVersion])
}

// TDM-FRAME: an unknown message type closes the session.
fn unknown_message_type_is_refused(t: &Target) -> Result<(), String> {
    let ev = hello(
        t,
        DeviceConfig::new(t.model_id.clone(), t.model_digest),
        None,
        |f| {
            if f.len() > 1 {
                f[1] = 0xee;
            }
        },
    )?;
    closed_by_peer_with(
        &ev,
        &[ErrorCode::MalformedMessage, ErrorCode::ProtocolViolation],
    )
}

// TDM-FRAME / TDM-LIM: a length above the limit is refused before the body arrives.
fn oversized_length_is_refused_early(t: &Target) -> Result<(), String> {
    let ev = hello(
        t,
        DeviceConfig::new(t.model_id.clone(), t.model_digest),
        None,
        |f| {
            if f.len() >= 6 {
                f.truncate(6);
                f[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
            }
        },
    )?;
    closed_by_peer_with(
        &ev,
        &[ErrorCode::LimitExceeded, ErrorCode::MalformedMessage],
    )
}

/// A session that completed its handshake on a fresh connection, offering `versions`.
struct Live {
    tls: Tls,
    s: DeviceSession,
    start: Instant,
}

fn live(t: &Target, versions: &[u16]) -> Result<Live, String> {
    let (mut tls, binding) = connect(t)?;
    let start = Instant::now();
    let mut c = DeviceConfig::new(t.model_id.clone(), t.model_digest);
    c.versions = versions.to_vec();
    let mut s = DeviceSession::new(c, binding, 0).map_err(|e| e.to_string())?;
    let mut frames = Vec::new();
    while let Some(f) = s.poll_transmit() {
        frames.push(f);
    }
    let ev = exchange(&mut tls, &mut s, &frames, start);
    if ev.iter().any(|e| matches!(e, DeviceEvent::Connected(_))) {
        Ok(Live { tls, s, start })
    } else {
        Err(format!("not connected: {ev:?}"))
    }
}

impl Live {
    /// Sends one noised request and returns the event that answers it (response, request
    /// failure or close).
    fn request(&mut self, layer: u32, batch: u16, values: Vec<i32>) -> Result<DeviceEvent, String> {
        let payload = RequestPayload::Noised(NoisedBlock {
            dp: samples::dp_gaussian(),
            values,
        });
        let id = self
            .s
            .send_request(layer, batch, payload, now_ms(self.start))
            .map_err(|e| format!("send: {e}"))?;
        self.answer(id)
    }

    fn answer(&mut self, id: u64) -> Result<DeviceEvent, String> {
        while let Some(f) = self.s.poll_transmit() {
            self.tls.write_all(&f).map_err(|e| e.to_string())?;
        }
        self.tls.flush().map_err(|e| e.to_string())?;
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..256 {
            let n = match self.tls.read(&mut buf) {
                Ok(0) => return Err("the cloud hung up".into()),
                Ok(n) => n,
                Err(e) => return Err(format!("read: {e}")),
            };
            let _ = self.s.handle_input(&buf[..n], now_ms(self.start));
            while let Some(e) = self.s.poll_event() {
                match &e {
                    DeviceEvent::Response { request_id, .. }
                    | DeviceEvent::RequestFailed { request_id, .. }
                        if *request_id == id =>
                    {
                        return Ok(e)
                    }
                    DeviceEvent::Closed { .. } => return Ok(e),
                    _ => {}
                }
            }
        }
        Err("no answer".into())
    }
}

fn layer_of(t: &Target) -> Result<(u32, usize), String> {
    t.layer
        .ok_or_else(|| "SKIP: no --layer/--width for a served cloud layer".to_string())
}

fn expect_plain(ev: &DeviceEvent, rows: usize) -> Result<Option<u32>, String> {
    match ev {
        DeviceEvent::Response {
            payload: ResponsePayload::Plain(v),
            cloud_eval_us,
            ..
        } if !v.is_empty() && v.len() % rows == 0 => Ok(*cloud_eval_us),
        other => Err(format!(
            "expected plain results for {rows} rows, got {other:?}"
        )),
    }
}

fn expect_refused(ev: &DeviceEvent, code: ErrorCode) -> Result<(), String> {
    match ev {
        DeviceEvent::RequestFailed { code: c, .. } if *c == code => Ok(()),
        other => Err(format!("expected RequestError {code:?}, got {other:?}")),
    }
}

// TDM-REQ-8, TDM-REQ-9, TDM-MSG-14, TDM-EVAL-1: a batched request (3 rows) for a cloud layer
// (layer id k, not necessarily 0) is answered with 3 rows of results, and a version-2 cloud
// reports a measured (non-zero) evaluation time.
fn batched_request_reports_eval_time(t: &Target) -> Result<(), String> {
    let (layer, width) = layer_of(t)?;
    let mut l = live(t, &tandem_protocol::SUPPORTED_VERSIONS)?;
    let version = l.s.negotiated().map(|n| n.version);
    if version != Some(2) {
        return Err(format!("negotiated {version:?}, want 2"));
    }
    let values = (0..3 * width).map(|i| (i % 7) as i32 - 3).collect();
    let ev = l.request(layer, 3, values)?;
    match expect_plain(&ev, 3)? {
        Some(us) if us >= 1 => Ok(()),
        other => Err(format!(
            "cloud_eval_us {other:?}, want a measured time (>= 1)"
        )),
    }
}

// TDM-REQ-8, TDM-REQ-6: a layer id the model does not serve (a device layer id, an index past
// the last layer) and a value count other than batch x the layer's width are refused one by
// one with RequestError InvalidRequest; the session stays usable for a valid request.
fn unserved_layer_refused_session_continues(t: &Target) -> Result<(), String> {
    let (layer, width) = layer_of(t)?;
    let mut l = live(t, &tandem_protocol::SUPPORTED_VERSIONS)?;
    for bad in [layer.wrapping_add(1000), u32::MAX] {
        expect_refused(
            &l.request(bad, 1, vec![1; width])?,
            ErrorCode::InvalidRequest,
        )?;
    }
    expect_refused(
        &l.request(layer, 2, vec![1; 2 * width + 2])?,
        ErrorCode::InvalidRequest,
    )?;
    expect_plain(&l.request(layer, 1, vec![1; width])?, 1).map(|_| ())
}

// TDM-VER-3: a device that offers only version 1 gets version-1 responses (no cloud_eval_us).
fn v1_device_gets_v1_layout(t: &Target) -> Result<(), String> {
    let (layer, width) = layer_of(t)?;
    let mut l = live(t, &[1])?;
    let version = l.s.negotiated().map(|n| n.version);
    if version != Some(1) {
        return Err(format!("negotiated {version:?}, want 1"));
    }
    match expect_plain(&l.request(layer, 1, vec![2; width])?, 1)? {
        None => Ok(()),
        Some(us) => Err(format!("version-1 response carried cloud_eval_us {us}")),
    }
}

// TDM-FRAME-7: a complete InferRequest frame whose body is cut inside its values closes the
// session with MalformedMessage.
fn truncated_request_closes(t: &Target) -> Result<(), String> {
    let mut l = live(t, &tandem_protocol::SUPPORTED_VERSIONS)?;
    let req = Message::InferRequest(tandem_protocol::InferRequest {
        request_id: 1,
        layer_id: 1,
        batch: 2,
        payload: RequestPayload::Noised(NoisedBlock {
            dp: samples::dp_gaussian(),
            values: vec![5; 8],
        }),
    })
    .encode()
    .map_err(|e| e.to_string())?;
    let keep = req.len() - 6;
    let mut cut = req[..keep].to_vec();
    let body = u32::try_from(keep - 6).map_err(|e| e.to_string())?;
    cut[2..6].copy_from_slice(&body.to_be_bytes());
    l.tls.write_all(&cut).map_err(|e| e.to_string())?;
    l.tls.flush().map_err(|e| e.to_string())?;
    let mut s = l.s;
    let ev = exchange(&mut l.tls, &mut s, &[], l.start);
    closed_by_peer_with(&ev, &[ErrorCode::MalformedMessage])
}

/// Runs every scenario against the target, printing one line each.
pub fn run(t: &Target) -> Tally {
    let scenarios: [(&str, Scenario); 10] = [
        ("handshake_completes", handshake_completes),
        (
            "wrong_channel_binding_is_refused",
            wrong_channel_binding_is_refused,
        ),
        (
            "unknown_model_digest_is_refused",
            unknown_model_digest_is_refused,
        ),
        (
            "unsupported_version_is_refused",
            unsupported_version_is_refused,
        ),
        (
            "unknown_message_type_is_refused",
            unknown_message_type_is_refused,
        ),
        (
            "oversized_length_is_refused_early",
            oversized_length_is_refused_early,
        ),
        (
            "batched_request_reports_eval_time",
            batched_request_reports_eval_time,
        ),
        (
            "unserved_layer_refused_session_continues",
            unserved_layer_refused_session_continues,
        ),
        ("v1_device_gets_v1_layout", v1_device_gets_v1_layout),
        ("truncated_request_closes", truncated_request_closes),
    ];
    let mut tally = Tally::default();
    if !t.pki.join(tandem_tls::pki::layout::CLOUD_CA_CERT).exists() {
        println!("SKIPPED all: no PKI at {}", t.pki.display());
        tally.skipped = scenarios.len();
        return tally;
    }
    for (name, f) in scenarios {
        match f(t) {
            Ok(()) => {
                println!("PASSED remote/{name}");
                tally.passed += 1;
            }
            Err(e) if e.starts_with("SKIP: ") => {
                println!("SKIPPED remote/{name}: {}", &e[6..]);
                tally.skipped += 1;
            }
            Err(e) => {
                println!("FAILED remote/{name}: {e}");
                tally.failed += 1;
            }
        }
    }
    tally
}

/// Parses a 64-hex-digit digest.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    crate::hexutil::decode(s)?.try_into().ok()
}
