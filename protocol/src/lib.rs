//! Sans-IO implementation of the Tandem protocol, versions 2 and 1 (`specs/protocol.md`).
//!
//! This crate does no I/O and reads no clock. Bytes received from the TLS
//! stream go in through `handle_input`, timer expiry through
//! `handle_timeout`; bytes to send come out of `poll_transmit`, application
//! events out of `poll_event`, and the next deadline out of `poll_timeout`.
//! Time is always a caller-supplied millisecond timestamp (`now_ms`) from any
//! monotonic clock.
//!
//! Ciphertexts and key blobs are opaque byte strings here; their inner
//! format is defined in `specs/he-formats.md` by the HE engine.
//!
//! Layers:
//! - [`codec`]: bounded reader / writer and the frame header (TDM-FRAME-*).
//! - [`message`]: every message type with `encode` / `decode` (TDM-MSG-*).
//! - [`session`]: [`DeviceSession`] and [`CloudSession`] state machines.
//! - [`samples`]: canonical example messages used by tests, vectors and fuzz seeds.
//!
//! Requirement IDs such as `TDM-FRAME-3` refer to `specs/protocol.md`.
#![forbid(unsafe_code)]

pub mod codec;
pub mod error;
pub mod limits;
pub mod message;
pub mod samples;
pub mod session;

pub use codec::{decode_frame, decode_frame_version, FrameHeader, FRAME_HEADER_LEN, FRAME_VERSION};
pub use error::{Error, ErrorCode};
pub use limits::Limits;
pub use message::{
    BudgetCharge, ClientHello, Close, DpMetadata, EncryptedBlock, InferRequest, InferResponse,
    KeyAck, KeyId, KeyRegister, Mechanism, Message, MessageType, NoisedBlock, OutputMode,
    ProtectionMode, RequestError, RequestPayload, ResponsePayload, Scale, ServerHello,
};
pub use session::{
    key_id_of, CloudConfig, CloudEvent, CloudSession, DeviceConfig, DeviceEvent, DeviceSession,
    ModelEntry, Negotiated, PeerIdentity, SessionState,
};

/// The highest protocol version this crate implements (TDM-VER-1, TDM-VER-3). Version 2 adds
/// the cloud's evaluation time to InferResponse (TDM-MSG-14); nothing else differs from 1.
pub const PROTOCOL_VERSION: u16 = 2;

/// Every protocol version this crate implements, highest first: what [`DeviceConfig::new`] offers
/// and [`CloudConfig::new`] accepts by default (TDM-VER-3). A version-1 peer gets the version-1
/// layout, without `cloud_eval_us`.
pub const SUPPORTED_VERSIONS: [u16; 2] = [2, 1];

/// ALPN protocol identifier the TLS layer MUST negotiate (TDM-ALPN-1).
pub const ALPN: &[u8] = b"tandem/1";
