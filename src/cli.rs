//! The command line: `rbdfence [-c CONF] [--id NAME] <command>`.
//!
//! Exit codes: 0 success, 2 bad usage or bad input (the message names the argument),
//! 1 any other failure (the message names the Ceph call and the errno).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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

fn parse_entry(s: &str) -> Result<BlocklistEntry, String> {
    s.parse().map_err(|e: crate::rbd::AddrError| e.to_string())
}

/// Runs the CLI and maps its result to the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
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
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rbdfence: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RBDFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
