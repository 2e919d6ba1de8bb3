//! Bounded reader, writer helpers and the frame layer (TDM-FRAME-*).
//!
//! Nothing here indexes into untrusted bytes: every read goes through
//! [`Reader`], which checks the remaining length first, and every declared
//! length is compared with a limit before any allocation (TDM-FRAME-4).

use crate::{Error, Limits, Message, MessageType};

/// Frame format version carried in every frame header (TDM-FRAME-2).
pub const FRAME_VERSION: u8 = 1;
/// Length of the frame header: version (1) + type (1) + body length (4).
pub const FRAME_HEADER_LEN: usize = 6;

/// A bounded cursor over untrusted bytes.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Wraps `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Number of bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Takes exactly `n` bytes or fails with `UnexpectedEnd`.
    pub fn take(&mut self, n: usize, context: &'static str) -> Result<&'a [u8], Error> {
        // TDM-FRAME-7: never read past the end; a short field is an error.
        let end = self
            .pos
            .checked_add(n)
            .ok_or(Error::UnexpectedEnd { context })?;
        let out = self
            .buf
            .get(self.pos..end)
            .ok_or(Error::UnexpectedEnd { context })?;
        self.pos = end;
        Ok(out)
    }

    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self, context: &'static str) -> Result<[u8; N], Error> {
        let s = self.take(N, context)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, context: &'static str) -> Result<u8, Error> {
        Ok(u8::from_be_bytes(self.array(context)?))
    }
    /// Reads a big-endian `u16`.
    pub fn u16(&mut self, context: &'static str) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.array(context)?))
    }
    /// Reads a big-endian `u32`.
    pub fn u32(&mut self, context: &'static str) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.array(context)?))
    }
    /// Reads a big-endian `u64`.
    pub fn u64(&mut self, context: &'static str) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.array(context)?))
    }
    /// Reads a big-endian two's-complement `i32`.
    pub fn i32(&mut self, context: &'static str) -> Result<i32, Error> {
        Ok(i32::from_be_bytes(self.array(context)?))
    }
    /// Reads a big-endian two's-complement `i64`.
    pub fn i64(&mut self, context: &'static str) -> Result<i64, Error> {
        Ok(i64::from_be_bytes(self.array(context)?))
    }

    /// Reads a count (as `u32`), checks it against `max`, then checks that at
    /// least `count * min_elem_size` bytes remain — both before any
    /// allocation (TDM-FRAME-4).
    pub fn count(
        &mut self,
        field: &'static str,
        max: u64,
        min_elem_size: usize,
    ) -> Result<usize, Error> {
        let n = u64::from(self.u32(field)?);
        self.check_count(field, n, max, min_elem_size)
    }

    /// Same as [`Reader::count`] with a `u8` count.
    pub fn count_u8(
        &mut self,
        field: &'static str,
        max: u64,
        min_elem_size: usize,
    ) -> Result<usize, Error> {
        let n = u64::from(self.u8(field)?);
        self.check_count(field, n, max, min_elem_size)
    }

    /// TDM-MSG-2: bound first (`LengthLimit`, whether or not the announced
    /// bytes are present), then `n * min_elem_size` against the bytes left
    /// (`UnexpectedEnd`), both before anything is allocated.
    fn check_count(
        &self,
        field: &'static str,
        n: u64,
        max: u64,
        min_elem_size: usize,
    ) -> Result<usize, Error> {
        if n > max {
            return Err(Error::LengthLimit { field, len: n, max });
        }
        let n_usize = usize::try_from(n).map_err(|_| Error::LengthLimit { field, len: n, max })?;
        let need = n_usize
            .checked_mul(min_elem_size)
            .ok_or(Error::UnexpectedEnd { context: field })?;
        if need > self.remaining() {
            return Err(Error::UnexpectedEnd { context: field });
        }
        Ok(n_usize)
    }

    /// Reads a `u32`-length-prefixed byte string of at most `max` bytes.
    pub fn bytes_u32(&mut self, field: &'static str, max: u32) -> Result<Vec<u8>, Error> {
        let n = self.count(field, u64::from(max), 1)?;
        Ok(self.take(n, field)?.to_vec())
    }

    /// Fails with `TrailingBytes` unless everything was consumed (TDM-FRAME-6).
    pub fn finish(&self, context: &'static str) -> Result<(), Error> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(Error::TrailingBytes { context, extra }),
        }
    }
}

/// Appends big-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
    length_fields: Vec<(usize, usize)>,
}

impl Writer {
    /// Empty writer.
    pub fn new() -> Self {
        Writer::default()
    }
    /// The bytes written.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
    /// `(offset, width)` of every length / count field written so far.
    pub fn length_fields(&self) -> &[(usize, usize)] {
        &self.length_fields
    }
    /// Writes a `u8`.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Writes a big-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes a big-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes a big-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes a big-endian `i32`.
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes a big-endian `i64`.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes raw bytes.
    pub fn raw(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }
    /// Writes a `u32` count; fails if it does not fit.
    pub fn count(&mut self, field: &'static str, n: usize) -> Result<(), Error> {
        let v = u32::try_from(n).map_err(|_| Error::LengthLimit {
            field,
            len: n as u64,
            max: u64::from(u32::MAX),
        })?;
        self.length_fields.push((self.buf.len(), 4));
        self.u32(v);
        Ok(())
    }
    /// Writes a `u8` count; fails if it does not fit.
    pub fn count_u8(&mut self, field: &'static str, n: usize) -> Result<(), Error> {
        let v = u8::try_from(n).map_err(|_| Error::LengthLimit {
            field,
            len: n as u64,
            max: u64::from(u8::MAX),
        })?;
        self.length_fields.push((self.buf.len(), 1));
        self.u8(v);
        Ok(())
    }
    /// Writes a `u32`-length-prefixed byte string.
    pub fn bytes_u32(&mut self, field: &'static str, v: &[u8]) -> Result<(), Error> {
        self.count(field, v.len())?;
        self.raw(v);
        Ok(())
    }
}

/// A parsed and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type.
    pub msg_type: MessageType,
    /// Body length in bytes (already checked against the limit).
    pub body_len: u32,
}

impl FrameHeader {
    /// Parses the 6-byte header and validates it against `max_frame_len`:
    /// version (TDM-FRAME-2), known type (TDM-FRAME-5), and body length
    /// (TDM-FRAME-3), all before the body is read or buffered.
    pub fn parse(bytes: &[u8; FRAME_HEADER_LEN], max_frame_len: u32) -> Result<Self, Error> {
        let mut r = Reader::new(bytes);
        let version = r.u8("frame.version")?;
        let ty = r.u8("frame.type")?;
        let len = r.u32("frame.length")?;
        // TDM-FRAME-2: unknown frame versions are rejected.
        if version != FRAME_VERSION {
            return Err(Error::UnsupportedFrameVersion(version));
        }
        // TDM-FRAME-5: unknown message types are rejected before the body is read.
        let msg_type = MessageType::from_u8(ty).ok_or(Error::UnknownMessageType(ty))?;
        // TDM-FRAME-3: the body length is checked against the limit before buffering.
        if len > max_frame_len {
            return Err(Error::LengthLimit {
                field: "frame.length",
                len: u64::from(len),
                max: u64::from(max_frame_len),
            });
        }
        Ok(FrameHeader {
            msg_type,
            body_len: len,
        })
    }
}

/// Decodes one frame from the front of `input` under `limits`: the *frame
/// decode* of `specs/protocol.md` §2.1, which treats `input` as complete.
///
/// Returns the message and the number of bytes consumed; the caller's rest is
/// `&input[consumed..]` (so `consumed + rest.len() == input.len()`).
/// Order (TDM-FRAME-7, TDM-MSG-2): fewer than 6 bytes is `UnexpectedEnd`; then
/// version, type and length against `max_frame_len`; then fewer than `6 + L`
/// bytes is `UnexpectedEnd`; then the body field by field. A stream receiver
/// (the sessions) waits instead of failing on the two truncation cases.
///
/// # Errors
/// The first failing check, as above; a body with unread bytes fails with
/// `TrailingBytes` (TDM-FRAME-6).
pub fn decode_frame(input: &[u8], limits: &Limits) -> Result<(Message, usize), Error> {
    decode_frame_version(input, limits, crate::PROTOCOL_VERSION)
}

/// [`decode_frame`] under the body layout of protocol `version` (TDM-VER-3; see
/// [`Message::decode_body_version`]): version 1 reads an InferResponse without
/// `cloud_eval_us`, version 2 with it. Frames of every other type decode the same under both.
///
/// # Errors
/// As [`decode_frame`].
pub fn decode_frame_version(
    input: &[u8],
    limits: &Limits,
    version: u16,
) -> Result<(Message, usize), Error> {
    let mut r = Reader::new(input);
    let hdr: [u8; FRAME_HEADER_LEN] = r.array("frame.header")?;
    let header = FrameHeader::parse(&hdr, limits.max_frame_len)?;
    let body_len = usize::try_from(header.body_len).map_err(|_| Error::LengthLimit {
        field: "frame.length",
        len: u64::from(header.body_len),
        max: u64::from(limits.max_frame_len),
    })?;
    let body = r.take(body_len, "frame.body")?;
    let msg = Message::decode_body_version(header.msg_type, body, limits, version)?;
    Ok((msg, r.position()))
}

/// Incremental deframer: accumulates at most one frame at a time and never
/// buffers more than `FRAME_HEADER_LEN + max_frame_len` bytes (TDM-FRAME-3).
#[derive(Debug, Default)]
pub(crate) struct Deframer {
    buf: Vec<u8>,
    header: Option<FrameHeader>,
}

impl Deframer {
    /// Consumes bytes from `input` (advancing it) until one complete frame
    /// is available, which is returned as `(type, body)`.
    ///
    /// TDM-FRAME-8: frames may be split at any byte or arrive several at once.
    pub(crate) fn push(
        &mut self,
        input: &mut &[u8],
        max_frame_len: u32,
    ) -> Result<Option<(MessageType, Vec<u8>)>, Error> {
        loop {
            let (need, header_done) = match self.header {
                None => (FRAME_HEADER_LEN.saturating_sub(self.buf.len()), false),
                Some(h) => {
                    let total = usize::try_from(h.body_len)
                        .unwrap_or(usize::MAX)
                        .saturating_add(FRAME_HEADER_LEN);
                    (total.saturating_sub(self.buf.len()), true)
                }
            };
            if need == 0 {
                if !header_done {
                    let mut hdr = [0u8; FRAME_HEADER_LEN];
                    let src = self
                        .buf
                        .get(..FRAME_HEADER_LEN)
                        .ok_or(Error::UnexpectedEnd {
                            context: "frame.header",
                        })?;
                    hdr.copy_from_slice(src);
                    self.header = Some(FrameHeader::parse(&hdr, max_frame_len)?);
                    continue;
                }
                let Some(h) = self.header.take() else {
                    return Ok(None);
                };
                let body = self.buf.split_off(FRAME_HEADER_LEN.min(self.buf.len()));
                self.buf.clear();
                return Ok(Some((h.msg_type, body)));
            }
            if input.is_empty() {
                return Ok(None);
            }
            let n = need.min(input.len());
            let (now, rest) = input.split_at(n);
            self.buf.extend_from_slice(now);
            *input = rest;
        }
    }

    /// Bytes of an incomplete frame currently buffered.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }
}
