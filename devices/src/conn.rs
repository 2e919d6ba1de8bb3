//! The connection driver: TCP + mutual TLS, the sans-IO [`DeviceSession`] pumped over it,
//! and the three exchanges the device needs (handshake, key upload, one request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_he::ParameterSet;
use tandem_protocol::{
    DeviceConfig, DeviceEvent, DeviceSession, ErrorCode, OutputMode, RequestPayload,
    ResponsePayload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{keys, DeviceError};

/// What one connection needs to know.
pub(crate) struct ConnectParams<'a> {
    pub addr: SocketAddr,
    pub server_name: &'a str,
    pub tls: Arc<tandem_tls::rustls::ClientConfig>,
    pub model_id: &'a str,
    pub model_digest: [u8; 32],
    pub param_sets: &'a [u16],
    pub io_timeout: Duration,
    pub epoch: Instant,
    /// The device's `request_timeout_ms` (TDM-TIME-3); `None` keeps the session's default.
    pub request_timeout_ms: Option<u64>,
}

/// One established session.
pub(crate) struct Conn {
    stream: TlsStream<TcpStream>,
    pub session: DeviceSession,
    /// The parameter set the handshake settled on (TDM: negotiated, never assumed).
    pub params: ParameterSet,
    io_timeout: Duration,
    epoch: Instant,
    /// `cloud_eval_us` of the last response [`Conn::round_trip_batch`] returned, when the cloud
    /// measured it (version 2, non-zero; TDM-MSG-14). Advisory (TDM-EVAL-2).
    pub last_eval_us: Option<u32>,
    /// The negotiated `max_in_flight` (the smaller of both sides' limits, TDM-REQ-8).
    pub max_in_flight: u16,
}

/// An established connection taken apart by [`Conn::into_parts`]: the TLS stream after the
/// handshake, the session, the negotiated parameter set and `max_in_flight`.
pub(crate) type ConnParts = (TlsStream<TcpStream>, DeviceSession, ParameterSet, u16);

fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    /// TCP connect, TLS handshake, protocol handshake; the negotiated parameter set must be
    /// one this build implements.
    pub async fn open(p: ConnectParams<'_>) -> Result<Conn, DeviceError> {
        let tcp = tokio::time::timeout(p.io_timeout, TcpStream::connect(p.addr))
            .await
            .map_err(|_| DeviceError::Timeout)??;
        tcp.set_nodelay(true)?;
        let name = tandem_tls::server_name(p.server_name)?;
        let stream = tokio::time::timeout(
            p.io_timeout,
            TlsConnector::from(p.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| DeviceError::Timeout)??;
        let est = tandem_tls::established(stream.get_ref().1)?;
        let mut config = DeviceConfig::new(p.model_id, p.model_digest);
        config.param_sets = p.param_sets.to_vec();
        if let Some(ms) = p.request_timeout_ms {
            config.request_timeout_ms = ms;
        }
        let session = DeviceSession::new(config, est.channel_binding, now_ms(p.epoch))?;
        let mut conn = Conn {
            stream,
            session,
            params: tandem_he::DEFAULT_PARAMETERS,
            io_timeout: p.io_timeout,
            epoch: p.epoch,
            last_eval_us: None,
            max_in_flight: 1,
        };
        conn.flush().await?;
        loop {
            conn.read_some().await?;
            while let Some(ev) = conn.session.poll_event() {
                match ev {
                    DeviceEvent::Connected(neg) => {
                        conn.max_in_flight = neg.limits.max_in_flight;
                        match keys::parameter_set(neg.param_set) {
                            Ok(params) => conn.params = params,
                            Err(e) => {
                                conn.session.close(ErrorCode::UnsupportedParameters);
                                let _ = conn.flush().await;
                                return Err(e);
                            }
                        }
                        return Ok(conn);
                    }
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            conn.flush().await?;
        }
    }

    /// Hands over the stream, session, parameter set and negotiated `max_in_flight`, for a
    /// driver that pumps the session itself (the pipelined [`crate::RemoteLayers`]).
    pub fn into_parts(self) -> ConnParts {
        (self.stream, self.session, self.params, self.max_in_flight)
    }

    /// Whether the session is still usable.
    pub fn is_open(&self) -> bool {
        !self.session.is_closed()
    }

    /// Writes every queued frame; returns the bytes written.
    pub async fn flush(&mut self) -> Result<usize, DeviceError> {
        let mut n = 0;
        while let Some(frame) = self.session.poll_transmit() {
            self.stream.write_all(&frame).await?;
            n += frame.len();
        }
        if n > 0 {
            self.stream.flush().await?;
        }
        Ok(n)
    }

    async fn read_some(&mut self) -> Result<usize, DeviceError> {
        let mut buf = [0u8; 16 * 1024];
        let n = tokio::time::timeout(self.io_timeout, self.stream.read(&mut buf))
            .await
            .map_err(|_| DeviceError::Timeout)??;
        if n == 0 {
            return Err(DeviceError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        // A fatal input error closes the session; the Closed event reports it.
        let _ = self.session.handle_input(&buf[..n], now_ms(self.epoch));
        Ok(n)
    }

    /// Uploads an evaluation key and waits for its acknowledgement; returns the bytes sent.
    pub async fn upload_key(
        &mut self,
        key_id: [u8; 32],
        mode: OutputMode,
        blob: Vec<u8>,
    ) -> Result<usize, DeviceError> {
        self.session
            .register_key(key_id, mode, blob, now_ms(self.epoch))?;
        let sent = self.flush().await?;
        loop {
            self.read_some().await?;
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    DeviceEvent::KeyAccepted { key_id: k } if k == key_id => return Ok(sent),
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            self.flush().await?;
        }
    }

    /// Sends one request and waits for its answer: (payload, bytes up, bytes down).
    pub async fn round_trip(
        &mut self,
        layer_id: u32,
        payload: RequestPayload,
    ) -> Result<(ResponsePayload, usize, usize), DeviceError> {
        self.round_trip_batch(layer_id, 1, payload).await
    }

    /// [`Conn::round_trip`] for a request carrying `batch` rows (issue 8: one request per
    /// batch of tokens of an encoder layer). Bytes are protocol frame bytes (TLS plaintext).
    pub async fn round_trip_batch(
        &mut self,
        layer_id: u32,
        batch: u16,
        payload: RequestPayload,
    ) -> Result<(ResponsePayload, usize, usize), DeviceError> {
        let id = self
            .session
            .send_request(layer_id, batch, payload, now_ms(self.epoch))?;
        self.last_eval_us = None;
        let up = self.flush().await?;
        let mut down = 0;
        loop {
            down += self.read_some().await?;
            while let Some(ev) = self.session.poll_event() {
                match ev {
                    DeviceEvent::Response {
                        request_id,
                        payload,
                        cloud_eval_us,
                        ..
                    } if request_id == id => {
                        // TDM-MSG-14: 0 (and a version-1 session) means "not measured".
                        self.last_eval_us = cloud_eval_us.filter(|&us| us > 0);
                        return Ok((payload, up, down));
                    }
                    DeviceEvent::RequestFailed { request_id, code } if request_id == id => {
                        return Err(DeviceError::Refused(code))
                    }
                    DeviceEvent::Closed { code, .. } => return Err(DeviceError::Closed(code)),
                    _ => {}
                }
            }
            self.flush().await?;
        }
    }

    /// Closes the session cleanly (best effort).
    pub async fn close(mut self) {
        self.session.close(ErrorCode::NoError);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
