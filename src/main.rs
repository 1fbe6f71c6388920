use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The environment's init (single-threaded, before anything else starts).
    if let Some(code) = sprited::container::init::dispatch(&args) {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    // CRIU's action script during a restore (see `checkpoint::place`).
    if let Some(code) = sprited::checkpoint::criu_action() {
        return ExitCode::from(code);
    }
    // Inside the environment, `sprite-env` is a symlink to this binary.
    if args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        == Some("sprite-env".as_ref())
    {
        return sprited::cli::main();
    }
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
