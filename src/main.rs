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
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Map one vendor payload offline and print the FHIR R4 Bundle (or precise errors).
    /// See docs/mappings.md.
    Map {
        /// Vendor name (the `vendor` of a mapping file).
        #[arg(long)]
        vendor: String,
        /// Mappings directory (default: the config's, else ./mappings).
        #[arg(long)]
        mappings: Option<PathBuf>,
        /// Config file, only to find the mappings directory.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Municipality as if sent in X-Tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Event id (a UUID v7 fixes the receive time); default: a new one.
        #[arg(long)]
        event_id: Option<String>,
        /// Instead of printing, map the payload N times and report events/s on one core.
        #[arg(long)]
        bench: Option<u64>,
        /// Payload file (`-` for stdin).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Walk the audit hash chain in the configured store; report the first broken row and exit
    /// 1, or print the chain head and exit 0. Read-only: the gateway may be running.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// mimalloc instead of the system allocator: the gateway allocates and frees many short-lived
/// buffers per event (JSON, HTTP), and glibc's malloc/free took about a tenth of its CPU under
/// load (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Command::Audit {
            action: AuditAction::Verify { config },
        } => match config::load(config.as_deref()) {
            Ok(cfg) => audit_verify(&cfg),
            Err(errs) => report(&errs),
        },
        Command::Map {
            vendor,
            mappings,
            config,
            tenant,
            event_id,
            bench,
            file,
        } => map_command(MapArgs {
            vendor,
            mappings,
            config,
            tenant,
            event_id,
            bench,
            file,
        }),
        Command::Serve { config } => {
            let (cfg, vendors) = match load_all(config.as_deref()) {
                Ok(v) => v,
                Err(errs) => return report(&errs),
            };
            let traces = match knutepunkt::telemetry::traces::init(&cfg.ops) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: cannot build the OTLP trace exporter: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cfg.worker_threads(cores))
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let served = rt.block_on(knutepunkt::app::serve(cfg, vendors));
            // Export the last spans (bounded by the exporter's timeout).
            traces.shutdown();
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

struct MapArgs {
    vendor: String,
    mappings: Option<PathBuf>,
    config: Option<PathBuf>,
    tenant: Option<String>,
    event_id: Option<String>,
    bench: Option<u64>,
    file: PathBuf,
}

/// `knutepunkt map`: offline mapping of one payload, or a throughput measurement.
fn map_command(a: MapArgs) -> ExitCode {
    use knutepunkt::normalise::{self, MapError, Outcome, RawEvent};
    let dir = match (a.mappings, a.config) {
        (Some(d), _) => d,
        (None, Some(c)) => match config::load(Some(&c)) {
            Ok(cfg) => cfg.mappings_dir,
            Err(errs) => return report(&errs),
        },
        (None, None) => PathBuf::from("./mappings"),
    };
    let registry = match load_vendors(&dir) {
        Ok(r) => r,
        Err(errs) => return report(&errs),
    };
    let Some(spec) = registry.get(&a.vendor) else {
        eprintln!(
            "error: no mapping for vendor {:?} in {}; known: {}",
            a.vendor,
            dir.display(),
            registry.names().join(", ")
        );
        return ExitCode::from(2);
    };
    let body = if a.file.as_os_str() == "-" {
        let mut v = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut v) {
            eprintln!("error: cannot read stdin: {e}");
            return ExitCode::from(2);
        }
        v
    } else {
        match std::fs::read(&a.file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", a.file.display());
                return ExitCode::from(2);
            }
        }
    };
    let id = a
        .event_id
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let raw = RawEvent {
        id,
        body: &body,
        tenant: a.tenant,
        max_json_depth: 64,
        max_xml_depth: knutepunkt::normalise::xml::MAX_DEPTH,
    };
    if let Some(n) = a.bench {
        let n = n.max(1);
        let start = std::time::Instant::now();
        let mut ok = 0u64;
        for _ in 0..n {
            if normalise::normalise_outcome(spec, &raw).is_ok() {
                ok += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "vendor {} ({}): {n} mappings in {secs:.3} s = {:.0} events/s on one core ({} ok, {} bytes each)",
            spec.name,
            spec.format.as_str(),
            n as f64 / secs,
            ok,
            body.len()
        );
        return ExitCode::SUCCESS;
    }
    match normalise::normalise_outcome(spec, &raw) {
        Ok(Outcome::Event(env)) => {
            eprintln!(
                "ok: category={} priority={} key={} tenant={} vendor_event_id={} mapping={}@{}",
                env.category,
                env.priority.as_str(),
                env.key,
                env.tenant.as_deref().unwrap_or("-"),
                env.vendor_event_id.as_deref().unwrap_or("-"),
                env.vendor,
                env.mapping_version
            );
            let text = serde_json::from_str::<serde_json::Value>(&env.fhir)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or_else(|_| env.fhir.clone());
            write_stdout(&text)
        }
        Ok(Outcome::Heartbeat(hb)) => {
            println!(
                "heartbeat: {} (vendor {}, tenant {}); not a clinical event, nothing is journaled",
                hb.device_key,
                hb.vendor,
                hb.tenant.as_deref().unwrap_or("-")
            );
            ExitCode::SUCCESS
        }
        Err(MapError::Malformed(m)) => {
            eprintln!("error (HTTP 400): malformed body: {m}");
            ExitCode::from(1)
        }
        Err(MapError::Unmappable { field, message }) => {
            eprintln!("error (HTTP 422) at {field}: {message}");
            ExitCode::from(1)
        }
    }
}

/// `knutepunkt audit verify`: 0 intact, 1 broken (the first broken row is named), 2 error.
fn audit_verify(cfg: &config::ValidConfig) -> ExitCode {
    use knutepunkt::journal::audit_chain::Verdict;
    let verdict = match &cfg.storage {
        config::Storage::Sqlite { data_dir } => knutepunkt::journal::verify_sqlite_audit(data_dir),
        config::Storage::Postgres {
            url, tls_ca_file, ..
        } => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::from(2);
                }
            };
            match url.resolve() {
                Ok(url) => rt.block_on(knutepunkt::journal::verify_postgres_audit(
                    &url,
                    tls_ca_file.as_deref(),
                )),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    match verdict {
        Ok(Verdict::Intact { rows, head, legacy }) => {
            let head = head.map_or("empty".to_string(), |(seq, hash)| {
                format!("head position {seq}, hash {hash}")
            });
            println!("ok: audit chain intact: {rows} row(s), {head}");
            if legacy > 0 {
                println!("note: {legacy} row(s) written before the chain existed are not covered");
            }
            ExitCode::SUCCESS
        }
        Ok(Verdict::Broken { id, seq, what }) => {
            let pos = seq.map_or("no chain position".to_string(), |s| {
                format!("chain position {s}")
            });
            if id == 0 {
                println!("broken: end of the audit chain ({pos}): {what}");
            } else {
                println!("broken: audit row id {id} ({pos}): {what}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
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
    // Config and mappings meet here: per-vendor limits must name a vendor with a mapping file.
    let unknown = match &vendors {
        Ok(v) => config::ingest_vendor::check_known_vendors(
            &source.file,
            raw.ingest.vendor.keys(),
            &v.names(),
        ),
        Err(_) => Vec::new(),
    };
    match (cfg, vendors) {
        (Ok(c), Ok(v)) if unknown.is_empty() => {
            // Certificate files are read here (IO), after the pure validation passed.
            let errs = c.tls.as_ref().map_or_else(Vec::new, |t| {
                knutepunkt::ingest::tls::check(t, &v.names(), &source.file)
            });
            if errs.is_empty() {
                Ok((c, v))
            } else {
                Err(errs)
            }
        }
        (c, v) => {
            let mut all = c.err().unwrap_or_default();
            all.extend(v.err().unwrap_or_default());
            all.extend(unknown);
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

/// Prints `text` to stdout. A reader that stops early (`| head`) ends the output quietly; any
/// other write error is reported and fails the command.
fn write_stdout(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the result: {e}");
            ExitCode::FAILURE
        }
    }
}
