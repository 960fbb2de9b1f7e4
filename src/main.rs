#![forbid(unsafe_code)]

use clap::Parser;

// A request allocates many small, short-lived objects (JSON trees, headers, futures); glibc's
// allocator spent a fifth of the challenge path's CPU in malloc/free and its consolidation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tollgate::cli::Cli::parse();
    match tollgate::cli::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
