//! jabberctl: the operator's tool. Adds, removes and lists users and sets passwords on a
//! running server, by connecting to the router as the component `admin` and asking the
//! storage component (see `docs/operations.md`); imports and exports accounts as
//! XEP-0227 files, and dumps and restores whole stores (docs/migration.md); follows the
//! server's log records as a log sink (`jabberctl log --follow`, docs/logd.md).

mod archive_pages;
mod control;
mod dump;
mod migrate;
mod pie;
mod xml;

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use jrs_auth::{Credentials, NS_AUTH};
use jrs_component::log_record::{Filter, Level, LogRecord};
use jrs_component::service::{connect_and_bind, Bind};
use jrs_component::PacketType;
use jrs_config::{Node, RouterLink};
use jrs_stream::Limits;
use jrs_xdb::{Op, XdbClient};

/// Manage a running jabberd-rs server: accounts, migration and copies of its storage,
/// sessions, logs.
#[derive(Parser, Debug)]
#[command(name = "jabberctl", version, about)]
struct Args {
    /// Configuration file: how to reach the router.
    #[arg(short = 'c', long = "config", default_value = "etc/jabberctl.xml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account. The password is read from standard input unless given.
    Adduser {
        /// The account's address, e.g. alice@localhost.
        jid: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// Remove an account and everything stored for it.
    Deluser { jid: String },
    /// Set an account's password. The password is read from standard input unless given.
    Passwd {
        jid: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// List the accounts of a domain.
    Users { domain: String },
    /// Import accounts from XEP-0227 files (Prosody's, ejabberd's or jabberctl's export).
    ///
    /// Reads each file (and the files it includes with XInclude) and stores each account
    /// as the server keeps it: its credentials (a plain password, or SCRAM-SHA-1 and
    /// SCRAM-SHA-256 keys carried over as they are), roster and pending subscription
    /// requests, vCard, private XML, offline messages, blocklist, PEP nodes and message
    /// archive. An account's credentials are stored last: it can log in once the rest is
    /// in. What is not carried over is printed under each account. See
    /// docs/migration.md.
    Import {
        /// The XEP-0227 files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Replace accounts that exist already: everything stored for them is removed,
        /// then the file's data is stored (without it such accounts are left alone and
        /// reported).
        #[arg(long)]
        replace: bool,
        /// Only the users of this domain (repeatable; all the file's domains by default).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Read the file and print what would be imported, without a server.
        #[arg(long)]
        dry_run: bool,
    },
    /// Export the accounts of one or more domains as a XEP-0227 file.
    ///
    /// Writes, per account, its SCRAM keys, roster and pending subscription requests,
    /// vCard, private XML, offline messages, blocklist (as a privacy list), PEP nodes and
    /// message archive; `jabberctl import` of the file gives the same records. See
    /// docs/migration.md.
    Export {
        /// The domains whose accounts are written.
        #[arg(required = true)]
        domains: Vec<String>,
        /// Write to this file (standard output by default).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// Only this account (repeatable).
        #[arg(long = "user")]
        users: Vec<String>,
    },
    /// Copy everything stored for some hosts into a dump file (to restore into another
    /// store: xdb-file to PostgreSQL and back).
    ///
    /// Unlike export, nothing is left out: every stored namespace of every owner (users,
    /// rooms, the hosts themselves), whatever module wrote it, and every archive with
    /// all its items (ids, times, with, stanzas), as storage answers them. The file is
    /// written under FILE.partial and renamed when complete. See docs/migration.md,
    /// "Copying a store".
    Dump {
        /// The dump file to write.
        file: PathBuf,
        /// A host whose data is dumped (repeatable, at least one: the users' domain,
        /// and the group chat service's, e.g. conference.localhost, for its rooms).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// Store the content of a dump file (`jabberctl dump`) in the running server's
    /// storage, whichever it is.
    ///
    /// Owners (users, rooms, hosts) that have data already are left alone and reported,
    /// unless --replace. An account's credentials are stored last: it can log in once
    /// the rest is in. See docs/migration.md, "Copying a store".
    Restore {
        /// The dump file.
        file: PathBuf,
        /// Replace owners that have data: everything stored for them is removed, then
        /// the dump's is stored.
        #[arg(long)]
        replace: bool,
        /// Only the owners of this domain (repeatable; all of the file by default).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Print the server's log records as they happen, by binding as a log sink (see
    /// docs/logd.md) until interrupted.
    Log {
        /// Keep printing new records (the only mode: there is no history).
        #[arg(long)]
        follow: bool,
        /// Only records at least this severe: error, warn, info, debug or trace.
        #[arg(long, default_value = "trace")]
        level: String,
        /// Only records concerning this host (repeatable).
        #[arg(long)]
        host: Vec<String>,
        /// Only records of this process or instance (sm, sm-2; repeatable).
        #[arg(long)]
        process: Vec<String>,
        /// Only records whose message or a field contains this text.
        #[arg(long = "match")]
        matches: Option<String>,
    },
    /// List who is online where: each session's JID, c2s instance, sm instance, state
    /// (live, or hibernating under XEP-0198) and presence.
    Sessions {
        /// Only the sessions of this domain.
        domain: Option<String>,
    },
    /// End the sessions of an account (all of them, or one resource): the clients get
    /// the stream error <policy-violation/>. The account stays; see deluser.
    Kick {
        /// user@domain or user@domain/resource.
        jid: String,
    },
    /// Send a message (a headline from the domain) to every available session of a
    /// domain's users. The text is read from standard input unless given.
    Announce {
        domain: String,
        /// The text.
        #[arg(long)]
        message: Option<String>,
        #[arg(long)]
        subject: Option<String>,
    },
    /// Online users and sessions per sm instance, and the totals.
    Stats,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<jrs_config::ConfigError>() => {
            eprintln!("jabberctl: {e}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("jabberctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_link(path: &std::path::Path) -> jrs_config::Result<RouterLink> {
    let root = Node::load(path, "jabberctl")?;
    root.allow(&[], &["router"])?;
    RouterLink::from_node(root.required_child("router")?)
}

/// A bare JID with a user part, normalised.
fn account(jid: &str) -> anyhow::Result<String> {
    let bare = jid::BareJid::new(jid).with_context(|| format!("'{jid}' is not a valid address"))?;
    if bare.node().is_none() {
        bail!("'{jid}' has no user part: expected user@domain");
    }
    Ok(bare.to_string())
}

/// A domain, normalised.
fn domain(d: &str) -> anyhow::Result<String> {
    jid::BareJid::new(d)
        .ok()
        .filter(|j| j.node().is_none())
        .map(|j| j.to_string())
        .with_context(|| format!("'{d}' is not a domain"))
}

fn read_password(given: Option<String>) -> anyhow::Result<String> {
    let password = match given {
        Some(p) => p,
        None => {
            eprint!("password: ");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Command::Import {
        files,
        hosts,
        dry_run: true,
        ..
    } = &args.command
    {
        // Needs no server, and no configuration.
        let opts = migrate::ImportOptions {
            replace: false,
            hosts: hosts.clone(),
        };
        return migrate::import_dry_run(files, &opts).await;
    }
    let mut link = load_link(&args.config)?;
    // An instance name, so several jabberctl runs can be connected at once.
    link.name = format!("{}-{}", link.name, std::process::id());
    // Ask before connecting, so a prompt does not hold the router link open.
    let password = match &args.command {
        Command::Adduser { password, .. } | Command::Passwd { password, .. } => {
            Some(read_password(password.clone())?)
        }
        _ => None,
    };
    jrs_component::transport::install_crypto_provider();
    if let Some(ask) = control_question(&args.command)? {
        return control(&link, ask).await;
    }
    if let Command::Log {
        follow,
        level,
        host,
        process,
        matches,
    } = &args.command
    {
        if !follow {
            bail!("jabberctl log needs --follow (records are not kept: logd writes them to files)");
        }
        let filter = Filter {
            level: Level::parse(level).with_context(|| {
                format!("--level {level}: expected error, warn, info, debug or trace")
            })?,
            hosts: host.iter().map(|h| h.to_ascii_lowercase()).collect(),
            processes: process.clone(),
            matches: matches.clone(),
        };
        return follow_log(&link, filter).await;
    }
    let component = tokio::time::timeout(
        Duration::from_secs(10),
        connect_and_bind(&link, Limits::default(), &[]),
    )
    .await
    .context("the router did not answer within 10 s: is the server running?")??;
    let (mut reader, writer) = component.split();
    let xdb = std::sync::Arc::new(XdbClient::new(link.name.clone(), Duration::from_secs(5)));
    xdb.set_outbox(writer.spawn());
    let answers = xdb.clone();
    tokio::spawn(async move {
        while let Ok(stanza) = reader.next().await {
            if stanza.name() == "xdb" {
                answers.answer(&stanza);
            }
        }
    });
    match args.command {
        Command::Adduser { jid, .. } => {
            let bare = account(&jid)?;
            if !xdb.get(&bare, NS_AUTH).await?.is_empty() {
                bail!("{bare} exists already (use passwd to change its password)");
            }
            let record = Credentials::from_password(&password.expect("read above")).to_xml();
            xdb.set(&bare, NS_AUTH, record).await?;
            println!("{bare} added");
        }
        Command::Passwd { jid, .. } => {
            let bare = account(&jid)?;
            if xdb.get(&bare, NS_AUTH).await?.is_empty() {
                bail!("{bare} does not exist");
            }
            let record = Credentials::from_password(&password.expect("read above")).to_xml();
            xdb.set(&bare, NS_AUTH, record).await?;
            println!("password of {bare} changed");
        }
        Command::Deluser { jid } => {
            let bare = account(&jid)?;
            if xdb.get(&bare, NS_AUTH).await?.is_empty() {
                bail!("{bare} does not exist");
            }
            xdb.delete(&bare, "*").await?;
            println!(
                "{bare} removed with all its data (sessions still open end at their next login)"
            );
        }
        Command::Users { domain } => {
            let listing = xdb
                .request(Op::List, &domain, "", Default::default(), None)
                .await?;
            let mut found = 0;
            for jid in migrate::owners(&listing) {
                if !xdb.get(&jid, NS_AUTH).await?.is_empty() {
                    println!("{jid}");
                    found += 1;
                }
            }
            eprintln!("{found} account(s) on {domain}");
        }
        Command::Import {
            files,
            replace,
            hosts,
            ..
        } => {
            let opts = migrate::ImportOptions { replace, hosts };
            migrate::import(xdb, &files, &opts).await?;
        }
        Command::Export {
            domains,
            output,
            users,
        } => {
            let only = users
                .iter()
                .map(|u| account(u))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let domains = domains
                .iter()
                .map(|d| domain(d))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let written = match &output {
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    migrate::export(&xdb, &domains, &only, &mut out).await?
                }
                Some(path) => {
                    // Written beside it and renamed when complete: a failed export
                    // leaves no truncated file under the name.
                    let mut partial = path.as_os_str().to_owned();
                    partial.push(".partial");
                    let partial = PathBuf::from(partial);
                    let file = std::fs::File::create(&partial)
                        .with_context(|| format!("{}", partial.display()))?;
                    let mut out = std::io::BufWriter::new(file);
                    let n = migrate::export(&xdb, &domains, &only, &mut out).await?;
                    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                    std::fs::rename(&partial, path)
                        .with_context(|| format!("{}", path.display()))?;
                    n
                }
            };
            eprintln!("{written} account(s) exported");
        }
        Command::Dump { file, hosts } => {
            let hosts = hosts
                .iter()
                .map(|d| domain(d))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let n = dump::dump(&xdb, &hosts, &file).await?;
            eprintln!(
                "{} owner(s), {} fragment(s), {} archived item(s) dumped to {}",
                n.owners,
                n.fragments,
                n.items,
                file.display()
            );
        }
        Command::Restore {
            file,
            replace,
            hosts,
        } => {
            let hosts = hosts
                .iter()
                .map(|d| domain(d))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = dump::RestoreOptions { replace, hosts };
            let n = dump::restore(xdb, &file, &opts).await?;
            eprintln!(
                "{} owner(s), {} fragment(s), {} archived item(s) restored",
                n.owners, n.fragments, n.items
            );
        }
        Command::Log { .. }
        | Command::Sessions { .. }
        | Command::Kick { .. }
        | Command::Announce { .. }
        | Command::Stats => unreachable!("handled before connecting"),
    }
    Ok(())
}

/// The question `sessions`, `kick`, `announce` and `stats` ask every sm instance.
fn control_question(command: &Command) -> anyhow::Result<Option<control::Ask>> {
    Ok(Some(match command {
        Command::Sessions { domain } => control::Ask::Sessions {
            domain: domain.as_ref().map(|d| d.to_ascii_lowercase()),
        },
        Command::Kick { jid } => control::Ask::Kick {
            jid: jid::Jid::new(jid)
                .ok()
                .filter(|j| j.node().is_some())
                .with_context(|| format!("'{jid}' is not a user's JID"))?
                .to_string(),
        },
        Command::Announce {
            domain,
            message,
            subject,
        } => {
            let body = match message {
                Some(m) => m.clone(),
                None => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                    text.trim_end().to_owned()
                }
            };
            if body.is_empty() {
                bail!("no message to announce");
            }
            control::Ask::Announce {
                domain: domain.to_ascii_lowercase(),
                subject: subject.clone(),
                body,
            }
        }
        Command::Stats => control::Ask::Stats,
        _ => return Ok(None),
    }))
}

/// Asks every sm instance (found through link notices) and prints the merged answers.
async fn control(link: &RouterLink, ask: control::Ask) -> anyhow::Result<()> {
    let component = tokio::time::timeout(
        Duration::from_secs(10),
        connect_and_bind(link, Limits::default(), &[Bind::notices()]),
    )
    .await
    .context("the router did not answer within 10 s: is the server running?")??;
    let (mut reader, writer) = component.split();
    let outbox = writer.spawn();
    let domain = match &ask {
        control::Ask::Sessions { domain } => domain.clone(),
        control::Ask::Announce { domain, .. } => Some(domain.clone()),
        _ => None,
    };
    let instances =
        control::sm_instances(&link.name, &mut reader, &outbox, domain.as_deref()).await?;
    if instances.is_empty() {
        bail!(
            "no session manager is connected{}",
            domain.map_or(String::new(), |d| format!(" for {d}"))
        );
    }
    let answers = control::ask_all(&link.name, &mut reader, &outbox, &instances, &ask).await?;
    control::print(&ask, &answers);
    outbox.flushed().await;
    Ok(())
}

/// `jabberctl log --follow`: binds `log` for `*` (copies: logd and others keep theirs)
/// and prints each record that passes the filter as one line (docs/logd.md).
async fn follow_log(link: &RouterLink, filter: Filter) -> anyhow::Result<()> {
    let bind = Bind {
        route: PacketType::Log,
        host: "*".into(),
        shared: true,
        fanout: false,
        ns: None,
    };
    let component = tokio::time::timeout(
        Duration::from_secs(10),
        connect_and_bind(link, Limits::default(), &[bind]),
    )
    .await
    .context("the router did not answer within 10 s: is the server running?")??;
    let (mut reader, _writer) = component.split();
    eprintln!("following the server's log (Ctrl-C to stop)");
    let print = async {
        loop {
            let stanza = reader.next().await?;
            if let Some(r) = LogRecord::parse(&stanza) {
                if filter.accepts(&r) {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", r.line())?;
                    out.flush()?;
                }
            }
        }
    };
    tokio::select! {
        r = print => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
