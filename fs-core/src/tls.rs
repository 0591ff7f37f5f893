//! Process-wide TLS setup.

/// Choose the process-wide rustls crypto provider (aws-lc-rs, the one the S3 client is built
/// with). Every binary calls this first: a binary that links both the S3 client and kube's
/// client has both the `ring` and `aws-lc-rs` providers compiled in, and rustls then refuses
/// to pick one by itself and panics when a client that names none (kube's) is built. A second
/// call changes nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_provider_is_installed_and_a_second_call_is_harmless() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
