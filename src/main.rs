//! The `knutepunkt` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use knutepunkt::config::{self, ConfigError};
use knutepunkt::normalise::load_vendors;

#[derive(Parser)]
#[command(
    name = "knutepunkt",
    version,
    about = "Welfare-technology integration gateway: vendor events in, FHIR R4 out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: listen 127.0.0.1:8080, data in ./data, mappings from ./mappings.
    Serve {
        /// Config file (TOML); see docs/configuration.md.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate config and every mapping file offline; print all errors; exit non-zero on any.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_all(config.as_deref()) {
            Ok((cfg, vendors)) => {
                println!(
                    "ok: {} vendor(s), {} destination(s), {} route(s)",
                    vendors.len(),
                    cfg.destinations.len(),
                    cfg.routes.len()
                );
                ExitCode::SUCCESS
            }
            Err(errs) => report(&errs),
        },
        Command::Serve { config } => {
            init_logging();
            let (cfg, vendors) = match load_all(config.as_deref()) {
                Ok(v) => v,
                Err(errs) => return report(&errs),
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(knutepunkt::app::serve(cfg, vendors)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Config and mappings are checked together so one run reports every problem.
fn load_all(
    path: Option<&std::path::Path>,
) -> Result<(config::ValidConfig, knutepunkt::normalise::VendorRegistry), Vec<ConfigError>> {
    let (raw, source) = config::parse(path)?;
    let cfg = config::validate(&raw, &source);
    let vendors = load_vendors(&raw.mappings.dir);
    match (cfg, vendors) {
        (Ok(c), Ok(v)) => Ok((c, v)),
        (c, v) => {
            let mut all = c.err().unwrap_or_default();
            all.extend(v.err().unwrap_or_default());
            Err(all)
        }
    }
}

fn report(errs: &[ConfigError]) -> ExitCode {
    for e in errs {
        eprintln!("error: {e}");
    }
    eprintln!("{} error(s)", errs.len());
    ExitCode::from(2)
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("KNUTEPUNKT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("KNUTEPUNKT_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
