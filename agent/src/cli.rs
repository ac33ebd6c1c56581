//! The command line: clap types and dispatch. The pipeline is assembled in `app`; the `run`
//! flags are `config::Flags`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, Flags};

#[derive(Debug, Parser)]
#[command(
    name = "mcpwarden",
    version,
    about = "Transparent policy enforcement for MCP tool calls on this host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent.
    Run {
        #[command(flatten)]
        flags: Flags,
    },
    /// The CA that signs the certificates presented to workloads for https:// servers.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Check policy files, or explain the decision for one call.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Remove what the agent installs: the pinned datapath (every link, which detaches its
    /// program, and every map under the bpffs directory) and its state files (the counters'
    /// journal, the lock, the hand-over socket; the CA stays), printing what was removed.
    /// Refused while an agent runs.
    Uninstall {
        #[command(flatten)]
        args: DatapathArgs,
        /// The agent's state directory [default: /var/lib/mcpwarden].
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// What the running agent is doing (asked on its admin socket): programs, endpoints,
    /// namespaces, policies, counters near their limits, the audit sink, connections. With
    /// --datapath: what is pinned on this host, agent or not.
    Status {
        /// Print the status as JSON, for scripts.
        #[arg(long, conflicts_with = "datapath")]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
        /// Instead: the pinned datapath (map layouts, each pinned link with the program it
        /// runs), read from bpffs without an agent.
        #[arg(long)]
        datapath: bool,
        #[command(flatten)]
        args: DatapathArgs,
        /// With --datapath: also every program attached to this cgroup (BPF_PROG_QUERY),
        /// mcpwarden's or not.
        #[arg(long, value_name = "PATH", requires = "datapath")]
        cgroup: Option<PathBuf>,
    },
    /// Ask the running agent to re-read its policies and config now (what SIGHUP does), and
    /// say what changed or failed (file:line:col). Exits non-zero if a file failed to load.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Calls held for an approval (`action: require_approval`) on the running agent: list
    /// them, approve or deny one. The approver is recorded by its uid and groups (and
    /// --as); an approver in the caller's own cgroup or pod is refused.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Ask the running agent whether it is ready (an exec probe): exit 0 when it is, 1 with
    /// the failing checks when not or when it does not answer.
    Health {
        #[command(flatten)]
        admin: AdminArgs,
        /// Liveness only: the agent answers on its admin socket.
        #[arg(long)]
        live: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// The held calls, the oldest first: id, time left, caller, server, tool, argument keys.
    List {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Let a held call go on: it is decided again against the policy in force now.
    Approve {
        /// The approval's id (from `list`).
        id: String,
        /// Why, for the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Also approve the same tool for the same caller for this long (e.g. 10m).
        #[arg(long = "for", value_name = "DURATION")]
        for_: Option<String>,
        /// Who you are, recorded as `claimed_as` (your uid and groups are recorded anyway).
        #[arg(long = "as", value_name = "NAME")]
        as_: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Refuse a held call: its client gets the refusal with your reason.
    Deny {
        id: String,
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[arg(long = "as", value_name = "NAME")]
        as_: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct AdminArgs {
    /// The running agent's admin socket [default: /run/mcpwarden/admin.sock].
    #[arg(long = "admin-socket", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
}

impl AdminArgs {
    fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::admin::DEFAULT_SOCKET))
    }
}

#[derive(Debug, clap::Args)]
struct DatapathArgs {
    /// The agent's bpffs directory (`bpffs_dir`) [default: /sys/fs/bpf/mcpwarden].
    #[arg(long = "bpffs-dir", value_name = "DIR")]
    bpffs_dir: Option<PathBuf>,
}

impl DatapathArgs {
    fn pins(&self) -> crate::redirect::pin::PinDir {
        crate::redirect::pin::PinDir::new(
            self.bpffs_dir
                .as_deref()
                .unwrap_or(std::path::Path::new(crate::config::DEFAULT_BPFFS_DIR)),
        )
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files: each error as file:line:col with a hint, and warnings about rules
    /// that can never apply. Exits non-zero if any file is invalid.
    Check {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: crate::policy_cli::Format,
    },
    /// Decide one tools/call against a policy file: the decision, the rule's JSON Pointer, and
    /// every check on the way. With --live (or without FILE): against the running agent's
    /// policy and its counters as they are now, without counting the call.
    Explain {
        /// The policy file; with --live, a file the agent has loaded (as configured).
        #[arg(value_name = "FILE", required_unless_present = "live")]
        file: Option<PathBuf>,
        /// Ask the running agent (its admin socket).
        #[arg(long)]
        live: bool,
        /// With --live: the server whose policy decides (needed when there are several).
        #[arg(long, requires = "live")]
        server: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
        /// The tool called.
        #[arg(long)]
        tool: String,
        /// The call's arguments, a JSON object.
        #[arg(long)]
        args: Option<String>,
        /// Limit scope keys of the caller: grant=…, process=…, session=… (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        caller: Vec<String>,
        #[arg(long, value_enum, default_value = "text")]
        format: crate::policy_cli::Format,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// One readable line per call: time (UTC), caller, server, tool (or method, or event),
    /// decision, rule, latency. A call's request is printed with the response that closed it;
    /// refusals at once. `non_mcp` and `server_message` records only with --all.
    Tail {
        /// The audit log (JSON Lines); `-` or none: standard input.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Keep reading at the end, as `tail -F`: across a rotation (the file renamed or
        /// removed and created again) and a truncation. A call still unanswered after 2 s is
        /// printed without its answer (its answer gets a line of its own).
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only calls with this decision (a refused call is deny or require_approval).
        #[arg(long, value_enum)]
        decision: Option<crate::audit_tail::DecisionFilter>,
        /// Only calls of this tool (exact name).
        #[arg(long, value_name = "NAME")]
        tool: Option<String>,
        /// Only callers whose comm, pid, uid or cgroup contains TEXT (case-insensitive).
        #[arg(long, value_name = "TEXT")]
        caller: Option<String>,
        /// Colour the decision: auto = when standard output is a terminal and NO_COLOR is not set.
        #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
        color: crate::audit_tail::ColorWhen,
        /// Also HTTP requests without MCP messages (`non_mcp`) and the server's own messages
        /// (`server_message`).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the CA certificate(s) workloads must trust (PEM, on stdout) and their SHA-256
    /// fingerprints (stderr). Generates the CA in the state directory if there is none yet.
    Show(CaArgs),
    /// Add the CA certificate(s) to this host's trust store (update-ca-certificates or
    /// update-ca-trust).
    Install(CaArgs),
    /// Remove them from this host's trust store.
    Uninstall,
    /// Generate a root CA for a cluster, name-constrained to the endpoints of a config file
    /// (every server's host and the short names of Service hosts): DIR/ca.crt (0644) and
    /// DIR/ca.key (0600). Keep the key off the nodes: they get intermediates (`ca intermediate`).
    Init {
        /// The agent's configuration file: its servers are what the CA may sign for.
        #[arg(long = "name-constraints-from", value_name = "CONFIG")]
        config: PathBuf,
        /// Where to write ca.crt and ca.key (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, value_name = "N", default_value_t = crate::ca::cluster::DEFAULT_ROOT_DAYS)]
        days: u32,
        /// Replace an existing ca.crt / ca.key.
        #[arg(long)]
        force: bool,
    },
    /// Issue a short-lived intermediate CA for one node, signed by the root, with the root's name
    /// constraints: DIR/tls.crt (the intermediate, then the root) and DIR/tls.key (0600).
    Intermediate {
        /// The root CA certificate (`ca init`'s ca.crt).
        #[arg(long = "ca-cert", value_name = "FILE")]
        ca_cert: PathBuf,
        /// The root CA key (`ca init`'s ca.key).
        #[arg(long = "ca-key", value_name = "FILE")]
        ca_key: PathBuf,
        /// The node's name (`kubectl get nodes`), in the intermediate's subject.
        #[arg(long, value_name = "NAME")]
        node: String,
        /// Where to write tls.crt and tls.key (replaced if present).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in hours (from an hour ago, never past the root's expiry).
        #[arg(long, value_name = "N", default_value_t = crate::ca::cluster::DEFAULT_INTERMEDIATE_HOURS)]
        hours: u32,
    },
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    /// Read the `ca:` section and `state_dir` from this configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory [default: /var/lib/mcpwarden].
    #[arg(long = "state-dir")]
    state_dir: Option<PathBuf>,
}

fn uninstall(args: &DatapathArgs, state_dir: Option<&std::path::Path>) -> Result<()> {
    let state = state_dir.unwrap_or(std::path::Path::new(crate::ca::DEFAULT_STATE_DIR));
    if crate::handover::lock_held(state)? {
        anyhow::bail!(
            "an agent is running ({} is locked): stop it first",
            state.join("agent.lock").display()
        );
    }
    let pins = args.pins();
    let mut removed = pins.remove_all()?;
    removed.extend(crate::handover::remove_state(state)?);
    if removed.is_empty() {
        println!(
            "nothing installed under {} or {}",
            pins.root().display(),
            state.display()
        );
    }
    for path in &removed {
        println!("removed {}", path.display());
    }
    Ok(())
}

fn datapath_status(args: &DatapathArgs, cgroup: Option<&std::path::Path>) -> Result<()> {
    use aya::programs::links::{FdLink, PinnedLink};
    let pins = args.pins();
    println!("bpffs directory: {}", pins.root().display());
    let layouts = pins.layouts();
    if layouts.is_empty() {
        println!("maps: none pinned");
    }
    for layout in layouts {
        let dir = pins.maps_dir(&layout);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        println!("maps, layout {layout}: {}", names.join(" "));
    }
    let programs: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_owned()))
        .collect();
    let links = pins.links();
    if links.is_empty() {
        println!("links: none pinned (nothing of mcpwarden's stays attached without an agent)");
    }
    for (cgroup_id, program, path) in links {
        let info = PinnedLink::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|l| Ok(FdLink::from(l).info()?));
        match info {
            Ok(info) => println!(
                "link {} cgroup {cgroup_id} program {program}: runs program {} ({})",
                info.id(),
                info.program_id(),
                programs.get(&info.program_id()).map_or("?", String::as_str)
            ),
            Err(e) => println!("link cgroup {cgroup_id} program {program}: unreadable: {e:#}"),
        }
    }
    let Some(cgroup) = cgroup else {
        return Ok(());
    };
    let ours: std::collections::HashSet<u32> = pins
        .links()
        .iter()
        .filter_map(|(_, _, path)| PinnedLink::from_pin(path).ok())
        .filter_map(|l| FdLink::from(l).info().ok())
        .map(|i| i.program_id())
        .collect();
    println!("attached to {}:", cgroup.display());
    for (attach_type, name) in crate::redirect::pin::ATTACH_TYPES {
        let ids = match crate::redirect::pin::prog_query(cgroup, *attach_type) {
            Ok(ids) => ids,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e).with_context(|| format!("querying {}", cgroup.display())),
        };
        for id in ids {
            let whose = if ours.contains(&id) {
                "mcpwarden (pinned)"
            } else {
                "another owner"
            };
            println!(
                "  {name}: program {id} ({}) — {whose}",
                programs.get(&id).map_or("?", String::as_str)
            );
        }
    }
    Ok(())
}

/// Entry point of the `mcpwarden` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Offline commands: no runtime, no logging set-up, exit codes of their own.
    if let Command::Policy(cmd) = &cli.command {
        return policy_command(cmd);
    }
    if let Command::Audit(cmd) = &cli.command {
        return audit_command(cmd);
    }
    if let Some(code) = agent_command(&cli.command) {
        return code;
    }
    // Colours only on a terminal: a log file or a collector gets plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // In a container: the host's cgroup namespace, before any thread exists (namespaces are
    // per thread, and threads inherit their creator's).
    if matches!(cli.command, Command::Run { .. }) {
        match crate::redirect::cgroup::join_host_cgroup_namespace() {
            Ok(true) => tracing::info!(
                "joined the host's cgroup namespace (this agent runs in a container)"
            ),
            Ok(false) => {}
            Err(e) => {
                eprintln!("mcpwarden: error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    // The control plane (accept loop, endpoint resolution, signals) runs on this thread; the
    // interceptor's worker threads have runtimes of their own. The `ca` commands are synchronous.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcpwarden: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { flags } => crate::app::run(Config::assemble(flags)?).await,
            Command::Ca(cmd) => ca_command(cmd),
            Command::Policy(_) | Command::Audit(_) => Ok(()),
            Command::Uninstall { args, state_dir } => uninstall(&args, state_dir.as_deref()),
            Command::Status { .. }
            | Command::Reload { .. }
            | Command::Health { .. }
            | Command::Approvals(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpwarden: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn policy_command(cmd: &PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Check { files, format } => {
            if crate::policy_cli::check(files, *format) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        PolicyCommand::Explain {
            file,
            live: true,
            server,
            admin,
            tool,
            args,
            caller,
            format,
        } => match live_explain(
            admin,
            file.as_deref(),
            server.as_deref(),
            tool,
            args.as_deref(),
            caller,
        ) {
            Ok(v) => {
                crate::policy_cli::print_explanation(&v, *format);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mcpwarden: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Explain {
            file: Some(file),
            tool,
            args,
            caller,
            format,
            ..
        } => match crate::policy_cli::explain(file, tool, args.as_deref(), caller, *format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mcpwarden: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Explain { file: None, .. } => {
            eprintln!("mcpwarden: error: give a policy FILE, or --live to ask the running agent");
            ExitCode::from(2)
        }
    }
}

/// `policy explain --live`: the running agent decides, against its counters, without counting.
fn live_explain(
    admin: &AdminArgs,
    file: Option<&std::path::Path>,
    server: Option<&str>,
    tool: &str,
    args: Option<&str>,
    caller: &[String],
) -> Result<serde_json::Value> {
    let q = crate::policy_cli::Question::parse(tool, args, caller)?;
    let query = crate::admin::ExplainQuery {
        server: server.map(str::to_owned),
        policy: file.map(|f| f.display().to_string()),
        tool: q.tool,
        arguments: q.arguments,
        grant: Some(q.grant),
        process: Some(q.process),
        session: Some(q.session),
        namespace: Some(q.namespace),
        service_account: Some(q.service_account),
    };
    let (status, v) = crate::admin::client::request(
        &admin.socket(),
        http::Method::POST,
        "/v1/explain",
        Some(&serde_json::to_value(&query)?),
    )?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            v["error"].as_str().unwrap_or("the agent refused the query")
        );
    }
    Ok(v)
}

/// The commands that talk to a running agent (and `status --datapath`): synchronous, no
/// logging set-up. `None` for the others.
fn agent_command(cmd: &Command) -> Option<ExitCode> {
    let result = match cmd {
        Command::Status {
            datapath: true,
            args,
            cgroup,
            ..
        } => datapath_status(args, cgroup.as_deref()).map(|()| ExitCode::SUCCESS),
        Command::Status { json, admin, .. } => agent_status(admin, *json),
        Command::Reload { admin } => agent_reload(admin),
        Command::Health { admin, live } => agent_health(admin, *live),
        Command::Approvals(cmd) => approvals_command(cmd),
        _ => return None,
    };
    Some(result.unwrap_or_else(|e| {
        eprintln!("mcpwarden: error: {e:#}");
        ExitCode::FAILURE
    }))
}

fn agent_status(admin: &AdminArgs, json: bool) -> Result<ExitCode> {
    let (_, v) =
        crate::admin::client::request(&admin.socket(), http::Method::GET, "/v1/status", None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let status: crate::admin::status::Status =
            serde_json::from_value(v).context("reading the agent's status")?;
        print!("{}", crate::admin::status::render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn agent_reload(admin: &AdminArgs) -> Result<ExitCode> {
    let (_, v) =
        crate::admin::client::request(&admin.socket(), http::Method::POST, "/v1/reload", None)?;
    let r: crate::admin::Reloaded = serde_json::from_value(v).context("reading the answer")?;
    for e in &r.errors {
        eprintln!("{e}");
    }
    println!(
        "reloaded: {} changed file(s) in force, {} failed (the previous version stays)",
        r.changed,
        r.errors.len()
    );
    Ok(if r.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn approvals_command(cmd: &ApprovalsCommand) -> Result<ExitCode> {
    let (admin, decide) = match cmd {
        ApprovalsCommand::List { json, admin } => {
            // The active agent's, then those of agents still draining after a hand-over.
            let mut list: Vec<crate::approvals::Summary> = Vec::new();
            for (i, socket) in crate::admin::socket::with_draining(&admin.socket())
                .iter()
                .enumerate()
            {
                let answer =
                    crate::admin::client::request(socket, http::Method::GET, "/v1/approvals", None);
                let v = match answer {
                    Ok((_, v)) => v,
                    // A draining agent that went meanwhile has nothing held any more.
                    Err(_) if i > 0 => continue,
                    Err(e) => return Err(e),
                };
                let more: Vec<crate::approvals::Summary> =
                    serde_json::from_value(v).context("reading the agent's answer")?;
                list.extend(more);
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", crate::approvals::render(&list));
            }
            return Ok(ExitCode::SUCCESS);
        }
        ApprovalsCommand::Approve {
            id,
            reason,
            for_,
            as_,
            admin,
        } => (
            admin,
            crate::admin::Decide {
                id: id.clone(),
                approve: true,
                reason: reason.clone(),
                for_: for_.clone(),
                as_: as_.clone(),
            },
        ),
        ApprovalsCommand::Deny {
            id,
            reason,
            as_,
            admin,
        } => (
            admin,
            crate::admin::Decide {
                id: id.clone(),
                approve: false,
                reason: reason.clone(),
                for_: None,
                as_: as_.clone(),
            },
        ),
    };
    let body = serde_json::to_value(&decide)?;
    // The active agent first; an id it does not hold may be a draining agent's. A socket
    // left by an agent that is gone does not answer: the next is asked.
    let sockets = crate::admin::socket::with_draining(&admin.socket());
    let mut answer = None;
    let mut errors = Vec::new();
    for socket in &sockets {
        match crate::admin::client::request(
            socket,
            http::Method::POST,
            "/v1/approvals/decide",
            Some(&body),
        ) {
            Ok((_, v)) => {
                answer = Some(v);
                break;
            }
            Err(e) => errors.push(e),
        }
    }
    let v = match answer {
        Some(v) => v,
        None => {
            // The active agent's answer, unless a draining one said more than "not here".
            let telling = errors.iter().position(|e| {
                let text = format!("{e:#}");
                !text.contains("no pending approval") && !text.starts_with("connecting to")
            });
            let e = match telling {
                Some(i) => errors.swap_remove(i),
                None if !errors.is_empty() => errors.swap_remove(0),
                None => anyhow::anyhow!("no admin socket answered"),
            };
            return Err(e);
        }
    };
    let s: crate::approvals::Summary =
        serde_json::from_value(v).context("reading the agent's answer")?;
    println!(
        "{} {}: {} on {} by {}",
        if decide.approve { "approved" } else { "denied" },
        s.id,
        s.tool,
        s.server,
        crate::approvals::caller_name(&s.caller)
    );
    Ok(ExitCode::SUCCESS)
}

fn agent_health(admin: &AdminArgs, live: bool) -> Result<ExitCode> {
    let (status, v) =
        crate::admin::client::request(&admin.socket(), http::Method::GET, "/v1/health", None)?;
    if live {
        println!("alive");
        return Ok(ExitCode::SUCCESS);
    }
    let report: crate::admin::health::Report =
        serde_json::from_value(v).context("reading the answer")?;
    for c in report.checks.iter().filter(|c| !c.ok) {
        println!("{}: {}", c.name, c.detail);
    }
    if status.is_success() && report.ready {
        println!("ready");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("not ready");
        Ok(ExitCode::FAILURE)
    }
}

fn audit_command(cmd: &AuditCommand) -> ExitCode {
    let AuditCommand::Tail {
        file,
        follow,
        decision,
        tool,
        caller,
        color,
        all,
    } = cmd;
    let opts = crate::audit_tail::Options {
        file: file.clone(),
        follow: *follow,
        filter: crate::audit_tail::Filter {
            decision: *decision,
            tool: tool.clone(),
            caller: caller.clone(),
        },
        color: color.enabled(),
        all: *all,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    match crate::audit_tail::run(&opts, &mut out, None) {
        Ok(()) => ExitCode::SUCCESS,
        // `| head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpwarden: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The CA settings the `ca` commands act on: the config file's, or just a state directory.
fn ca_settings(args: &CaArgs) -> Result<crate::ca::CaSettings> {
    match &args.config {
        Some(path) => Ok(Config::assemble(Flags {
            config: Some(path.clone()),
            state_dir: args.state_dir.clone(),
            ..Flags::default()
        })?
        .ca),
        None => Ok(crate::ca::CaSettings {
            state_dir: args
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::ca::DEFAULT_STATE_DIR)),
            ..Default::default()
        }),
    }
}

/// `ca init`: the root, constrained to the config's endpoints; then what to do with it.
fn ca_init(config: &std::path::Path, out: &std::path::Path, days: u32, force: bool) -> Result<()> {
    let config = Config::assemble(Flags {
        config: Some(config.to_path_buf()),
        ..Flags::default()
    })?;
    let names = crate::ca::cluster::endpoint_names(&config);
    let root = crate::ca::cluster::init(&names, out, days, force, std::time::SystemTime::now())?;
    let (cert, key) = (root.cert.display(), root.key.display());
    println!("wrote {cert} (SHA-256 {})", root.fingerprint);
    println!("  may sign for: {}", root.permitted);
    println!("wrote {key} (0600): keep it off the nodes; they get intermediates");
    println!();
    println!("Workloads trust the root (the certificate only):");
    println!("  kubectl -n mcpwarden create configmap mcpwarden-ca --from-file=ca.crt={cert}");
    println!(
        "Each node signs with an intermediate of its own, in one Secret (<node>.crt, <node>.key):"
    );
    println!("  args=()");
    println!("  for node in $(kubectl get nodes -o jsonpath='{{.items[*].metadata.name}}'); do");
    println!("    mcpwarden ca intermediate --ca-cert {cert} --ca-key {key} --node \"$node\" \\");
    println!(
        "      --out \"nodes/$node\" --hours {}",
        crate::ca::cluster::DEFAULT_INTERMEDIATE_HOURS
    );
    println!("    args+=(--from-file=\"$node.crt=nodes/$node/tls.crt\" --from-file=\"$node.key=nodes/$node/tls.key\")");
    println!("  done");
    println!("  kubectl -n mcpwarden create secret generic mcpwarden-node-ca \"${{args[@]}}\" \\");
    println!("    --dry-run=client -o yaml | kubectl apply -f -");
    println!("Configure the agent with ca.cert: /etc/mcpwarden/ca/${{NODE_NAME}}.crt and");
    println!(
        "ca.key: /etc/mcpwarden/ca/${{NODE_NAME}}.key; re-issue the intermediates before they"
    );
    println!("expire and restart the agents (README, \"The CA in a cluster\").");
    Ok(())
}

fn ca_command(cmd: CaCommand) -> Result<()> {
    use crate::ca::{trust, Ca};
    match cmd {
        CaCommand::Show(args) => {
            let ca = Ca::load_or_generate(&ca_settings(&args)?)?;
            for (file, fingerprint, signing) in ca.describe(std::time::SystemTime::now()) {
                eprintln!(
                    "{}: SHA-256 {fingerprint}{}",
                    file.display(),
                    if signing { " (signing)" } else { "" }
                );
            }
            for i in ca.intermediates() {
                eprintln!(
                    "{}: signs with the intermediate {:?} (SHA-256 {}), valid until {}; workloads trust the root above",
                    i.source.display(),
                    i.subject,
                    i.fingerprint,
                    humantime::format_rfc3339_seconds(i.not_after)
                );
            }
            print!("{}", ca.bundle_pem());
        }
        CaCommand::Install(args) => {
            let ca = Ca::load_or_generate(&ca_settings(&args)?)?;
            let pems: Vec<String> = ca
                .bundle_pem()
                .split_inclusive("-----END CERTIFICATE-----\n")
                .map(str::to_owned)
                .collect();
            for f in trust::detect()?.install(&pems)? {
                eprintln!("installed {}", f.display());
            }
        }
        CaCommand::Init {
            config,
            out,
            days,
            force,
        } => ca_init(&config, &out, days, force)?,
        CaCommand::Intermediate {
            ca_cert,
            ca_key,
            node,
            out,
            hours,
        } => {
            let issued = crate::ca::cluster::intermediate(
                &crate::ca::CaFiles {
                    cert: ca_cert,
                    key: ca_key,
                },
                &node,
                &out,
                hours,
                std::time::SystemTime::now(),
            )?;
            println!(
                "wrote {} ({}, SHA-256 {}, valid until {}{}), then the root",
                issued.cert.display(),
                issued.subject,
                issued.fingerprint,
                humantime::format_rfc3339_seconds(issued.not_after),
                if issued.cut_short {
                    ": the root expires first"
                } else {
                    ""
                }
            );
            println!("wrote {} (0600)", issued.key.display());
            if !issued.constrained {
                eprintln!(
                    "mcpwarden: warning: the root carries no name constraints: agents refuse this \
                     intermediate unless ca.allow_unconstrained is true"
                );
            }
        }
        CaCommand::Uninstall => {
            let removed = trust::detect()?.uninstall()?;
            if removed.is_empty() {
                eprintln!("no mcpwarden CA was installed");
            }
            for f in removed {
                eprintln!("removed {}", f.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_run_flag_lands_in_its_config_flag() {
        let cli = Cli::try_parse_from([
            "mcpwarden",
            "run",
            "--config=c.yaml",
            "--endpoint=http://a:1/mcp",
            "--policy=a.json",
            "--endpoint=https://b/mcp",
            "--policy=b.json",
            "--listen=127.0.0.1:9",
            "--audit-log=-",
            "--cgroup=kubepods.slice",
            "--agent-cgroup=warden",
            "--max-body-bytes=10",
            "--workers=2",
            "--state-dir=/s",
            "--upstream-ca=ca.pem",
            "--no-tls-prewarm",
        ]);
        let Ok(Cli {
            command: Command::Run { flags: f },
        }) = cli
        else {
            panic!("not parsed as run: {cli:?}");
        };
        assert_eq!(f.config.as_deref(), Some("c.yaml".as_ref()));
        assert_eq!(f.endpoints, ["http://a:1/mcp", "https://b/mcp"]);
        assert_eq!(
            f.policies,
            ["a.json", "b.json"].map(std::path::PathBuf::from)
        );
        assert_eq!(f.listen, ["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(f.audit.as_deref(), Some("-".as_ref()));
        assert_eq!(f.cgroup.as_deref(), Some("kubepods.slice".as_ref()));
        assert_eq!(f.agent_cgroup.as_deref(), Some("warden".as_ref()));
        assert_eq!((f.max_body_bytes, f.workers), (Some(10), Some(2)));
        assert_eq!(f.state_dir.as_deref(), Some("/s".as_ref()));
        assert_eq!(f.upstream_ca.as_deref(), Some("ca.pem".as_ref()));
        assert!(f.no_tls_prewarm);

        let Ok(Cli {
            command: Command::Run { flags: f },
        }) = Cli::try_parse_from(["mcpwarden", "run"])
        else {
            panic!("run without flags");
        };
        assert!(!f.no_tls_prewarm && f.endpoints.is_empty() && f.config.is_none());
    }
}
