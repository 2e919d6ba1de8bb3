//! Channel binding (TDM-BIND-1) and the post-handshake check runtimes call before creating a
//! protocol session.

use rustls::{ConnectionCommon, ProtocolVersion};

use crate::identity::{peer_identity, PeerIdentity};
use crate::{Error, Result, ALPN_TANDEM_V1, CHANNEL_BINDING_LABEL, CHANNEL_BINDING_LEN};

/// Derives the 32-byte channel binding of a TLS 1.3 connection (TDM-BIND-1): the RFC 8446 §7.5
/// exporter with label `EXPORTER-tandem-channel-binding` and an empty context.
///
/// Both ends of one connection compute the same value; any two connections differ (with
/// overwhelming probability). Works on the client and the server side
/// (`&ServerConnection` / `&ClientConnection` coerce to `&ConnectionCommon<_>`). Fails with
/// [`Error::HandshakeIncomplete`] while the handshake is running.
pub fn channel_binding<D>(conn: &ConnectionCommon<D>) -> Result<[u8; CHANNEL_BINDING_LEN]> {
    if conn.is_handshaking() {
        return Err(Error::HandshakeIncomplete);
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(Error::NotTls13);
    }
    let out =
        conn.export_keying_material([0u8; CHANNEL_BINDING_LEN], CHANNEL_BINDING_LABEL, Some(&[]))?;
    Ok(out)
}

/// What a runtime needs from a completed handshake to create its protocol session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The peer's identity (for the cloud: the device's; for the device: the cloud's).
    pub peer: PeerIdentity,
    /// The connection's channel binding (TDM-BIND-1), given to the session at creation.
    pub channel_binding: [u8; CHANNEL_BINDING_LEN],
}

/// Checks a completed handshake and returns the peer identity and channel binding.
///
/// Call it on both sides once `is_handshaking()` is false and **before** handing any byte to a
/// protocol session (TDM-ALPN-1). It fails unless the connection is TLS 1.3, negotiated ALPN
/// `tandem/1` and the peer presented a parsable certificate. (Servers built by this crate
/// already refuse, inside the handshake, clients that do not offer `tandem/1`; a client that
/// talks to a server without ALPN is caught here.)
pub fn established<D>(conn: &ConnectionCommon<D>) -> Result<Established> {
    if conn.is_handshaking() {
        return Err(Error::HandshakeIncomplete);
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(Error::NotTls13);
    }
    if conn.alpn_protocol() != Some(ALPN_TANDEM_V1) {
        return Err(Error::AlpnMismatch);
    }
    let peer = peer_identity(conn)?;
    let channel_binding = channel_binding(conn)?;
    Ok(Established {
        peer,
        channel_binding,
    })
}
