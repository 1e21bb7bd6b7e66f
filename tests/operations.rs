//! What an operator meets: the shipped configuration files, config errors, and the
//! supervisor keeping the server up.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;

use jrs_harness::{bin_dir, free_port, repo_root};
use jrs_xdb::{Op, Request};

const PROGRAMS: &[(&str, &str)] = &[
    ("router", "etc/router.xml"),
    ("xdb-file", "etc/xdb-file.xml"),
    ("sm", "etc/sm.xml"),
    ("muc", "etc/muc.xml"),
    ("upload", "etc/upload.xml"),
    ("proxy65", "etc/proxy65.xml"),
    ("c2s", "etc/c2s.xml"),
    ("s2s", "etc/s2s.xml"),
];

#[test]
fn every_shipped_config_loads() {
    for (program, config) in PROGRAMS {
        let out = Command::new(bin_dir().join(program))
            .args(["--check", "-c", config])
            .current_dir(repo_root())
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e} (build the workspace first)"));
        assert!(
            out.status.success(),
            "{program} -c {config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(bin_dir().join("router"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("-c, --config"));
}

#[test]
fn a_broken_config_names_file_and_line() {
    let dir = std::env::temp_dir().join(format!("jrs-badconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("router", "<router>\n  <listen port='5347'/>\n  <users file='u.xml'>\n</router>\n", 4, "malformed XML"),
        ("router", "<router>\n  <listen port='5347'/>\n  <listne/>\n  <users file='u.xml'/>\n</router>\n", 3, "unknown element"),
        ("router", "<router>\n  <listen port='http'/>\n  <users file='u.xml'/>\n</router>\n", 2, "expected a port number"),
        ("router", "<router>\n  <listen port='5347'/>\n</router>\n", 1, "<users> is required"),
        ("xdb-file", "<xdb-file>\n  <router name='xdb-file' secret='s'/>\n  <host>localhost</host>\n</xdb-file>\n", 1, "<spool> is required"),
        ("sm", "<sm>\n  <router name='sm' secret='s' tls='maybe'/>\n  <host>localhost</host>\n</sm>\n", 2, "expected true or false"),
        ("s2s", "<s2s>\n  <router name='s2s' secret='s'/>\n</s2s>\n", 1, "<host name='DOMAIN'/> is required"),
        ("muc", "<muc>\n  <router name='muc' secret='s'/>\n  <service>room@conference</service>\n</muc>\n", 3, "not a domain name"),
    ];
    for (i, (program, text, line, message)) in cases.iter().enumerate() {
        let path = dir.join(format!("broken{i}.xml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin_dir().join(program))
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program} case {i}: {stderr}");
        let expected = format!("{}:{line}:", path.display());
        assert!(
            stderr.contains(&expected) && stderr.contains(message),
            "{program} case {i}: wanted '{expected}' and '{message}' in: {stderr}"
        );
    }
    // A missing file too.
    let out = Command::new(bin_dir().join("router"))
        .args(["-c", "/nonexistent/router.xml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/router.xml"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `scripts/jabberd ARGS -f supervisor.xml` against an installation in `dir`.
fn jabberd(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(repo_root().join("scripts/jabberd"))
        .args(args)
        .arg("-f")
        .arg(dir.join("supervisor.xml"))
        .env("JABBERD_BIN_DIR", bin_dir())
        .output()
        .expect("scripts/jabberd runs")
}

fn status_pid(dir: &std::path::Path, name: &str) -> Option<u32> {
    let out = jabberd(dir, &["status"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

struct Stop<'a>(&'a std::path::Path);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        let out = jabberd(self.0, &["stop"]);
        if std::thread::panicking() {
            for name in ["supervisor", "router", "xdb-file", "sm", "c2s", "s2s"] {
                let log = std::fs::read_to_string(self.0.join(format!("log/{name}.log")))
                    .unwrap_or_default();
                eprintln!("--- {name}.log ---\n{log}");
            }
            eprintln!("stop: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_restarts_a_killed_process_and_service_resumes() {
    let dir = std::env::temp_dir().join(format!("jrs-supervised-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let p = |rel: &str| dir.join(rel).display().to_string();
    let router_el = |name: &str, secret: &str| {
        format!("<router address='127.0.0.1' port='{port}' name='{name}' secret='{secret}' reconnect='0.05'/>")
    };
    // The shipped users file, with this test's router port and paths.
    std::fs::copy(
        repo_root().join("etc/router-users.xml"),
        dir.join("router-users.xml"),
    )
    .unwrap();
    let files = [
        ("router.xml", format!("<router><listen address='127.0.0.1' port='{port}'/><users file='{}'/><grace seconds='5'/></router>", p("router-users.xml"))),
        ("xdb-file.xml", format!("<xdb-file>{}<host>localhost</host><spool dir='{}'/></xdb-file>", router_el("xdb-file", "xdb-secret"), p("spool"))),
        ("sm.xml", format!("<sm>{}<host>localhost</host></sm>", router_el("sm", "sm-secret"))),
        ("c2s.xml", format!(
            "<c2s>{}<host name='localhost' cert='{}' key='{}' self-signed='true'/>\
             <listen address='127.0.0.1' port='{}'/><listen address='127.0.0.1' port='{}' mode='tls'/></c2s>",
            router_el("c2s", "c2s-secret"), p("certs/localhost.crt"), p("certs/localhost.key"), free_port(), free_port())),
        ("s2s.xml", format!(
            "<s2s>{}<host name='localhost' cert='{}' key='{}' self-signed='true'/><listen address='127.0.0.1' port='{}'/></s2s>",
            router_el("s2s", "s2s-secret"), p("certs/s2s.crt"), p("certs/s2s.key"), free_port())),
        ("supervisor.xml", format!(
            "<supervisor><run-dir>{}</run-dir><log-dir>{}</log-dir>\
             <process name='router' program='router' config='{}' wait-for='127.0.0.1:{port}'/>\
             <process name='xdb-file' program='xdb-file' config='{}'/>\
             <process name='sm' program='sm' config='{}' instances='2'/>\
             <process name='c2s' program='c2s' config='{}'/>\
             <process name='s2s' program='s2s' config='{}'/></supervisor>",
            p("run"), p("log"), p("router.xml"), p("xdb-file.xml"), p("sm.xml"), p("c2s.xml"), p("s2s.xml"))),
    ];
    for (name, text) in &files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let out = jabberd(&dir, &["start", "--daemon", "--no-build"]);
    assert!(
        out.status.success(),
        "start: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _stop = Stop(&dir);

    let limits = jrs_stream::Limits::default();
    let (mut r, mut w) = jrs_component::service::connect_and_bind(
        &jrs_harness::link(port, "admin", "admin-secret"),
        limits,
        &[],
    )
    .await
    .unwrap()
    .split();
    let get = |id: &str| {
        Request {
            op: Op::Get,
            owner: "alice@localhost".into(),
            ns: "x".into(),
            id: id.into(),
            from: "admin".into(),
            max_items: None,
            max_age: None,
            flush: jrs_xdb::Flush::Now,
            content: Bytes::new(),
        }
        .to_xml()
        .into_bytes()
    };
    // Storage answers (retry until xdb-file has connected).
    let mut answered = false;
    for attempt in 0..100 {
        w.send(&get(&format!("a{attempt}"))).await.unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), r.next())
            .await
            .unwrap()
            .unwrap();
        if s.kind() == Some("result") {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered, "xdb-file answers through the router");

    // Both sm instances and every other process are up.
    for name in ["router", "xdb-file", "sm-1", "sm-2", "c2s", "s2s"] {
        assert!(status_pid(&dir, name).is_some(), "{name} running");
    }
    // SIGHUP reaches every process; none of them dies of it.
    let pids: Vec<_> = ["router", "xdb-file", "sm-1", "sm-2", "c2s", "s2s"]
        .map(|n| status_pid(&dir, n))
        .to_vec();
    assert!(jabberd(&dir, &["reload"]).status.success());
    for (name, marker) in [
        ("router", "SIGHUP: component users reloaded"),
        ("xdb-file", "SIGHUP"),
        ("sm-1", "SIGHUP"),
        ("s2s", "SIGHUP"),
    ] {
        let log = dir.join(format!("log/{name}.log"));
        jrs_harness::wait_for(
            &format!("{name} to log the SIGHUP"),
            Duration::from_secs(5),
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|l| l.contains(marker))
            },
        )
        .await
        .unwrap();
    }
    let after: Vec<_> = ["router", "xdb-file", "sm-1", "sm-2", "c2s", "s2s"]
        .map(|n| status_pid(&dir, n))
        .to_vec();
    assert_eq!(pids, after, "no process restarted after SIGHUP");

    let old = status_pid(&dir, "xdb-file").unwrap();
    let _ = Command::new("kill").args(["-9", &old.to_string()]).status();
    let new = jrs_harness::wait_for(
        "the supervisor to restart xdb-file",
        Duration::from_secs(10),
        || status_pid(&dir, "xdb-file").filter(|p| *p != old),
    )
    .await
    .unwrap();
    assert_ne!(new, old);
    // The request sent while it was down is held by the router and answered after the
    // restart: no manual step.
    w.send(&get("after-restart")).await.unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), r.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s.id(), s.kind()), (Some("after-restart"), Some("result")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jabberctl_manages_accounts() {
    let mut server = jrs_harness::Server::start(jrs_harness::Options::default())
        .await
        .unwrap();
    server.start_storage().await.unwrap();
    let config = server
        .write(
            "jabberctl.xml",
            &format!(
                "<jabberctl>{}</jabberctl>",
                server.router_element("admin", "admin-secret")
            ),
        )
        .unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new(bin_dir().join("jabberctl"))
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = ctl(&["adduser", "Alice@localhost", "--password", "s3cret"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("alice@localhost added"), "{out}");
    let (code, out) = ctl(&["adduser", "alice@localhost", "--password", "x"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("exists already"), "{out}");
    assert_eq!(
        ctl(&["adduser", "bob@localhost", "--password", "b"]).0,
        Some(0)
    );
    let (code, out) = ctl(&["users", "localhost"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("alice@localhost\nbob@localhost\n"), "{out}");
    assert_eq!(
        ctl(&["passwd", "alice@localhost", "--password", "new"]).0,
        Some(0)
    );
    // The stored record checks the new password, not the old one.
    let record =
        std::fs::read(server.path("spool/localhost/alice/urn%3Ajabberd-rs%3Aauth%3A0.xml"))
            .unwrap();
    let inner = &record[b"<stored>".len()..record.len() - b"</stored>".len()];
    let creds = jrs_auth::Credentials::parse(inner).unwrap().unwrap();
    assert!(creds.check_password("new") && !creds.check_password("s3cret"));
    assert!(
        !String::from_utf8_lossy(&record).contains("new"),
        "no clear password on disk"
    );
    assert_eq!(ctl(&["deluser", "alice@localhost"]).0, Some(0));
    let (_, out) = ctl(&["users", "localhost"]);
    assert!(
        !out.contains("alice@") && out.contains("bob@localhost"),
        "{out}"
    );
    let (code, out) = ctl(&["deluser", "nobody"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no user part"), "{out}");
}
