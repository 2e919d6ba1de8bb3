//! In-memory pair harness: a DeviceSession and a CloudSession wired through
//! two lossy links with fault knobs, driven with a step bound so a livelock
//! fails the test (quinn-proto style).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;

use tandem_protocol::*;

/// Fault knobs for one direction. Frame indices count frames handed to the link.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Drop the n-th frame.
    pub drop: Option<usize>,
    /// Truncate the n-th frame to k bytes.
    pub truncate: Option<(usize, usize)>,
    /// Deliver the n-th frame twice.
    pub duplicate: Option<usize>,
    /// Swap the n-th frame with the next one.
    pub reorder: Option<usize>,
    /// Split every frame into two writes at this offset (if inside the frame).
    pub split_at: Option<usize>,
    /// Deliver every frame in chunks of this many bytes.
    pub chunk: Option<usize>,
    /// Extra delivery delay in ms for every frame.
    pub delay_ms: u64,
    /// Extra delay in ms for the n-th frame only.
    pub delay_one: Option<(usize, u64)>,
}

#[derive(Debug, Default)]
pub struct Link {
    pub queue: VecDeque<(u64, Vec<u8>)>,
    pub faults: Faults,
    pub frames: usize,
    pub held: Option<Vec<u8>>,
    pub bytes: usize,
}

impl Link {
    fn send(&mut self, frame: Vec<u8>, now: u64, latency: u64) {
        let n = self.frames;
        self.frames += 1;
        if self.faults.drop == Some(n) {
            return;
        }
        let mut frame = frame;
        if let Some((i, k)) = self.faults.truncate {
            if i == n {
                frame.truncate(k);
            }
        }
        if self.faults.reorder == Some(n) {
            self.held = Some(frame);
            return;
        }
        let mut delay = latency + self.faults.delay_ms;
        if let Some((i, d)) = self.faults.delay_one {
            if i == n {
                delay += d;
            }
        }
        let copies = if self.faults.duplicate == Some(n) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            self.enqueue(frame.clone(), now + delay);
        }
        if let Some(h) = self.held.take() {
            self.enqueue(h, now + delay);
        }
    }

    fn enqueue(&mut self, frame: Vec<u8>, at: u64) {
        self.bytes += frame.len();
        // Keep per-link FIFO order even when delays differ.
        let at = self.queue.back().map_or(at, |(t, _)| at.max(*t));
        let mut pieces = vec![frame];
        if let Some(k) = self.faults.split_at {
            let f = pieces.pop().unwrap();
            if k > 0 && k < f.len() {
                pieces.push(f[..k].to_vec());
                pieces.push(f[k..].to_vec());
            } else {
                pieces.push(f);
            }
        }
        if let Some(c) = self.faults.chunk {
            pieces = pieces
                .into_iter()
                .flat_map(|p| p.chunks(c.max(1)).map(<[u8]>::to_vec).collect::<Vec<_>>())
                .collect();
        }
        for p in pieces {
            self.queue.push_back((at, p));
        }
    }

    fn release_held(&mut self, now: u64) {
        if let Some(h) = self.held.take() {
            self.enqueue(h, now);
        }
    }
}

/// How the simulated cloud application answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudApp {
    /// Echo ciphertexts / sum noised rows, immediately.
    Echo,
    /// Never answer.
    Silent,
    /// Fail every request with `InvalidRequest`.
    Reject,
}

pub struct Pair {
    pub device: DeviceSession,
    pub cloud: CloudSession,
    pub now: u64,
    pub latency: u64,
    pub d2c: Link,
    pub c2d: Link,
    pub device_events: Vec<DeviceEvent>,
    pub cloud_events: Vec<CloudEvent>,
    pub device_errors: Vec<Error>,
    pub cloud_errors: Vec<Error>,
    pub app: CloudApp,
    /// How the cloud application answers key registrations (TDM-KEY-8): `None` accepts
    /// each one as soon as it is reported, `Some(code)` refuses it with `code`.
    pub refuse_keys: Option<ErrorCode>,
    pub steps: usize,
    pub device_closed_events: usize,
    pub cloud_closed_events: usize,
}

pub fn device_cfg() -> DeviceConfig {
    samples::device_config()
}
pub fn cloud_cfg() -> CloudConfig {
    samples::cloud_config()
}

impl Pair {
    pub fn new() -> Self {
        Self::with(
            device_cfg(),
            cloud_cfg(),
            samples::CHANNEL_BINDING,
            samples::CHANNEL_BINDING,
        )
    }

    pub fn with(d: DeviceConfig, c: CloudConfig, cb_d: [u8; 32], cb_c: [u8; 32]) -> Self {
        Pair {
            device: DeviceSession::new(d, cb_d, 0).unwrap(),
            cloud: CloudSession::new(c, samples::PEER_IDENTITY, cb_c, 0).unwrap(),
            now: 0,
            latency: 5,
            d2c: Link::default(),
            c2d: Link::default(),
            device_events: vec![],
            cloud_events: vec![],
            device_errors: vec![],
            cloud_errors: vec![],
            app: CloudApp::Echo,
            refuse_keys: None,
            steps: 0,
            device_closed_events: 0,
            cloud_closed_events: 0,
        }
    }

    /// Moves outputs into links and runs the cloud application until quiet.
    fn flush(&mut self) {
        loop {
            let mut progress = false;
            while let Some(f) = self.device.poll_transmit() {
                self.d2c.send(f, self.now, self.latency);
                progress = true;
            }
            while let Some(e) = self.device.poll_event() {
                if matches!(e, DeviceEvent::Closed { .. }) {
                    self.device_closed_events += 1;
                }
                self.device_events.push(e);
                progress = true;
            }
            while let Some(e) = self.cloud.poll_event() {
                if let CloudEvent::Request { request, .. } = &e {
                    self.answer(request.clone());
                }
                if let CloudEvent::KeyRegistered { key_id, .. } = &e {
                    let r = match self.refuse_keys {
                        None => self.cloud.accept_key(*key_id, self.now),
                        Some(code) => self.cloud.refuse_key(*key_id, code),
                    };
                    if let Err(e) = r {
                        assert!(self.cloud.is_closed(), "cloud key answer failed: {e}");
                    }
                }
                if matches!(e, CloudEvent::Closed { .. }) {
                    self.cloud_closed_events += 1;
                }
                self.cloud_events.push(e);
                progress = true;
            }
            while let Some(f) = self.cloud.poll_transmit() {
                self.c2d.send(f, self.now, self.latency);
                progress = true;
            }
            if !progress {
                return;
            }
        }
    }

    fn answer(&mut self, r: InferRequest) {
        let res = match self.app {
            CloudApp::Silent => return,
            CloudApp::Reject => {
                self.cloud
                    .send_request_error(r.request_id, ErrorCode::InvalidRequest, self.now)
            }
            CloudApp::Echo => {
                let payload = match r.payload {
                    RequestPayload::Encrypted(e)
                    | RequestPayload::NoisedEncrypted { enc: e, .. } => {
                        ResponsePayload::Encrypted(e)
                    }
                    RequestPayload::Noised(n) => {
                        let w = n.values.len() / usize::from(r.batch);
                        ResponsePayload::Plain(
                            n.values
                                .chunks(w)
                                .map(|row| row.iter().map(|v| i64::from(*v)).sum())
                                .collect(),
                        )
                    }
                };
                self.cloud.send_response(r.request_id, payload, self.now)
            }
        };
        // The session may already be closed (e.g. a later frame in the same
        // input closed it); then the answer is refused, which is fine.
        if let Err(e) = res {
            assert!(self.cloud.is_closed(), "cloud app answer failed: {e}");
        }
    }

    fn pending(&self) -> bool {
        !self.d2c.queue.is_empty() || !self.c2d.queue.is_empty()
    }

    /// Delivers queued data until both links are empty. Fails after
    /// `max_steps` deliveries (livelock).
    pub fn drive(&mut self, max_steps: usize) {
        self.flush();
        loop {
            if !self.pending() {
                self.d2c.release_held(self.now);
                self.c2d.release_held(self.now);
                if !self.pending() {
                    return;
                }
            }
            self.steps += 1;
            assert!(
                self.steps <= max_steps,
                "livelock: more than {max_steps} steps"
            );
            let next = [self.d2c.queue.front(), self.c2d.queue.front()]
                .into_iter()
                .flatten()
                .map(|(t, _)| *t)
                .min()
                .unwrap();
            self.now = self.now.max(next);
            while self.d2c.queue.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, bytes) = self.d2c.queue.pop_front().unwrap();
                if let Err(e) = self.cloud.handle_input(&bytes, self.now) {
                    self.cloud_errors.push(e);
                }
                self.flush();
            }
            while self.c2d.queue.front().is_some_and(|(t, _)| *t <= self.now) {
                let (_, bytes) = self.c2d.queue.pop_front().unwrap();
                if let Err(e) = self.device.handle_input(&bytes, self.now) {
                    self.device_errors.push(e);
                }
                self.flush();
            }
        }
    }

    /// Advances time by `ms`, fires timers, then drives.
    pub fn advance(&mut self, ms: u64, max_steps: usize) {
        self.now += ms;
        self.device.handle_timeout(self.now);
        self.cloud.handle_timeout(self.now);
        self.drive(max_steps);
    }

    /// Runs until both sessions are closed, jumping to the next timer each
    /// time the links are quiet.
    pub fn run_to_close(&mut self, max_steps: usize) {
        self.drive(max_steps);
        let mut rounds = 0;
        while !(self.device.is_closed() && self.cloud.is_closed()) {
            rounds += 1;
            assert!(rounds < 50, "sessions never closed");
            let t = [self.device.poll_timeout(), self.cloud.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            let Some(t) = t else { break };
            self.now = self.now.max(t);
            self.device.handle_timeout(self.now);
            self.cloud.handle_timeout(self.now);
            self.drive(max_steps);
        }
    }

    pub fn connect(&mut self) {
        self.drive(100);
        assert_eq!(self.device.state(), SessionState::Ready);
        assert_eq!(self.cloud.state(), SessionState::Ready);
    }

    pub fn responses(&self) -> Vec<(u64, ResponsePayload)> {
        self.device_events
            .iter()
            .filter_map(|e| match e {
                DeviceEvent::Response {
                    request_id,
                    payload,
                    ..
                } => Some((*request_id, payload.clone())),
                _ => None,
            })
            .collect()
    }

    /// Invariants that hold in every scenario.
    pub fn check_invariants(&self) {
        // At most one Closed event per side, and it is the last event.
        assert!(self.device_closed_events <= 1);
        assert!(self.cloud_closed_events <= 1);
        if self.device_closed_events == 1 {
            assert!(matches!(
                self.device_events.last(),
                Some(DeviceEvent::Closed { .. })
            ));
        }
        if self.cloud_closed_events == 1 {
            assert!(matches!(
                self.cloud_events.last(),
                Some(CloudEvent::Closed { .. })
            ));
        }
        // Every request is answered at most once.
        let mut ids: Vec<u64> = self
            .device_events
            .iter()
            .filter_map(|e| match e {
                DeviceEvent::Response { request_id, .. }
                | DeviceEvent::RequestFailed { request_id, .. } => Some(*request_id),
                _ => None,
            })
            .collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "a request was answered twice");
        // Closed sessions report no in-flight work and emit nothing more.
        if self.device.is_closed() {
            assert_eq!(self.device.in_flight(), 0);
            assert_eq!(self.device.poll_timeout(), None);
        }
        if self.cloud.is_closed() {
            assert_eq!(self.cloud.in_flight(), 0);
            assert_eq!(self.cloud.poll_timeout(), None);
        }
        // Buffers stay within the frame limit.
        assert!(
            self.device.buffered() <= FRAME_HEADER_LEN + samples::limits().max_frame_len as usize
        );
        assert!(
            self.cloud.buffered() <= FRAME_HEADER_LEN + samples::limits().max_frame_len as usize
        );
    }
}

pub fn enc_payload(mode: OutputMode) -> RequestPayload {
    RequestPayload::Encrypted(samples::encrypted(2, mode))
}

pub fn noised_payload() -> RequestPayload {
    RequestPayload::Noised(NoisedBlock {
        dp: samples::dp_gaussian(),
        values: vec![1, 2, 3, 4, 5, 6],
    })
}
