// mimalloc: per-thread free lists suit the per-core workers; see BENCHMARKS.md for the effect.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mcpwarden::cli::main()
}
