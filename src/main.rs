#![forbid(unsafe_code)]

use clap::Parser;

// A request allocates many small, short-lived objects (JSON trees, headers, futures); glibc's
// allocator spent a fifth of the challenge path's CPU in malloc/free and its consolidation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = tollgate::cli::Cli::parse();
    // Built here, not by `#[tokio::main]`: its worker count is a setting of the config.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(tollgate::cli::worker_threads(&cli))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
