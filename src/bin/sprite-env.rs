fn main() -> std::process::ExitCode {
    sprited::cli::main()
}
