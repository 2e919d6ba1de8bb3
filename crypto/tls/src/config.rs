//! rustls configurations for the cloud (server) and the device (client).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};

use crate::crl::effective_crls;
use crate::load::{load_certificates, load_crls, load_private_key};
use crate::pki::layout;
use crate::{Error, Result, ALPN_TANDEM_V1};

/// The crypto provider every Tandem TLS configuration uses: rustls' **ring** provider (never
/// aws-lc-rs), passed explicitly rather than through a process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the cloud needs to accept devices.
#[derive(Debug)]
pub struct ServerCredentials {
    /// The cloud's certificate chain, end-entity first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of the end-entity certificate.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for client certificates: the device CA (one or more certificates).
    pub device_ca: Vec<CertificateDer<'static>>,
    /// CRLs issued by the device CA, in any order and number: [`server_config`] keeps the
    /// newest per issuer ([`crate::effective_crls`]). Empty means no revocation checking.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

/// What a device needs to connect to the cloud.
#[derive(Debug)]
pub struct ClientCredentials {
    /// The device's certificate chain, end-entity first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of the device certificate.
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors for the cloud's certificate: the cloud CA.
    pub cloud_ca: Vec<CertificateDer<'static>>,
}

/// PEM file paths for [`ServerCredentials`] (e.g. from `cloud.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// Cloud certificate chain (PEM, end-entity first).
    pub cert: PathBuf,
    /// Cloud private key (PEM).
    pub key: PathBuf,
    /// Device CA certificate(s) (PEM).
    pub device_ca: PathBuf,
    /// Device CA CRL file(s) (PEM `X509 CRL`), each holding one or more CRLs in any order;
    /// the newest CRL of each device CA is used. Empty: no revocation checking.
    pub crls: Vec<PathBuf>,
}

impl ServerFiles {
    /// The files written by [`crate::pki::init`] in `dir`.
    pub fn from_pki_dir(dir: &Path) -> Self {
        ServerFiles {
            cert: dir.join(layout::CLOUD_CERT),
            key: dir.join(layout::CLOUD_KEY),
            device_ca: dir.join(layout::DEVICE_CA_CERT),
            crls: vec![dir.join(layout::DEVICE_CA_CRL)],
        }
    }

    /// Loads and parses every file, and reduces the CRLs to the newest one per device CA
    /// after checking their issuer, signature and dates ([`crate::effective_crls`]).
    ///
    /// # Errors
    ///
    /// Typed errors naming the file at fault: see [`load_certificates`],
    /// [`load_private_key`], [`load_crls`] and [`crate::effective_crls`].
    pub fn load(&self) -> Result<ServerCredentials> {
        let device_ca = load_certificates(&self.device_ca)?;
        let mut crls = Vec::new();
        for path in &self.crls {
            crls.extend(load_crls(path)?.into_iter().map(|c| (path.clone(), c)));
        }
        let crls = effective_crls(&crls, &device_ca, SystemTime::now())?;
        Ok(ServerCredentials {
            cert_chain: load_certificates(&self.cert)?,
            key: load_private_key(&self.key)?,
            device_ca,
            crls,
        })
    }
}

/// PEM file paths for [`ClientCredentials`] (e.g. from `device.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// Device certificate chain (PEM, end-entity first).
    pub cert: PathBuf,
    /// Device private key (PEM).
    pub key: PathBuf,
    /// Cloud CA certificate(s) (PEM).
    pub cloud_ca: PathBuf,
}

impl ClientFiles {
    /// The files written by [`crate::pki::init`] in `dir` for the device called `device`.
    pub fn from_pki_dir(dir: &Path, device: &str) -> Result<Self> {
        crate::pki::check_device_name(device)?;
        Ok(ClientFiles {
            cert: layout::device_cert(dir, device),
            key: layout::device_key(dir, device),
            cloud_ca: dir.join(layout::CLOUD_CA_CERT),
        })
    }

    /// Loads and parses every file.
    pub fn load(&self) -> Result<ClientCredentials> {
        Ok(ClientCredentials {
            cert_chain: load_certificates(&self.cert)?,
            key: load_private_key(&self.key)?,
            cloud_ca: load_certificates(&self.cloud_ca)?,
        })
    }
}

fn root_store(cas: &[CertificateDer<'static>]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone())
            .map_err(|e| Error::InvalidCertificate(format!("unusable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Serves the cloud certificate only to clients that offer ALPN `tandem/1`, so that a client
/// without it fails *inside* the handshake (TDM-ALPN-1). rustls itself refuses clients that
/// offer only other protocols, but would accept a client that offers no ALPN at all.
#[derive(Debug)]
struct AlpnEnforcingResolver {
    key: Arc<CertifiedKey>,
}

impl ResolvesServerCert for AlpnEnforcingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offers_tandem = client_hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_TANDEM_V1));
        offers_tandem.then(|| Arc::clone(&self.key))
    }
}

/// Builds the cloud's rustls [`ServerConfig`].
///
/// - ring provider ([`provider`]), TLS 1.3 only;
/// - client certificate **required**, verified by `WebPkiClientVerifier` against
///   `device_ca`, with the newest CRL of each device CA among `crls` (chosen and checked by
///   [`crate::effective_crls`]: issuer, signature, `thisUpdate` not in the future, `nextUpdate`
///   not passed); the whole chain is checked; a certificate whose revocation status is
///   unknown is refused; `nextUpdate` is enforced at every handshake, so once the CRL expires
///   every device is refused until a fresh CRL is loaded; validity period and the clientAuth
///   extended key usage are checked by webpki;
/// - ALPN `tandem/1`; a client that does not offer it fails in the handshake;
/// - no session resumption (no tickets, no session cache): every connection runs full
///   certificate verification against the current CRL and clock;
/// - no 0-RTT data.
///
/// # Errors
///
/// Fails if the cloud key does not match its certificate, a CA is unusable or the CRLs break
/// the policy of [`crate::effective_crls`] (in-memory CRLs are named
/// `ServerCredentials.crls[i]` in errors).
pub fn server_config(creds: ServerCredentials) -> Result<Arc<ServerConfig>> {
    let provider = provider();
    let roots = Arc::new(root_store(&creds.device_ca)?);
    let labelled: Vec<(PathBuf, CertificateRevocationListDer<'static>)> = creds
        .crls
        .into_iter()
        .enumerate()
        .map(|(i, c)| (PathBuf::from(format!("ServerCredentials.crls[{i}]")), c))
        .collect();
    let crls = effective_crls(&labelled, &creds.device_ca, SystemTime::now())?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider));
    if !crls.is_empty() {
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    let verifier: Arc<dyn ClientCertVerifier> = builder.build()?;

    let signing_key = provider.key_provider.load_private_key(creds.key)?;
    let certified = CertifiedKey::new(creds.cert_chain, signing_key);
    certified.keys_match()?;

    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(AlpnEnforcingResolver {
            key: Arc::new(certified),
        }));
    config.alpn_protocols = vec![ALPN_TANDEM_V1.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Loads the files and builds the cloud's [`ServerConfig`] (see [`server_config`]).
pub fn server_config_from_files(files: &ServerFiles) -> Result<Arc<ServerConfig>> {
    server_config(files.load()?)
}

/// Builds the device's rustls [`ClientConfig`]: ring provider, TLS 1.3 only, the cloud
/// verified against `cloud_ca` (and, at connect time, against the [`ServerName`] passed to
/// `ClientConnection::new` — see [`server_name`]), the device certificate presented, ALPN
/// `tandem/1`, no 0-RTT.
///
/// Fails if the device key does not match its certificate or a CA is unusable.
pub fn client_config(creds: ClientCredentials) -> Result<Arc<ClientConfig>> {
    let roots = root_store(&creds.cloud_ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(creds.cert_chain, creds.key)?;
    config.alpn_protocols = vec![ALPN_TANDEM_V1.to_vec()];
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// Loads the files and builds the device's [`ClientConfig`] (see [`client_config`]).
pub fn client_config_from_files(files: &ClientFiles) -> Result<Arc<ClientConfig>> {
    client_config(files.load()?)
}

/// Parses the cloud's name as the device will check it: a DNS name (`localhost`) or an IP
/// address (`127.0.0.1`). The cloud certificate must carry it as a subjectAltName.
pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).map_err(|_| Error::InvalidServerName {
        name: name.to_owned(),
    })
}
