//! The standalone `inseam` command on an app's database URL (see the crate's documentation).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Logs (off unless RUST_LOG asks) go to standard error: standard output is the command's.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .init();
    inseam_cli::run_standalone(std::env::args_os()).await
}
