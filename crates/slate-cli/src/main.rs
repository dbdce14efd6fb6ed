//! `slate`: the server and its command-line client, thin over the libraries.

mod bench;
mod client;
mod fake_github;
mod image_cmd;
mod plan_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use slate_core::config::Config;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "slate",
    version,
    about = "CI for pull requests on pristine machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[arg(long, short, env = "SLATE_CONFIG", default_value = "slate.toml")]
        config: PathBuf,
        /// Override `[server] listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Write the bound address here once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Validate a configuration file without starting anything.
    CheckConfig {
        #[arg(long, short, env = "SLATE_CONFIG", default_value = "slate.toml")]
        config: PathBuf,
    },
    /// Print the SHA-256 fingerprint of the agent listener's certificate (`sha256:HEX`),
    /// which remote agents pin (`SLATE_AGENT_FINGERPRINT`); generates the certificate into
    /// the data dir if it does not exist yet, as `serve` would.
    AgentFingerprint {
        #[arg(long, short, env = "SLATE_CONFIG", default_value = "slate.toml")]
        config: PathBuf,
    },
    /// Enqueue a build of a branch head (the same path as a webhook).
    Submit {
        #[arg(long)]
        repo: String,
        #[arg(long = "ref")]
        git_ref: String,
        #[command(flatten)]
        server: client::ServerArgs,
        /// Wait for the build to finish and exit non-zero unless every job succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Print a job's log.
    Logs {
        job: i64,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// List builds, newest first.
    Builds {
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        pr: Option<u64>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// List the jobs of a build.
    Jobs {
        build: i64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Cancel a job.
    Cancel {
        job: i64,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Measure sandbox cost, image-size independence, webhook latency and ingest (as root).
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
    },
    /// Base images: build a recipe into a new version, list versions, collect old ones.
    #[command(subcommand)]
    Image(image_cmd::ImageCommand),
    /// Print what a change would build (`--planner macports`: the changed ports and the
    /// users of changed PortGroups), from a local checkout.
    Plan {
        #[arg(long, default_value = "macports")]
        planner: String,
        #[arg(long)]
        repo_dir: PathBuf,
        #[arg(long)]
        base: String,
        #[arg(long)]
        head: String,
        #[arg(long, default_value_t = 50)]
        portgroup_limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Apply the store's migrations (SQLite or PostgreSQL) and exit. Migrations only
    /// expand the schema (new tables, nullable columns), so replicas of the previous
    /// version keep working while others are upgraded.
    Migrate {
        #[arg(long, short, env = "SLATE_CONFIG", default_value = "slate.toml")]
        config: PathBuf,
    },
    /// Manage API tokens (stored hashed; a token is shown once, when created).
    #[command(subcommand)]
    Token(TokenCommand),
    /// A stand-in for GitHub's status API that records what it receives (demos, offline use).
    #[command(hide = true)]
    FakeGithub {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Append each received status as a JSON line here.
        #[arg(long)]
        record: PathBuf,
        /// Write the bound address here once listening.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token for the API (`Authorization: Bearer`) and the web UI's login.
    Create {
        name: String,
        #[arg(long, short, env = "SLATE_CONFIG", default_value = "slate.toml")]
        config: PathBuf,
    },
}

fn load_config(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match Config::parse(&text, &path.display().to_string()) {
        Ok(c) => Ok(c),
        Err(errors) => bail!("{errors}"),
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SLATE_LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    use std::io::IsTerminal;
    // Colours only on a terminal: logs in files stay greppable.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::CheckConfig { config } => {
            let c = load_config(&config)?;
            println!(
                "{}: ok ({} repos, {} pools, {} pipelines)",
                config.display(),
                c.repos.len(),
                c.pools.len(),
                c.pipelines.len()
            );
            Ok(0)
        }
        Command::AgentFingerprint { config } => {
            let c = load_config(&config)?;
            let tls = slate_server::tls::AgentTls::load_or_generate(
                &c.server.data_dir,
                c.server.agent_tls_cert.as_deref(),
                c.server.agent_tls_key.as_deref(),
            )?;
            println!("{}", tls.fingerprint);
            Ok(0)
        }
        Command::Serve {
            config,
            listen,
            addr_file,
        } => {
            init_tracing();
            let mut c = load_config(&config)?;
            if let Some(l) = listen {
                c.server.listen = l;
            }
            let listener = tokio::net::TcpListener::bind(&c.server.listen)
                .await
                .with_context(|| format!("binding {}", c.server.listen))?;
            let addr = listener.local_addr()?;
            let app = slate_server::App::build(
                c,
                slate_server::AppOptions {
                    bound_addr: Some(addr),
                    ..Default::default()
                },
            )
            .await?;
            tracing::info!(%addr, data_dir = %app.data_dir.display(), "slate listening");
            if let Some(p) = addr_file {
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, addr.to_string())?;
                std::fs::rename(&tmp, &p)?;
            }
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                tracing::info!("shutting down");
            };
            slate_server::start(app, listener, shutdown).await?;
            Ok(0)
        }
        Command::Submit {
            repo,
            git_ref,
            server,
            wait,
        } => client::submit(&server, &repo, &git_ref, wait).await,
        Command::Logs {
            job,
            follow,
            server,
        } => client::logs(&server, job, follow).await,
        Command::Builds {
            repo,
            pr,
            limit,
            json,
            server,
        } => client::builds(&server, repo, pr, limit, json).await,
        Command::Jobs {
            build,
            json,
            server,
        } => client::jobs(&server, build, json).await,
        Command::Cancel { job, server } => client::cancel(&server, job).await,
        Command::Bench { args } => bench::run(args).await,
        Command::Image(cmd) => image_cmd::run(cmd).await,
        Command::Plan {
            planner,
            repo_dir,
            base,
            head,
            portgroup_limit,
            json,
        } => {
            if planner != "macports" {
                bail!("unknown planner {planner:?}: expected \"macports\"");
            }
            plan_cmd::run(&repo_dir, &base, &head, portgroup_limit, json)
        }
        Command::Migrate { config } => {
            let c = load_config(&config)?;
            let url = c.server.database.as_deref().unwrap_or("");
            slate_store::open_store(url, &c.server.data_dir.join("slate.db")).await?;
            println!(
                "migrations applied to {}",
                if url.is_empty() {
                    c.server.data_dir.join("slate.db").display().to_string()
                } else {
                    // Never print credentials.
                    url.split('@')
                        .next_back()
                        .unwrap_or("the database")
                        .to_string()
                }
            );
            Ok(0)
        }
        Command::Token(TokenCommand::Create { name, config }) => {
            let c = load_config(&config)?;
            let store = slate_store::open_store(
                c.server.database.as_deref().unwrap_or(""),
                &c.server.data_dir.join("slate.db"),
            )
            .await?;
            let (id, token) = slate_server::ui::auth::create_token(store.as_ref(), &name).await?;
            eprintln!("token {id} ({name}) created; it is shown only once:");
            println!("{token}");
            Ok(0)
        }
        Command::FakeGithub {
            listen,
            record,
            addr_file,
        } => {
            fake_github::run(&listen, &record, addr_file.as_deref()).await?;
            Ok(0)
        }
    }
}
