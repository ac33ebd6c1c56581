fn main() -> std::process::ExitCode {
    mcpwarden::cli::main()
}
