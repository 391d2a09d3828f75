//! The one rustls client setup (shards' `wss://` upstreams, the query
//! workers' describeServer check): the web PKI roots plus the operator's
//! `tls_ca_file`, AWS-LC as the crypto provider, TLS 1.2 and 1.3.

use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_ca_file {path}: {err}")]
    CaFile { path: String, err: String },
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
}

/// A client config trusting the web PKI roots and the certificates (PEM)
/// in `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(p) = extra_ca {
        let ca = |err: String| TlsError::CaFile { path: p.display().to_string(), err };
        let pem = std::fs::read(p).map_err(|e| ca(e.to_string()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.map_err(|e| ca(e.to_string()))?).map_err(|e| ca(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    #[test]
    fn roots_and_a_missing_ca_file() {
        assert!(super::client_config(None).is_ok());
        let e = super::client_config(Some(std::path::Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
