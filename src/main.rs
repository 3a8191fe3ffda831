use std::process::ExitCode;

fn main() -> ExitCode {
    rbdfence::cli::main()
}
