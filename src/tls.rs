//! TLS on the gateway's own listeners: the server config, the identity a verified client
//! certificate carries, and development certificates (`miniapp-gateway certs`).
//!
//! A client certificate names an app by a URI SAN `miniapp://APPID` (or
//! `miniapp://APPID/webview`, which also fixes the channel), or else by its subject CN. Only a
//! certificate that chains to `[tls].client_ca` is ever looked at: rustls verifies it during
//! the handshake and refuses the handshake otherwise.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::TlsSettings;
use crate::policy::{Channel, is_valid_app_id};

/// The URI scheme of an app identity in a client certificate.
pub const IDENTITY_SCHEME: &str = "miniapp://";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which part of `[tls]` a loading error concerns (so `check` can point at its line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// Build the server config for TLS listeners: TLS 1.2 and 1.3 with rustls' modern suites,
/// HTTP/1.1 only, and client certificates requested (never required) when `client_ca` is set.
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsSettings, (TlsFile, String)> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| (TlsFile::Cert, format!("cannot read certificates from {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err((TlsFile::Cert, format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| (TlsFile::Key, format!("cannot read a private key from {}: {e}", key.display())))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| (TlsFile::Cert, e.to_string()))?;
    let client_verifier = match client_ca {
        None => None,
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| (TlsFile::ClientCa, format!("cannot read certificates from {}: {e}", ca.display())))?;
            for cert in certs {
                roots.add(cert).map_err(|e| (TlsFile::ClientCa, format!("{}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| (TlsFile::ClientCa, format!("{}: {e}", ca.display())))?;
            Some(verifier)
        }
    };
    let builder = match &client_verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| (TlsFile::Key, format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSettings { server: Arc::new(config), client_verifier })
}

/// Whether a client certificate chain (end entity first) still verifies under `settings`:
/// what a reload asks of the connections that presented one under an older `client_ca`.
pub fn client_chain_verifies(settings: Option<&TlsSettings>, chain: &[CertificateDer<'static>]) -> bool {
    let Some(verifier) = settings.and_then(|tls| tls.client_verifier.as_ref()) else { return false };
    let Some((end_entity, intermediates)) = chain.split_first() else { return false };
    verifier.verify_client_cert(end_entity, intermediates, rustls_pki_types::UnixTime::now()).is_ok()
}

/// The app (and, for `miniapp://APPID/webview`, the channel) a verified client certificate
/// names; `None` when it names none.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<(String, Option<Channel>)> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(identity) = parse_identity_uri(uri)
            {
                return Some(identity);
            }
        }
    }
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    is_valid_app_id(cn).then(|| (cn.to_owned(), None))
}

/// `miniapp://APPID` or `miniapp://APPID/webview` (or `/request`).
fn parse_identity_uri(uri: &str) -> Option<(String, Option<Channel>)> {
    let rest = uri.strip_prefix(IDENTITY_SCHEME)?;
    let (app, channel) = match rest.split_once('/') {
        None | Some((_, "")) => (rest.trim_end_matches('/'), None),
        Some((app, channel)) => (app, Some(Channel::parse(channel)?)),
    };
    is_valid_app_id(app).then(|| (app.to_owned(), channel))
}

/// What `miniapp-gateway certs` wrote.
#[derive(Debug)]
pub struct DevCerts {
    pub files: Vec<PathBuf>,
}

/// Write a development CA, a gateway certificate for `hosts` (plus localhost, 127.0.0.1, ::1)
/// and one client certificate per app into `dir`, all PEM. Keys are written owner-only.
pub fn write_dev_certs(dir: &Path, hosts: &[String], apps: &[(String, Option<Channel>)]) -> Result<DevCerts, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let err = |e: rcgen::Error| format!("cannot make a certificate: {e}");
    let mut files = Vec::new();

    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.distinguished_name = name("miniapp-gateway development CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    files.push(write(dir, "ca.crt", &ca.pem(), false)?);
    files.push(write(dir, "ca.key", &ca_key_pem, true)?);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(hosts.iter().cloned());
    let mut gateway = CertificateParams::new(names).map_err(err)?;
    gateway.distinguished_name = name("miniapp-gateway");
    gateway.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(err)?;
    let cert = gateway.signed_by(&key, &ca).map_err(err)?;
    files.push(write(dir, "gateway.crt", &cert.pem(), false)?);
    files.push(write(dir, "gateway.key", &key.serialize_pem(), true)?);

    for (app, channel) in apps {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(app);
        let uri = match channel {
            Some(channel) => format!("{IDENTITY_SCHEME}{app}/{channel}"),
            None => format!("{IDENTITY_SCHEME}{app}"),
        };
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(err)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &ca).map_err(err)?;
        let stem = match channel {
            Some(channel) => format!("{app}-{channel}"),
            None => app.clone(),
        };
        files.push(write(dir, &format!("{stem}.crt"), &cert.pem(), false)?);
        files.push(write(dir, &format!("{stem}.key"), &key.serialize_pem(), true)?);
    }
    Ok(DevCerts { files })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn write(dir: &Path, file: &str, pem: &str, secret: bool) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    let mode = if secret { 0o600 } else { 0o644 };
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    out.write_all(pem.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris() {
        assert_eq!(parse_identity_uri("miniapp://demo"), Some(("demo".into(), None)));
        assert_eq!(parse_identity_uri("miniapp://demo/"), Some(("demo".into(), None)));
        assert_eq!(parse_identity_uri("miniapp://demo/webview"), Some(("demo".into(), Some(Channel::Webview))));
        assert_eq!(parse_identity_uri("miniapp://demo/request"), Some(("demo".into(), Some(Channel::Request))));
        assert_eq!(parse_identity_uri("miniapp://demo/sockets"), None);
        assert_eq!(parse_identity_uri("miniapp://"), None);
        assert_eq!(parse_identity_uri("https://demo"), None);
    }

    #[test]
    fn without_an_identity_uri_the_common_name_names_the_app() {
        let mut params = CertificateParams::default();
        params.distinguished_name = name("cn-app");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_identity(cert.der()), Some(("cn-app".into(), None)));
        params.subject_alt_names = vec![SanType::URI("https://elsewhere.example".try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(certificate_identity(cert.der()), Some(("cn-app".into(), None)), "other URIs are not identities");
    }

    #[test]
    fn dev_certs_carry_the_app_identity_and_load_as_a_server_config() {
        let dir = tempfile::tempdir().unwrap();
        let apps = [("demo".to_owned(), None), ("demo".to_owned(), Some(Channel::Webview))];
        let written = write_dev_certs(dir.path(), &["gw.internal".into()], &apps).unwrap();
        assert_eq!(written.files.len(), 8);
        let read = |file: &str| CertificateDer::from_pem_file(dir.path().join(file)).unwrap();
        assert_eq!(certificate_identity(&read("demo.crt")), Some(("demo".into(), None)));
        assert_eq!(certificate_identity(&read("demo-webview.crt")), Some(("demo".into(), Some(Channel::Webview))));
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let config = server_config(
            &dir.path().join("gateway.crt"),
            &dir.path().join("gateway.key"),
            Some(&dir.path().join("ca.crt")),
        );
        assert!(config.is_ok());
        let missing = server_config(&dir.path().join("nope.crt"), &dir.path().join("gateway.key"), None);
        assert_eq!(missing.err().map(|(file, _)| file), Some(TlsFile::Cert));
        let mismatched = server_config(&dir.path().join("gateway.crt"), &dir.path().join("demo.key"), None);
        assert_eq!(mismatched.err().map(|(file, _)| file), Some(TlsFile::Key));
    }
}
