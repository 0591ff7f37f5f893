//! TLS to PostgreSQL, with libpq's `sslmode` meanings so that the URL a user already has for
//! a managed server (`?sslmode=require`, `?sslmode=verify-full&sslrootcert=ca.pem`) works
//! as it does for `psql`:
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | only when `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | always | chains to `sslrootcert` (or the system's roots) |
//! | `verify-full` | always | as `verify-ca`, and names the host of the URL |
//!
//! TLS is rustls with the aws-lc-rs provider, the one the S3 client uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::MetaError;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Chain,
    Full,
}

/// The TLS part of a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsParams {
    mode: &'static str,
    root_cert: Option<PathBuf>,
}

impl Default for TlsParams {
    fn default() -> Self {
        TlsParams {
            mode: "prefer",
            root_cert: None,
        }
    }
}

impl TlsParams {
    /// Take `sslmode` / `sslrootcert` from one `key=value` URL parameter; `Ok(false)` when it
    /// is another parameter.
    pub(super) fn take(&mut self, key: &str, value: &str) -> Result<bool, MetaError> {
        match key {
            "sslmode" => {
                self.mode = match value {
                    "disable" => "disable",
                    "prefer" | "allow" => "prefer",
                    "require" => "require",
                    "verify-ca" => "verify-ca",
                    "verify-full" => "verify-full",
                    _ => {
                        return Err(MetaError::Format(format!(
                            "metadata URL parameter sslmode={value}: use disable, prefer, require, verify-ca or verify-full"
                        )));
                    }
                };
                Ok(true)
            }
            "sslrootcert" => {
                self.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub(super) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            _ => SslMode::Require,
        }
    }

    fn check(&self) -> Check {
        match self.mode {
            "verify-full" => Check::Full,
            "verify-ca" => Check::Chain,
            "require" if self.root_cert.is_some() => Check::Chain,
            _ => Check::None,
        }
    }

    /// The connector for these settings (unused by tokio-postgres with `sslmode=disable`).
    pub(super) fn connector(&self) -> Result<MakeRustlsConnect, MetaError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| MetaError::Engine(format!("PostgreSQL TLS: {e}")))?;
        let check = self.check();
        let webpki = match check {
            Check::None => None,
            Check::Chain | Check::Full => {
                let roots = match &self.root_cert {
                    Some(p) => roots_from_file(p)?,
                    None => system_roots()?,
                };
                Some(
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| MetaError::Engine(format!("PostgreSQL TLS roots: {e}")))?,
                )
            }
        };
        let verifier = Arc::new(Verifier {
            check,
            webpki,
            provider,
        });
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

fn roots_from_file(path: &Path) -> Result<RootCertStore, MetaError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| {
        MetaError::Format(format!(
            "sslrootcert={}: {why} (give a PEM file with the CA certificate of the PostgreSQL server)",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("{e:?}")))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, MetaError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(MetaError::Format(
            "sslmode=verify-ca/verify-full: no system CA certificates found; add sslrootcert=/path/to/ca.pem to the metadata URL"
                .into(),
        ));
    }
    Ok(roots)
}

/// Checks the server's certificate as `check` says: not at all (`prefer`, `require` without
/// a root certificate, as libpq), the chain only (`verify-ca`: any name), or the chain and
/// the host name (`verify-full`). Handshake signatures are always verified.
#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_libpq() {
        let mut t = TlsParams::default();
        assert_eq!(t.ssl_mode(), SslMode::Prefer);
        assert_eq!(t.check(), Check::None);
        assert!(t.take("sslmode", "require").unwrap());
        assert_eq!(t.ssl_mode(), SslMode::Require);
        assert_eq!(t.check(), Check::None);
        assert!(t.take("sslrootcert", "/ca.pem").unwrap());
        assert_eq!(t.check(), Check::Chain, "require with a root = verify-ca");
        t.take("sslmode", "verify-full").unwrap();
        assert_eq!(t.check(), Check::Full);
        t.take("sslmode", "disable").unwrap();
        assert_eq!(t.ssl_mode(), SslMode::Disable);
        assert!(!t.take("pool", "4").unwrap());
        let e = t.take("sslmode", "on").unwrap_err().to_string();
        assert!(e.contains("sslmode=on") && e.contains("verify-full"), "{e}");
    }

    #[test]
    fn a_bad_root_certificate_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let mut t = TlsParams::default();
        t.take("sslmode", "verify-full").unwrap();
        t.take("sslrootcert", p.to_str().unwrap()).unwrap();
        let e = t.connector().err().expect("missing file").to_string();
        assert!(e.contains("ca.pem") && e.contains("CA certificate"), "{e}");
        std::fs::write(&p, "not a certificate").unwrap();
        let e = t.connector().err().expect("no cert").to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
