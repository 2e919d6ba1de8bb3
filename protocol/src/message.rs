//! Message types and their body codecs (TDM-MSG-*). Layouts are in
//! `specs/wire-format.md`; all integers are big-endian.

use crate::codec::{Reader, Writer, FRAME_HEADER_LEN, FRAME_VERSION};
use crate::limits::{MAX_LIST_LEN, MAX_MODEL_ID_LEN};
use crate::{Error, ErrorCode, Limits};

/// A key id: SHA-256 digest of the device's key material (TDM-KEY-2).
pub type KeyId = [u8; 32];

/// `(offset, width)` of a length or count field inside an encoded frame.
pub type LengthField = (usize, usize);

/// Message type byte of the frame header (TDM-MSG-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `0x01` device → cloud.
    ClientHello = 0x01,
    /// `0x02` cloud → device.
    ServerHello = 0x02,
    /// `0x03` device → cloud.
    KeyRegister = 0x03,
    /// `0x04` cloud → device.
    KeyAck = 0x04,
    /// `0x05` device → cloud.
    InferRequest = 0x05,
    /// `0x06` cloud → device.
    InferResponse = 0x06,
    /// `0x07` cloud → device.
    RequestError = 0x07,
    /// `0x08` either direction.
    Close = 0x08,
}

impl MessageType {
    /// Parses a type byte; `None` if undefined (versions 1 and 2 share the types).
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => Self::ClientHello,
            0x02 => Self::ServerHello,
            0x03 => Self::KeyRegister,
            0x04 => Self::KeyAck,
            0x05 => Self::InferRequest,
            0x06 => Self::InferResponse,
            0x07 => Self::RequestError,
            0x08 => Self::Close,
            _ => return None,
        })
    }

    /// Human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ClientHello => "ClientHello",
            Self::ServerHello => "ServerHello",
            Self::KeyRegister => "KeyRegister",
            Self::KeyAck => "KeyAck",
            Self::InferRequest => "InferRequest",
            Self::InferResponse => "InferResponse",
            Self::RequestError => "RequestError",
            Self::Close => "Close",
        }
    }
}

/// How the cloud returns encrypted results (TDM-MSG-9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputMode {
    /// `0`: no evaluation key; the cloud returns one GLWE ciphertext per output block (its
    /// full mask and only the body coefficients that hold outputs), modulus-switched
    /// (`specs/he-formats.md`, output batch).
    NoKey = 0,
    /// `1`: the outputs of several blocks packed into fewer GLWE ciphertexts with the device's
    /// automorphism (packing) key.
    Packed = 1,
}

impl OutputMode {
    fn from_u8(v: u8) -> Result<Self, Error> {
        match v {
            0 => Ok(Self::NoKey),
            1 => Ok(Self::Packed),
            _ => Err(Error::InvalidField {
                field: "output_mode",
            }),
        }
    }
}

/// Protection mode of a request payload (TDM-MSG-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtectionMode {
    /// `0`: GLWE-encrypted activations.
    Encrypted = 0,
    /// `1`: DP-noised quantised activations in the clear.
    Noised = 1,
    /// `2`: noised first, then encrypted.
    NoisedEncrypted = 2,
}

/// DP noise mechanism (TDM-MSG-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// `0`: discrete Gaussian.
    DiscreteGaussian = 0,
    /// `1`: discrete Laplace.
    DiscreteLaplace = 1,
}

/// Noise scale: exact rational or IEEE-754 binary64 (TDM-MSG-10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// Kind `0`: `num / den`, both non-zero.
    Rational {
        /// Numerator.
        num: u64,
        /// Denominator.
        den: u64,
    },
    /// Kind `1`: a finite, positive binary64.
    Float(f64),
}

/// Privacy budget charged for this release (TDM-MSG-10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetCharge {
    /// Kind `0`: ρ in zCDP, finite, ≥ 0.
    Rho(f64),
    /// Kind `1`: ε in pure DP, finite, ≥ 0.
    Epsilon(f64),
}

/// DP metadata carried with noised payloads (TDM-MSG-10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpMetadata {
    /// Noise mechanism.
    pub mechanism: Mechanism,
    /// Noise scale on the integer grid.
    pub scale: Scale,
    /// Budget charged on the device's ledger for this release.
    pub charge: BudgetCharge,
    /// L2 (Gaussian) or L1 (Laplace) clipping bound before quantisation.
    pub clip_bound: f64,
    /// Quantisation scale `s`: integer grid steps per unit of real value, `q = round(s · x)`
    /// (finite, > 0; TDM-MSG-10). A model that quantises with a step of `input_scale` real
    /// units sends `1 / input_scale`.
    pub quant_scale: f64,
}

/// Opaque ciphertexts bound to a parameter set and key id (TDM-MSG-9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedBlock {
    /// Parameter-set id (must equal the negotiated one).
    pub param_set: u16,
    /// Key id the ciphertexts are encrypted under.
    pub key_id: KeyId,
    /// Requested / used output mode.
    pub output_mode: OutputMode,
    /// Ciphertext blobs, format per `specs/he-formats.md`.
    pub ciphertexts: Vec<Vec<u8>>,
}

/// Noised quantised activations (TDM-MSG-10).
#[derive(Debug, Clone, PartialEq)]
pub struct NoisedBlock {
    /// DP metadata.
    pub dp: DpMetadata,
    /// Noised values, `batch * width` of them, row-major.
    pub values: Vec<i32>,
}

/// Payload of an inference request (TDM-MSG-8).
#[derive(Debug, Clone, PartialEq)]
pub enum RequestPayload {
    /// Encrypted activations.
    Encrypted(EncryptedBlock),
    /// Noised activations in the clear.
    Noised(NoisedBlock),
    /// Noised, then encrypted.
    NoisedEncrypted {
        /// DP metadata of the noise applied before encryption.
        dp: DpMetadata,
        /// The ciphertexts.
        enc: EncryptedBlock,
    },
}

impl RequestPayload {
    /// The protection mode of this payload.
    pub fn mode(&self) -> ProtectionMode {
        match self {
            Self::Encrypted(_) => ProtectionMode::Encrypted,
            Self::Noised(_) => ProtectionMode::Noised,
            Self::NoisedEncrypted { .. } => ProtectionMode::NoisedEncrypted,
        }
    }

    /// The encrypted block, if any.
    pub fn encrypted(&self) -> Option<&EncryptedBlock> {
        match self {
            Self::Encrypted(e) | Self::NoisedEncrypted { enc: e, .. } => Some(e),
            Self::Noised(_) => None,
        }
    }
}

/// Payload of an inference response (TDM-MSG-11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponsePayload {
    /// Kind `0`: encrypted results.
    Encrypted(EncryptedBlock),
    /// Kind `1`: cleartext integer results (for `Noised` requests).
    Plain(Vec<i64>),
}

/// `ClientHello` (TDM-MSG-3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Supported protocol versions (1..=16 entries).
    pub versions: Vec<u16>,
    /// Supported parameter-set ids in preference order (1..=16 entries).
    pub param_sets: Vec<u16>,
    /// Model id: 1..=64 bytes of printable ASCII (0x21..=0x7e).
    pub model_id: String,
    /// SHA-256 digest of the model manifest the device expects.
    pub model_digest: [u8; 32],
    /// TLS-exporter channel binding of this connection.
    pub channel_binding: [u8; 32],
    /// Offered limits.
    pub limits: Limits,
}

/// `ServerHello` (TDM-MSG-4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// Chosen protocol version.
    pub version: u16,
    /// Chosen parameter-set id.
    pub param_set: u16,
    /// Echoed model id.
    pub model_id: String,
    /// Echoed model digest.
    pub model_digest: [u8; 32],
    /// Limits in force for the session.
    pub limits: Limits,
}

/// `KeyRegister` (TDM-MSG-5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRegister {
    /// Key id; `SHA-256(key_blob)` when the blob is non-empty.
    pub key_id: KeyId,
    /// Parameter set of the key.
    pub param_set: u16,
    /// Output mode this key material serves.
    pub output_mode: OutputMode,
    /// TLS-exporter channel binding of this connection.
    pub channel_binding: [u8; 32],
    /// Opaque key blob (`specs/he-formats.md`); empty only for `NoKey`.
    pub key_blob: Vec<u8>,
}

/// `KeyAck` (TDM-MSG-6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAck {
    /// The registered key id.
    pub key_id: KeyId,
}

/// `InferRequest` (TDM-MSG-7).
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// Request id: non-zero, strictly increasing per session.
    pub request_id: u64,
    /// Layer / segment id in the model manifest.
    pub layer_id: u32,
    /// Batch size, `1..=max_batch`.
    pub batch: u16,
    /// Protected activations.
    pub payload: RequestPayload,
}

/// `InferResponse` (TDM-MSG-11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferResponse {
    /// Id of the request answered.
    pub request_id: u64,
    /// Layer id, echoed.
    pub layer_id: u32,
    /// The cloud's measured wall time of this layer's evaluation, in microseconds, saturating at
    /// `u32::MAX` (TDM-MSG-14, TDM-EVAL-1). `Some` exactly when the frame uses the version-2
    /// layout (the field is on the wire), `None` for the version-1 layout; `Some(0)` means the
    /// cloud did not measure. Advisory: a device uses it only for cost estimates (TDM-EVAL-2).
    pub cloud_eval_us: Option<u32>,
    /// Results.
    pub payload: ResponsePayload,
}

/// `RequestError` (TDM-MSG-12): one request failed, the session continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// Id of the failed request.
    pub request_id: u64,
    /// Why (never `NoError`).
    pub code: ErrorCode,
}

/// `Close` (TDM-MSG-13): the last message of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// `NoError` for a normal close, else the reason.
    pub code: ErrorCode,
}

/// Every message (versions 1 and 2; only InferResponse differs, TDM-VER-3).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`ClientHello`].
    ClientHello(ClientHello),
    /// See [`ServerHello`].
    ServerHello(ServerHello),
    /// See [`KeyRegister`].
    KeyRegister(KeyRegister),
    /// See [`KeyAck`].
    KeyAck(KeyAck),
    /// See [`InferRequest`].
    InferRequest(InferRequest),
    /// See [`InferResponse`].
    InferResponse(InferResponse),
    /// See [`RequestError`].
    RequestError(RequestError),
    /// See [`Close`].
    Close(Close),
}

fn invalid(field: &'static str) -> Error {
    Error::InvalidField { field }
}

fn finite_f64(r: &mut Reader<'_>, field: &'static str, positive: bool) -> Result<f64, Error> {
    let v = f64::from_bits(r.u64(field)?);
    // TDM-MSG-10: floats are finite, and positive or non-negative as stated.
    let ok = v.is_finite() && if positive { v > 0.0 } else { v >= 0.0 };
    if ok {
        Ok(v)
    } else {
        Err(invalid(field))
    }
}

fn read_model_id(r: &mut Reader<'_>) -> Result<String, Error> {
    // TDM-MSG-3: model id is 1..=64 bytes of printable ASCII.
    let n = r.count_u8("model_id", MAX_MODEL_ID_LEN as u64, 1)?;
    let b = r.take(n, "model_id")?;
    if n == 0 || !b.iter().all(|c| (0x21..=0x7e).contains(c)) {
        return Err(invalid("model_id"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| invalid("model_id"))
}

fn write_model_id(w: &mut Writer, id: &str) -> Result<(), Error> {
    w.count_u8("model_id", id.len())?;
    w.raw(id.as_bytes());
    Ok(())
}

fn read_u16_list(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<u16>, Error> {
    // TDM-MSG-3: lists hold 1..=16 entries.
    let n = r.count_u8(field, MAX_LIST_LEN as u64, 2)?;
    if n == 0 {
        return Err(invalid(field));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.u16(field)?);
    }
    Ok(out)
}

fn write_u16_list(w: &mut Writer, field: &'static str, v: &[u16]) -> Result<(), Error> {
    w.count_u8(field, v.len())?;
    for x in v {
        w.u16(*x);
    }
    Ok(())
}

fn read_limits(r: &mut Reader<'_>) -> Result<Limits, Error> {
    let l = Limits {
        max_frame_len: r.u32("limits")?,
        max_key_len: r.u32("limits")?,
        max_ciphertext_len: r.u32("limits")?,
        max_ciphertexts: r.u32("limits")?,
        max_elements: r.u32("limits")?,
        max_batch: r.u16("limits")?,
        max_in_flight: r.u16("limits")?,
        idle_timeout_ms: r.u32("limits")?,
    };
    l.validate()?;
    Ok(l)
}

fn write_limits(w: &mut Writer, l: &Limits) {
    w.u32(l.max_frame_len);
    w.u32(l.max_key_len);
    w.u32(l.max_ciphertext_len);
    w.u32(l.max_ciphertexts);
    w.u32(l.max_elements);
    w.u16(l.max_batch);
    w.u16(l.max_in_flight);
    w.u32(l.idle_timeout_ms);
}

fn read_output_mode(r: &mut Reader<'_>) -> Result<OutputMode, Error> {
    OutputMode::from_u8(r.u8("output_mode")?)
}

fn read_encrypted(r: &mut Reader<'_>, limits: &Limits) -> Result<EncryptedBlock, Error> {
    let param_set = r.u16("param_set")?;
    let key_id = r.array("key_id")?;
    let output_mode = read_output_mode(r)?;
    // TDM-MSG-9: 1..=max_ciphertexts blobs, each 1..=max_ciphertext_len bytes.
    let n = r.count("ciphertexts", u64::from(limits.max_ciphertexts), 5)?;
    if n == 0 {
        return Err(invalid("ciphertexts"));
    }
    let mut ciphertexts = Vec::with_capacity(n);
    for _ in 0..n {
        let ct = r.bytes_u32("ciphertext", limits.max_ciphertext_len)?;
        if ct.is_empty() {
            return Err(invalid("ciphertext"));
        }
        ciphertexts.push(ct);
    }
    Ok(EncryptedBlock {
        param_set,
        key_id,
        output_mode,
        ciphertexts,
    })
}

fn write_encrypted(w: &mut Writer, e: &EncryptedBlock) -> Result<(), Error> {
    w.u16(e.param_set);
    w.raw(&e.key_id);
    w.u8(e.output_mode as u8);
    w.count("ciphertexts", e.ciphertexts.len())?;
    for ct in &e.ciphertexts {
        w.bytes_u32("ciphertext", ct)?;
    }
    Ok(())
}

fn read_dp(r: &mut Reader<'_>) -> Result<DpMetadata, Error> {
    let mechanism = match r.u8("dp.mechanism")? {
        0 => Mechanism::DiscreteGaussian,
        1 => Mechanism::DiscreteLaplace,
        _ => return Err(invalid("dp.mechanism")),
    };
    let scale = match r.u8("dp.scale_kind")? {
        0 => {
            let num = r.u64("dp.scale")?;
            let den = r.u64("dp.scale")?;
            if num == 0 || den == 0 {
                return Err(invalid("dp.scale"));
            }
            Scale::Rational { num, den }
        }
        1 => Scale::Float(finite_f64(r, "dp.scale", true)?),
        _ => return Err(invalid("dp.scale_kind")),
    };
    let charge = match r.u8("dp.charge_kind")? {
        0 => BudgetCharge::Rho(finite_f64(r, "dp.charge", false)?),
        1 => BudgetCharge::Epsilon(finite_f64(r, "dp.charge", false)?),
        _ => return Err(invalid("dp.charge_kind")),
    };
    let clip_bound = finite_f64(r, "dp.clip_bound", true)?;
    let quant_scale = finite_f64(r, "dp.quant_scale", true)?;
    Ok(DpMetadata {
        mechanism,
        scale,
        charge,
        clip_bound,
        quant_scale,
    })
}

fn write_dp(w: &mut Writer, d: &DpMetadata) {
    w.u8(d.mechanism as u8);
    match d.scale {
        Scale::Rational { num, den } => {
            w.u8(0);
            w.u64(num);
            w.u64(den);
        }
        Scale::Float(f) => {
            w.u8(1);
            w.u64(f.to_bits());
        }
    }
    match d.charge {
        BudgetCharge::Rho(f) => {
            w.u8(0);
            w.u64(f.to_bits());
        }
        BudgetCharge::Epsilon(f) => {
            w.u8(1);
            w.u64(f.to_bits());
        }
    }
    w.u64(d.clip_bound.to_bits());
    w.u64(d.quant_scale.to_bits());
}

fn read_code(r: &mut Reader<'_>) -> Result<ErrorCode, Error> {
    // TDM-ERR-2: undefined error codes are rejected.
    ErrorCode::from_u16(r.u16("code")?).ok_or(invalid("code"))
}

impl Message {
    /// The frame type of this message.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Message::ClientHello(_) => MessageType::ClientHello,
            Message::ServerHello(_) => MessageType::ServerHello,
            Message::KeyRegister(_) => MessageType::KeyRegister,
            Message::KeyAck(_) => MessageType::KeyAck,
            Message::InferRequest(_) => MessageType::InferRequest,
            Message::InferResponse(_) => MessageType::InferResponse,
            Message::RequestError(_) => MessageType::RequestError,
            Message::Close(_) => MessageType::Close,
        }
    }

    /// Decodes a message body of type `ty` under `limits`. The whole body
    /// must be consumed (TDM-FRAME-6).
    ///
    /// TDM-MSG-2: fields are read in wire order and each is checked as it is
    /// read, so the first bad field decides the error; an upper bound on a
    /// length, count or batch gives `LimitExceeded`, every other failure
    /// `MalformedMessage` (see [`Error::code`]).
    ///
    /// # Errors
    /// [`Error::LengthLimit`], [`Error::UnexpectedEnd`], [`Error::InvalidField`]
    /// or [`Error::TrailingBytes`] for the first check that fails.
    pub fn decode_body(ty: MessageType, body: &[u8], limits: &Limits) -> Result<Self, Error> {
        Self::decode_body_version(ty, body, limits, crate::PROTOCOL_VERSION)
    }

    /// [`Message::decode_body`] under the layout of protocol `version` (TDM-VER-3): the
    /// version-1 layout for `version` 1, the version-2 layout (an InferResponse carries
    /// `cloud_eval_us`) for any other value. A session decodes with its negotiated version,
    /// and before the handshake with the highest version it supports.
    ///
    /// # Errors
    /// As [`Message::decode_body`].
    pub fn decode_body_version(
        ty: MessageType,
        body: &[u8],
        limits: &Limits,
        version: u16,
    ) -> Result<Self, Error> {
        let mut r = Reader::new(body);
        let msg = match ty {
            MessageType::ClientHello => {
                let versions = read_u16_list(&mut r, "versions")?;
                let param_sets = read_u16_list(&mut r, "param_sets")?;
                let model_id = read_model_id(&mut r)?;
                let model_digest = r.array("model_digest")?;
                let channel_binding = r.array("channel_binding")?;
                let limits = read_limits(&mut r)?;
                Message::ClientHello(ClientHello {
                    versions,
                    param_sets,
                    model_id,
                    model_digest,
                    channel_binding,
                    limits,
                })
            }
            MessageType::ServerHello => {
                let version = r.u16("version")?;
                let param_set = r.u16("param_set")?;
                let model_id = read_model_id(&mut r)?;
                let model_digest = r.array("model_digest")?;
                let limits = read_limits(&mut r)?;
                Message::ServerHello(ServerHello {
                    version,
                    param_set,
                    model_id,
                    model_digest,
                    limits,
                })
            }
            MessageType::KeyRegister => {
                let key_id = r.array("key_id")?;
                let param_set = r.u16("param_set")?;
                let output_mode = read_output_mode(&mut r)?;
                let channel_binding = r.array("channel_binding")?;
                // TDM-KEY-1: the key blob length is checked against max_key_len.
                let key_blob = r.bytes_u32("key_blob", limits.max_key_len)?;
                if key_blob.is_empty() && output_mode == OutputMode::Packed {
                    return Err(invalid("key_blob"));
                }
                Message::KeyRegister(KeyRegister {
                    key_id,
                    param_set,
                    output_mode,
                    channel_binding,
                    key_blob,
                })
            }
            MessageType::KeyAck => Message::KeyAck(KeyAck {
                key_id: r.array("key_id")?,
            }),
            MessageType::InferRequest => {
                let request_id = r.u64("request_id")?;
                if request_id == 0 {
                    return Err(invalid("request_id"));
                }
                let layer_id = r.u32("layer_id")?;
                let batch = r.u16("batch")?;
                // TDM-MSG-7: 1 <= batch <= max_batch.
                if batch == 0 {
                    return Err(invalid("batch"));
                }
                if batch > limits.max_batch {
                    return Err(Error::LengthLimit {
                        field: "batch",
                        len: u64::from(batch),
                        max: u64::from(limits.max_batch),
                    });
                }
                let payload = match r.u8("protection")? {
                    0 => RequestPayload::Encrypted(read_encrypted(&mut r, limits)?),
                    1 => {
                        let dp = read_dp(&mut r)?;
                        // TDM-MSG-10: 1..=max_elements values, a multiple of batch.
                        let n = r.count("values", u64::from(limits.max_elements), 4)?;
                        if n == 0 || n % usize::from(batch) != 0 {
                            return Err(invalid("values"));
                        }
                        let mut values = Vec::with_capacity(n);
                        for _ in 0..n {
                            values.push(r.i32("values")?);
                        }
                        RequestPayload::Noised(NoisedBlock { dp, values })
                    }
                    2 => {
                        let dp = read_dp(&mut r)?;
                        let enc = read_encrypted(&mut r, limits)?;
                        RequestPayload::NoisedEncrypted { dp, enc }
                    }
                    _ => return Err(invalid("protection")),
                };
                Message::InferRequest(InferRequest {
                    request_id,
                    layer_id,
                    batch,
                    payload,
                })
            }
            MessageType::InferResponse => {
                let request_id = r.u64("request_id")?;
                if request_id == 0 {
                    return Err(invalid("request_id"));
                }
                let layer_id = r.u32("layer_id")?;
                // TDM-VER-3, TDM-MSG-14: the version-2 layout carries the cloud's evaluation
                // time after the layer id; the version-1 layout does not.
                let cloud_eval_us = if version == 1 {
                    None
                } else {
                    Some(r.u32("cloud_eval_us")?)
                };
                let payload = match r.u8("response_kind")? {
                    0 => ResponsePayload::Encrypted(read_encrypted(&mut r, limits)?),
                    1 => {
                        let n = r.count("values", u64::from(limits.max_elements), 8)?;
                        if n == 0 {
                            return Err(invalid("values"));
                        }
                        let mut values = Vec::with_capacity(n);
                        for _ in 0..n {
                            values.push(r.i64("values")?);
                        }
                        ResponsePayload::Plain(values)
                    }
                    _ => return Err(invalid("response_kind")),
                };
                Message::InferResponse(InferResponse {
                    request_id,
                    layer_id,
                    cloud_eval_us,
                    payload,
                })
            }
            MessageType::RequestError => {
                let request_id = r.u64("request_id")?;
                let code = read_code(&mut r)?;
                if request_id == 0 || code == ErrorCode::NoError {
                    return Err(invalid("request_error"));
                }
                Message::RequestError(RequestError { request_id, code })
            }
            MessageType::Close => Message::Close(Close {
                code: read_code(&mut r)?,
            }),
        };
        // TDM-FRAME-6: trailing bytes inside a frame body are rejected.
        r.finish(ty.name())?;
        Ok(msg)
    }

    /// Encodes the message body (without frame header).
    pub fn encode_body(&self) -> Result<Vec<u8>, Error> {
        Ok(self.write_body()?.into_inner())
    }

    /// Encodes the frame and returns, with it, the `(offset, width)` of
    /// every length or count field in it (frame length included). Used by
    /// length-rewrite tests and vector generation.
    pub fn encode_with_length_fields(&self) -> Result<(Vec<u8>, Vec<LengthField>), Error> {
        let w = self.write_body()?;
        let mut fields = vec![(2usize, 4usize)];
        fields.extend(
            w.length_fields()
                .iter()
                .map(|(o, n)| (o.saturating_add(FRAME_HEADER_LEN), *n)),
        );
        Ok((self.encode()?, fields))
    }

    fn write_body(&self) -> Result<Writer, Error> {
        let mut w = Writer::new();
        match self {
            Message::ClientHello(m) => {
                write_u16_list(&mut w, "versions", &m.versions)?;
                write_u16_list(&mut w, "param_sets", &m.param_sets)?;
                write_model_id(&mut w, &m.model_id)?;
                w.raw(&m.model_digest);
                w.raw(&m.channel_binding);
                write_limits(&mut w, &m.limits);
            }
            Message::ServerHello(m) => {
                w.u16(m.version);
                w.u16(m.param_set);
                write_model_id(&mut w, &m.model_id)?;
                w.raw(&m.model_digest);
                write_limits(&mut w, &m.limits);
            }
            Message::KeyRegister(m) => {
                w.raw(&m.key_id);
                w.u16(m.param_set);
                w.u8(m.output_mode as u8);
                w.raw(&m.channel_binding);
                w.bytes_u32("key_blob", &m.key_blob)?;
            }
            Message::KeyAck(m) => w.raw(&m.key_id),
            Message::InferRequest(m) => {
                w.u64(m.request_id);
                w.u32(m.layer_id);
                w.u16(m.batch);
                w.u8(m.payload.mode() as u8);
                match &m.payload {
                    RequestPayload::Encrypted(e) => write_encrypted(&mut w, e)?,
                    RequestPayload::Noised(n) => {
                        write_dp(&mut w, &n.dp);
                        w.count("values", n.values.len())?;
                        for v in &n.values {
                            w.i32(*v);
                        }
                    }
                    RequestPayload::NoisedEncrypted { dp, enc } => {
                        write_dp(&mut w, dp);
                        write_encrypted(&mut w, enc)?;
                    }
                }
            }
            Message::InferResponse(m) => {
                w.u64(m.request_id);
                w.u32(m.layer_id);
                // TDM-MSG-14: present exactly in the version-2 layout.
                if let Some(us) = m.cloud_eval_us {
                    w.u32(us);
                }
                match &m.payload {
                    ResponsePayload::Encrypted(e) => {
                        w.u8(0);
                        write_encrypted(&mut w, e)?;
                    }
                    ResponsePayload::Plain(v) => {
                        w.u8(1);
                        w.count("values", v.len())?;
                        for x in v {
                            w.i64(*x);
                        }
                    }
                }
            }
            Message::RequestError(m) => {
                w.u64(m.request_id);
                w.u16(m.code.to_u16());
            }
            Message::Close(m) => w.u16(m.code.to_u16()),
        }
        Ok(w)
    }

    /// Encodes the whole frame: header (TDM-FRAME-1) then body.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let body = self.encode_body()?;
        let len = u32::try_from(body.len()).map_err(|_| Error::LengthLimit {
            field: "frame.length",
            len: body.len() as u64,
            max: u64::from(u32::MAX),
        })?;
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN.saturating_add(body.len()));
        out.push(FRAME_VERSION);
        out.push(self.msg_type() as u8);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// The protocol version whose layout [`Message::encode`] produces for this message: `1`
    /// for an InferResponse without `cloud_eval_us`, else [`crate::PROTOCOL_VERSION`] (every
    /// other message has the same layout in both versions, TDM-VER-3).
    pub fn wire_version(&self) -> u16 {
        match self {
            Message::InferResponse(InferResponse {
                cloud_eval_us: None,
                ..
            }) => 1,
            _ => crate::PROTOCOL_VERSION,
        }
    }

    /// Encodes, then checks that the encoding decodes under `limits` (and the layout of
    /// [`Message::wire_version`]) to the same message — so nothing the peer would reject is
    /// ever sent.
    ///
    /// # Errors
    /// The decoder's error if the encoding would be refused under `limits`, or
    /// [`Error::InvalidField`] if it does not decode to the same message.
    pub fn encode_checked(&self, limits: &Limits) -> Result<Vec<u8>, Error> {
        let bytes = self.encode()?;
        let (back, used) = crate::codec::decode_frame_version(&bytes, limits, self.wire_version())?;
        if used != bytes.len() || back != *self {
            return Err(Error::InvalidField { field: "message" });
        }
        Ok(bytes)
    }
}
