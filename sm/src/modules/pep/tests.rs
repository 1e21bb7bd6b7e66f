use crate::modules::caps::Cache;
use crate::modules::testing::*;

const ROSTER: &str = "<query xmlns='jabber:iq:roster' ver='1'>\
    <item jid='bob@localhost' subscription='both'><group>Friends</group></item>\
    <item jid='carol@localhost' subscription='from'/>\
    <item jid='dave@localhost' subscription='to'/></query>";

const AVATAR: &str = "urn:xmpp:avatar:metadata";
/// Capabilities that want avatar metadata, and ones that want nothing.
const WANTS: &str =
    "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='wants='/>";
const NOTHING: &str =
    "<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n' ver='nothing='/>";

async fn alice() -> crate::host::User {
    let ctx = ctx(None, "");
    let cache = ctx.shared.get::<Cache>().unwrap();
    cache.insert("wants=", vec![format!("{AVATAR}+notify")]);
    cache.insert("nothing=", vec!["urn:xmpp:ping".into()]);
    ctx.store
        .set("alice@localhost", "jabber:iq:roster", ROSTER)
        .await
        .unwrap();
    user(&ctx, "alice@localhost")
}

fn publish(node: &str, id: &str, payload: &str, options: &str) -> String {
    let options = if options.is_empty() {
        String::new()
    } else {
        let fields: String = options
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                format!("<field var='pubsub#{k}'><value>{v}</value></field>")
            })
            .collect();
        format!("<publish-options><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>{fields}</x></publish-options>")
    };
    format!("<iq type='set' id='p'><pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item id='{id}'>{payload}</item></publish>{options}</pubsub></iq>")
}

fn items_from(from: &str, node: &str) -> String {
    format!("<iq type='get' id='g' from='{from}' to='alice@localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{node}'/></pubsub></iq>")
}

const META: &str = "<metadata xmlns='urn:xmpp:avatar:metadata'><info id='abc' bytes='1' type='image/png'/></metadata>";

#[tokio::test]
async fn publish_notifies_sessions_and_contacts_that_want_the_node() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &format!("<presence>{WANTS}</presence>")).await;
    start(&mut u, "laptop").await;
    send(&mut u, "laptop", &format!("<presence>{NOTHING}</presence>")).await;
    // bob's phone wants avatars, his laptop does not; carol sends no presence.
    inbound(
        &mut u,
        &format!("<presence from='bob@localhost/phone' to='alice@localhost'>{WANTS}</presence>"),
    )
    .await;
    inbound(
        &mut u,
        &format!("<presence from='bob@localhost/laptop' to='alice@localhost'>{NOTHING}</presence>"),
    )
    .await;
    take(&mut u);
    send(&mut u, "phone", &publish(AVATAR, "abc", META, "")).await;
    let out = take(&mut u);
    assert_eq!(
        to(
            &out,
            "phone",
            &["id='p'", "type='result'", "<item id='abc'/>"]
        )
        .len(),
        1,
        "{out:?}"
    );
    assert_eq!(
        to(
            &out,
            "phone",
            &["headline", "pubsub#event", "<item id='abc'>"]
        )
        .len(),
        1,
        "{out:?}"
    );
    assert!(to(&out, "laptop", &["pubsub#event"]).is_empty(), "{out:?}");
    let routed = to(&out, "", &["pubsub#event"]);
    assert!(
        routed
            .iter()
            .any(|s| s.contains("to='bob@localhost/phone'")),
        "{out:?}"
    );
    assert!(
        !routed.iter().any(|s| s.contains("bob@localhost/laptop")),
        "{out:?}"
    );
    // carol is subscribed but sends no presence: her server picks her resources.
    assert!(
        routed.iter().any(|s| s.contains("to='carol@localhost'")),
        "{out:?}"
    );
    // dave is not subscribed to alice.
    assert!(!routed.iter().any(|s| s.contains("dave@")), "{out:?}");
}

#[tokio::test]
async fn a_contact_coming_online_gets_the_last_item() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &publish(AVATAR, "one", META, "")).await;
    send(&mut u, "phone", &publish(AVATAR, "two", META, "")).await;
    take(&mut u);
    inbound(
        &mut u,
        &format!("<presence from='bob@localhost/tablet' to='alice@localhost'>{WANTS}</presence>"),
    )
    .await;
    let out = take(&mut u);
    let got = to(&out, "", &["to='bob@localhost/tablet'", "pubsub#event"]);
    assert_eq!(got.len(), 1, "{out:?}");
    assert!(
        got[0].contains("<item id='two'>") && got[0].contains("urn:xmpp:delay"),
        "{out:?}"
    );
    // The same presence again (a status change) sends nothing new.
    inbound(
        &mut u,
        &format!("<presence from='bob@localhost/tablet' to='alice@localhost'>{WANTS}</presence>"),
    )
    .await;
    assert!(to(&take(&mut u), "", &["pubsub#event"]).is_empty());
    // A resource that does not want the node gets nothing.
    inbound(
        &mut u,
        &format!("<presence from='bob@localhost/laptop' to='alice@localhost'>{NOTHING}</presence>"),
    )
    .await;
    assert!(to(&take(&mut u), "", &["pubsub#event"]).is_empty());
}

#[tokio::test]
async fn the_owner_gets_the_last_items_on_login() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &publish(AVATAR, "one", META, "")).await;
    take(&mut u);
    start(&mut u, "laptop").await;
    send(&mut u, "laptop", &format!("<presence>{WANTS}</presence>")).await;
    let out = take(&mut u);
    assert_eq!(
        to(&out, "laptop", &["pubsub#event", "<item id='one'>"]).len(),
        1,
        "{out:?}"
    );
    // A node that never sends its last item (as XEP-0402 bookmarks) does not.
    send(&mut u, "phone", &format!("<iq type='set' id='s'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='{AVATAR}'><x xmlns='jabber:x:data' type='submit'><field var='pubsub#send_last_published_item'><value>never</value></field></x></configure></pubsub></iq>")).await;
    assert_eq!(
        to(&take(&mut u), "phone", &["id='s'", "type='result'"]).len(),
        1
    );
    start(&mut u, "tablet").await;
    send(&mut u, "tablet", &format!("<presence>{WANTS}</presence>")).await;
    assert!(to(&take(&mut u), "tablet", &["pubsub#event"]).is_empty());
}

#[tokio::test]
async fn access_models_are_enforced() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(
        &mut u,
        "phone",
        &publish("presence-node", "1", "<x xmlns='urn:x'/>", ""),
    )
    .await;
    send(
        &mut u,
        "phone",
        &publish(
            "secret",
            "1",
            "<x xmlns='urn:x'/>",
            "access_model=whitelist",
        ),
    )
    .await;
    send(
        &mut u,
        "phone",
        &publish(
            "friends",
            "1",
            "<x xmlns='urn:x'/>",
            "access_model=roster,roster_groups_allowed=Friends",
        ),
    )
    .await;
    send(
        &mut u,
        "phone",
        &publish("public", "1", "<x xmlns='urn:x'/>", "access_model=open"),
    )
    .await;
    take(&mut u);
    let cases = [
        ("bob@localhost/a", "presence-node", "type='result'"),
        ("carol@localhost/a", "presence-node", "type='result'"),
        (
            "dave@localhost/a",
            "presence-node",
            "presence-subscription-required",
        ),
        ("bob@localhost/a", "secret", "closed-node"),
        ("bob@localhost/a", "friends", "type='result'"),
        ("carol@localhost/a", "friends", "not-in-roster-group"),
        ("stranger@elsewhere/a", "public", "type='result'"),
        ("stranger@elsewhere/a", "nothing-here", "item-not-found"),
    ];
    for (from, node, expect) in cases {
        inbound(&mut u, &items_from(from, node)).await;
        let out = take(&mut u);
        assert!(
            out.iter().any(|(_, s)| s.contains(expect)),
            "{from} {node}: {out:?}"
        );
    }
    // The owner reads every node.
    send(&mut u, "phone", "<iq type='get' id='o'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='secret'/></pubsub></iq>").await;
    let out = take(&mut u);
    assert_eq!(
        to(&out, "phone", &["id='o'", "type='result'", "urn:x"]).len(),
        1,
        "{out:?}"
    );
}

#[tokio::test]
async fn publish_options_that_do_not_match_conflict() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(
        &mut u,
        "phone",
        &publish(
            "urn:xmpp:omemo:2:bundles",
            "1",
            "<b xmlns='urn:x'/>",
            "access_model=open,max_items=max",
        ),
    )
    .await;
    assert_eq!(to(&take(&mut u), "phone", &["type='result'"]).len(), 1);
    send(
        &mut u,
        "phone",
        &publish(
            "urn:xmpp:omemo:2:bundles",
            "2",
            "<b xmlns='urn:x'/>",
            "access_model=open",
        ),
    )
    .await;
    assert_eq!(to(&take(&mut u), "phone", &["type='result'"]).len(), 1);
    send(
        &mut u,
        "phone",
        &publish(
            "urn:xmpp:omemo:2:bundles",
            "3",
            "<b xmlns='urn:x'/>",
            "access_model=presence",
        ),
    )
    .await;
    let out = take(&mut u);
    assert_eq!(
        to(
            &out,
            "phone",
            &["type='error'", "conflict", "precondition-not-met"]
        )
        .len(),
        1,
        "{out:?}"
    );
    // max_items=max kept both items.
    inbound(
        &mut u,
        &items_from("stranger@elsewhere/x", "urn:xmpp:omemo:2:bundles"),
    )
    .await;
    let out = take(&mut u);
    assert!(
        out[0].1.contains("id='1'") && out[0].1.contains("id='2'"),
        "{out:?}"
    );
}

#[tokio::test]
async fn retract_purge_delete_and_configure() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &format!("<presence>{WANTS}</presence>")).await;
    send(&mut u, "phone", &publish(AVATAR, "a", META, "max_items=5")).await;
    send(&mut u, "phone", &publish(AVATAR, "b", META, "")).await;
    take(&mut u);
    send(&mut u, "phone", &format!("<iq type='set' id='r'><pubsub xmlns='http://jabber.org/protocol/pubsub'><retract node='{AVATAR}' notify='true'><item id='a'/></retract></pubsub></iq>")).await;
    let out = take(&mut u);
    assert_eq!(
        to(&out, "phone", &["id='r'", "type='result'"]).len(),
        1,
        "{out:?}"
    );
    assert_eq!(
        to(&out, "phone", &["pubsub#event", "<retract id='a'/>"]).len(),
        1,
        "{out:?}"
    );
    // Configuration form, then a change.
    send(&mut u, "phone", &format!("<iq type='get' id='c'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='{AVATAR}'/></pubsub></iq>")).await;
    let out = take(&mut u);
    let form = to(
        &out,
        "phone",
        &["id='c'", "type='result'", "pubsub#node_config"],
    );
    assert!(
        form.len() == 1 && form[0].contains("<value>5</value>"),
        "{out:?}"
    );
    send(&mut u, "phone", &format!("<iq type='set' id='s'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='{AVATAR}'><x xmlns='jabber:x:data' type='submit'><field var='pubsub#access_model'><value>whitelist</value></field></x></configure></pubsub></iq>")).await;
    assert_eq!(
        to(&take(&mut u), "phone", &["id='s'", "type='result'"]).len(),
        1
    );
    inbound(&mut u, &items_from("bob@localhost/x", AVATAR)).await;
    assert!(take(&mut u)[0].1.contains("closed-node"));
    // A contact may not configure or publish.
    inbound(&mut u, &format!("<iq type='set' id='x' from='bob@localhost/x' to='alice@localhost'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='{AVATAR}'/></pubsub></iq>")).await;
    assert!(take(&mut u)[0].1.contains("forbidden"));
    send(&mut u, "phone", &format!("<iq type='set' id='u'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><purge node='{AVATAR}'/></pubsub></iq>")).await;
    let out = take(&mut u);
    assert_eq!(
        to(&out, "phone", &["id='u'", "type='result'"]).len(),
        1,
        "{out:?}"
    );
    assert_eq!(
        to(&out, "phone", &["pubsub#event", "<purge"]).len(),
        1,
        "{out:?}"
    );
    send(&mut u, "phone", &format!("<iq type='set' id='d'><pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='{AVATAR}'/></pubsub></iq>")).await;
    assert_eq!(
        to(&take(&mut u), "phone", &["id='d'", "type='result'"]).len(),
        1
    );
    send(&mut u, "phone", &format!("<iq type='get' id='g'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='{AVATAR}'/></pubsub></iq>")).await;
    assert!(take(&mut u)[0].1.contains("item-not-found"));
}

#[tokio::test]
async fn items_are_durable_and_limited() {
    let ctx = ctx(None, "<pep max-item-bytes='100' max-bytes='150'/>");
    let mut u = user(&ctx, "alice@localhost");
    online(&mut u, "phone", 0).await;
    take(&mut u);
    let big = format!("<x xmlns='urn:x'>{}</x>", "a".repeat(120));
    send(&mut u, "phone", &publish("n", "1", &big, "")).await;
    assert!(take(&mut u)[0].1.contains("payload-too-big"));
    let mid = format!("<x xmlns='urn:x'>{}</x>", "a".repeat(60));
    send(&mut u, "phone", &publish("n1", "1", &mid, "")).await;
    send(&mut u, "phone", &publish("n2", "1", &mid, "")).await;
    let out = take(&mut u);
    assert!(
        out[0].1.contains("type='result'") && out[1].1.contains("resource-constraint"),
        "{out:?}"
    );
    // A new task (after a restart of sm) reads the items back from storage.
    let mut again = user(&ctx, "alice@localhost");
    online(&mut again, "phone", 0).await;
    take(&mut again);
    send(&mut again, "phone", "<iq type='get' id='g'><pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='n1'/></pubsub></iq>").await;
    let out = take(&mut again);
    assert!(
        out.iter()
            .any(|(_, s)| s.contains("<item id='1'>") && s.contains("aaaa")),
        "{out:?}"
    );
}

#[tokio::test]
async fn events_to_the_bare_jid_go_to_sessions_that_want_them() {
    let mut u = alice().await;
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &format!("<presence>{WANTS}</presence>")).await;
    online(&mut u, "laptop", 0).await;
    send(&mut u, "laptop", &format!("<presence>{NOTHING}</presence>")).await;
    take(&mut u);
    inbound(&mut u, &format!("<message type='headline' from='carol@localhost' to='alice@localhost'><event xmlns='http://jabber.org/protocol/pubsub#event'><items node='{AVATAR}'><item id='z'>{META}</item></items></event></message>")).await;
    let out = take(&mut u);
    assert_eq!(to(&out, "phone", &["<item id='z'>"]).len(), 1, "{out:?}");
    assert!(to(&out, "laptop", &["<item id='z'>"]).is_empty(), "{out:?}");
}

#[tokio::test]
async fn account_removal_removes_the_nodes() {
    let mut modules: Vec<&str> = crate::modules::DEFAULT.to_vec();
    modules.push("register");
    let ctx = ctx(Some(&modules), "");
    let mut u = user(&ctx, "alice@localhost");
    online(&mut u, "phone", 0).await;
    send(&mut u, "phone", &publish(AVATAR, "a", META, "")).await;
    take(&mut u);
    assert!(!ctx
        .store
        .get("alice@localhost", super::store::NS_STORE)
        .await
        .unwrap()
        .is_empty());
    send(
        &mut u,
        "phone",
        "<iq type='set' id='r'><query xmlns='jabber:iq:register'><remove/></query></iq>",
    )
    .await;
    take(&mut u);
    for ns in [
        super::store::NS_STORE.to_owned(),
        super::store::items_ns(AVATAR),
    ] {
        assert!(
            ctx.store
                .get("alice@localhost", &ns)
                .await
                .unwrap()
                .is_empty(),
            "{ns}"
        );
    }
}
