//! Logging: `tracing` with `RUST_LOG` (default `info`), as text or JSON lines. Nothing logged
//! anywhere in the operator carries a credential (see `provider::Credentials`).

use tracing_subscriber::{EnvFilter, fmt};

pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
