//! The room's rules, fed stanzas and read back what it sends (no sockets).

use std::sync::Arc;

use bytes::Bytes;
use jid::BareJid;
use jrs_stream::Stanza;
use minidom::Element;

use super::{Affiliation, Out, Room};
use crate::config::RoomLimits;
use crate::xml::{NS_CLIENT, NS_DELAY, NS_MUC_USER, NS_OCCUPANT_ID, NS_SID, NS_STANZAS};

const ROOM: &str = "room@conf.example";

fn limits() -> RoomLimits {
    RoomLimits {
        max_occupants: 3,
        default_max_users: 3,
        max_history: 10,
        default_history: 5,
        rate: 1.0,
        burst: 3.0,
        archive: false,
        archive_max_items: None,
    }
}

fn room() -> Room {
    Room::new(
        BareJid::new(ROOM).unwrap(),
        Arc::new(limits()),
        Arc::new(vec![]),
        Arc::from("salt"),
    )
}

/// Feeds one stanza; returns what the room sent.
fn feed(room: &mut Room, xml: &str, now: f64) -> (Vec<Element>, Out) {
    let mut out = Out::default();
    room.handle(
        &Stanza::parse(Bytes::from(xml.to_owned())).unwrap(),
        now,
        &mut out,
    );
    let text = String::from_utf8(out.buf.to_vec()).unwrap();
    let w: Element = format!("<w xmlns='{NS_CLIENT}'>{text}</w>")
        .parse()
        .unwrap();
    (w.children().cloned().collect(), out)
}

fn send(room: &mut Room, xml: &str) -> Vec<Element> {
    feed(room, xml, 1000.0).0
}

fn join(room: &mut Room, full: &str, nick: &str) -> Vec<Element> {
    send(
        room,
        &format!("<presence from='{full}' to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
    )
}

fn codes(e: &Element) -> Vec<String> {
    e.get_child("x", NS_MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.name() == "status")
                .map(|c| c.attr("code").unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn error(e: &Element) -> String {
    let err = e.get_child("error", NS_CLIENT).expect("an error");
    err.children()
        .find(|c| c.ns() == NS_STANZAS)
        .unwrap()
        .name()
        .to_owned()
}

fn to(e: &Element) -> &str {
    e.attr("to").unwrap()
}

/// A room created by alice and configured with the defaults (instant room).
fn instant() -> Room {
    let mut r = room();
    join(&mut r, "alice@x/a", "Alice");
    let got = send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"),
    );
    assert_eq!(got[0].attr("type"), Some("result"));
    r
}

#[test]
fn first_join_creates_a_locked_room() {
    let mut r = room();
    let got = join(&mut r, "alice@x/a", "Alice");
    assert_eq!(got.len(), 2, "own presence then subject");
    assert_eq!(codes(&got[0]), ["110", "201"]);
    let item = got[0]
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("item", NS_MUC_USER)
        .unwrap();
    assert_eq!(item.attr("affiliation"), Some("owner"));
    assert_eq!(item.attr("role"), Some("moderator"));
    assert!(got[1].get_child("subject", NS_CLIENT).is_some());
    assert!(r.locked);
    // Others cannot enter a locked room.
    let got = join(&mut r, "bob@x/b", "Bob");
    assert_eq!(error(&got[0]), "item-not-found");
    // The owner accepts the defaults: the room opens.
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"),
    );
    assert!(!r.locked);
    let got = join(&mut r, "bob@x/b", "Bob");
    // Alice's presence to Bob, Bob's to Alice, Bob's own (110), subject.
    assert_eq!(got.len(), 4);
    assert_eq!(
        (to(&got[0]), got[0].attr("from")),
        ("bob@x/b", Some("room@conf.example/Alice"))
    );
    assert_eq!(to(&got[1]), "alice@x/a");
    assert_eq!(
        (to(&got[2]), codes(&got[2])),
        ("bob@x/b", vec!["110".to_owned()])
    );
    assert_eq!(got[3].name(), "message");
    // Semi-anonymous: Bob does not see Alice's JID, Alice (moderator) sees Bob's.
    let jid = |e: &Element| {
        e.get_child("x", NS_MUC_USER)
            .unwrap()
            .get_child("item", NS_MUC_USER)
            .unwrap()
            .attr("jid")
            .map(str::to_owned)
    };
    assert_eq!(jid(&got[0]), None);
    assert_eq!(jid(&got[1]).as_deref(), Some("bob@x/b"));
    assert!(got[0].get_child("occupant-id", NS_OCCUPANT_ID).is_some());
}

#[test]
fn nick_conflict_leave_and_nick_change() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    let got = join(&mut r, "carol@x/c", "Bob");
    assert_eq!(error(&got[0]), "conflict");
    // Bob renames himself: unavailable with 303 and the new nick, then available.
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Robert'/>"),
    );
    assert_eq!(got.len(), 4);
    let self_gone = got
        .iter()
        .find(|e| to(e) == "bob@x/b" && e.attr("type") == Some("unavailable"))
        .unwrap();
    assert_eq!(codes(self_gone), ["110", "303"]);
    let item = self_gone
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("item", NS_MUC_USER)
        .unwrap();
    assert_eq!(item.attr("nick"), Some("Robert"));
    let back = got
        .iter()
        .find(|e| to(e) == "alice@x/a" && e.attr("type").is_none())
        .unwrap();
    assert_eq!(back.attr("from"), Some("room@conf.example/Robert"));
    // Leaves: everyone hears, Bob with 110.
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Robert' type='unavailable'/>"),
    );
    assert_eq!(got.len(), 2);
    assert_eq!(
        codes(got.iter().find(|e| to(e) == "bob@x/b").unwrap()),
        ["110"]
    );
    assert_eq!(r.occupants.len(), 1);
}

#[test]
fn two_sessions_share_one_occupant() {
    let mut r = instant();
    join(&mut r, "bob@x/b1", "Bob");
    let got = join(&mut r, "bob@x/b2", "Bob");
    // Only the new session hears anything: Alice's presence, its own, the subject.
    assert!(got.iter().all(|e| to(e) == "bob@x/b2"), "{got:?}");
    assert_eq!(r.occupants.len(), 2);
    let got = send(
        &mut r,
        &format!(
            "<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>hi</body></message>"
        ),
    );
    let mut recipients: Vec<&str> = got.iter().map(to).collect();
    recipients.sort();
    assert_eq!(recipients, ["alice@x/a", "bob@x/b1", "bob@x/b2"]);
    // One session leaves: only it is told; Bob stays.
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b1' to='{ROOM}/Bob' type='unavailable'/>"),
    );
    assert_eq!(got.len(), 1);
    assert_eq!(to(&got[0]), "bob@x/b1");
    assert_eq!(r.occupants.len(), 2);
}

#[test]
fn groupchat_has_ids_and_history_has_delays() {
    let mut r = instant();
    let got = send(
        &mut r,
        &format!("<message from='alice@x/a' to='{ROOM}' type='groupchat' id='m1'><body>one</body><stanza-id xmlns='urn:xmpp:sid:0' by='{ROOM}' id='forged'/></message>"),
    );
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.attr("id"), Some("m1"));
    let ids: Vec<&Element> = m.children().filter(|c| c.is("stanza-id", NS_SID)).collect();
    assert_eq!(ids.len(), 1, "the client's own stanza-id is dropped");
    assert_ne!(ids[0].attr("id"), Some("forged"));
    assert_eq!(ids[0].attr("by"), Some(ROOM));
    assert!(m.get_child("occupant-id", NS_OCCUPANT_ID).is_some());
    send(
        &mut r,
        &format!(
            "<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>two</body></message>"
        ),
    );
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='1'/></x></presence>"),
    );
    let history: Vec<&Element> = got
        .iter()
        .filter(|e| to(e) == "bob@x/b" && e.get_child("body", NS_CLIENT).is_some())
        .collect();
    assert_eq!(history.len(), 1);
    assert_eq!(
        history[0].get_child("body", NS_CLIENT).unwrap().text(),
        "two"
    );
    assert!(history[0].get_child("delay", NS_DELAY).is_some());
    // The subject comes last.
    assert!(got
        .last()
        .unwrap()
        .get_child("subject", NS_CLIENT)
        .is_some());
}

#[test]
fn subject_and_private_messages() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    let got = send(&mut r, &format!("<message from='bob@x/b' to='{ROOM}' type='groupchat'><subject>mine</subject></message>"));
    assert_eq!(error(&got[0]), "forbidden");
    let got = send(&mut r, &format!("<message from='alice@x/a' to='{ROOM}' type='groupchat'><subject>Topic</subject></message>"));
    assert_eq!(got.len(), 2);
    assert_eq!(r.subject.as_ref().unwrap().1, "Topic");
    let got = send(
        &mut r,
        &format!(
            "<message from='bob@x/b' to='{ROOM}/Alice' type='chat'><body>psst</body></message>"
        ),
    );
    assert_eq!(got.len(), 1);
    assert_eq!(
        (to(&got[0]), got[0].attr("from")),
        ("alice@x/a", Some("room@conf.example/Bob"))
    );
    let got = send(
        &mut r,
        &format!(
            "<message from='carol@x/c' to='{ROOM}/Alice' type='chat'><body>?</body></message>"
        ),
    );
    assert_eq!(error(&got[0]), "not-acceptable");
    let got = send(
        &mut r,
        &format!("<message from='bob@x/b' to='{ROOM}/Nobody' type='chat'><body>?</body></message>"),
    );
    assert_eq!(error(&got[0]), "item-not-found");
}

#[test]
fn password_members_only_ban_and_max_users() {
    let mut r = instant();
    let configure = |r: &mut Room, fields: &str| {
        let got = send(
            r,
            &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'>{fields}</x></query></iq>"),
        );
        assert_eq!(got[0].attr("type"), Some("result"), "{got:?}");
    };
    configure(&mut r, "<field var='muc#roomconfig_passwordprotectedroom'><value>1</value></field><field var='muc#roomconfig_roomsecret'><value>pw</value></field>");
    assert_eq!(error(&join(&mut r, "bob@x/b", "Bob")[0]), "not-authorized");
    let got = send(&mut r, &format!("<presence from='bob@x/b' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'><password>pw</password></x></presence>"));
    assert!(got.iter().any(|e| codes(e) == ["110"]));
    r.affiliations
        .insert(BareJid::new("bob@x").unwrap(), Affiliation::Member);
    configure(&mut r, "<field var='muc#roomconfig_passwordprotectedroom'><value>0</value></field><field var='muc#roomconfig_membersonly'><value>1</value></field>");
    assert_eq!(
        error(&join(&mut r, "carol@x/c", "Carol")[0]),
        "registration-required"
    );
    // Alice bans Bob, who is in the room: he leaves with 301.
    let got = send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='b'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast' jid='bob@x'/></query></iq>"),
    );
    assert!(
        got.iter()
            .any(|e| to(e) == "bob@x/b" && codes(e) == ["110", "301"]),
        "{got:?}"
    );
    assert_eq!(
        r.affiliation(&BareJid::new("bob@x").unwrap()),
        Affiliation::Outcast
    );
    assert_eq!(error(&join(&mut r, "bob@x/b", "Bob")[0]), "forbidden");
    // Members: carol and dave and erin; max-occupants is 3.
    for who in ["carol", "dave", "erin"] {
        send(&mut r, &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='m'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='{who}@x'/></query></iq>"));
    }
    join(&mut r, "carol@x/c", "Carol");
    join(&mut r, "dave@x/d", "Dave");
    let full = join(&mut r, "erin@x/e", "Erin");
    assert_eq!(error(&full[0]), "service-unavailable");
    assert_eq!(error_type(&full[0]), "wait", "a full room: try later");
}

fn error_type(e: &Element) -> String {
    e.get_child("error", NS_CLIENT)
        .expect("an error")
        .attr("type")
        .unwrap()
        .to_owned()
}

#[test]
fn moderated_rooms_silence_visitors_and_rate_is_limited() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_moderatedroom'><value>1</value></field></x></query></iq>"),
    );
    join(&mut r, "bob@x/b", "Bob");
    let got = send(
        &mut r,
        &format!("<message from='bob@x/b' to='{ROOM}' type='groupchat'><body>hi</body></message>"),
    );
    assert_eq!(error(&got[0]), "forbidden");
    // Burst 3, one a second: the fourth at once is refused, a second later it passes.
    for _ in 0..3 {
        let (got, _) = feed(
            &mut r,
            &format!(
                "<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>x</body></message>"
            ),
            2000.0,
        );
        assert!(got[0].attr("type") == Some("groupchat"));
    }
    let (got, _) = feed(
        &mut r,
        &format!("<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>x</body></message>"),
        2000.0,
    );
    assert_eq!(error(&got[0]), "resource-constraint");
    let (got, _) = feed(
        &mut r,
        &format!("<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>x</body></message>"),
        2001.0,
    );
    assert_eq!(got[0].attr("type"), Some("groupchat"));
}

#[test]
fn destroy_self_ping_and_disco() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    let ping = |from: &str, nick: &str| {
        format!("<iq from='{from}' to='{ROOM}/{nick}' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
    };
    assert_eq!(
        send(&mut r, &ping("bob@x/b", "Bob"))[0].attr("type"),
        Some("result")
    );
    let not_joined = send(&mut r, &ping("bob@x/other", "Bob"));
    assert_eq!(error(&not_joined[0]), "not-acceptable");
    assert_eq!(error_type(&not_joined[0]), "cancel", "XEP-0410");
    // Not implemented: service-unavailable, type cancel.
    let got = send(
        &mut r,
        &format!(
            "<iq from='carol@x/c' to='{ROOM}' type='get' id='u'><query xmlns='urn:unknown'/></iq>"
        ),
    );
    assert_eq!(
        (error(&got[0]), error_type(&got[0])),
        ("service-unavailable".to_owned(), "cancel".to_owned())
    );
    let got = send(&mut r, &format!("<iq from='carol@x/c' to='{ROOM}' type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"));
    let q = got[0]
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    let features: Vec<&str> = q.children().filter_map(|c| c.attr("var")).collect();
    for f in [
        "http://jabber.org/protocol/muc",
        "muc_temporary",
        "muc_open",
        "muc_semianonymous",
        "muc_unsecured",
        "muc_public",
        "muc_unmoderated",
    ] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='set' id='d'><query xmlns='http://jabber.org/protocol/muc#owner'><destroy jid='other@conf.example'><reason>moved</reason></destroy></query></iq>"));
    assert_eq!(error(&got[0]), "forbidden");
    let (got, out) = feed(&mut r, &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='d'><query xmlns='http://jabber.org/protocol/muc#owner'><destroy jid='other@conf.example'><reason>moved</reason></destroy></query></iq>"), 1.0);
    assert_eq!(got.len(), 3);
    let d = got[0]
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("destroy", NS_MUC_USER)
        .unwrap();
    assert_eq!(d.attr("jid"), Some("other@conf.example"));
    assert!(out.delete);
    assert!(r.finished());
}

#[test]
fn persistent_state_round_trips_through_storage_xml() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_persistentroom'><value>1</value></field><field var='muc#roomconfig_roomname'><value>A &amp; B</value></field></x></query></iq>"),
    );
    send(
        &mut r,
        &format!(
            "<message from='alice@x/a' to='{ROOM}' type='groupchat'><subject>S</subject></message>"
        ),
    );
    let xml = crate::store::to_xml(&r);
    let mut back = room();
    crate::store::from_xml(&mut back, &xml.parse().unwrap());
    assert_eq!(back.config, r.config);
    assert_eq!(back.subject, r.subject);
    assert_eq!(back.affiliations, r.affiliations);
    assert!(!back.fresh && !back.locked);
}

#[test]
fn configuration_changes_are_announced() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    let got = send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_whois'><value>anyone</value></field></x></query></iq>"),
    );
    let notes: Vec<&Element> = got.iter().filter(|e| e.name() == "message").collect();
    assert_eq!(notes.len(), 2);
    assert_eq!(codes(notes[0]), ["104", "172"]);
}

#[test]
fn moderators_kick_and_give_voice() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_moderatedroom'><value>1</value></field></x></query></iq>"),
    );
    join(&mut r, "bob@x/b", "Bob");
    join(&mut r, "carol@x/c", "Carol");
    let admin = |item: &str| {
        format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='a'><query xmlns='http://jabber.org/protocol/muc#admin'>{item}</query></iq>")
    };
    // Voice: Bob becomes a participant and may speak.
    let got = send(&mut r, &admin("<item nick='Bob' role='participant'/>"));
    assert!(got
        .iter()
        .any(|e| e.name() == "iq" && e.attr("type") == Some("result")));
    let got = send(
        &mut r,
        &format!("<message from='bob@x/b' to='{ROOM}' type='groupchat'><body>now</body></message>"),
    );
    assert_eq!(got.len(), 3);
    // A visitor may not kick.
    let got = send(&mut r, &format!("<iq from='carol@x/c' to='{ROOM}' type='set' id='k'><query xmlns='http://jabber.org/protocol/muc#admin'><item nick='Bob' role='none'/></query></iq>"));
    assert_eq!(error(&got[0]), "not-allowed");
    // Kick: Bob leaves with 307.
    let got = send(
        &mut r,
        &admin("<item nick='Bob' role='none'><reason>bye</reason></item>"),
    );
    let kicked = got.iter().find(|e| to(e) == "bob@x/b").unwrap();
    assert_eq!(codes(kicked), ["110", "307"]);
    let item = kicked
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("item", NS_MUC_USER)
        .unwrap();
    assert_eq!(item.get_child("reason", NS_MUC_USER).unwrap().text(), "bye");
    assert_eq!(
        item.get_child("actor", NS_MUC_USER).unwrap().attr("nick"),
        Some("Alice")
    );
    assert_eq!(r.occupants.len(), 2);
}

#[test]
fn mediated_invitations() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_membersonly'><value>1</value></field></x></query></iq>"),
    );
    let invite = |from: &str| {
        format!("<message from='{from}' to='{ROOM}'><x xmlns='http://jabber.org/protocol/muc#user'><invite to='carol@x'><reason>join us</reason></invite></x></message>")
    };
    let got = send(&mut r, &invite("dave@x/d"));
    assert_eq!(error(&got[0]), "not-acceptable");
    let got = send(&mut r, &invite("alice@x/a"));
    assert_eq!(got.len(), 1);
    assert_eq!((to(&got[0]), got[0].attr("from")), ("carol@x", Some(ROOM)));
    let inv = got[0]
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("invite", NS_MUC_USER)
        .unwrap();
    assert_eq!(inv.attr("from"), Some("alice@x/a"));
    assert_eq!(
        inv.get_child("reason", NS_MUC_USER).unwrap().text(),
        "join us"
    );
    // Carol became a member: she may join the members-only room.
    assert!(join(&mut r, "carol@x/c", "Carol")
        .iter()
        .any(|e| codes(e) == ["110"]));
    // A decline goes back to the inviter, from someone invited only (the room is no
    // reflector).
    let decline = format!("<message from='erin@x/e' to='{ROOM}'><x xmlns='http://jabber.org/protocol/muc#user'><decline to='alice@x/a'/></x></message>");
    assert_eq!(error(&send(&mut r, &decline)[0]), "not-acceptable");
    send(&mut r, &format!("<message from='alice@x/a' to='{ROOM}'><x xmlns='http://jabber.org/protocol/muc#user'><invite to='erin@x'/></x></message>"));
    let got = send(&mut r, &decline);
    let d = got[0]
        .get_child("x", NS_MUC_USER)
        .unwrap()
        .get_child("decline", NS_MUC_USER)
        .unwrap();
    assert_eq!((to(&got[0]), d.attr("from")), ("alice@x/a", Some("erin@x")));
    // Once.
    assert_eq!(error(&send(&mut r, &decline)[0]), "not-acceptable");
    // At most a few invitations in one message.
    let many: String = (0..6).map(|k| format!("<invite to='u{k}@x'/>")).collect();
    let got = send(&mut r, &format!("<message from='alice@x/a' to='{ROOM}'><x xmlns='http://jabber.org/protocol/muc#user'>{many}</x></message>"));
    assert_eq!(error(&got[0]), "bad-request");
    // Participants may not invite unless allowinvites is on.
    let got = send(&mut r, &invite("carol@x/c"));
    assert_eq!(error(&got[0]), "forbidden");
}

#[test]
fn iqs_to_occupants_are_relayed_and_answered() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    join(&mut r, "carol@x/c", "Carol");
    // vCard requests go to the occupant's bare JID, with an id of the room's.
    let ask = |from: &str| {
        format!("<iq from='{from}' to='{ROOM}/Alice' type='get' id='v1'><vCard xmlns='vcard-temp'/></iq>")
    };
    let got = send(&mut r, &ask("bob@x/b"));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (to(&got[0]), got[0].attr("from")),
        ("alice@x", Some("room@conf.example/Bob"))
    );
    assert!(got[0].get_child("vCard", "vcard-temp").is_some());
    let bob_id = got[0].attr("id").unwrap().to_owned();
    assert_ne!(bob_id, "v1");
    // Carol asks with the same id: a different relayed id.
    let got = send(&mut r, &ask("carol@x/c"));
    let carol_id = got[0].attr("id").unwrap().to_owned();
    assert_ne!(bob_id, carol_id);
    // Each answer goes back to its asker, with the asker's id.
    let answer = |id: &str, nick: &str| {
        format!("<iq from='alice@x' to='{ROOM}/{nick}' type='result' id='{id}'><vCard xmlns='vcard-temp'><FN>A</FN></vCard></iq>")
    };
    let got = send(&mut r, &answer(&carol_id, "Carol"));
    assert_eq!(got.len(), 1);
    assert_eq!(
        (to(&got[0]), got[0].attr("from"), got[0].attr("id")),
        ("carol@x/c", Some("room@conf.example/Alice"), Some("v1"))
    );
    let got = send(&mut r, &answer(&bob_id, "Bob"));
    assert_eq!(
        (to(&got[0]), got[0].attr("type"), got[0].attr("id")),
        ("bob@x/b", Some("result"), Some("v1"))
    );
    // Answered once: a second answer is dropped.
    assert!(send(&mut r, &answer(&bob_id, "Bob")).is_empty());
    // Other IQs go to the occupant's session.
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}/Alice' type='get' id='t'><time xmlns='urn:xmpp:time'/></iq>"));
    assert_eq!(to(&got[0]), "alice@x/a");
    // allowpm none: no relayed IQs either.
    r.config.allow_pm = super::config::AllowPm::None;
    let got = send(&mut r, &ask("bob@x/b"));
    assert_eq!(error(&got[0]), "forbidden");
}

#[test]
fn bounces_from_a_gone_session_remove_the_occupant() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    // An error that does not say the session is gone changes nothing.
    let got = send(&mut r, &format!("<message from='bob@x/b' to='{ROOM}' type='error'><error type='modify'><not-acceptable xmlns='{NS_STANZAS}'/></error></message>"));
    assert!(got.is_empty());
    assert_eq!(r.occupants.len(), 2);
    let got = send(&mut r, &format!("<message from='bob@x/b' to='{ROOM}' type='error'><error type='cancel'><recipient-unavailable xmlns='{NS_STANZAS}'/></error></message>"));
    assert_eq!(got.len(), 1, "to Alice only");
    assert_eq!(
        (to(&got[0]), got[0].attr("type")),
        ("alice@x/a", Some("unavailable"))
    );
    assert_eq!(codes(&got[0]), ["333"]);
    assert_eq!(r.occupants.len(), 1);
}

#[test]
fn members_only_removes_non_members_and_role_lists() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    join(&mut r, "carol@x/c", "Carol");
    send(&mut r, &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='m'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='carol@x'/></query></iq>"));
    let list = send(&mut r, &format!("<iq from='alice@x/a' to='{ROOM}' type='get' id='l'><query xmlns='http://jabber.org/protocol/muc#admin'><item role='participant'/></query></iq>"));
    let nicks: Vec<&str> = list[0]
        .get_child("query", "http://jabber.org/protocol/muc#admin")
        .unwrap()
        .children()
        .filter_map(|i| i.attr("nick"))
        .collect();
    assert_eq!(nicks, ["Bob", "Carol"]);
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='get' id='l'><query xmlns='http://jabber.org/protocol/muc#admin'><item role='participant'/></query></iq>"));
    assert_eq!(error(&got[0]), "forbidden");
    let got = send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_membersonly'><value>1</value></field></x></query></iq>"),
    );
    let removed = got
        .iter()
        .find(|e| to(e) == "bob@x/b" && e.attr("type") == Some("unavailable"))
        .unwrap();
    assert_eq!(codes(removed), ["110", "322"]);
    assert_eq!(
        r.occupants
            .iter()
            .map(|o| o.nick.as_str())
            .collect::<Vec<_>>(),
        ["Alice", "Carol"]
    );
}

/// Not a check: the cost of a join and of a message in a 1000-occupant room, in the
/// room code alone (no I/O). `cargo test -p muc --release -- --ignored --nocapture`
#[test]
#[ignore]
fn fan_out_cost_in_a_big_room() {
    let limits = RoomLimits {
        max_occupants: 2000,
        default_max_users: 2000,
        max_history: 20,
        default_history: 20,
        rate: 1e9,
        burst: 1e9,
        archive: false,
        archive_max_items: None,
    };
    let mut r = Room::new(
        BareJid::new(ROOM).unwrap(),
        Arc::new(limits),
        Arc::new(vec![]),
        Arc::from("s"),
    );
    let mut out = Out::default();
    let stanza = |xml: String| Stanza::parse(Bytes::from(xml)).unwrap();
    r.handle(
        &stanza(format!("<presence from='owner@x/o' to='{ROOM}/owner'/>")),
        1.0,
        &mut out,
    );
    r.handle(&stanza(format!("<iq from='owner@x/o' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>")), 1.0, &mut out);
    for i in 0..999 {
        let mut o = Out::default();
        r.handle(
            &stanza(format!(
                "<presence from='u{i}@x/r' to='{ROOM}/user{i}'><show>away</show></presence>"
            )),
            1.0,
            &mut o,
        );
    }
    let join = stanza(format!("<presence from='new@x/r' to='{ROOM}/newcomer'><x xmlns='http://jabber.org/protocol/muc'/></presence>"));
    let leave = stanza(format!(
        "<presence from='new@x/r' to='{ROOM}/newcomer' type='unavailable'/>"
    ));
    let t = std::time::Instant::now();
    let rounds = 20;
    let mut bytes = 0;
    for _ in 0..rounds {
        let mut o = Out::default();
        r.handle(&join, 1.0, &mut o);
        bytes = o.buf.len();
        r.handle(&leave, 1.0, &mut Out::default());
    }
    let join_cost = t.elapsed() / rounds;
    let msg = stanza(format!("<message from='u1@x/r' to='{ROOM}' type='groupchat' id='x'><body>hello everyone in this room</body></message>"));
    let t = std::time::Instant::now();
    let rounds = 200;
    for _ in 0..rounds {
        r.handle(&msg, 1.0, &mut Out::default());
    }
    let per_message = t.elapsed() / rounds;
    println!(
        "1000 occupants: join (+ leave) {join_cost:?} ({bytes} bytes out); message {per_message:?} = {:.0} deliveries/s",
        1000.0 / per_message.as_secs_f64()
    );
}

#[test]
fn archived_rooms_say_so_and_hand_messages_and_queries_to_storage() {
    let mut r = Room::new(
        BareJid::new(ROOM).unwrap(),
        Arc::new(RoomLimits {
            archive: true,
            ..limits()
        }),
        Arc::new(vec![]),
        Arc::from("salt"),
    );
    let got = join(&mut r, "alice@x/a", "Alice");
    assert_eq!(codes(&got[0]), ["110", "170", "201"]);
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>"),
    );
    let (_, out) = feed(
        &mut r,
        &format!(
            "<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>kept</body></message>"
        ),
        5.0,
    );
    assert_eq!(out.archive.len(), 1);
    assert_eq!(out.archive[0].with, "room@conf.example/Alice");
    assert_eq!(out.archive[0].time, 5_000_000);
    let (got, out) = feed(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='set' id='q'><query xmlns='urn:xmpp:mam:2' queryid='f'/></iq>"), 6.0);
    assert!(got.is_empty());
    assert_eq!(out.queries.len(), 1);
    assert_eq!(out.queries[0].to, "bob@x/b");
    // Members-only rooms: outsiders may not read.
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_membersonly'><value>1</value></field></x></query></iq>"),
    );
    let got = send(
        &mut r,
        &format!(
            "<iq from='bob@x/b' to='{ROOM}' type='set' id='q'><query xmlns='urn:xmpp:mam:2'/></iq>"
        ),
    );
    assert_eq!(error(&got[0]), "forbidden");
}

#[test]
fn voice_requests_go_to_moderators_and_their_approval_gives_voice() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_moderatedroom'><value>1</value></field></x></query></iq>"),
    );
    join(&mut r, "bob@x/b", "Bob");
    let got = send(&mut r, &format!("<message from='bob@x/b' to='{ROOM}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#role'><value>participant</value></field></x></message>"));
    assert_eq!(got.len(), 1);
    assert_eq!(to(&got[0]), "alice@x/a");
    let form = got[0].get_child("x", "jabber:x:data").unwrap();
    assert_eq!(form.attr("type"), Some("form"));
    let got = send(&mut r, &format!("<message from='alice@x/a' to='{ROOM}'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field><field var='muc#roomnick'><value>Bob</value></field><field var='muc#request_allow'><value>true</value></field></x></message>"));
    assert_eq!(got.len(), 2, "Bob's new presence to both");
    assert_eq!(r.occupants[1].role, super::Role::Participant);
}

#[test]
fn reserved_nick_discovery_finds_none() {
    let mut r = instant();
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='get' id='n'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>"));
    let q = got[0]
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    assert_eq!(q.attr("node"), Some("x-roomuser-item"));
    assert_eq!(q.children().count(), 0);
}

#[test]
fn registering_reserves_a_nick_and_makes_a_member_only_if_configured() {
    let mut r = instant();
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='get' id='g'><query xmlns='jabber:iq:register'/></iq>"));
    assert!(got[0]
        .get_child("query", "jabber:iq:register")
        .unwrap()
        .get_child("x", "jabber:x:data")
        .is_some());
    let reg = |from: &str, nick: &str| {
        format!("<iq from='{from}' to='{ROOM}' type='set' id='r'><query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field><field var='muc#register_roomnick'><value>{nick}</value></field></x></query></iq>")
    };
    // Nicks are kept in normal form: the fullwidth form is the same nick.
    let got = send(&mut r, &reg("bob@x/b", "\u{FF22}obby"));
    assert_eq!(got[0].attr("type"), Some("result"));
    assert_eq!(r.nicks[&BareJid::new("bob@x").unwrap()], "Bobby");
    // Only the nick is reserved: no membership by default.
    assert_eq!(
        r.affiliation(&BareJid::new("bob@x").unwrap()),
        Affiliation::None
    );
    assert_eq!(
        error(&send(&mut r, &reg("carol@x/c", "Bobby"))[0]),
        "conflict"
    );
    assert_eq!(
        error(&send(&mut r, &reg("carol@x/c", "Alice"))[0]),
        "conflict",
        "in use"
    );
    assert_eq!(error(&join(&mut r, "carol@x/c", "Bobby")[0]), "conflict");
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='get' id='n'><query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/></iq>"));
    let q = got[0]
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    assert_eq!(q.children().next().unwrap().attr("name"), Some("Bobby"));
    // Kept in storage with the affiliation.
    let mut back = room();
    crate::store::from_xml(&mut back, &crate::store::to_xml(&r).parse().unwrap());
    assert_eq!(back.nicks, r.nicks);
    assert!(!back
        .affiliations
        .contains_key(&BareJid::new("bob@x").unwrap()));
    // A room that says registration makes members.
    r.config.register_members = true;
    assert_eq!(
        send(&mut r, &reg("dave@x/d", "Dave"))[0].attr("type"),
        Some("result")
    );
    assert_eq!(
        r.affiliation(&BareJid::new("dave@x").unwrap()),
        Affiliation::Member
    );
    // The banned may not register.
    send(&mut r, &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='b'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='outcast' jid='eve@x'/></query></iq>"));
    assert_eq!(error(&send(&mut r, &reg("eve@x/e", "Eve"))[0]), "forbidden");
    assert_eq!(
        r.affiliation(&BareJid::new("eve@x").unwrap()),
        Affiliation::Outcast
    );
    let got = send(&mut r, &format!("<iq from='bob@x/b' to='{ROOM}' type='set' id='u'><query xmlns='jabber:iq:register'><remove/></query></iq>"));
    assert_eq!(got[0].attr("type"), Some("result"));
    assert_eq!(
        r.affiliation(&BareJid::new("bob@x").unwrap()),
        Affiliation::None
    );
    assert!(join(&mut r, "carol@x/c", "Bobby")
        .iter()
        .any(|e| codes(e) == ["110"]));
}

/// Every copied child is self-contained: a prefix declared on the stanza's own start tag
/// is declared again on the child (messages, history, private messages, presence
/// payloads, relayed IQs). `send` parses what the room wrote, so an undeclared prefix
/// fails it.
#[test]
fn copied_children_keep_their_namespace_declarations() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    let got = send(
        &mut r,
        &format!("<message xmlns:a='urn:x' type='groupchat' from='alice@x/a' to='{ROOM}'><body>hi</body><a:b/></message>"),
    );
    assert_eq!(got.len(), 2);
    for m in &got {
        assert!(m.get_child("b", "urn:x").is_some(), "{m:?}");
    }
    // Kept in history and replayed the same way.
    let got = join(&mut r, "carol@x/c", "Carol");
    let replayed: Vec<&Element> = got
        .iter()
        .filter(|e| e.get_child("body", NS_CLIENT).is_some())
        .collect();
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].get_child("b", "urn:x").is_some());
    // Nested use of the prefix, and a child that declares it itself.
    let got = send(
        &mut r,
        &format!("<message xmlns:a=\"urn:x\" type='chat' from='alice@x/a' to='{ROOM}/Bob'><body>pm</body><x xmlns='urn:y'><a:c/></x><a:d xmlns:a='urn:z'/></message>"),
    );
    assert_eq!(got.len(), 1);
    let x = got[0].get_child("x", "urn:y").unwrap();
    assert!(x.get_child("c", "urn:x").is_some());
    assert!(got[0].get_child("d", "urn:z").is_some());
    // Presence payloads.
    let got = send(
        &mut r,
        &format!("<presence xmlns:a='urn:x' from='bob@x/b' to='{ROOM}/Bob'><a:caps/></presence>"),
    );
    assert!(!got.is_empty());
    for p in &got {
        assert!(p.get_child("caps", "urn:x").is_some(), "{p:?}");
    }
    // Relayed IQs, both ways.
    let got = send(
        &mut r,
        &format!("<iq xmlns:v='vcard-temp' from='bob@x/b' to='{ROOM}/Alice' type='get' id='v1'><v:vCard/></iq>"),
    );
    assert_eq!(got.len(), 1);
    assert!(got[0].get_child("vCard", "vcard-temp").is_some());
    let id = got[0].attr("id").unwrap().to_owned();
    let got = send(
        &mut r,
        &format!("<iq xmlns:v='vcard-temp' from='alice@x' to='{ROOM}/Bob' type='result' id='{id}'><v:vCard><v:FN>A</v:FN></v:vCard></iq>"),
    );
    assert_eq!(got.len(), 1);
    assert!(got[0].get_child("vCard", "vcard-temp").is_some());
}

fn admin_iq(from: &str, items: &str) -> String {
    format!("<iq from='{from}' to='{ROOM}' type='set' id='a'><query xmlns='http://jabber.org/protocol/muc#admin'>{items}</query></iq>")
}

#[test]
fn invitations_do_not_lift_bans() {
    let mut r = instant();
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_membersonly'><value>1</value></field></x></query></iq>"),
    );
    send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='outcast' jid='eve@x'/>"),
    );
    send(
        &mut r,
        &format!("<message from='alice@x/a' to='{ROOM}'><x xmlns='http://jabber.org/protocol/muc#user'><invite to='eve@x'/></x></message>"),
    );
    assert_eq!(
        r.affiliation(&BareJid::new("eve@x").unwrap()),
        Affiliation::Outcast
    );
    assert_eq!(error(&join(&mut r, "eve@x/e", "Eve")[0]), "forbidden");
}

#[test]
fn admin_items_are_all_applied_or_none() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    // The second item is refused: the first (a ban of Bob) is not applied either.
    let got = send(
        &mut r,
        &admin_iq(
            "alice@x/a",
            "<item affiliation='outcast' jid='bob@x'/><item affiliation='bogus' jid='carol@x'/>",
        ),
    );
    assert_eq!(got.len(), 1, "only the error: {got:?}");
    assert_eq!(error(&got[0]), "bad-request");
    assert_eq!(
        r.affiliation(&BareJid::new("bob@x").unwrap()),
        Affiliation::None
    );
    assert_eq!(r.occupants.len(), 2);
    // `nick=` items are compared in normal form.
    let got = send(
        &mut r,
        &admin_iq(
            "alice@x/a",
            "<item affiliation='member' nick='\u{FF22}ob'/>",
        ),
    );
    assert!(got.iter().any(|e| e.attr("type") == Some("result")));
    assert_eq!(
        r.affiliation(&BareJid::new("bob@x").unwrap()),
        Affiliation::Member
    );
}

#[test]
fn bans_reach_every_occupant_of_a_user_and_domains() {
    let mut r = instant();
    // Bob joined under two nicks from two sessions.
    join(&mut r, "bob@x/b1", "Bob");
    join(&mut r, "bob@x/b2", "Bobby");
    assert_eq!(r.occupants.len(), 3);
    // A kick of one nick takes both.
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item role='none' nick='Bobby'/>"),
    );
    assert!(got.iter().any(|e| e.attr("type") == Some("result")));
    assert_eq!(r.occupants.len(), 1, "both of Bob's occupants were kicked");
    join(&mut r, "bob@x/b1", "Bob");
    join(&mut r, "bob@x/b2", "Bobby");
    send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='outcast' jid='bob@x'/>"),
    );
    assert_eq!(r.occupants.len(), 1, "both of Bob's occupants left");
    join(&mut r, "mallory@evil/m", "Mallory");
    assert_eq!(r.occupants.len(), 2);
    // A domain ban: its users present leave, and may not join.
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='outcast' jid='evil'/>"),
    );
    assert!(got
        .iter()
        .any(|e| to(e) == "mallory@evil/m" && codes(e).contains(&"301".to_owned())));
    assert_eq!(r.occupants.len(), 1);
    assert_eq!(
        error(&join(&mut r, "trudy@evil/t", "Trudy")[0]),
        "forbidden"
    );
}

#[test]
fn only_admins_and_owners_take_the_moderator_role() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    join(&mut r, "carol@x/c", "Carol");
    send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='admin' jid='bob@x'/>"),
    );
    // Alice (owner) makes Carol a moderator.
    send(
        &mut r,
        &admin_iq("alice@x/a", "<item role='moderator' nick='Carol'/>"),
    );
    assert_eq!(r.occupants[2].role, super::Role::Moderator);
    // Dave, a moderator by role only (not admin), may not take it from Carol.
    join(&mut r, "dave@x/d", "Dave");
    send(
        &mut r,
        &admin_iq("alice@x/a", "<item role='moderator' nick='Dave'/>"),
    );
    let got = send(
        &mut r,
        &admin_iq("dave@x/d", "<item role='participant' nick='Carol'/>"),
    );
    assert_eq!(error(&got[0]), "not-allowed");
    assert_eq!(r.occupants[2].role, super::Role::Moderator);
    // Bob (admin) may.
    let got = send(
        &mut r,
        &admin_iq("bob@x/b", "<item role='participant' nick='Carol'/>"),
    );
    assert!(got.iter().any(|e| e.attr("type") == Some("result")));
    assert_eq!(r.occupants[2].role, super::Role::Participant);
}

#[test]
fn history_keeps_only_messages_with_a_body_or_a_store_hint() {
    let mut r = instant();
    for (k, m) in [
        "<composing xmlns='http://jabber.org/protocol/chatstates'/>",
        "<displayed xmlns='urn:xmpp:chat-markers:0' id='x'/>",
        "<body>kept</body>",
        "<received xmlns='urn:xmpp:receipts' id='y'/><store xmlns='urn:xmpp:hints'/>",
    ]
    .iter()
    .enumerate()
    {
        feed(
            &mut r,
            &format!("<message from='alice@x/a' to='{ROOM}' type='groupchat'>{m}</message>"),
            2000.0 + 10.0 * k as f64,
        );
    }
    assert_eq!(r.history.len(), 2);
    assert!(r.history[0].message.tail.contains("kept"));
    assert!(r.history[1].message.tail.contains("urn:xmpp:hints"));
}

#[test]
fn a_join_from_a_joined_session_replays_the_join() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    send(
        &mut r,
        &format!(
            "<message from='alice@x/a' to='{ROOM}' type='groupchat'><body>hello</body></message>"
        ),
    );
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Bob'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='5'/></x></presence>"),
    );
    // Alice's presence, Bob's own (110), the history, the subject: all to Bob only.
    assert!(got.iter().all(|e| to(e) == "bob@x/b"), "{got:?}");
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].attr("from"), Some("room@conf.example/Alice"));
    assert_eq!(codes(&got[1]), ["110"]);
    assert_eq!(got[2].get_child("body", NS_CLIENT).unwrap().text(), "hello");
    assert!(got[3].get_child("subject", NS_CLIENT).is_some());
    assert_eq!(r.occupants.len(), 2);
    // A plain presence update is still only broadcast.
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Bob'><show>away</show></presence>"),
    );
    assert_eq!(got.len(), 2);
}

#[test]
fn sessions_codes_payloads_new_moderators_and_archiving_codes() {
    let mut r = instant();
    // Non-anonymous: a second session's own presence carries 100 as the first's.
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_whois'><value>anyone</value></field></x></query></iq>"),
    );
    let first = join(&mut r, "bob@x/b1", "Bob");
    let own = |got: &[Element], s: &str| {
        got.iter()
            .find(|e| to(e) == s && codes(e).contains(&"110".to_owned()))
            .map(codes)
            .unwrap()
    };
    assert_eq!(own(&first, "bob@x/b1"), ["110", "100"]);
    send(
        &mut r,
        &format!("<presence from='bob@x/b1' to='{ROOM}/Bob'><show>dnd</show></presence>"),
    );
    let second = join(&mut r, "bob@x/b2", "Bob");
    assert_eq!(own(&second, "bob@x/b2"), ["110", "100"]);
    // The second session leaves: the first's presence (dnd) stays.
    send(
        &mut r,
        &format!("<presence from='bob@x/b2' to='{ROOM}/Bob' type='unavailable'><status>bye</status></presence>"),
    );
    assert!(
        r.occupants[1].payload.contains("dnd"),
        "{}",
        r.occupants[1].payload
    );
    // Semi-anonymous again; Carol made a moderator gets the presences with JIDs.
    send(
        &mut r,
        &format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_whois'><value>moderators</value></field></x></query></iq>"),
    );
    join(&mut r, "carol@x/c", "Carol");
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item role='moderator' nick='Carol'/>"),
    );
    let jid_of = |from: &str| {
        got.iter()
            .find(|e| to(e) == "carol@x/c" && e.attr("from") == Some(from))
            .and_then(|e| e.get_child("x", NS_MUC_USER))
            .and_then(|x| x.get_child("item", NS_MUC_USER))
            .and_then(|i| i.attr("jid"))
            .map(str::to_owned)
    };
    assert_eq!(jid_of("room@conf.example/Bob").as_deref(), Some("bob@x/b1"));
    assert_eq!(
        jid_of("room@conf.example/Alice").as_deref(),
        Some("alice@x/a")
    );
}

#[test]
fn switching_archiving_is_announced() {
    let mut l = limits();
    l.archive = true;
    let mut r = Room::new(
        BareJid::new(ROOM).unwrap(),
        Arc::new(l),
        Arc::new(vec![]),
        Arc::from("salt"),
    );
    join(&mut r, "alice@x/a", "Alice");
    let cfg = |on: &str| {
        format!("<iq from='alice@x/a' to='{ROOM}' type='set' id='c'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_enablearchiving'><value>{on}</value></field></x></query></iq>")
    };
    send(&mut r, &cfg("1"));
    let got = send(&mut r, &cfg("0"));
    let note = got.iter().find(|e| e.name() == "message").unwrap();
    assert_eq!(codes(note), ["104", "171"]);
    let got = send(&mut r, &cfg("1"));
    let note = got.iter().find(|e| e.name() == "message").unwrap();
    assert_eq!(codes(note), ["104", "170"]);
}

#[test]
fn presence_updates_private_messages_and_voice_requests_are_rate_limited() {
    let mut r = instant();
    join(&mut r, "bob@x/b", "Bob");
    // Burst 3: the fourth presence update at once is refused.
    let update = format!("<presence from='bob@x/b' to='{ROOM}/Bob'><show>away</show></presence>");
    for _ in 0..3 {
        assert!(send(&mut r, &update)
            .iter()
            .all(|e| e.attr("type") != Some("error")));
    }
    let got = send(&mut r, &update);
    assert_eq!(error(&got[0]), "resource-constraint");
    // Nick changes and private messages draw from the same bucket.
    let got = send(
        &mut r,
        &format!("<presence from='bob@x/b' to='{ROOM}/Robert'/>"),
    );
    assert_eq!(error(&got[0]), "resource-constraint");
    let got = send(
        &mut r,
        &format!("<message from='bob@x/b' to='{ROOM}/Alice' type='chat'><body>hi</body></message>"),
    );
    assert_eq!(error(&got[0]), "resource-constraint");
    // Later (a token a second), it works again.
    let (got, _) = feed(
        &mut r,
        &format!("<message from='bob@x/b' to='{ROOM}/Alice' type='chat'><body>hi</body></message>"),
        1002.0,
    );
    assert_eq!(to(&got[0]), "alice@x/a");
}

#[test]
fn rooms_created_per_user_are_bounded() {
    let creations = Arc::new(super::Creations::new(1));
    let make = |name: &str| {
        let mut r = Room::new(
            BareJid::new(&format!("{name}@conf.example")).unwrap(),
            Arc::new(limits()),
            Arc::new(vec![]),
            Arc::from("salt"),
        );
        r.creations = creations.clone();
        r
    };
    let join_to = |r: &mut Room, name: &str| {
        send(
            r,
            &format!("<presence from='alice@x/a' to='{name}@conf.example/A'><x xmlns='http://jabber.org/protocol/muc'/></presence>"),
        )
    };
    let mut one = make("one");
    assert_eq!(codes(&join_to(&mut one, "one")[0]), ["110", "201"]);
    let mut two = make("two");
    assert_eq!(error(&join_to(&mut two, "two")[0]), "not-allowed");
    // The first room ends: Alice may create another.
    creations.ended(&one.jid);
    assert_eq!(codes(&join_to(&mut two, "two")[0]), ["110", "201"]);
}

#[test]
fn affiliations_per_room_are_bounded() {
    let mut r = instant();
    // Alice (owner) and users up to the bound.
    for k in 1..super::MAX_AFFILIATIONS {
        r.affiliations.insert(
            BareJid::new(&format!("u{k}@x")).unwrap(),
            Affiliation::Member,
        );
    }
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='member' jid='one-more@x'/>"),
    );
    assert_eq!(error(&got[0]), "resource-constraint");
    // Changing an existing one, or removing, is still fine.
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='outcast' jid='u1@x'/>"),
    );
    assert_eq!(got.last().unwrap().attr("type"), Some("result"));
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='none' jid='u2@x'/>"),
    );
    assert_eq!(got.last().unwrap().attr("type"), Some("result"));
    let got = send(
        &mut r,
        &admin_iq("alice@x/a", "<item affiliation='member' jid='one-more@x'/>"),
    );
    assert_eq!(got.last().unwrap().attr("type"), Some("result"));
}

#[test]
fn a_nick_normalised_by_the_room_is_announced_with_210() {
    let mut r = instant();
    // "Zoe" with a combining acute accent: the room's nick is its composed form.
    let got = join(&mut r, "bob@x/b", "Zoe\u{301}");
    let own = got.iter().find(|e| {
        e.attr("to") == Some("bob@x/b") && e.attr("from") == Some("room@conf.example/Zo\u{e9}")
    });
    let own = own.expect("bob's own presence under the composed nick");
    assert!(codes(own).contains(&"210".to_owned()), "{own:?}");
    // As written: no 210.
    let got = join(&mut r, "carol@x/c", "Carol");
    let own = got
        .iter()
        .find(|e| e.attr("to") == Some("carol@x/c") && codes(e).contains(&"110".to_owned()))
        .unwrap();
    assert!(!codes(own).contains(&"210".to_owned()));
}
