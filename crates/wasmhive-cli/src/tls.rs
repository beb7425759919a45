//! TLS for the client listener (`--tls-cert`, `--tls-key`): rustls with the
//! `ring` provider, ALPN offering HTTP/2 and HTTP/1.1.
//!
//! A certificate and key that cannot serve are refused at start-up rather
//! than at the first handshake: a key that is not the certificate's, a
//! certificate that has expired or is not valid yet, a file without a
//! certificate or key in PEM.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The protocols a client may choose in its handshake, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// An acceptor for the certificate chain in `cert` (PEM, the server's own
/// certificate first) and the private key in `key` (PEM: PKCS#8, PKCS#1 or
/// SEC1).
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", cert.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("{} holds no PEM certificate", cert.display());
    };
    check_validity(leaf, std::time::SystemTime::now())
        .with_context(|| format!("cannot serve the certificate in {}", cert.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a private key from {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("the TLS provider offers no protocol version")?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "the key in {} does not go with the certificate in {}",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Fails unless `now` is within the certificate's validity period.
fn check_validity(cert: &CertificateDer<'_>, now: std::time::SystemTime) -> anyhow::Result<()> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|error| anyhow::anyhow!("not an X.509 certificate: {error}"))?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::from_timestamp(
        now.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs() as i64),
    )
    .context("the clock is out of range")?;
    if now > validity.not_after {
        bail!("it expired on {}", validity.not_after);
    }
    if now < validity.not_before {
        bail!("it is not valid until {}", validity.not_before);
    }
    Ok(())
}
