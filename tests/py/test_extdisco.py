"""End-to-end tests of the discovery extras of sm, with slixmpp as the client (it has
no XEP-0215 plugin: the requests are raw IQs and the answers are read as XML):

- XEP-0215 external service discovery (sm module `extdisco`): the services of sm.xml's
  <extdisco>, filtered by type; a TURN entry with a shared secret comes with TURN REST
  credentials (username EXPIRY:USER, password base64(HMAC-SHA1(secret, username))) that
  a TURN server with the same secret accepts, also from a <credentials/> request;
  without services the feature is not advertised;
- XEP-0157 contact addresses and other XEP-0128 forms (sm.xml's <disco>) in the
  server's disco#info, not in an account's.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_extdisco.py -q
"""

import base64
import hashlib
import hmac
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import pytest

pytest.importorskip("OpenSSL")
pytest.importorskip("slixmpp")

from serverproc import ROOT, TIMEOUT, run_clients, serving  # noqa: E402

USERS = {"alice": "alice-pw"}
NS_EXTDISCO = "urn:xmpp:extdisco:2"
NS_INFO = "http://jabber.org/protocol/disco#info"
NS_DATA = "jabber:x:data"
SERVERINFO = "http://jabber.org/network/serverinfo"
TURN_SECRET = "turn-shared-secret-for-the-test"
TTL = 600

EXTDISCO = (
    f"<extdisco ttl='{TTL}'>"
    "<service type='stun' host='stun.example.org' port='3478' transport='udp'/>"
    f"<service type='turn' host='turn.example.org' port='3478' transport='udp' "
    f"secret='{TURN_SECRET}' name='Relay'/>"
    "</extdisco>"
)
DISCO = (
    "<disco>"
    "<contact type='admin-addresses'>xmpp:admin@localhost</contact>"
    "<contact type='admin-addresses'>mailto:admin@example.org</contact>"
    "<contact type='abuse-addresses'>mailto:abuse@example.org</contact>"
    "<form type='urn:example:server-rules'><field var='rules'>https://example.org/rules</field></form>"
    "</disco>"
)


def modules_with_extdisco():
    """etc/sm.xml's <modules> with the extdisco module added (unless it is there)."""
    modules = ET.parse(ROOT / "etc" / "sm.xml").getroot().find("modules")
    if modules is None:
        return ""  # every default module runs, extdisco among them
    if not any(m.get("name") == "extdisco" for m in modules.findall("module")):
        ET.SubElement(modules, "module", {"name": "extdisco"})
    return ET.tostring(modules, encoding="unicode")


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS,
                 sm_extra=modules_with_extdisco() + EXTDISCO + DISCO) as s:
        yield s


async def ask(client, payload, to="localhost"):
    """Sends an IQ get with `payload` (XML text) and returns the answer's XML
    (a result, or the error slixmpp raises as IqError)."""
    from slixmpp.exceptions import IqError

    iq = client.make_iq_get(ito=to)
    iq.append(ET.fromstring(payload))
    try:
        answer = await iq.send(timeout=TIMEOUT)
    except IqError as e:
        return e.iq.xml
    return answer.xml


def services(answer, element="services"):
    found = answer.find(f"{{{NS_EXTDISCO}}}{element}")
    assert found is not None, ET.tostring(answer, encoding="unicode")
    return found.findall(f"{{{NS_EXTDISCO}}}service")


def check_turn_credentials(service, user):
    """What a TURN server with static-auth-secret=TURN_SECRET checks."""
    shown = ET.tostring(service, encoding="unicode")
    username, password = service.get("username"), service.get("password")
    assert username and password, shown
    expiry, who = username.split(":", 1)
    assert who == user, shown
    now = time.time()
    assert now < int(expiry) <= now + TTL + 2, shown
    expected = base64.b64encode(
        hmac.new(TURN_SECRET.encode(), username.encode(), hashlib.sha1).digest()).decode()
    assert password == expected, shown
    expires = datetime.strptime(service.get("expires"), "%Y-%m-%dT%H:%M:%SZ")
    assert expires.replace(tzinfo=timezone.utc).timestamp() == int(expiry), shown
    assert service.get("restricted") in ("1", "true"), shown


def test_turn_credentials_verify_with_the_shared_secret(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw")
        await alice.start()

        info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=TIMEOUT)
        assert NS_EXTDISCO in info["disco_info"]["features"], str(info)

        listed = services(await ask(alice, f"<services xmlns='{NS_EXTDISCO}'/>"))
        assert [s.get("type") for s in listed] == ["stun", "turn"]
        stun, turn = listed
        assert (stun.get("host"), stun.get("port"), stun.get("transport")) == \
            ("stun.example.org", "3478", "udp")
        assert stun.get("username") is None and stun.get("password") is None
        assert (turn.get("host"), turn.get("name")) == ("turn.example.org", "Relay")
        check_turn_credentials(turn, "alice@localhost")

        only_turn = services(await ask(alice, f"<services xmlns='{NS_EXTDISCO}' type='turn'/>"))
        assert [s.get("type") for s in only_turn] == ["turn"]

        answer = await ask(alice, f"<credentials xmlns='{NS_EXTDISCO}'>"
                                  "<service type='turn' host='turn.example.org'/></credentials>")
        fresh = services(answer, "credentials")
        assert len(fresh) == 1, ET.tostring(answer, encoding="unicode")
        check_turn_credentials(fresh[0], "alice@localhost")

        unknown = await ask(alice, f"<credentials xmlns='{NS_EXTDISCO}'>"
                                   "<service type='turn' host='elsewhere.example.org'/></credentials>")
        assert unknown.get("type") == "error"
        assert unknown.find("{jabber:client}error/"
                            "{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None

    run_clients(test, server.starttls_port)
    assert TURN_SECRET not in server.log("sm")


def forms_of(answer):
    query = answer.find(f"{{{NS_INFO}}}query")
    assert query is not None, ET.tostring(answer, encoding="unicode")
    forms = {}
    for x in query.findall(f"{{{NS_DATA}}}x"):
        fields = {f.get("var"): [v.text for v in f.findall(f"{{{NS_DATA}}}value")]
                  for f in x.findall(f"{{{NS_DATA}}}field")}
        forms[fields.pop("FORM_TYPE")[0]] = fields
    return forms


def test_contact_addresses_in_the_server_disco_info_only(server):
    async def test(clients):
        alice = clients.make("alice@localhost/a", "alice-pw")
        await alice.start()
        forms = forms_of(await ask(alice, f"<query xmlns='{NS_INFO}'/>"))
        assert forms[SERVERINFO] == {
            "admin-addresses": ["xmpp:admin@localhost", "mailto:admin@example.org"],
            "abuse-addresses": ["mailto:abuse@example.org"],
        }
        assert forms["urn:example:server-rules"] == {"rules": ["https://example.org/rules"]}

        # slixmpp's XEP-0128 plugin reads it too.
        alice.register_plugin("xep_0128")
        info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=TIMEOUT)
        assert SERVERINFO in str(info)

        # An account's disco#info has no forms.
        assert forms_of(await ask(alice, f"<query xmlns='{NS_INFO}'/>", to="alice@localhost")) == {}

    run_clients(test, server.starttls_port)


def test_without_services_extdisco_is_not_advertised(request, tmp_path):
    with serving(request, tmp_path, USERS, sm_extra=modules_with_extdisco()) as server:
        async def test(clients):
            alice = clients.make("alice@localhost/a", "alice-pw")
            await alice.start()
            info = await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=TIMEOUT)
            assert NS_EXTDISCO not in info["disco_info"]["features"], str(info)
            answer = await ask(alice, f"<services xmlns='{NS_EXTDISCO}'/>")
            assert answer.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}"
                               "service-unavailable") is not None, \
                ET.tostring(answer, encoding="unicode")

        run_clients(test, server.starttls_port)
