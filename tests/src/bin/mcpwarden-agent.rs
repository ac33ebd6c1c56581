//! The real mcpwarden agent, built as a binary of this crate so that the integration tests
//! get its path from `env!("CARGO_BIN_EXE_mcpwarden-agent")`.
fn main() -> std::process::ExitCode {
    mcpwarden::cli::main()
}
