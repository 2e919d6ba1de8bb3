//! The rcgen-based generator of the development PKI (feature `dev-pki`); see [`crate::pki`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::{Duration, OffsetDateTime};

use super::{check_device_name, layout};
use crate::config::{ClientCredentials, ServerCredentials};
use crate::identity::{identity_from_certificate, PeerIdentity};
use crate::limits::MAX_DEV_PKI_DEVICES;
use crate::load::{load_certificates, load_crls, load_private_key, to_pem};
use crate::{Error, Result};

/// Names the cloud certificate of the dev PKI is valid for.
pub const CLOUD_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

const CA_VALIDITY: Duration = Duration::days(3650);
const LEAF_VALIDITY: Duration = Duration::days(365);
const CRL_VALIDITY: Duration = Duration::days(90);
/// Backdating of `notBefore`, to tolerate small clock differences between machines.
const BACKDATE: Duration = Duration::hours(1);
const ORGANIZATION: &str = "Tandem development PKI";

/// What kind of device certificate [`DevPki::issue_device`] makes. Everything but
/// [`DeviceCertProfile::Valid`] exists to test that the cloud refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceCertProfile {
    /// A normal device certificate: valid now, EKU clientAuth, keyUsage digitalSignature.
    Valid,
    /// Validity period entirely in the past.
    Expired,
    /// Validity period entirely in the future.
    NotYetValid,
    /// Extended key usage serverAuth only (wrong key usage for a client).
    ServerAuthOnly,
}

/// A certificate issued by the dev PKI, with its private key.
#[derive(Debug)]
pub struct IssuedCert {
    name: String,
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    serial: Vec<u8>,
}

impl IssuedCert {
    /// The name it was issued for (device name, or the first SAN for a cloud certificate).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The certificate (DER).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A copy of the private key (PKCS#8 DER).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The certificate serial number (big-endian, as encoded).
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// The peer identity the other side will compute for this certificate.
    pub fn identity(&self) -> Result<PeerIdentity> {
        identity_from_certificate(&self.cert)
    }

    /// The certificate as PEM.
    pub fn cert_pem(&self) -> String {
        to_pem("CERTIFICATE", &self.cert)
    }

    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        to_pem("PRIVATE KEY", self.key.secret_pkcs8_der())
    }
}

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn generate(common_name: &str, now: OffsetDateTime) -> Result<Self> {
        let key = KeyPair::generate().map_err(Error::generation)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).map_err(Error::generation)?;
        Ok(Ca {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    fn from_parts(cert: CertificateDer<'static>, key: &PrivateKeyDer<'_>) -> Result<Self> {
        let key = KeyPair::try_from(key).map_err(Error::generation)?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(Error::generation)?;
        Ok(Ca { cert, issuer })
    }

    fn key_pem(&self) -> String {
        to_pem("PRIVATE KEY", self.issuer.key().serialized_der())
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A random positive 16-byte serial with a non-zero first byte (so its DER encoding is
/// exactly these 16 bytes).
fn random_serial() -> Result<SerialNumber> {
    let mut buf = [0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut buf)
        .map_err(|_| Error::Random)?;
    buf[0] = (buf[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&buf))
}

fn issue_leaf(
    ca: &Ca,
    name: &str,
    sans: &[&str],
    ekus: Vec<ExtendedKeyUsagePurpose>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedCert> {
    let key = KeyPair::generate().map_err(Error::generation)?;
    let mut params = CertificateParams::new(
        sans.iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<String>>(),
    )
    .map_err(Error::generation)?;
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.not_before = not_before;
    params.not_after = not_after;
    let serial = random_serial()?;
    params.serial_number = Some(serial.clone());
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(Error::generation)?;
    Ok(IssuedCert {
        name: name.to_owned(),
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        serial: serial.to_bytes(),
    })
}

fn sign_crl(
    ca: &Ca,
    revoked: &[RevokedCertParams],
    crl_number: u64,
    now: OffsetDateTime,
) -> Result<CertificateRevocationListDer<'static>> {
    sign_crl_dated(ca, revoked, crl_number, now, now + CRL_VALIDITY)
}

fn sign_crl_dated(
    ca: &Ca,
    revoked: &[RevokedCertParams],
    crl_number: u64,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
) -> Result<CertificateRevocationListDer<'static>> {
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked.to_vec(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer).map_err(Error::generation)?;
    Ok(crl.der().clone())
}

fn revoked_entry(serial: &[u8], now: OffsetDateTime) -> RevokedCertParams {
    RevokedCertParams {
        serial_number: SerialNumber::from_slice(serial),
        revocation_time: now,
        reason_code: Some(RevocationReason::Unspecified),
        invalidity_date: None,
    }
}

/// An in-memory development PKI: two CAs, a cloud certificate for `localhost` and
/// `127.0.0.1`, N device certificates and the device CA's CRL, all as DER.
///
/// Used by tests and by `tandem demo` (a throw-away PKI); [`DevPki::write`] / [`init`] put it
/// on disk.
pub struct DevPki {
    cloud_ca: Ca,
    device_ca: Ca,
    cloud: IssuedCert,
    devices: Vec<IssuedCert>,
    revoked: Vec<RevokedCertParams>,
    crl_number: u64,
    crl: CertificateRevocationListDer<'static>,
}

impl std::fmt::Debug for DevPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevPki")
            .field("devices", &self.devices.len())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

impl DevPki {
    /// Generates a fresh PKI with `devices` device certificates named `device-1` …
    /// (`devices` may be 0; at most [`MAX_DEV_PKI_DEVICES`]).
    pub fn generate(devices: usize) -> Result<Self> {
        if devices > MAX_DEV_PKI_DEVICES {
            return Err(Error::OutOfRange {
                what: "number of devices",
                min: 0,
                max: MAX_DEV_PKI_DEVICES,
                got: devices,
            });
        }
        tracing::warn!(
            devices,
            "generating a DEVELOPMENT PKI (CA private keys kept next to the certificates): \
             for development and tests only, never for production devices"
        );
        let now = OffsetDateTime::now_utc();
        // A random tag in the CA names tells PKIs apart (in logs, and for verifiers, which
        // look issuers up by name).
        let tag = crate::identity::hex(&random_serial()?.to_bytes()[..4]);
        let cloud_ca = Ca::generate(&format!("Tandem cloud CA {tag}"), now)?;
        let device_ca = Ca::generate(&format!("Tandem device CA {tag}"), now)?;
        let cloud = issue_leaf(
            &cloud_ca,
            CLOUD_NAMES[0],
            &CLOUD_NAMES,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            now - BACKDATE,
            now + LEAF_VALIDITY,
        )?;
        let mut pki = DevPki {
            crl: sign_crl(&device_ca, &[], 1, now)?,
            cloud_ca,
            device_ca,
            cloud,
            devices: Vec::with_capacity(devices),
            revoked: Vec::new(),
            crl_number: 1,
        };
        for i in 1..=devices {
            let device = pki.issue_device(&format!("device-{i}"), DeviceCertProfile::Valid)?;
            pki.devices.push(device);
        }
        Ok(pki)
    }

    /// The cloud CA certificate (what devices trust).
    pub fn cloud_ca_cert(&self) -> &CertificateDer<'static> {
        &self.cloud_ca.cert
    }

    /// The device CA certificate (what the cloud trusts).
    pub fn device_ca_cert(&self) -> &CertificateDer<'static> {
        &self.device_ca.cert
    }

    /// The cloud's certificate and key.
    pub fn cloud(&self) -> &IssuedCert {
        &self.cloud
    }

    /// The device certificates, in order `device-1` … `device-N`.
    pub fn devices(&self) -> &[IssuedCert] {
        &self.devices
    }

    /// The device certificate called `name`, if any.
    pub fn device(&self, name: &str) -> Option<&IssuedCert> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The current CRL of the device CA.
    pub fn crl(&self) -> &CertificateRevocationListDer<'static> {
        &self.crl
    }

    /// Signs another CRL of the device CA listing the certificates revoked so far, with the
    /// given CRL number and dates, without changing [`Self::crl`]. For testing the CRL policy
    /// (old, stale, future or equal-numbered CRLs).
    ///
    /// # Errors
    ///
    /// [`Error::Generation`] if rcgen fails.
    pub fn sign_crl_with(
        &self,
        crl_number: u64,
        this_update: std::time::SystemTime,
        next_update: std::time::SystemTime,
    ) -> Result<CertificateRevocationListDer<'static>> {
        sign_crl_dated(
            &self.device_ca,
            &self.revoked,
            crl_number,
            this_update.into(),
            next_update.into(),
        )
    }

    /// Credentials for [`crate::server_config`]: the cloud certificate, the device CA and the
    /// current CRL.
    pub fn server_credentials(&self) -> ServerCredentials {
        ServerCredentials {
            cert_chain: vec![self.cloud.cert.clone()],
            key: self.cloud.key(),
            device_ca: vec![self.device_ca.cert.clone()],
            crls: vec![self.crl.clone()],
        }
    }

    /// Credentials for [`crate::client_config`] for the device called `name`.
    pub fn client_credentials(&self, name: &str) -> Result<ClientCredentials> {
        let device = self.device(name).ok_or_else(|| Error::UnknownDevice {
            name: name.to_owned(),
        })?;
        Ok(self.client_credentials_for(device))
    }

    /// Credentials for [`crate::client_config`] presenting `cert` (e.g. one made by
    /// [`DevPki::issue_device`], or by another PKI) and trusting this PKI's cloud CA.
    pub fn client_credentials_for(&self, cert: &IssuedCert) -> ClientCredentials {
        ClientCredentials {
            cert_chain: vec![cert.cert.clone()],
            key: cert.key(),
            cloud_ca: vec![self.cloud_ca.cert.clone()],
        }
    }

    /// Issues an extra device certificate from the device CA (not added to [`Self::devices`]).
    pub fn issue_device(&self, name: &str, profile: DeviceCertProfile) -> Result<IssuedCert> {
        check_device_name(name)?;
        let now = OffsetDateTime::now_utc();
        let (not_before, not_after) = match profile {
            DeviceCertProfile::Expired => (now - Duration::days(30), now - Duration::days(1)),
            DeviceCertProfile::NotYetValid => (now + Duration::days(1), now + Duration::days(30)),
            DeviceCertProfile::Valid | DeviceCertProfile::ServerAuthOnly => {
                (now - BACKDATE, now + LEAF_VALIDITY)
            }
        };
        let eku = match profile {
            DeviceCertProfile::ServerAuthOnly => ExtendedKeyUsagePurpose::ServerAuth,
            _ => ExtendedKeyUsagePurpose::ClientAuth,
        };
        issue_leaf(&self.device_ca, name, &[], vec![eku], not_before, not_after)
    }

    /// Issues an extra cloud certificate from the cloud CA for the given names (DNS names or
    /// IP addresses), e.g. one for the wrong name.
    pub fn issue_cloud(&self, names: &[&str]) -> Result<IssuedCert> {
        let now = OffsetDateTime::now_utc();
        let first = names.first().copied().unwrap_or("cloud");
        issue_leaf(
            &self.cloud_ca,
            first,
            names,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            now - BACKDATE,
            now + LEAF_VALIDITY,
        )
    }

    /// Revokes a certificate issued by the device CA (by serial) and re-signs the CRL.
    /// Revoking twice is harmless.
    pub fn revoke(&mut self, cert: &IssuedCert) -> Result<()> {
        let serial = cert.serial.clone();
        self.revoke_serial(&serial)
    }

    /// Revokes the device called `name` (see [`DevPki::revoke`]).
    pub fn revoke_device(&mut self, name: &str) -> Result<()> {
        let serial =
            self.device(name)
                .map(|d| d.serial.clone())
                .ok_or_else(|| Error::UnknownDevice {
                    name: name.to_owned(),
                })?;
        self.revoke_serial(&serial)
    }

    fn revoke_serial(&mut self, serial: &[u8]) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        if !self
            .revoked
            .iter()
            .any(|r| r.serial_number.as_ref() == serial)
        {
            self.revoked.push(revoked_entry(serial, now));
        }
        self.crl_number = self.crl_number.saturating_add(1);
        self.crl = sign_crl(&self.device_ca, &self.revoked, self.crl_number, now)?;
        Ok(())
    }

    /// Writes the PKI to `dir` in the layout of the module documentation. Creates `dir` if
    /// needed; refuses ([`Error::PkiExists`]) if any of the files already exists.
    pub fn write(&self, dir: &Path) -> Result<PkiSummary> {
        let devices_dir = dir.join(layout::DEVICES_DIR);
        fs::create_dir_all(&devices_dir).map_err(|e| Error::io(&devices_dir, e))?;

        let mut files: Vec<(PathBuf, String, bool)> = vec![
            (
                dir.join(layout::CLOUD_CA_CERT),
                to_pem("CERTIFICATE", &self.cloud_ca.cert),
                false,
            ),
            (
                dir.join(layout::CLOUD_CA_KEY),
                self.cloud_ca.key_pem(),
                true,
            ),
            (
                dir.join(layout::DEVICE_CA_CERT),
                to_pem("CERTIFICATE", &self.device_ca.cert),
                false,
            ),
            (
                dir.join(layout::DEVICE_CA_KEY),
                self.device_ca.key_pem(),
                true,
            ),
            (
                dir.join(layout::DEVICE_CA_CRL),
                to_pem("X509 CRL", &self.crl),
                false,
            ),
            (dir.join(layout::CLOUD_CERT), self.cloud.cert_pem(), false),
            (dir.join(layout::CLOUD_KEY), self.cloud.key_pem(), true),
        ];
        let mut devices = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            let cert = layout::device_cert(dir, &d.name);
            let key = layout::device_key(dir, &d.name);
            files.push((cert.clone(), d.cert_pem(), false));
            files.push((key.clone(), d.key_pem(), true));
            devices.push(DeviceSummary {
                name: d.name.clone(),
                cert,
                key,
                identity: d.identity()?,
            });
        }
        if let Some((existing, _, _)) = files.iter().find(|(p, _, _)| p.exists()) {
            return Err(Error::PkiExists {
                path: existing.clone(),
            });
        }
        for (path, contents, secret) in &files {
            write_new(path, contents.as_bytes(), *secret)?;
        }
        Ok(PkiSummary {
            dir: dir.to_path_buf(),
            cloud_ca_cert: dir.join(layout::CLOUD_CA_CERT),
            device_ca_cert: dir.join(layout::DEVICE_CA_CERT),
            crl: dir.join(layout::DEVICE_CA_CRL),
            cloud_cert: dir.join(layout::CLOUD_CERT),
            cloud_key: dir.join(layout::CLOUD_KEY),
            cloud_names: CLOUD_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            devices,
        })
    }
}

/// Creates a new file (failing if it exists); private keys get mode 0600 on Unix.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Error::PkiExists {
            path: path.to_path_buf(),
        },
        _ => Error::io(path, e),
    })?;
    f.write_all(contents).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Replaces a file atomically (temporary file in the same directory, then rename).
fn replace_file(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, false)?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// One device written by [`init`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceSummary {
    /// Device name (`device-1` …).
    pub name: String,
    /// Path of its certificate.
    pub cert: PathBuf,
    /// Path of its private key.
    pub key: PathBuf,
    /// The identity the cloud will see for it.
    pub identity: PeerIdentity,
}

/// What [`init`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PkiSummary {
    /// The PKI directory.
    pub dir: PathBuf,
    /// Cloud CA certificate (give to devices).
    pub cloud_ca_cert: PathBuf,
    /// Device CA certificate (give to the cloud).
    pub device_ca_cert: PathBuf,
    /// The device CA's CRL (give to the cloud).
    pub crl: PathBuf,
    /// Cloud certificate.
    pub cloud_cert: PathBuf,
    /// Cloud private key.
    pub cloud_key: PathBuf,
    /// Names the cloud certificate is valid for.
    pub cloud_names: Vec<String>,
    /// The device certificates written.
    pub devices: Vec<DeviceSummary>,
}

/// `tandem pki init <dir> --devices N`: generates a fresh dev PKI (two CAs, a cloud
/// certificate for `localhost` and `127.0.0.1`, `devices` device certificates named
/// `device-1` … and an empty CRL) and writes it to `dir` as PEM files (layout in the module
/// documentation). Refuses to overwrite an existing PKI.
pub fn init(dir: &Path, devices: usize) -> Result<PkiSummary> {
    DevPki::generate(devices)?.write(dir)
}

/// `tandem pki revoke <dir> <device>`: adds the serial of `<dir>/devices/<device>.crt` to the
/// device CA's CRL, re-signs it with the device CA key and replaces `<dir>/device-ca.crl`.
///
/// Keeps every serial revoked before and increments the CRL number. Revoking a device twice
/// is harmless. Fails with [`Error::UnknownDevice`] if the device's certificate does not
/// exist, with [`Error::FileNotFound`] if the CRL is missing (never starts an empty one, which
/// would un-revoke earlier devices), and with [`Error::InvalidCertificate`] if it was not issued by this device CA. A
/// cloud picks the new CRL up when it next builds its server configuration.
pub fn revoke(dir: &Path, device: &str) -> Result<()> {
    check_device_name(device)?;
    let cert_path = layout::device_cert(dir, device);
    let device_cert = match load_certificates(&cert_path) {
        Ok(mut certs) => certs.swap_remove(0),
        Err(Error::FileNotFound { .. }) => {
            return Err(Error::UnknownDevice {
                name: device.to_owned(),
            })
        }
        Err(e) => return Err(e),
    };
    let ca_path = dir.join(layout::DEVICE_CA_CERT);
    let ca_cert = load_certificates(&ca_path)?.swap_remove(0);
    let ca_key = load_private_key(&dir.join(layout::DEVICE_CA_KEY))?;
    let ca = Ca::from_parts(ca_cert, &ca_key)?;

    let serial = {
        let (_, dev) = x509_parser::parse_x509_certificate(device_cert.as_ref())
            .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
        let (_, ca_parsed) = x509_parser::parse_x509_certificate(ca.cert.as_ref())
            .map_err(|e| Error::InvalidCertificate(e.to_string()))?;
        if dev.issuer().as_raw() != ca_parsed.subject().as_raw() {
            return Err(Error::InvalidCertificate(format!(
                "{} was not issued by the device CA",
                cert_path.display()
            )));
        }
        dev.raw_serial().to_vec()
    };

    tracing::warn!(
        device,
        dir = %dir.display(),
        "re-signing the CRL with a DEVELOPMENT device CA key (development and tests only)"
    );
    let now = OffsetDateTime::now_utc();
    let crl_path = dir.join(layout::DEVICE_CA_CRL);
    // A missing CRL is an error, not an empty list: starting afresh would silently un-revoke.
    let mut revoked = Vec::new();
    let mut previous_number = 0u64;
    for (i, crl) in load_crls(&crl_path)?.iter().enumerate() {
        let (n, entries) = parse_crl(&crl_path, i + 1, crl)?;
        previous_number = previous_number.max(n);
        revoked.extend(entries);
    }
    if !revoked
        .iter()
        .any(|r: &RevokedCertParams| r.serial_number.as_ref() == serial.as_slice())
    {
        revoked.push(revoked_entry(&serial, now));
    }
    let crl = sign_crl(&ca, &revoked, previous_number.saturating_add(1), now)?;
    replace_file(&crl_path, to_pem("X509 CRL", &crl).as_bytes())
}

/// Reads the CRL number and the revoked entries of CRL number `index` (from 1) of the file
/// `path` (untrusted input: typed errors naming the file).
fn parse_crl(
    path: &Path,
    index: usize,
    crl: &CertificateRevocationListDer<'_>,
) -> Result<(u64, Vec<RevokedCertParams>)> {
    let invalid = |reason: String| Error::InvalidCrl {
        path: path.to_path_buf(),
        index,
        reason,
    };
    let (_, parsed) =
        x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| invalid(e.to_string()))?;
    let number = match parsed.crl_number() {
        Some(n) => {
            let bytes = n.to_bytes_be();
            if bytes.len() > 8 {
                return Err(invalid("CRL number longer than 8 bytes".into()));
            }
            bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }
        None => 0,
    };
    let mut entries = Vec::new();
    for r in parsed.iter_revoked_certificates() {
        let time = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
            .map_err(|e| invalid(e.to_string()))?;
        entries.push(revoked_entry(r.raw_serial(), time));
    }
    Ok((number, entries))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        for ok in ["device-1", "a", "A_b-9", &"x".repeat(64)] {
            assert!(check_device_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../cloud", "a/b", "a.b", "dév", "a b", &"x".repeat(65)] {
            assert!(
                matches!(check_device_name(bad), Err(Error::InvalidDeviceName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn serials_are_positive_16_bytes() {
        for _ in 0..64 {
            let s = random_serial().unwrap().to_bytes();
            assert_eq!(s.len(), 16);
            assert!(s[0] >= 0x40 && s[0] < 0x80);
        }
    }

    #[test]
    fn generate_and_revoke_in_memory() {
        let mut pki = DevPki::generate(2).unwrap();
        assert_eq!(pki.devices().len(), 2);
        assert_eq!(pki.devices()[1].name(), "device-2");
        let (n, entries) = parse_crl(Path::new("mem"), 1, pki.crl()).unwrap();
        assert_eq!((n, entries.len()), (1, 0));
        pki.revoke_device("device-2").unwrap();
        pki.revoke_device("device-2").unwrap();
        let (n, entries) = parse_crl(Path::new("mem"), 1, pki.crl()).unwrap();
        assert_eq!((n, entries.len()), (3, 1));
        assert_eq!(entries[0].serial_number.as_ref(), pki.devices()[1].serial());
        let extra = pki.issue_device("extra", DeviceCertProfile::Valid).unwrap();
        pki.revoke(&extra).unwrap();
        let (n, entries) = parse_crl(Path::new("mem"), 1, pki.crl()).unwrap();
        assert_eq!((n, entries.len()), (4, 2));
        assert_eq!(entries[1].serial_number.as_ref(), extra.serial());
        assert!(matches!(
            pki.revoke_device("device-9"),
            Err(Error::UnknownDevice { .. })
        ));
        assert!(matches!(
            DevPki::generate(MAX_DEV_PKI_DEVICES + 1),
            Err(Error::OutOfRange { .. })
        ));
    }

    #[test]
    fn identity_survives_reissue_with_the_same_key_but_not_a_new_key() {
        let pki = DevPki::generate(0).unwrap();
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().unwrap();
        let issue = |cn: &str, days: i64, key: &KeyPair| {
            let mut p = CertificateParams::default();
            p.distinguished_name = dn(cn);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.not_before = now - BACKDATE;
            p.not_after = now + Duration::days(days);
            p.serial_number = Some(random_serial().unwrap());
            let c = p.signed_by(key, &pki.device_ca.issuer).unwrap();
            identity_from_certificate(c.der()).unwrap()
        };
        let first = issue("device-a", 30, &key);
        let renewed = issue("device-a-renamed", 365, &key);
        assert_eq!(first.id(), renewed.id());
        assert_ne!(first.common_name(), renewed.common_name());
        let rekeyed = issue("device-a", 30, &KeyPair::generate().unwrap());
        assert_ne!(first.id(), rekeyed.id());
        // The id is SHA-256 of the SubjectPublicKeyInfo DER.
        use rcgen::PublicKeyData;
        use sha2::Digest;
        let expected: [u8; 32] = sha2::Sha256::digest(key.subject_public_key_info()).into();
        assert_eq!(first.id(), expected);
    }

    #[test]
    fn a_forged_crl_with_a_higher_number_cannot_displace_the_real_one() {
        // Same issuer name as the device CA, another key: refused before selection, so its
        // huge CRL number cannot un-revoke anything.
        let mut pki = DevPki::generate(1).unwrap();
        pki.revoke_device("device-1").unwrap();
        let now = OffsetDateTime::now_utc();
        let subject = x509_parser::parse_x509_certificate(pki.device_ca_cert().as_ref())
            .unwrap()
            .1
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        let forger = Ca::generate(&subject, now).unwrap();
        let forged = sign_crl(&forger, &[], u64::MAX, now).unwrap();
        let crls = vec![
            (PathBuf::from("device-ca.crl"), pki.crl().clone()),
            (PathBuf::from("device-ca.crl"), forged),
        ];
        let r = crate::effective_crls(
            &crls,
            &[pki.device_ca_cert().clone()],
            std::time::SystemTime::now(),
        );
        assert!(matches!(r, Err(Error::CrlBadSignature { .. })), "{r:?}");
        let r = crate::effective_crls(&crls[..1], &[pki.device_ca_cert().clone()], now.into());
        assert_eq!(r.unwrap(), vec![pki.crl().clone()]);
    }

    #[test]
    fn distinct_devices_have_distinct_identities() {
        let pki = DevPki::generate(3).unwrap();
        let ids: std::collections::HashSet<_> = pki
            .devices()
            .iter()
            .map(|d| d.identity().unwrap().id())
            .collect();
        assert_eq!(ids.len(), 3);
        assert_eq!(
            pki.devices()[0].identity().unwrap().common_name(),
            Some("device-1")
        );
    }
}
