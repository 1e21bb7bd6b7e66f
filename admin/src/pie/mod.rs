//! XEP-0227 (Portable Import/Export Format) files: reading them user by user, following
//! XInclude (ejabberd writes one file per host, included from the main file), and the
//! conversions between a file's `<user/>` and the records sm keeps ([`import`],
//! [`export`]). docs/migration.md says what is carried over from where.

pub mod export;
pub mod import;
pub mod records;
pub mod vcard;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use crate::xml::{Element, Ev, Source};

pub const NS_PIE: &str = "urn:xmpp:pie:0";
/// The namespace of XEP-0227 before version 0.3 (older ejabberd releases).
const NS_PIE_OLD: &str = "http://www.xmpp.org/extensions/xep-0227.html#ns";
pub const NS_SCRAM: &str = "urn:xmpp:pie:0#scram";
pub const NS_PIE_MAM: &str = "urn:xmpp:pie:0#mam";
const NS_XINCLUDE: &str = "http://www.w3.org/2001/XInclude";
/// XInclude nesting followed at most (server file, host file, user file, and spare).
const MAX_INCLUDES: usize = 4;

fn is_pie(ns: &str) -> bool {
    ns == NS_PIE || ns == NS_PIE_OLD
}

/// What reading a file finds, in order.
pub enum Found {
    /// A user of `host` (the `<user/>` element and everything in it).
    User { host: String, user: Element },
    /// Something the file holds that is not imported (an unknown element).
    Note(String),
}

pub type Each<'a> = dyn FnMut(Found) -> Result<(), String> + 'a;

/// Reads the XEP-0227 file at `path` (and the files it includes), handing each user to
/// `each` as soon as it is read: the file is never held in memory whole.
pub fn read(path: &Path, each: &mut Each) -> Result<(), String> {
    read_file(path, None, 0, each)
}

fn read_file(path: &Path, host: Option<&str>, depth: usize, each: &mut Each) -> Result<(), String> {
    if depth > MAX_INCLUDES {
        return Err(format!(
            "{}: XInclude nested more than {MAX_INCLUDES} deep",
            path.display()
        ));
    }
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.display().to_string();
    let mut src = Source::new(BufReader::new(file), &name, "");
    let dir = path.parent().unwrap_or(Path::new("."));
    let (root, empty) = loop {
        match src.next()? {
            Ev::Start(e, empty) => break (e, empty),
            Ev::Text(t) if t.trim().is_empty() => {}
            Ev::Eof => return Err(format!("{name}: no document element")),
            _ => return Err(format!("{name}: text before the document element")),
        }
    };
    if !is_pie(&root.ns) {
        return Err(format!(
            "{name}: not a XEP-0227 file (the document element is <{}/> in '{}', not in '{NS_PIE}')",
            root.name, root.ns
        ));
    }
    match root.name.as_str() {
        "server-data" if empty => {}
        "server-data" => server_data(&mut src, dir, depth, each)?,
        "host" => host_element(&mut src, root, empty, dir, depth, each)?,
        "user" => {
            let host = host
                .ok_or_else(|| format!("{name}: a <user/> file must be included from a <host/>"))?
                .to_owned();
            let user = if empty { root } else { src.finish(root)? };
            each(Found::User { host, user })?;
        }
        other => return Err(format!("{name}: unexpected document element <{other}/>")),
    }
    loop {
        match src.next()? {
            Ev::Eof => return Ok(()),
            Ev::Text(t) if t.trim().is_empty() => {}
            _ => return Err(format!("{name}: content after the document element")),
        }
    }
}

fn include(
    e: &Element,
    dir: &Path,
    host: Option<&str>,
    depth: usize,
    each: &mut Each,
) -> Result<(), String> {
    let href = e
        .attr("href")
        .filter(|h| !h.is_empty())
        .ok_or("<xi:include/> without href")?;
    if e.attr("parse").is_some_and(|p| p != "xml") {
        return Err(format!(
            "<xi:include href='{href}'/>: only parse='xml' is read"
        ));
    }
    read_file(&dir.join(href), host, depth + 1, each)
}

fn server_data<R: std::io::BufRead>(
    src: &mut Source<R>,
    dir: &Path,
    depth: usize,
    each: &mut Each,
) -> Result<(), String> {
    loop {
        match src.next()? {
            Ev::Start(e, empty) if e.name == "host" && is_pie(&e.ns) => {
                host_element(src, e, empty, dir, depth, each)?
            }
            Ev::Start(e, empty) if e.is("include", NS_XINCLUDE) => {
                if !empty {
                    src.skip()?;
                }
                include(&e, dir, None, depth, each)?;
            }
            Ev::Start(e, empty) => {
                if !empty {
                    src.skip()?;
                }
                each(Found::Note(format!(
                    "<{}/> in '{}' under <server-data/> is not imported",
                    e.name, e.ns
                )))?;
            }
            Ev::End => return Ok(()),
            Ev::Text(_) => {}
            Ev::Eof => return Err("the file ends inside <server-data/>".into()),
        }
    }
}

fn host_element<R: std::io::BufRead>(
    src: &mut Source<R>,
    e: Element,
    empty: bool,
    dir: &Path,
    depth: usize,
    each: &mut Each,
) -> Result<(), String> {
    let host = e
        .attr("jid")
        .filter(|j| !j.is_empty())
        .ok_or("<host/> without jid")?
        .to_owned();
    if empty {
        return Ok(());
    }
    loop {
        match src.next()? {
            Ev::Start(u, empty) if u.name == "user" && is_pie(&u.ns) => {
                let user = if empty { u } else { src.finish(u)? };
                each(Found::User {
                    host: host.clone(),
                    user,
                })?;
            }
            Ev::Start(i, empty) if i.is("include", NS_XINCLUDE) => {
                if !empty {
                    src.skip()?;
                }
                include(&i, dir, Some(&host), depth, each)?;
            }
            Ev::Start(other, empty) => {
                if !empty {
                    src.skip()?;
                }
                each(Found::Note(format!(
                    "{host}: <{}/> in '{}' under <host/> is not imported (only users are)",
                    other.name, other.ns
                )))?;
            }
            Ev::End => return Ok(()),
            Ev::Text(_) => {}
            Ev::Eof => return Err("the file ends inside <host/>".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_includes_of_hosts_and_users() {
        let dir = std::env::temp_dir().join(format!("jabberctl-pie-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("main.xml"),
            "<?xml version='1.0' encoding='UTF-8'?><server-data xmlns='urn:xmpp:pie:0' \
             xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='h.xml'/></server-data>",
        )
        .unwrap();
        std::fs::write(
            dir.join("h.xml"),
            "<host xmlns='urn:xmpp:pie:0' xmlns:xi='http://www.w3.org/2001/XInclude' jid='example.com'>\
             <user name='a'/><xi:include href='u.xml'/><other/></host>",
        )
        .unwrap();
        std::fs::write(
            dir.join("u.xml"),
            "<user xmlns='urn:xmpp:pie:0' name='b'><vCard xmlns='vcard-temp'/></user>",
        )
        .unwrap();
        let mut users = vec![];
        let mut notes = 0;
        read(&dir.join("main.xml"), &mut |f| {
            match f {
                Found::User { host, user } => {
                    users.push(format!("{}@{host}", user.attr("name").unwrap()))
                }
                Found::Note(_) => notes += 1,
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(users, ["a@example.com", "b@example.com"]);
        assert_eq!(notes, 1);
        std::fs::write(dir.join("loop.xml"), "<host xmlns='urn:xmpp:pie:0' jid='x' xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='loop.xml'/></host>").unwrap();
        assert!(read(&dir.join("loop.xml"), &mut |_| Ok(())).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
