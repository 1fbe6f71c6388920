use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let run =
        || -> anyhow::Result<()> { Ok(sprited::daemon::run(sprited::config::Args::parse())?) };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sprited: {e:#}");
            ExitCode::FAILURE
        }
    }
}
