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

/// Why `miniapp-gateway certs` did not write a full set.
#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    /// Files it would write already exist and `--force` was not given; nothing was written.
    #[error(
        "refusing to overwrite {}; nothing was written. Every run makes a new CA, and overwriting \
         the CA invalidates every certificate it signed (clients and the gateway would have to be \
         given the new ones): pass --force to replace them",
        list_paths(.0)
    )]
    Exists(Vec<PathBuf>),
    /// A certificate could not be made or a file could not be written.
    #[error("{0}")]
    Failed(String),
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Write a development CA, a gateway certificate for `hosts` (plus localhost, 127.0.0.1, ::1)
/// and one client certificate per app into `dir`, all PEM.
///
/// Existing files are never touched unless `force` is set: every run makes a new CA, so a
/// second run would silently invalidate every certificate the first one signed. Every target
/// is checked before anything is written. With `force`, each file is written to a temporary
/// file in `dir` and renamed over its target, so a reader never sees half a key and a symlink
/// planted at a target is replaced, not written through. Keys are created owner-only (`0600`)
/// from the first byte, whatever mode a file they replace had.
pub fn write_dev_certs(
    dir: &Path,
    hosts: &[String],
    apps: &[(String, Option<Channel>)],
    force: bool,
) -> Result<DevCerts, DevCertsError> {
    let failed = DevCertsError::Failed;
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
    let err = |e: rcgen::Error| failed(format!("cannot make a certificate: {e}"));

    let mut stems: Vec<(String, &String, &Option<Channel>)> = Vec::new();
    for (app, channel) in apps {
        let stem = match channel {
            Some(channel) => format!("{app}-{channel}"),
            None => app.clone(),
        };
        if !stems.iter().any(|(seen, _, _)| *seen == stem) {
            stems.push((stem, app, channel));
        }
    }
    let mut targets =
        vec!["ca.crt".to_owned(), "ca.key".to_owned(), "gateway.crt".to_owned(), "gateway.key".to_owned()];
    for (stem, _, _) in &stems {
        targets.push(format!("{stem}.crt"));
        targets.push(format!("{stem}.key"));
    }
    if !force {
        let mut existing = Vec::new();
        for file in &targets {
            let path = dir.join(file);
            // `symlink_metadata`: a dangling symlink is an existing entry too.
            match std::fs::symlink_metadata(&path) {
                Ok(_) => existing.push(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(format!("cannot look at {}: {e}", path.display()))),
            }
        }
        if !existing.is_empty() {
            return Err(DevCertsError::Exists(existing));
        }
    }

    // Make everything first, so that a failure leaves no partial set behind.
    let mut pems: Vec<String> = Vec::with_capacity(targets.len());
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.distinguished_name = name("miniapp-gateway development CA");
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;
    pems.push(ca.pem());
    pems.push(ca_key_pem);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(hosts.iter().cloned());
    let mut gateway = CertificateParams::new(names).map_err(err)?;
    gateway.distinguished_name = name("miniapp-gateway");
    gateway.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(err)?;
    let cert = gateway.signed_by(&key, &ca).map_err(err)?;
    pems.push(cert.pem());
    pems.push(key.serialize_pem());

    for (_, app, channel) in &stems {
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
        pems.push(cert.pem());
        pems.push(key.serialize_pem());
    }

    let mut files = Vec::with_capacity(targets.len());
    for (file, pem) in targets.iter().zip(&pems) {
        let secret = file.ends_with(".key");
        let path = if force { replace(dir, file, pem, secret) } else { create(dir, file, pem, secret) };
        files.push(path.map_err(failed)?);
    }
    if force {
        // The renames are durable once the directory is.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| failed(format!("cannot sync {}: {e}", dir.display())))?;
    }
    Ok(DevCerts { files })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// A new file that must not exist yet: `O_CREAT | O_EXCL | O_NOFOLLOW`, so neither an existing
/// file nor a symlink (dangling or not) at `path` is ever opened. Keys get `0600` at creation
/// (the umask can only narrow it), certificates `0644`.
fn create_new(path: &Path, secret: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn write_synced(mut out: std::fs::File, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    out.write_all(pem.as_bytes())?;
    out.sync_all()
}

/// Write `dir/file`, which must not exist.
fn create(dir: &Path, file: &str, pem: &str, secret: bool) -> Result<PathBuf, String> {
    let path = dir.join(file);
    create_new(&path, secret)
        .and_then(|out| write_synced(out, pem))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Replace `dir/file` atomically: a fresh temporary file beside it, synced, renamed over it.
/// `rename` replaces whatever entry is at the target (a symlink included) without following it.
fn replace(dir: &Path, file: &str, pem: &str, secret: bool) -> Result<PathBuf, String> {
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
    let out = create_new(&tmp, secret).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    if let Err(e) = write_synced(out, pem).and_then(|()| std::fs::rename(&tmp, &path)) {
        // Only a temporary file this call created is removed.
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
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
        let written = write_dev_certs(dir.path(), &["gw.internal".into()], &apps, false).unwrap();
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
