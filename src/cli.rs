//! The command line: `rbdfence [-c CONF] [--id NAME] <command>`.
//!
//! Exit codes: 0 success, 2 bad usage or bad input (the message names the argument),
//! 1 any other failure (the message names the Ceph call and the errno).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::fence::driver::FenceRequest;
use crate::fence::ledger::Ledger;
use crate::fence::record::FenceView;
use crate::fence::unfence::{Trigger, unfence_host};
use crate::fence::vm::VmUuid;

use crate::rbd::{
    BlocklistEntry, Ceph, CephError, ConnectOptions, ImageSpec, ImageStatus, Timeouts,
};

#[derive(Debug, Parser)]
#[command(
    name = "rbdfence",
    version,
    about = "Fail-closed VM fencing on Ceph RBD"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Ceph config file.
    #[arg(
        short = 'c',
        long = "conf",
        env = "CEPH_CONF",
        default_value = "/etc/ceph/ceph.conf",
        global = true
    )]
    pub conf: PathBuf,
    /// cephx user, without `client.`.
    #[arg(long = "id", env = "CEPH_ID", default_value = "admin", global = true)]
    pub id: String,
    /// Bound on connecting and on each Ceph call, in seconds.
    #[arg(long = "timeout", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600), global = true)]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watchers and exclusive-lock owners of one image.
    Watchers {
        /// The image, as POOL/IMAGE.
        #[arg(value_name = "POOL/IMAGE", value_parser = parse_image)]
        image: ImageSpec,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The OSD blocklist.
    #[command(subcommand)]
    Blocklist(BlocklistCommand),
    /// Run the service: HTTP API, metrics, one persistent Ceph connection.
    Serve {
        /// The service's TOML config.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log as JSON lines (default: human-readable). Also RBDFENCE_LOG_FORMAT=json.
        #[arg(long)]
        log_json: bool,
    },
    /// Run the fence engine once: may this VM start on the target host? Prints the decision
    /// (the pre-instantiate reply). Exit 0 on approve, 1 on deny, 2 on bad input.
    Fence(FenceArgs),
    /// The fence ledger (shared by every instance): list fences, or show one with its state.
    #[command(subcommand)]
    Fences(FencesCommand),
    /// Lift the entries rbdfence's fences of HOST made, once its VMs are confirmed gone (or
    /// --force), under the host's lease, and record it. Exit 0 lifted, 1 refused or failed.
    Unfence {
        /// The service's TOML config (Ceph, ledger, hosts).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The host (inventory uuid).
        #[arg(value_name = "HOST", value_parser = parse_host)]
        host: String,
        /// Lift although a fence of the host approved without seeing its VM gone (recorded
        /// as forced).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FencesCommand {
    /// The most recent fences, newest first, each with its state.
    Ls {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One fence: its record and state, as JSON.
    Show {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(value_name = "FENCE_ID")]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct FenceArgs {
    /// The service's TOML config (Ceph, SSH, hosts); its [ceph] section replaces -c/--id.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The VM's uuid (hyphenated, or 32 hex digits).
    #[arg(long, value_name = "UUID", value_parser = parse_vm)]
    pub vm: VmUuid,
    /// The host that failed (inventory uuid).
    #[arg(long, value_name = "HOST", value_parser = parse_host)]
    pub failed_host: String,
    /// The host the HA manager wants to start the VM on.
    #[arg(long, value_name = "HOST", value_parser = parse_host)]
    pub target_host: String,
    /// Every volume of the VM, as POOL/IMAGE (repeat the option).
    #[arg(long = "volume", value_name = "POOL/IMAGE", value_parser = parse_image, required = true)]
    pub volumes: Vec<ImageSpec>,
    /// Gather evidence and say what would be done; change nothing (always a deny).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BlocklistCommand {
    /// List every entry.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Fence: IP:PORT/NONCE (one client), a bare IP (= IP:0/0, every client of the IP), or a
    /// CIDR (a range). Returns once the entry is in the osdmap this client has.
    Add {
        #[arg(value_name = "ENTRY", value_parser = parse_entry)]
        entry: BlocklistEntry,
        /// Expiry in seconds (Ceph's default, mon_osd_blocklist_default_expire, when absent).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10 * 365 * 86400))]
        expire: Option<u64>,
    },
    /// Lift an entry.
    Rm {
        #[arg(value_name = "ENTRY", value_parser = parse_entry)]
        entry: BlocklistEntry,
    },
}

fn parse_image(s: &str) -> Result<ImageSpec, String> {
    s.parse()
        .map_err(|e: crate::rbd::ImageSpecError| e.to_string())
}

fn parse_vm(s: &str) -> Result<VmUuid, String> {
    s.parse()
        .map_err(|e: crate::fence::vm::VmUuidError| e.to_string())
}

fn parse_host(s: &str) -> Result<String, String> {
    if crate::config::valid_host_uuid(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid host {s:?}: 1-64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

fn parse_entry(s: &str) -> Result<BlocklistEntry, String> {
    s.parse().map_err(|e: crate::rbd::AddrError| e.to_string())
}

/// Runs the CLI and maps its result to the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let json_logs = matches!(cli.command, Command::Serve { log_json: true, .. })
        || std::env::var("RBDFENCE_LOG_FORMAT").is_ok_and(|v| v == "json");
    init_tracing(if serving { "info" } else { "warn" }, json_logs);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rbdfence: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Command::Fence(args) = cli.command {
        return runtime.block_on(fence(args));
    }
    if let Command::Fences(c) = cli.command {
        return runtime.block_on(fences(c));
    }
    if let Command::Unfence {
        config,
        host,
        force,
    } = cli.command
    {
        return runtime.block_on(unfence(config, host, force));
    }
    if let Command::Serve { config, .. } = &cli.command {
        let cfg = match Config::load(config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rbdfence: {e}");
                return ExitCode::from(2);
            }
        };
        return match runtime.block_on(crate::serve::run(cfg)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rbdfence: {e}");
                ExitCode::from(1)
            }
        };
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            ExitCode::from(1)
        }
    }
}

async fn fence(args: FenceArgs) -> ExitCode {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            return ExitCode::from(2);
        }
    };
    let link = crate::fence::link::CephLink::connect(cfg.connect_options(), None, None).await;
    let engine = match crate::app::engine(&cfg, link, None) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            return ExitCode::from(1);
        }
    };
    let req = FenceRequest {
        request_id: None,
        vm: args.vm,
        failed_host: args.failed_host,
        target_host: args.target_host,
        volumes: args.volumes,
        dry_run: args.dry_run,
    };
    let record = engine.fence(&req).await;
    let reply = &record.reply;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(reply).unwrap_or_default()
        );
    } else {
        println!(
            "{} ({}, reason {}): {}",
            reply.decision, reply.outcome, reply.reason, reply.message
        );
        println!("fence {} in {} ms", reply.fence_id, reply.duration_ms);
    }
    if reply.approved() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The ledger named by a service config, over a connection of its own.
async fn open_ledger(
    config: &std::path::Path,
) -> Result<(Config, std::sync::Arc<crate::fence::link::CephLink>, Ledger), ExitCode> {
    let cfg = Config::load(config).map_err(|e| {
        eprintln!("rbdfence: {e}");
        ExitCode::from(2)
    })?;
    let link = crate::fence::link::CephLink::connect(cfg.connect_options(), None, None).await;
    let ledger = match &cfg.fence.ledger {
        Some(path) => Ledger::open(path.clone()).map_err(|e| {
            eprintln!("rbdfence: {e}");
            ExitCode::from(1)
        })?,
        None => Ledger::in_rados(
            link.clone(),
            cfg.ledger.pool.clone(),
            cfg.ledger.namespace.clone(),
        ),
    };
    Ok((cfg, link, ledger))
}

async fn fences(c: FencesCommand) -> ExitCode {
    let config = match &c {
        FencesCommand::Ls { config, .. } | FencesCommand::Show { config, .. } => config.clone(),
    };
    let (_, _, ledger) = match open_ledger(&config).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    let unfences = match ledger.unfences(None).await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            return ExitCode::from(1);
        }
    };
    match c {
        FencesCommand::Ls { limit, json, .. } => match ledger.recent(limit).await {
            Ok(list) => {
                let views: Vec<FenceView> = list
                    .into_iter()
                    .map(|r| FenceView {
                        state: r.state(&unfences),
                        record: r,
                    })
                    .collect();
                if json {
                    println!("{}", serde_json::to_string(&views).unwrap_or_default());
                } else if views.is_empty() {
                    println!("no fences");
                } else {
                    for v in &views {
                        let r = &v.record;
                        let scope = r
                            .reply
                            .evidence
                            .blocklist
                            .as_ref()
                            .map_or("none", |b| b.scope.as_str());
                        let state = if v.state.in_force {
                            "in force"
                        } else {
                            "ended"
                        };
                        println!(
                            "{}  {}  {:<7} {:<24} scope {:<4}  {:<8}  vm {} on {}",
                            r.reply.fence_id,
                            r.started_at,
                            r.reply.decision,
                            r.reply.reason,
                            scope,
                            state,
                            r.vm_uuid,
                            r.failed_host
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rbdfence: {e}");
                ExitCode::from(1)
            }
        },
        FencesCommand::Show { id, .. } => match ledger.get(&id).await {
            Ok(Some(r)) => {
                let view = FenceView {
                    state: r.state(&unfences),
                    record: r,
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&view).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("rbdfence: no fence {id:?} in the ledger");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("rbdfence: {e}");
                ExitCode::from(1)
            }
        },
    }
}

async fn unfence(config: PathBuf, host: String, force: bool) -> ExitCode {
    let (cfg, link, ledger) = match open_ledger(&config).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    if cfg.inventory().unwrap_or_default().get(&host).is_none() {
        eprintln!("rbdfence: host {host} is not in the inventory");
        return ExitCode::from(2);
    }
    let ceph = match link.ceph() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            return ExitCode::from(1);
        }
    };
    // The host's lease: no instance fences the host meanwhile.
    let holder = format!("cli-{}", std::process::id());
    let deadline = std::time::Instant::now() + Duration::from_secs(cfg.fence.deadline_secs);
    loop {
        match ledger
            .lease(&host, &holder, crate::service::HOST_LEASE)
            .await
        {
            Ok(true) => break,
            Ok(false) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(false) => {
                eprintln!("rbdfence: a fence of {host} is running; try again");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("rbdfence: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let quiet = cfg.fence.lift_quiet();
    let result = unfence_host(&ledger, &ceph, &host, Trigger::Api { force }, quiet).await;
    let _ = ledger.release(&host, &holder).await;
    match result {
        Ok(r) => {
            println!(
                "unfenced {host} ({}, {}): lifted {:?}, fences {:?}",
                r.unfence_id, r.trigger, r.lifted, r.fences
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rbdfence: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBDFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

impl Global {
    pub fn connect_options(&self) -> ConnectOptions {
        let t = Duration::from_secs(self.timeout);
        ConnectOptions {
            conf: self.conf.clone(),
            id: self.id.clone(),
            timeouts: Timeouts { op: t, mount: t },
        }
    }
}

async fn run(cli: Cli) -> Result<(), CephError> {
    let ceph = Ceph::connect(cli.global.connect_options()).await?;
    match cli.command {
        Command::Watchers { image, json } => {
            let status = ceph.image_status(&image).await?;
            if json {
                println!("{}", watchers_json(&image, &status));
            } else {
                print!("{}", watchers_text(&image, &status));
            }
        }
        Command::Blocklist(BlocklistCommand::Ls { json }) => {
            let items = ceph.blocklist_ls().await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())
                );
            } else if items.is_empty() {
                println!("no blocklist entries");
            } else {
                for i in &items {
                    println!("{:<45} {:<5} until {}", i.entry, i.kind, i.until);
                }
            }
        }
        Command::Blocklist(BlocklistCommand::Add { entry, expire }) => {
            ceph.blocklist_add(entry, expire.map(Duration::from_secs))
                .await?;
            ceph.wait_for_latest_osdmap().await?;
            let epoch = ceph.osdmap_epoch().await?;
            println!(
                "blocklisted {entry} ({}, osdmap epoch {epoch})",
                entry.kind()
            );
        }
        Command::Blocklist(BlocklistCommand::Rm { entry }) => {
            ceph.blocklist_rm(entry).await?;
            println!("un-blocklisted {entry}");
        }
        // Dispatched in `main` before a Ceph connection is made; nothing to do here.
        Command::Fence(_)
        | Command::Serve { .. }
        | Command::Fences(_)
        | Command::Unfence { .. } => {}
    }
    Ok(())
}

/// `{"image":"POOL/IMAGE","watchers":[…],"lock_owners":[…]}`, as the contract gives it.
pub fn watchers_json(image: &ImageSpec, status: &ImageStatus) -> serde_json::Value {
    serde_json::json!({
        "image": image.to_string(),
        "watchers": status.watchers,
        "lock_owners": status.lock_owners,
    })
}

fn watchers_text(image: &ImageSpec, status: &ImageStatus) -> String {
    let mut s = format!("{image}\nwatchers:\n");
    if status.watchers.is_empty() {
        s.push_str("  none\n");
    }
    for w in &status.watchers {
        s.push_str(&format!(
            "  {}  client.{}  cookie={}\n",
            w.address, w.client, w.cookie
        ));
    }
    s.push_str("lock owners:\n");
    if status.lock_owners.is_empty() {
        s.push_str("  none\n");
    }
    for o in &status.lock_owners {
        let mode = match o.mode {
            crate::rbd::LockMode::Exclusive => "exclusive",
            crate::rbd::LockMode::Shared => "shared",
        };
        s.push_str(&format!("  {mode}  {}\n", o.address));
    }
    s
}
