//! jabberctl: the operator's tool. Adds, removes and lists users and sets passwords on a
//! running server, by connecting to the router as the component `admin` and asking the
//! storage component (see `docs/operations.md`); follows the server's log records as a
//! log sink (`jabberctl log --follow`, docs/logd.md).

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

/// Manage the users of a running jabberd-rs server.
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
            for jid in owners(&listing) {
                if !xdb.get(&jid, NS_AUTH).await?.is_empty() {
                    println!("{jid}");
                    found += 1;
                }
            }
            eprintln!("{found} account(s) on {domain}");
        }
        Command::Log { .. } => unreachable!("handled before connecting"),
    }
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

/// The `jid` attributes of `<owner/>` elements in a `list` answer.
fn owners(listing: &[u8]) -> Vec<String> {
    let mut reader = quick_xml::Reader::from_reader(listing);
    let mut out = vec![];
    while let Ok(event) = reader.read_event() {
        match event {
            quick_xml::events::Event::Empty(e) | quick_xml::events::Event::Start(e)
                if e.local_name().as_ref() == "owner" =>
            {
                if let Some(a) = e.attributes().flatten().find(|a| a.key.as_ref() == "jid") {
                    if let Ok(v) = quick_xml::escape::unescape(&a.value) {
                        out.push(v.into_owned());
                    }
                }
            }
            quick_xml::events::Event::Eof => break,
            _ => {}
        }
    }
    out
}
