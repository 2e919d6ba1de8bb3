//! Codec tests: round trips, exhaustive truncation, length rewrites, limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::strategies::*;
use proptest::prelude::*;
use tandem_protocol::codec::Reader;
use tandem_protocol::limits::{HARD_MAX_FRAME_LEN, MIN_FRAME_LEN};
use tandem_protocol::*;

fn sample_limits() -> Limits {
    Limits::default()
}

/// Frame decode under the layout `m` was encoded with (TDM-VER-3: a version-1 InferResponse
/// has no `cloud_eval_us`).
fn decode_as(m: &Message, b: &[u8], l: &Limits) -> Result<(Message, usize), Error> {
    decode_frame_version(b, l, m.wire_version())
}

#[test]
fn samples_round_trip() {
    // TDM-FRAME-1, TDM-MSG-1: every sample encodes to a frame that decodes to itself;
    // the samples cover TDM-MSG-3 .. TDM-MSG-13 (ServerHello TDM-MSG-4, KeyAck TDM-MSG-6,
    // InferResponse TDM-MSG-11, Close TDM-MSG-13).
    for (name, msg) in samples::messages() {
        let bytes = msg.encode().unwrap();
        let (back, used) = decode_as(&msg, &bytes, &sample_limits()).unwrap();
        assert_eq!(back, msg, "{name}");
        assert_eq!(used, bytes.len(), "{name}");
        assert_eq!(bytes[0], FRAME_VERSION);
        assert_eq!(bytes[1], msg.msg_type() as u8);
    }
}

#[test]
fn every_strict_prefix_fails() {
    // TDM-FRAME-7: every strict prefix of every valid frame is rejected as truncated.
    let mut cases = 0;
    for (name, msg) in samples::messages() {
        let bytes = msg.encode().unwrap();
        for cut in 0..bytes.len() {
            let r = decode_as(&msg, &bytes[..cut], &sample_limits());
            assert!(
                matches!(r, Err(Error::UnexpectedEnd { .. })),
                "{name} prefix {cut}: {r:?}"
            );
            cases += 1;
        }
        // Also each strict prefix of the body alone.
        let body = msg.encode_body().unwrap();
        for cut in 0..body.len() {
            assert!(Message::decode_body_version(
                msg.msg_type(),
                &body[..cut],
                &sample_limits(),
                msg.wire_version()
            )
            .is_err());
            cases += 1;
        }
    }
    assert!(cases > 1000, "{cases}");
}

#[test]
fn trailing_bytes_rejected() {
    // TDM-FRAME-6: a body with bytes after its last field is rejected.
    for (name, msg) in samples::messages() {
        let mut body = msg.encode_body().unwrap();
        body.push(0);
        let r = Message::decode_body_version(
            msg.msg_type(),
            &body,
            &sample_limits(),
            msg.wire_version(),
        );
        assert!(
            matches!(r, Err(Error::TrailingBytes { extra: 1, .. })),
            "{name}: {r:?}"
        );
        // Same at frame level with the length field grown by one.
        let mut frame = msg.encode().unwrap();
        frame.push(0);
        let len = u32::from_be_bytes(frame[2..6].try_into().unwrap()) + 1;
        frame[2..6].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_as(&msg, &frame, &sample_limits()),
            Err(Error::TrailingBytes { .. })
        ));
    }
}

#[test]
fn consumed_plus_rest_is_input() {
    // TDM-FRAME-1: decode_frame consumes exactly one frame and leaves the rest.
    let all: Vec<u8> = samples::messages()
        .iter()
        .flat_map(|(_, m)| m.encode().unwrap())
        .collect();
    let mut rest = &all[..];
    let mut n = 0;
    for (_, m) in samples::messages() {
        let (back, used) = decode_as(&m, rest, &sample_limits()).unwrap();
        assert_eq!(back, m);
        rest = &rest[used..];
        n += 1;
    }
    assert!(rest.is_empty());
    assert_eq!(n, samples::messages().len());
}

#[test]
fn every_length_field_rewritten_fails() {
    // TDM-FRAME-4, TDM-FRAME-6, TDM-FRAME-7: any wrong value in any length or
    // count field is rejected (truncation, trailing bytes or limit).
    let (mut cases, mut rejected, mut reparsed) = (0, 0, 0);
    for (name, msg) in samples::messages() {
        let (bytes, fields) = msg.encode_with_length_fields().unwrap();
        assert!(!fields.is_empty());
        for (off, width) in fields {
            let orig: u64 = bytes[off..off + width]
                .iter()
                .fold(0, |a, b| (a << 8) | u64::from(*b));
            let max = if width == 4 { u64::from(u32::MAX) } else { 255 };
            let mut candidates = vec![0, 1, orig.wrapping_sub(1), orig + 1, orig + 4, max, max / 2];
            candidates.retain(|v| *v != orig && *v <= max);
            for v in candidates {
                let mut b = bytes.clone();
                let be = v.to_be_bytes();
                b[off..off + width].copy_from_slice(&be[8 - width..]);
                match decode_as(&msg, &b, &sample_limits()) {
                    Err(_) => rejected += 1,
                    // A shifted parse can land on another valid encoding (e.g. moving
                    // one u16 from `param_sets` to `versions`). That is inherent to
                    // length-prefixed formats; what must hold is that the result is a
                    // *different* message whose canonical encoding is exactly these bytes.
                    Ok((m2, used)) => {
                        assert_ne!(m2, msg, "{name} field@{off} = {v}");
                        assert_eq!(used, b.len());
                        assert_eq!(m2.encode().unwrap(), b, "{name} field@{off} = {v}");
                        reparsed += 1;
                    }
                }
                cases += 1;
            }
        }
    }
    assert!(cases > 100, "{cases}");
    assert_eq!(rejected + reparsed, cases);
    // Shifted-but-valid parses must stay rare (they are listed by the panic above if not).
    assert!(reparsed * 20 < cases, "{reparsed} of {cases}");
    eprintln!("length rewrites: {cases} cases, {rejected} rejected, {reparsed} re-parsed as another message");
}

#[test]
fn frame_header_checks() {
    let msg = Message::Close(Close {
        code: ErrorCode::NoError,
    });
    let good = msg.encode().unwrap();
    // TDM-FRAME-2: other frame versions are rejected.
    for v in [0u8, 2, 255] {
        let mut b = good.clone();
        b[0] = v;
        assert_eq!(
            decode_frame(&b, &sample_limits()),
            Err(Error::UnsupportedFrameVersion(v))
        );
    }
    // TDM-FRAME-5: unknown message types are rejected.
    for t in [0u8, 9, 0x42, 0xff] {
        let mut b = good.clone();
        b[1] = t;
        assert_eq!(
            decode_frame(&b, &sample_limits()),
            Err(Error::UnknownMessageType(t))
        );
    }
    // TDM-FRAME-3: a length above the limit is refused from the header alone,
    // before the body is present (MAX+1 and 2^32-1).
    let limits = samples::limits();
    for len in [limits.max_frame_len + 1, u32::MAX] {
        let mut b = vec![1u8, 8];
        b.extend_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_frame(&b, &limits),
            Err(Error::LengthLimit { .. })
        ));
    }
}

#[test]
fn inner_limits_enforced_before_allocation() {
    // TDM-FRAME-4: a count above its limit is refused even if bytes are missing.
    let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        r.count("values", 10, 4),
        Err(Error::LengthLimit { .. })
    ));
    // A count within the limit but larger than the remaining bytes is refused
    // as truncated, before allocating.
    let mut r = Reader::new(&[0, 0, 0, 9, 1, 2, 3]);
    assert!(matches!(
        r.count("values", 1 << 20, 4),
        Err(Error::UnexpectedEnd { .. })
    ));
    // Key blob over max_key_len (TDM-KEY-1).
    let msg = samples::messages()
        .into_iter()
        .find(|(n, _)| *n == "key_register_packed")
        .unwrap()
        .1;
    let mut small = sample_limits();
    small.max_key_len = 63;
    assert!(matches!(
        decode_frame(&msg.encode().unwrap(), &small),
        Err(Error::LengthLimit {
            field: "key_blob",
            ..
        })
    ));
    // Ciphertext length / count / elements / batch limits (TDM-MSG-7, TDM-MSG-9, TDM-MSG-10).
    for (name, field, set) in [
        (
            "request_encrypted_packed",
            "ciphertext",
            (|l: &mut Limits| l.max_ciphertext_len = 15) as fn(&mut Limits),
        ),
        ("request_encrypted_packed", "ciphertexts", |l| {
            l.max_ciphertexts = 1
        }),
        ("request_noised_gaussian", "values", |l| l.max_elements = 5),
        ("request_noised_gaussian", "batch", |l| l.max_batch = 1),
        ("response_plain", "values", |l| l.max_elements = 4),
    ] {
        let msg = samples::messages()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1;
        let mut l = sample_limits();
        set(&mut l);
        let r = decode_frame(&msg.encode().unwrap(), &l);
        assert!(
            matches!(r, Err(Error::LengthLimit { field: f, .. }) if f == field),
            "{name}: {r:?}"
        );
    }
}

#[test]
fn field_domains_enforced() {
    // TDM-MSG-3: empty lists, bad model ids.
    let mut h = samples::client_hello();
    h.model_id = "has space".into();
    let b = Message::ClientHello(h).encode().unwrap();
    assert!(matches!(
        decode_frame(&b, &sample_limits()),
        Err(Error::InvalidField { field: "model_id" })
    ));
    let mut h = samples::client_hello();
    h.versions.clear();
    let b = Message::ClientHello(h).encode().unwrap();
    assert!(decode_frame(&b, &sample_limits()).is_err());
    // TDM-LIM-2: zero limits and out-of-range frame limits are invalid.
    for set in [
        (|l: &mut Limits| l.max_frame_len = MIN_FRAME_LEN - 1) as fn(&mut Limits),
        |l| l.max_frame_len = HARD_MAX_FRAME_LEN + 1,
        |l| l.max_in_flight = 0,
        |l| l.idle_timeout_ms = 0,
        |l| l.max_batch = 0,
        |l| l.max_key_len = 0,
        |l| l.max_elements = 0,
        |l| l.max_ciphertexts = 0,
        |l| l.max_ciphertext_len = 0,
    ] {
        let mut h = samples::server_hello();
        set(&mut h.limits);
        let b = Message::ServerHello(h).encode().unwrap();
        assert!(matches!(
            decode_frame(&b, &sample_limits()),
            Err(Error::InvalidField { .. })
        ));
    }
    // TDM-MSG-10: non-finite or non-positive floats; zero rational parts.
    let bad_dps = [
        DpMetadata {
            clip_bound: f64::NAN,
            ..samples::dp_gaussian()
        },
        DpMetadata {
            quant_scale: 0.0,
            ..samples::dp_gaussian()
        },
        DpMetadata {
            scale: Scale::Rational { num: 1, den: 0 },
            ..samples::dp_gaussian()
        },
        DpMetadata {
            scale: Scale::Float(f64::INFINITY),
            ..samples::dp_gaussian()
        },
        DpMetadata {
            charge: BudgetCharge::Rho(-1.0),
            ..samples::dp_gaussian()
        },
        DpMetadata {
            charge: BudgetCharge::Epsilon(f64::NAN),
            ..samples::dp_gaussian()
        },
    ];
    for dp in bad_dps {
        let m = Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch: 1,
            payload: RequestPayload::Noised(NoisedBlock {
                dp,
                values: vec![1],
            }),
        });
        assert!(matches!(
            decode_frame(&m.encode().unwrap(), &sample_limits()),
            Err(Error::InvalidField { .. })
        ));
    }
    // TDM-MSG-10: values must be a non-empty multiple of batch.
    let m = Message::InferRequest(InferRequest {
        request_id: 1,
        layer_id: 0,
        batch: 2,
        payload: RequestPayload::Noised(NoisedBlock {
            dp: samples::dp_laplace(),
            values: vec![1, 2, 3],
        }),
    });
    assert!(decode_frame(&m.encode().unwrap(), &sample_limits()).is_err());
    // TDM-MSG-7: request id 0 and batch 0 are invalid.
    for (rid, batch) in [(0u64, 1u16), (1, 0)] {
        let m = Message::InferRequest(InferRequest {
            request_id: rid,
            layer_id: 0,
            batch,
            payload: RequestPayload::Encrypted(samples::encrypted(1, OutputMode::NoKey)),
        });
        assert!(decode_frame(&m.encode().unwrap(), &sample_limits()).is_err());
    }
    // TDM-MSG-9: empty ciphertext list or empty ciphertext.
    for enc in [
        EncryptedBlock {
            ciphertexts: vec![],
            ..samples::encrypted(1, OutputMode::NoKey)
        },
        EncryptedBlock {
            ciphertexts: vec![vec![]],
            ..samples::encrypted(1, OutputMode::NoKey)
        },
    ] {
        let m = Message::InferResponse(InferResponse {
            request_id: 1,
            layer_id: 0,
            cloud_eval_us: Some(7),
            payload: ResponsePayload::Encrypted(enc),
        });
        assert!(decode_frame(&m.encode().unwrap(), &sample_limits()).is_err());
    }
    // TDM-MSG-5: a Packed registration with an empty blob is invalid.
    let m = Message::KeyRegister(KeyRegister {
        key_id: [0; 32],
        param_set: 1,
        output_mode: OutputMode::Packed,
        channel_binding: [0; 32],
        key_blob: vec![],
    });
    assert!(decode_frame(&m.encode().unwrap(), &sample_limits()).is_err());
    // TDM-ERR-2: undefined error codes; TDM-MSG-12: RequestError with NoError.
    assert!(decode_frame(&[1, 8, 0, 0, 0, 2, 0, 13], &sample_limits()).is_err());
    assert!(decode_frame(&[1, 8, 0, 0, 0, 2, 0xff, 0xff], &sample_limits()).is_err());
    let m = Message::RequestError(RequestError {
        request_id: 5,
        code: ErrorCode::NoError,
    });
    assert!(decode_frame(&m.encode().unwrap(), &sample_limits()).is_err());
}

#[test]
fn alpn_and_key_id() {
    // TDM-ALPN-1: the ALPN id is `tandem/1`.
    assert_eq!(ALPN, b"tandem/1");
    // TDM-KEY-2: the key id of a blob is its SHA-256 digest (FIPS 180-2 "abc" vector).
    assert_eq!(key_id_of(b"abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    assert_eq!(samples::key_id(), key_id_of(&samples::key_blob()));
}

#[test]
fn error_codes_round_trip() {
    // TDM-ERR-1: codes are stable wire values 0..=12.
    for (i, c) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(usize::from(c.to_u16()), i);
        assert_eq!(ErrorCode::from_u16(c.to_u16()), Some(*c));
    }
    assert_eq!(ErrorCode::from_u16(13), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    // TDM-MSG-1: every message type round-trips through encode/decode.
    #[test]
    fn prop_round_trip_client_hello(m in arb_client_hello()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_server_hello(m in arb_server_hello()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_key_register(m in arb_key_register()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_key_ack(m in arb_key_ack()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_request(m in arb_request()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_response(m in arb_response()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_request_error(m in arb_request_error()) { round_trip(&m)?; }
    #[test]
    fn prop_round_trip_close(m in arb_close()) { round_trip(&m)?; }

    // TDM-FRAME-7: random prefixes of random messages never decode.
    #[test]
    fn prop_prefix_fails(m in arb_message(), frac in 0.0f64..1.0) {
        let b = m.encode().unwrap();
        let cut = ((b.len() as f64) * frac) as usize;
        prop_assert!(decode_frame(&b[..cut.min(b.len() - 1)], &limits()).is_err());
    }

    // Arbitrary bytes never panic; anything accepted is canonical.
    #[test]
    fn prop_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok((m, used)) = decode_frame(&b, &limits()) {
            prop_assert!(used <= b.len());
            prop_assert_eq!(m.encode().unwrap(), b[..used].to_vec());
        }
    }

    // Mutating one byte of a valid frame never panics; accepted results re-encode identically.
    #[test]
    fn prop_mutation(m in arb_message(), pos in any::<prop::sample::Index>(), x in any::<u8>()) {
        let mut b = m.encode().unwrap();
        let i = pos.index(b.len());
        b[i] ^= x;
        if let Ok((m2, used)) = decode_frame(&b, &limits()) {
            prop_assert_eq!(m2.encode().unwrap(), b[..used].to_vec());
        }
    }
}

fn round_trip(m: &Message) -> Result<(), TestCaseError> {
    let b = m.encode().unwrap();
    let (back, used) = decode_frame_version(&b, &limits(), m.wire_version()).unwrap();
    prop_assert_eq!(&back, m);
    prop_assert_eq!(used, b.len());
    Ok(())
}

fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![1, ty];
    b.extend_from_slice(&(body.len() as u32).to_be_bytes());
    b.extend_from_slice(body);
    b
}

fn code_of(bytes: &[u8], limits: &Limits) -> ErrorCode {
    match decode_frame(bytes, limits) {
        Ok((m, _)) => panic!("decoded {m:?}"),
        Err(e) => e.code(),
    }
}

#[test]
fn truncated_field_inside_complete_frame() {
    // TDM-FRAME-7: a complete frame (length rewritten) whose body is cut anywhere has a short
    // field: always `UnexpectedEnd`, never read past the body, never a limit error.
    let l = samples::limits();
    for (name, m) in samples::messages() {
        let b = m.encode().unwrap();
        for keep in 0..b.len() - 6 {
            let f = frame(b[1], &b[6..6 + keep]);
            let r = decode_as(&m, &f, &l);
            assert!(
                matches!(r, Err(Error::UnexpectedEnd { .. })),
                "{name} body cut to {keep}: {r:?}"
            );
            // With the next frame right behind it, the decoder still does not read into it.
            let mut two = f.clone();
            two.extend_from_slice(&b);
            assert!(matches!(
                decode_as(&m, &two, &l),
                Err(Error::UnexpectedEnd { .. })
            ));
        }
    }
}

#[test]
fn order_of_checks() {
    // TDM-MSG-2, TDM-FRAME-2, TDM-FRAME-3, TDM-FRAME-5: which code wins.
    let l = samples::limits();
    let mal = ErrorCode::MalformedMessage;
    let lim = ErrorCode::LimitExceeded;
    // Header: version, then type, then length; a short header is truncation.
    assert_eq!(code_of(&[2, 5, 0xff, 0xff, 0xff, 0xff], &l), mal);
    assert_eq!(code_of(&[1, 0x42, 0xff, 0xff, 0xff, 0xff], &l), mal);
    assert_eq!(code_of(&[1, 5, 0xff, 0xff, 0xff, 0xff], &l), lim);
    assert_eq!(code_of(&[1, 5, 0xff, 0xff, 0xff], &l), mal);
    // Values count: bound before bytes remaining.
    let mut body = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1];
    let dp = {
        let m = Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch: 1,
            payload: RequestPayload::Noised(NoisedBlock {
                dp: samples::dp_gaussian(),
                values: vec![],
            }),
        });
        let b = m.encode().unwrap();
        b[6 + 15..b.len() - 4].to_vec()
    };
    body.extend_from_slice(&dp);
    let over = [&body[..], &4097u32.to_be_bytes()].concat();
    assert_eq!(code_of(&frame(5, &over), &l), lim);
    let short = [&body[..], &4096u32.to_be_bytes(), &[0; 8][..]].concat();
    assert_eq!(code_of(&frame(5, &short), &l), mal);
    // Ciphertext list: 2 ciphertexts need at least 10 bytes; with 9 left the list is refused
    // before the first (oversized) ciphertext length is read.
    // request id 1, layer 0, cloud_eval_us 0 (version 2, TDM-MSG-14), kind 0.
    let mut enc = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    enc.extend_from_slice(&[0, 1]);
    enc.extend_from_slice(&[0; 32]);
    enc.push(0);
    enc.extend_from_slice(&2u32.to_be_bytes());
    enc.extend_from_slice(&u32::MAX.to_be_bytes());
    enc.extend_from_slice(&[0; 5]);
    assert_eq!(code_of(&frame(6, &enc), &l), mal);
    // With 10 bytes left the oversized length is reached: LimitExceeded.
    enc.push(0);
    assert_eq!(code_of(&frame(6, &enc), &l), lim);
    // First bad field wins: batch over the limit before a bad protection byte, batch 0
    // before an oversized value count.
    let req = |batch: u16, values: Vec<i32>| {
        Message::InferRequest(InferRequest {
            request_id: 1,
            layer_id: 0,
            batch,
            payload: RequestPayload::Noised(NoisedBlock {
                dp: samples::dp_gaussian(),
                values,
            }),
        })
        .encode()
        .unwrap()
    };
    let mut b = req(9, vec![1; 9]);
    b[6 + 14] = 3;
    assert_eq!(code_of(&b, &l), lim);
    assert_eq!(code_of(&req(0, vec![0; 4097]), &l), mal);
    // Fixed bounds are limits; limits-block values are settings (MalformedMessage).
    let mut h = samples::client_hello();
    h.model_id = "m".repeat(65);
    assert_eq!(code_of(&Message::ClientHello(h).encode().unwrap(), &l), lim);
    let mut h = samples::server_hello();
    h.limits.max_frame_len = HARD_MAX_FRAME_LEN + 1;
    assert_eq!(code_of(&Message::ServerHello(h).encode().unwrap(), &l), mal);
}
