"""End-to-end tests of the /metrics listeners (docs/metrics.md): every process of a
server started with <metrics/> in each file serves the Prometheus text format (and
OpenMetrics when asked), which parses with the Prometheus project's own Python parser,
and the counters move with what clients do; other paths and methods are refused; and
without <metrics/> nothing listens.

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_metrics.py -q
"""

import urllib.error
import urllib.request

import pytest

pytest.importorskip("OpenSSL")
parser = pytest.importorskip("prometheus_client.parser")
om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")

from scram_client import login  # noqa: E402
from serverproc import accepts, serving  # noqa: E402

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
PROCESSES = ["router", "xdb-file", "sm", "c2s", "muc", "logd", "proxy65"]


@pytest.fixture
def server(request, tmp_path):
    with serving(request, tmp_path, USERS, metrics=True, muc=True, logd=True,
                 proxy65=True) as s:
        yield s


def get(port, path="/metrics", method="GET", accept=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if accept:
        req.add_header("Accept", accept)
    if method == "POST":
        req.data = b"x=1"
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def scrape(port):
    """{(sample name, frozenset of labels): value}, parsed from the text format."""
    status, ctype, text = get(port)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), ctype
    samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def total(samples, name, **labels):
    """Sum over the series of `name` that have `labels` (others free)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_every_process_serves_metrics_that_move(server):
    # sm delivers between its users without the router once it confirmed it serves the
    # domain alone (sm/src/host/local.rs).
    server.wait_for(lambda: "served by this instance alone" in server.log("sm"),
                    "sm to deliver locally", watch=["sm"])
    a = login(server.starttls_port, "alice", USERS["alice"], resource="a")
    b = login(server.starttls_port, "bob", USERS["bob"], resource="b")
    a.send("<message to='bob@localhost/b' type='chat' id='m1'><body>hello</body></message>")
    got = b.expect("message")
    assert got.get("from") == "alice@localhost/a"

    scraped = {}
    for name in PROCESSES:
        s = scrape(server.metrics_ports[name])
        scraped[name] = s
        assert value(s, "process_resident_memory_bytes") > 0, name
        assert value(s, "process_cpu_seconds_total") >= 0, name
        assert value(s, "process_open_fds") > 0, name
        assert value(s, "process_start_time_seconds") > 1_600_000_000, name

    c2s = scraped["c2s"]
    assert value(c2s, "jabberd_c2s_auth_total", mechanism="SCRAM-SHA-256", result="success") == 2
    assert value(c2s, "jabberd_c2s_auth_total", mechanism="SCRAM-SHA-256", result="failure") == 0
    assert value(c2s, "jabberd_c2s_connections", transport="tcp", state="session") == 2
    assert value(c2s, "jabberd_c2s_connections", transport="bosh", state="session") == 0
    assert value(c2s, "jabberd_c2s_connections_accepted_total", transport="tcp") >= 2
    assert value(c2s, "jabberd_c2s_stanzas_in_total", type="message") >= 1
    assert value(c2s, "jabberd_c2s_stanzas_out_total", type="message") >= 1
    assert value(c2s, "jabberd_c2s_sessions_total", event="started") == 2
    assert value(c2s, "jabberd_c2s_bytes_in_total") > 0
    assert value(c2s, "jabberd_c2s_bytes_out_total") > 0
    # c2s reads credentials from storage to log in.
    assert total(c2s, "jabberd_storage_wait_seconds_count", op="get") >= 2

    router = scraped["router"]
    assert total(router, "jabberd_router_packets_in_total") > 0
    assert value(router, "jabberd_router_packets_in_total", type="session") > 0
    assert value(router, "jabberd_router_packets_out_total", type="xdb") > 0
    assert value(router, "jabberd_router_bytes_in_total") > 0
    assert value(router, "jabberd_router_bytes_out_total") > 0
    assert value(router, "jabberd_router_links", component="sm") == 1
    assert value(router, "jabberd_router_links", component="c2s") == 1
    assert value(router, "jabberd_router_held_packets", type="normal") == 0
    assert value(router, "jabberd_router_queued_bytes") >= 0

    sm = scraped["sm"]
    assert total(sm, "jabberd_storage_wait_seconds_count") > 0
    assert total(sm, "jabberd_storage_wait_seconds_bucket", le="+Inf") == \
        total(sm, "jabberd_storage_wait_seconds_count")
    # Between two users of the one sm, the message never crossed the router.
    assert value(sm, "jabberd_sm_local_stanzas_total") >= 1
    assert value(sm, "jabberd_sm_packets_total", type="session") >= 1
    assert value(sm, "jabberd_sm_session_events_total", event="start") == 2
    assert value(sm, "jabberd_sm_hibernated_sessions") == 0
    assert total(sm, "jabberd_link_packets_in_total") > 0

    xdb = scraped["xdb-file"]
    assert total(xdb, "jabberd_storage_request_duration_seconds_count") > 0
    assert value(xdb, "jabberd_storage_request_duration_seconds_count", op="get") > 0
    assert total(xdb, "jabberd_storage_requests_total", outcome="ok") > 0

    assert value(scraped["proxy65"], "jabberd_proxy65_streams") == 0
    assert total(scraped["logd"], "jabberd_logd_records_total") >= 0

    a.close()
    b.close()


def test_openmetrics_on_request(server):
    status, ctype, text = get(server.metrics_ports["c2s"],
                              accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert status == 200 and ctype.startswith("application/openmetrics-text"), ctype
    assert text.endswith("# EOF\n")
    names = {f.name for f in om_parser.text_string_to_metric_families(text)}
    assert "jabberd_c2s_auth" in names and "process_cpu_seconds" in names, names
    # HEAD: the headers only.
    status, _, body = get(server.metrics_ports["router"], method="HEAD")
    assert status == 200 and body == ""


def test_only_get_metrics(server):
    port = server.metrics_ports["router"]
    with pytest.raises(urllib.error.HTTPError) as e:
        get(port, "/")
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        get(port, "/metrics/x")
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        get(port, method="POST")
    assert e.value.code == 405 and e.value.headers.get("Allow") == "GET, HEAD"
    # Still serving after that.
    assert get(port)[0] == 200


def test_off_by_default(request, tmp_path):
    with serving(request, tmp_path) as s:
        assert s.metrics_ports == {}
        for name in ["router", "xdb-file", "sm", "c2s"]:
            assert "<metrics" not in (tmp_path / f"{name}.xml").read_text()
            assert "serving metrics" not in s.log(name), name
        # Nothing on the ports the shipped examples use.
        assert not any(accepts(p) for p in range(9110, 9210, 10))
