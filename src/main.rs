//! The `presenced` binary: the command line (`cli/`, one file per
//! subcommand) over the library, where the work happens.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
