//! TLS setup and the construction of the `reqwest` client every provider and worker call uses.

use std::{sync::Once, time::Duration};

/// Makes sure rustls has a process-wide crypto provider before reqwest builds a TLS config
/// (reqwest is built with `rustls-no-provider` and would panic otherwise). The `ring`
/// provider is the one kube already uses.
pub(crate) fn ensure_tls_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Err only means another thread installed one first: fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// A `reqwest` client with the given connect timeout, no redirects (a redirect could carry
/// credentials elsewhere), and no default request timeout (each call sets its own).
pub(crate) fn build_reqwest(
    connect_timeout: Duration,
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    ensure_tls_provider();
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}
