//! `gpupool-sim`: the provider simulator as a process (docs/simulator.md).
//!
//! Parses flags (each with an environment fallback), starts the simulator on loopback,
//! prints `gpupool-sim listening on http://127.0.0.1:PORT` once bound (and writes the port
//! to `--port-file` if asked), and stops cleanly on SIGTERM or SIGINT.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use gpupool_sim::{self as sim, SimConfig};
use tracing_subscriber::EnvFilter;

/// Local stand-in for the Vast.ai and RunPod APIs, with real worker servers per machine.
#[derive(Parser, Debug)]
#[command(name = "gpupool-sim", version)]
struct Args {
    /// Address to listen on; must be loopback. Port 0 picks a free port.
    #[arg(long, env = "GPUPOOL_SIM_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// YAML configuration (keys, catalogue, endpoints, timing, faults); built-in defaults otherwise.
    #[arg(long, env = "GPUPOOL_SIM_CONFIG")]
    config: Option<PathBuf>,
    /// Seed of the simulator's random choices (overrides the config file's `seed`).
    #[arg(long, env = "GPUPOOL_SIM_SEED")]
    seed: Option<u64>,
    /// Write the bound port number to this file once listening.
    #[arg(long, env = "GPUPOOL_SIM_PORT_FILE")]
    port_file: Option<PathBuf>,
}

fn load_config(args: &Args) -> Result<SimConfig, String> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            SimConfig::from_yaml(&text)?
        }
        None => SimConfig::default(),
    };
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    Ok(config)
}

/// Writes the port next to the target then renames, so a reader never sees half a file.
fn write_port_file(path: &PathBuf, port: u16) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{port}\n"))?;
    std::fs::rename(&tmp, path)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpupool-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let handle = match sim::start_on(config, args.listen).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("gpupool-sim: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.port_file
        && let Err(e) = write_port_file(path, handle.addr.port())
    {
        eprintln!("gpupool-sim: cannot write {}: {e}", path.display());
        return ExitCode::from(1);
    }
    println!("gpupool-sim listening on {}", handle.base_url);
    wait_for_signal().await;
    tracing::info!("signal received, stopping");
    handle.shutdown().await;
    ExitCode::SUCCESS
}
