//! The `baton` command line.

#![forbid(unsafe_code)]

mod daemon;
mod daemon_cli;
mod demo;
mod exercise;
mod keyval;
mod qmp;
mod serve;
mod storage;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "baton", version, about = "Block layer and storage-handover service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Exercise the block layer on a raw image: a verified random-write
    /// workload through a guest-style user, a dirty bitmap, and an
    /// all-or-nothing inactivation and reactivation.
    Exercise(exercise::Args),
    /// Serve a raw image over NBD (qemu-nbd's flags).
    Serve(serve::Args),
    /// The storage daemon with a QMP control socket (qemu-storage-daemon's command line).
    Daemon(daemon_cli::Args),
    /// The mission in one command: a running guest and its disk move between two
    /// daemons that share no storage, and the guest finds every write it made.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // With failpoints compiled in, FAILPOINTS=name=action;... configures them (the fault tests).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if let Command::Daemon(a) = &cli.command {
        if daemon_cli::is_daemonize_request(a) {
            return match daemon_cli::daemonize_and_wait() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            };
        }
    }
    if let Command::Serve(a) = &cli.command {
        if serve::is_fork_request(a) {
            return match serve::fork_and_wait() {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            };
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        match cli.command {
            Command::Exercise(a) => exercise::run(a).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
            Command::Serve(a) => serve::run(a).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
            Command::Daemon(a) => daemon_cli::run(a).await,
            Command::Demo(a) => demo::run(a).await.map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources, `: `-separated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    block::error::chain(e)
}

/// Why a detached run (`--fork`, `--daemonize`) could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DetachError {
    #[error("cannot find own executable")]
    Exe(#[source] std::io::Error),
    #[error("cannot start the background process")]
    Spawn(#[source] std::io::Error),
    #[error("cannot wait for the background process")]
    Wait(#[source] std::io::Error),
    #[error("the background process exited during setup ({0})")]
    Exited(std::process::ExitStatus),
}

/// `--fork` / `--daemonize`: run this same command line again in a new
/// session, marked by `marker` in its environment and without `flag`, and
/// return the first line it prints once it is ready (it then detaches stdout).
pub(crate) fn run_detached(marker: &str, flag: &str) -> Result<String, DetachError> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(DetachError::Exe)?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != flag).collect();
    let mut child = std::process::Command::new(exe)
        .args(args)
        .env(marker, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(DetachError::Spawn)?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if line.is_empty() {
        let status = child.wait().map_err(DetachError::Wait)?;
        return Err(DetachError::Exited(status));
    }
    Ok(line)
}

/// Point stdout at /dev/null (a daemonized child whose parent has exited).
pub(crate) fn detach_stdout() {
    use std::os::fd::AsFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        if let Ok(mut out) = std::io::stdout().as_fd().try_clone_to_owned() {
            let _ = nix::unistd::dup2(null.as_fd(), &mut out);
        }
    }
}
