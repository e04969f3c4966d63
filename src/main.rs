//! The `miniapp-gateway` command line: parse flags, set up logging, load the config, and
//! run, check or explain. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use miniapp_gateway::access_log::{AccessLog, LogFormat};
use miniapp_gateway::apps_cmd::{self, Format};
use miniapp_gateway::config::{self, DEFAULT_PATH};
use miniapp_gateway::policy::{Channel, Verdict};
use miniapp_gateway::proxy::Gateway;
use miniapp_gateway::reload::{Trigger, spawn_watcher};
use miniapp_gateway::replica::{Origin, Replica};
use miniapp_gateway::tls;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "miniapp-gateway", version, about = "A CONNECT proxy that enforces per-miniapp domain whitelists")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The config file.
    #[arg(short, long, env = "MINIAPP_GATEWAY_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway and serve until SIGTERM or SIGINT.
    ///
    /// Opens the proxy listeners ([server].listen and every [[listener]], served over TLS when
    /// [tls] is set) and, with [server].admin_listen, the admin listener: the web console (/),
    /// /metrics, /healthz, /readyz, /-/reload, /v1/* and /proxy.pac (with admin users, the
    /// API needs Authorization: Bearer). Logs one startup line on stderr naming the addresses,
    /// the console's URL, which of them speak TLS, the generation and the number of apps;
    /// writes one access log line per decision on stdout. Reloads on config changes, SIGHUP and POST /-/reload. Listen
    /// addresses, [tls] on a listener and admin_listen change only on restart. On SIGTERM or
    /// SIGINT: /readyz turns 503, accepting goes on for shutdown_delay, tunnels drain for
    /// shutdown_grace; a second signal exits at once.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Access log format on stdout.
        #[arg(long, value_enum, default_value_t = LogFormat::Json)]
        log_format: LogFormat,
    },
    /// Validate the config (and its apps_dir) without starting; exit 1 on any error.
    ///
    /// On success prints `ok: N apps, M entries` on stdout and exits 0. Otherwise prints every
    /// error, not only the first, one per line as `PATH:LINE:COL: message` on stderr (the file
    /// may be the config or one of its apps_dir files), and exits 1. Files named by the config
    /// ([tls] certificates and keys, admin_token_file) are read and checked too.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the decision the gateway would make for URL; exit 0 allow, 1 deny, 2 error.
    Explain {
        #[command(flatten)]
        config: ConfigArg,
        /// The app (AppId) asking.
        #[arg(long)]
        app: String,
        /// The channel: request (server domains) or webview (WebView domains).
        #[arg(long, default_value = "request", value_parser = parse_channel)]
        channel: Channel,
        /// The URL, e.g. https://api.shop.example/v1/items
        url: String,
    },
    /// Print the [[app]] entries that would have let through what `report` mode recorded in an
    /// access log (JSON lines): report for a while, learn, review, then enforce.
    Learn {
        /// The access log, as `run` writes it to stdout.
        access_log: PathBuf,
        /// Generalize hosts under DOMAIN to `*.DOMAIN` (never done unless asked). Repeat for more.
        #[arg(long = "wildcard", value_name = "DOMAIN")]
        wildcards: Vec<String>,
    },
    /// Export, compare and import apps: the GitOps and migration path.
    Apps {
        #[command(subcommand)]
        action: AppsAction,
    },
    /// The PostgreSQL store ([store] backend = "postgres").
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Make a new admin API token, and the [[admin_user]] entry that admits it (only the
    /// token's SHA-256 goes in the config).
    Token {
        /// The user's name, shown in logs and history.
        #[arg(long, default_value = "NAME")]
        name: String,
        /// What the user may do: viewer (read, check), editor (and change apps), admin (and
        /// reload, roll back).
        #[arg(long, default_value = "viewer", value_parser = ["viewer", "editor", "admin"])]
        role: String,
    },
    /// Write a development CA, a gateway certificate and client certificates into DIR (PEM).
    Certs {
        /// Where to write ca.crt/.key, gateway.crt/.key and APP[-webview].crt/.key.
        dir: PathBuf,
        /// A client certificate for this app: ID names the app, ID/webview also fixes the
        /// web-view channel. Repeat for more.
        #[arg(long = "app", value_name = "ID[/webview]", value_parser = parse_app_arg)]
        apps: Vec<(String, Option<Channel>)>,
        /// An extra name or address for the gateway certificate (localhost, 127.0.0.1 and ::1
        /// are always in it). Repeat for more.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace files that already exist (each atomically, keys owner-only). Without it,
        /// existing files are an error and nothing is written: a new CA invalidates every
        /// certificate the old one signed.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Bring the database's schema up to this binary's (once, however many replicas run it at
    /// the same time); refuse a schema newer than this binary knows.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
enum AppsAction {
    /// Write every app of the config (the main file's and apps_dir's) to stdout.
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// toml: [[app]] tables with tokens (a complete copy); json: as the admin API shows
        /// apps, without tokens.
        #[arg(long, value_enum, default_value_t = Format::Toml)]
        format: Format,
    },
    /// Show what importing FILE would change, one line an app.
    Diff {
        #[command(flatten)]
        config: ConfigArg,
        /// Apps as `export` writes them (TOML or JSON).
        file: PathBuf,
        /// Also delete the apps FILE does not name.
        #[arg(long)]
        prune: bool,
    },
    /// Write the apps of FILE into apps_dir (one file an app, atomically, audited as user
    /// import), after checking every change; a running gateway reloads them. Nothing is
    /// written if any change is invalid.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// Apps as `export` writes them (TOML or JSON).
        file: PathBuf,
        /// Also delete the apps FILE does not name.
        #[arg(long)]
        prune: bool,
    },
}

/// `store migrate`: connect with the config's `[store]` settings and migrate the schema.
fn store_migrate(path: &Path) -> ExitCode {
    let settings = match config::load(path) {
        Ok(config) => match config.store {
            config::StoreSettings::Postgres(settings) => settings,
            config::StoreSettings::Files => {
                eprintln!(
                    "miniapp-gateway: {} keeps its apps in files ([store] backend = \"files\"): nothing to migrate",
                    path.display()
                );
                return ExitCode::from(2);
            }
        },
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("miniapp-gateway: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let migrated = runtime.block_on(async {
        let mut client = miniapp_gateway::pg::connect(&settings).await?;
        miniapp_gateway::pg::migrate(&mut client).await
    });
    match migrated {
        Ok(m) if m.from == m.to => {
            println!("schema at version {}: nothing to do", m.to);
            ExitCode::SUCCESS
        }
        Ok(m) => {
            println!("schema migrated from version {} to {}", m.from, m.to);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("miniapp-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn apps(action: AppsAction) -> ExitCode {
    let result = match action {
        AppsAction::Export { config, format } => apps_cmd::export(&config.config, format),
        AppsAction::Diff { config, file, prune } => apps_cmd::diff(&config.config, &file, prune),
        AppsAction::Import { config, file, prune } => apps_cmd::import(&config.config, &file, prune),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("miniapp-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn learn(log: &std::path::Path, wildcards: &[String]) -> ExitCode {
    let file = match std::fs::File::open(log) {
        Ok(file) => file,
        Err(e) => {
            eprintln!("miniapp-gateway: cannot read {}: {e}", log.display());
            return ExitCode::from(2);
        }
    };
    match miniapp_gateway::learn::learn(std::io::BufReader::new(file), wildcards) {
        Ok(learned) => {
            print!("{}", learned.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("miniapp-gateway: cannot read {}: {e}", log.display());
            ExitCode::from(2)
        }
    }
}

fn parse_app_arg(raw: &str) -> Result<(String, Option<Channel>), String> {
    let (app, channel) = match raw.split_once('/') {
        Some((app, channel)) => (app, Some(Channel::parse(channel).ok_or("the channel is request or webview")?)),
        None => (raw, None),
    };
    if !miniapp_gateway::policy::is_valid_app_id(app) {
        return Err("an app id is 1 to 64 characters of A-Z a-z 0-9 _ - .".to_owned());
    }
    Ok((app.to_owned(), channel))
}

fn parse_channel(raw: &str) -> Result<Channel, String> {
    Channel::parse(raw).ok_or_else(|| "the channel is request or webview".to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Run { config, log_format } => match run(config.config, log_format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("miniapp-gateway: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config } => check(&config.config),
        Command::Explain { config, app, channel, url } => explain(&config.config, &app, channel, &url),
        Command::Learn { access_log, wildcards } => learn(&access_log, &wildcards),
        Command::Apps { action } => apps(action),
        Command::Store { action: StoreAction::Migrate { config } } => store_migrate(&config.config),
        Command::Token { name, .. }
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) =>
        {
            eprintln!("miniapp-gateway: a user's name is 1 to 64 printable ASCII characters, without spaces");
            ExitCode::from(2)
        }
        Command::Token { name, role } => match new_token() {
            Ok(token) => {
                let hash = hex(&config::token_sha256(&token));
                println!("# the bearer token of {name} (Authorization: Bearer <token>); only its hash is kept:");
                println!("{token}");
                println!("# add to the config:");
                println!("[[admin_user]]\nname = {name:?}\ntoken_sha256 = \"{hash}\"\nrole = \"{role}\"");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("miniapp-gateway: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Certs { dir, apps, hosts, force } => match tls::write_dev_certs(&dir, &hosts, &apps, force) {
            Ok(written) => {
                for file in written.files {
                    println!("wrote {}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("miniapp-gateway: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            println!("ok: {} apps, {} entries", config.policy.app_count(), config.policy.entry_count());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn explain(path: &std::path::Path, app: &str, channel: Channel, url: &str) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let (decision, target) = match config.policy.decide_url(app, channel, url) {
        Ok(decided) => decided,
        Err(e) => {
            eprintln!("miniapp-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let shown_app = decision.app.map_or(app, |a| &a.id);
    match (decision.verdict, decision.rule) {
        (Verdict::Allow, Some(rule)) => println!("allow {} {rule} \"{}\"", decision.reason, rule.entry),
        (Verdict::Allow, None) => {
            println!("allow {}: {}", decision.reason, decision.reason.message(shown_app, channel, &target))
        }
        (verdict, _) => println!(
            "{} {}: {}",
            verdict.as_str(),
            decision.reason,
            decision.reason.message(shown_app, channel, &target)
        ),
    }
    if decision.verdict == Verdict::Deny { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn run(path: PathBuf, log_format: LogFormat) -> anyhow::Result<()> {
    let mut loader = config::Loader::new(&path);
    let config = loader.load().map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    check_descriptor_limit(config.limits.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let (log, writer) = AccessLog::start(log_format, Box::new(std::io::stdout()));
    runtime.block_on(async move {
        // With the PostgreSQL store, the apps come from the database (or its cache file).
        let (config, replica) = match &config.store {
            config::StoreSettings::Files => (config, None),
            config::StoreSettings::Postgres(settings) => {
                let (replica, apps, origin) = Replica::open(settings, &path).await?;
                match origin {
                    Origin::Database(revision) => tracing::info!(revision, apps = apps.len(), "store read"),
                    Origin::Cache(revision, age) => tracing::warn!(
                        revision,
                        apps = apps.len(),
                        age_seconds = age,
                        cache = %settings.cache.display(),
                        "started from the store's cache: the database cannot be reached"
                    ),
                }
                loader.set_store_apps(apps);
                let config = loader.load().map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
                (config, Some(replica))
            }
        };
        let apps = config.policy.app_count();
        let gateway = Gateway::bind(config, loader, log).await?;
        let addrs: Vec<String> = gateway.local_addrs().iter().map(ToString::to_string).collect();
        let admin = gateway.admin_addr().map_or_else(|| "off".to_owned(), |a| a.to_string());
        let console = gateway.admin_addr().map_or_else(|| "off".to_owned(), console_url);
        let tls: Vec<String> = gateway.tls_addrs().iter().map(ToString::to_string).collect();
        let tls = if tls.is_empty() { "none".to_owned() } else { tls.join(",") };
        tracing::info!(listen = %addrs.join(","), tls = %tls, admin = %admin, console = %console, generation = 1, apps, config = %path.display(), "miniapp-gateway started");
        let _replica = replica.map(|replica| replica.spawn(gateway.reloader()));
        let reloader = gateway.reloader();
        let _watcher = spawn_watcher(reloader.clone());
        let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                let _ = reloader.reload(Trigger::Signal).await;
            }
        });
        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
            }
            // The first signal starts an orderly shutdown; a second one means now.
            tokio::spawn(async move {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
                tracing::warn!("second signal: exiting at once");
                std::process::exit(1);
            });
        };
        gateway.run(shutdown).await;
        anyhow::Ok(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    if !writer.finish(LOG_FLUSH_LIMIT) {
        tracing::warn!("the access log could not be written out within {LOG_FLUSH_LIMIT:?}; exiting anyway");
    }
    tracing::info!("miniapp-gateway stopped");
    Ok(())
}

/// The web console's address on the admin listener (on a wildcard address: by loopback).
fn console_url(admin: std::net::SocketAddr) -> String {
    let mut admin = admin;
    if admin.ip().is_unspecified() {
        admin.set_ip(if admin.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    format!("http://{admin}{}", miniapp_gateway::admin::CONSOLE_PATH)
}

/// How long the exit waits for the last access log lines to be written (stdout may be stuck).
const LOG_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// Raise the soft limit on open files to the hard limit (as nginx's `worker_rlimit_nofile` and
/// Go's runtime do: the soft limit of 1,024 many shells start with is far below what a proxy
/// needs), and warn when `max_connections` tunnels would still not fit in it: each takes two
/// descriptors.
fn check_descriptor_limit(max_connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let needed = (max_connections as u64).saturating_mul(2);
    if limit.rlim_cur < needed {
        tracing::warn!(
            max_connections,
            open_files_limit = limit.rlim_cur,
            "max_connections tunnels need about {needed} descriptors, more than the open files limit: beyond it \
             connections are answered 503 overloaded; raise the limit (LimitNOFILE=, ulimit -n)"
        );
    }
}

/// 32 random bytes from the operating system, as 64 hex digits.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random number generator failed"))?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
