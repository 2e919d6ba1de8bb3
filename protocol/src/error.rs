//! The crate's single error type and the coarse wire error codes.

use core::fmt;

/// Coarse error code carried to the peer in `Close` and `RequestError`
/// messages (TDM-ERR-1). Values are fixed on the wire; unknown values are
/// rejected by the decoder (TDM-ERR-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Normal close, no error.
    NoError = 0,
    /// The peer sent a message that is not allowed in the current state or
    /// violated a protocol rule.
    ProtocolViolation = 1,
    /// A frame or message could not be decoded (truncated, trailing bytes,
    /// bad field value, unknown type).
    MalformedMessage = 2,
    /// No protocol version in common.
    UnsupportedVersion = 3,
    /// The requested model id / digest is not served.
    UnknownModel = 4,
    /// No parameter set in common, or a message used a different one.
    UnsupportedParameters = 5,
    /// A negotiated limit was exceeded.
    LimitExceeded = 6,
    /// The channel binding did not match this TLS connection.
    ChannelBindingMismatch = 7,
    /// A ciphertext refers to a key id not registered for this peer.
    UnknownKey = 8,
    /// The session was idle for longer than the negotiated timeout.
    IdleTimeout = 9,
    /// The sender hit an internal failure.
    InternalError = 10,
    /// The request was well-formed but cannot be served (e.g. unknown layer).
    InvalidRequest = 11,
    /// The sender is overloaded; the request may be retried later.
    Busy = 12,
}

impl ErrorCode {
    /// Wire value of this code.
    pub fn to_u16(self) -> u16 {
        self as u16
    }

    /// Parses a wire value; `None` for values not defined (versions 1 and 2 share them).
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::NoError,
            1 => Self::ProtocolViolation,
            2 => Self::MalformedMessage,
            3 => Self::UnsupportedVersion,
            4 => Self::UnknownModel,
            5 => Self::UnsupportedParameters,
            6 => Self::LimitExceeded,
            7 => Self::ChannelBindingMismatch,
            8 => Self::UnknownKey,
            9 => Self::IdleTimeout,
            10 => Self::InternalError,
            11 => Self::InvalidRequest,
            12 => Self::Busy,
            _ => return None,
        })
    }

    /// All codes defined (versions 1 and 2), in wire order.
    pub const ALL: [ErrorCode; 13] = [
        Self::NoError,
        Self::ProtocolViolation,
        Self::MalformedMessage,
        Self::UnsupportedVersion,
        Self::UnknownModel,
        Self::UnsupportedParameters,
        Self::LimitExceeded,
        Self::ChannelBindingMismatch,
        Self::UnknownKey,
        Self::IdleTimeout,
        Self::InternalError,
        Self::InvalidRequest,
        Self::Busy,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({})", self, self.to_u16())
    }
}

/// Every error this crate returns.
///
/// Errors returned from `handle_input` / `handle_timeout` are fatal and
/// sticky: the session queues one `Close` carrying [`Error::code`], enters
/// the closed state, and returns the same error from every later call
/// (TDM-ERR-3). Errors from local API calls (`send_request`, ...) that are
/// caused by the caller are not fatal unless documented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input ended before a field was complete.
    #[error("truncated input while reading {context}")]
    UnexpectedEnd {
        /// What was being read.
        context: &'static str,
    },
    /// A message body had bytes left after its last field.
    #[error("{extra} trailing bytes after {context}")]
    TrailingBytes {
        /// Which message.
        context: &'static str,
        /// Number of unread bytes.
        extra: usize,
    },
    /// A length or count exceeded its limit (checked before allocation).
    #[error("{field} length {len} exceeds limit {max}")]
    LengthLimit {
        /// Which field.
        field: &'static str,
        /// Declared length or count.
        len: u64,
        /// Limit in force.
        max: u64,
    },
    /// The frame header carried an undefined message type.
    #[error("unknown message type 0x{0:02x}")]
    UnknownMessageType(u8),
    /// The frame header carried an unsupported frame version.
    #[error("unsupported frame version {0}")]
    UnsupportedFrameVersion(u8),
    /// A field had a value outside its domain.
    #[error("invalid value for {field}")]
    InvalidField {
        /// Which field.
        field: &'static str,
    },
    /// A well-formed message arrived in a state or direction where it is not allowed.
    #[error("unexpected {message} in state {state}")]
    UnexpectedMessage {
        /// Message type name.
        message: &'static str,
        /// Session state name.
        state: &'static str,
    },
    /// No protocol version in common.
    #[error("no common protocol version")]
    NoCommonVersion,
    /// The model id or digest is not served / not the one requested.
    #[error("model id or digest mismatch")]
    UnknownModel,
    /// No parameter set in common, or a message used a non-negotiated one.
    #[error("parameter set mismatch")]
    ParameterSetMismatch,
    /// The peer's channel binding differs from this connection's.
    #[error("channel binding mismatch")]
    ChannelBindingMismatch,
    /// A key id is not the SHA-256 of the key blob it names.
    #[error("key id does not match key blob digest")]
    KeyIdMismatch,
    /// A request id was reused or not increasing (replay / duplicate).
    #[error("duplicate or replayed request id {0}")]
    DuplicateRequestId(u64),
    /// A response or error named a request id that is not in flight.
    #[error("request id {0} is not in flight")]
    UnknownRequestId(u64),
    /// A response does not match the request it answers (kind or key id).
    #[error("response to request {0} does not match the request")]
    ResponseMismatch(u64),
    /// The in-flight request limit would be exceeded.
    #[error("in-flight request limit exceeded")]
    InFlightLimit,
    /// A negotiated value exceeded what was offered or allowed.
    #[error("negotiated {field} exceeds the offered value")]
    NegotiationViolation {
        /// Which value.
        field: &'static str,
    },
    /// The idle or handshake timeout expired.
    #[error("timeout expired")]
    Timeout,
    /// The peer closed the session with an error code.
    #[error("peer closed the session with {0}")]
    PeerClosed(ErrorCode),
    /// The session was closed locally with an error code.
    #[error("session closed locally with {0}")]
    LocallyClosed(ErrorCode),
    /// The session is closed (cleanly); no more input or operations.
    #[error("session is closed")]
    Closed,
    /// The operation requires a completed handshake.
    #[error("session is not ready")]
    NotReady,
}

impl Error {
    /// The coarse code sent to the peer when this error closes a session
    /// (TDM-ERR-3).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnexpectedEnd { .. }
            | Error::TrailingBytes { .. }
            | Error::UnknownMessageType(_)
            | Error::UnsupportedFrameVersion(_)
            | Error::InvalidField { .. } => ErrorCode::MalformedMessage,
            Error::LengthLimit { .. } | Error::InFlightLimit => ErrorCode::LimitExceeded,
            Error::UnexpectedMessage { .. }
            | Error::KeyIdMismatch
            | Error::DuplicateRequestId(_)
            | Error::UnknownRequestId(_)
            | Error::ResponseMismatch(_)
            | Error::NegotiationViolation { .. } => ErrorCode::ProtocolViolation,
            Error::NoCommonVersion => ErrorCode::UnsupportedVersion,
            Error::UnknownModel => ErrorCode::UnknownModel,
            Error::ParameterSetMismatch => ErrorCode::UnsupportedParameters,
            Error::ChannelBindingMismatch => ErrorCode::ChannelBindingMismatch,
            Error::Timeout => ErrorCode::IdleTimeout,
            Error::PeerClosed(c) | Error::LocallyClosed(c) => *c,
            Error::Closed => ErrorCode::NoError,
            Error::NotReady => ErrorCode::InternalError,
        }
    }
}
