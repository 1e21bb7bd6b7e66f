"""End-to-end tests of the router with an independent XEP-0114 implementation.

Both components are slixmpp ComponentXMPP instances talking to a real `router`
process (tests/py/routerproc.py starts it on a free port in tmp_path).

Run from the repository root:  .venv/bin/python -m pytest tests/py/test_component.py -q
(.venv: python3 -m venv .venv && .venv/bin/pip install -r tests/py/requirements.txt)
"""

import asyncio

import pytest

slixmpp = pytest.importorskip("slixmpp")
from slixmpp.componentxmpp import ComponentXMPP  # noqa: E402

from routerproc import RouterProcess, router_binary  # noqa: E402

COMPONENTS = {
    "echo.localhost": "echo-secret",
    "sender.localhost": "sender-secret",
}
ACCEPT = "jabber:component:accept"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
TIMEOUT = 5.0  # seconds for any single wait: every step is normally milliseconds


@pytest.fixture
def router(tmp_path, request):
    if not router_binary().exists():
        pytest.fail(f"router binary not found at {router_binary()}: build it first")
    proc = RouterProcess(tmp_path, COMPONENTS).start()
    yield proc
    proc.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # Shown with the failure in pytest's summary.
        report.sections.append(("router log", proc.log_text()))


class Component(ComponentXMPP):
    """A ComponentXMPP that records what happens to it for the tests to await."""

    def __init__(self, name, secret, port, echo=False, plugins=()):
        super().__init__(name, secret, "127.0.0.1", port)
        self.port = port
        self.echo = echo
        self.started = asyncio.Event()
        self.gone = asyncio.Event()
        self.stream_errors = []
        self.messages = asyncio.Queue()  # every <message> that is not an error
        self.errors = asyncio.Queue()  # every <message type='error'>
        self.received = []  # every <message>, in order
        for plugin in plugins:
            self.register_plugin(plugin)
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("message", self._on_message)
        self.add_event_handler("message_error", self._on_message_error)

    def _on_start(self, _event):
        self.started.set()

    def _on_disconnected(self, _reason):
        self.gone.set()

    def _on_stream_error(self, error):
        self.stream_errors.append(error["condition"])

    def _on_message(self, msg):
        # A bounce carries the original <body/> too, so it fires 'message' as well.
        if msg["type"] == "error":
            return
        self.received.append(msg)
        self.messages.put_nowait(msg)
        if self.echo:
            msg.reply("echo: " + msg["body"]).send()

    def _on_message_error(self, msg):
        self.received.append(msg)
        self.errors.put_nowait(msg)

    async def start(self):
        """Connect and wait for the handshake to be accepted."""
        self.connect("127.0.0.1", self.port)
        await wait(self.started.wait(), f"{self.boundjid} session start")
        return self

    async def stop(self):
        if not self.gone.is_set():
            self.disconnect(wait=1.0)
            try:
                await asyncio.wait_for(self.gone.wait(), 2.0)
            except asyncio.TimeoutError:
                self.abort()
        self.cancel_connection_attempt()
        # slixmpp's background sender task outlives the connection: end it here,
        # on its own loop, rather than in __del__ after the loop is closed.
        task, self._run_out_filters = self._run_out_filters, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def send_with_id(self, mid, **kwargs):
        msg = self.make_message(**kwargs)
        msg["id"] = mid
        msg.send()


async def wait(awaitable, what, timeout=TIMEOUT):
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def run(test, port):
    """Run `test(components)` on a fresh event loop; every Component the test makes
    with components.make(...) is disconnected afterwards, whatever happens."""

    class Components:
        def __init__(self):
            self.all = []

        def make(self, name, secret=None, **kwargs):
            comp = Component(name, COMPONENTS.get(name, "x") if secret is None else secret,
                             port, **kwargs)
            self.all.append(comp)
            return comp

    async def main():
        components = Components()
        try:
            await test(components)
        finally:
            for comp in components.all:
                await comp.stop()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        # Let cancelled tasks of slixmpp finish before closing the loop.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()


def error_condition(msg):
    """The defined condition of a bounce, read from the raw XML: slixmpp's Error
    plugin looks for {jabber:client}error, while on a component stream the
    <error/> is (correctly) in jabber:component:accept."""
    error = msg.xml.find(f"{{{ACCEPT}}}error")
    assert error is not None, f"no <error/> in {msg}"
    conditions = [child.tag.split("}", 1)[1] for child in error
                  if child.tag.startswith(f"{{{STANZAS}}}") and not child.tag.endswith("}text")]
    return error.get("type"), conditions


def test_echo_message_and_iq(router):
    async def test(components):
        echo = await components.make("echo.localhost", echo=True,
                                     plugins=["xep_0030", "xep_0199"]).start()
        sender = await components.make("sender.localhost",
                                       plugins=["xep_0030", "xep_0199"]).start()

        sender.send_message(mto="bot@echo.localhost", mfrom="user@sender.localhost",
                            mbody="hello", mtype="chat")
        got = await wait(echo.messages.get(), "the message at echo.localhost")
        assert (str(got["from"]), str(got["to"]), got["body"]) == (
            "user@sender.localhost", "bot@echo.localhost", "hello")

        reply = await wait(sender.messages.get(), "the echo at sender.localhost")
        assert str(reply["from"]) == "bot@echo.localhost"
        assert str(reply["to"]) == "user@sender.localhost"
        assert reply["body"] == "echo: hello"
        assert reply["type"] == "chat"

        # IQ round trips: XEP-0199 ping and XEP-0030 disco#info, answered by
        # slixmpp's plugins on echo.localhost.
        rtt = await sender.plugin["xep_0199"].ping(jid="echo.localhost",
                                            ifrom="user@sender.localhost", timeout=TIMEOUT)
        assert rtt >= 0
        info = await sender.plugin["xep_0030"].get_info(jid="echo.localhost",
                                                 ifrom="user@sender.localhost",
                                                 timeout=TIMEOUT)
        assert info["type"] == "result"
        assert str(info["from"]) == "echo.localhost"
        assert str(info["to"]) == "user@sender.localhost"
        assert "urn:xmpp:ping" in info["disco_info"]["features"]

        assert sender.errors.empty() and echo.errors.empty()

    run(test, router.port)


@pytest.mark.parametrize("name, secret, condition", [
    ("echo.localhost", "wrong-secret", "not-authorized"),
    ("nobody.localhost", "whatever", "host-unknown"),
])
def test_refused(router, name, secret, condition):
    async def test(components):
        comp = components.make(name, secret)
        comp.connect("127.0.0.1", router.port)
        await wait(comp.gone.wait(), f"the router to close the link of {name}")
        assert not comp.started.is_set()
        assert not comp.sessionstarted
        assert comp.stream_errors == [condition]

        # The refused attempt did not take the name: the right secret still works.
        if name in COMPONENTS:
            await components.make(name).start()

    run(test, router.port)


def test_unroutable_domain_bounces(router):
    async def test(components):
        sender = await components.make("sender.localhost").start()
        sender.send_with_id("m-nowhere", mto="someone@nowhere.example",
                            mfrom="user@sender.localhost", mbody="anyone?")
        bounce = await wait(sender.errors.get(), "the bounce from the router")
        assert bounce["type"] == "error"
        assert bounce["id"] == "m-nowhere"
        assert str(bounce["from"]) == "someone@nowhere.example"
        assert str(bounce["to"]) == "user@sender.localhost"
        assert error_condition(bounce) == ("cancel", ["remote-server-not-found"])
        assert sender.messages.empty()

    run(test, router.port)


def test_forged_from_is_bounced(router):
    async def test(components):
        echo = await components.make("echo.localhost", echo=True).start()
        sender = await components.make("sender.localhost").start()

        sender.send_with_id("m-forged", mto="bot@echo.localhost", mfrom="x@echo.localhost",
                            mbody="forged")
        bounce = await wait(sender.errors.get(), "the not-allowed bounce")
        assert bounce["type"] == "error"
        assert bounce["id"] == "m-forged"
        assert error_condition(bounce) == ("cancel", ["not-allowed"])

        # The router handles a link's stanzas in order, so once this one has been
        # echoed the forged one can no longer arrive at echo.localhost.
        sender.send_with_id("m-genuine", mto="bot@echo.localhost",
                            mfrom="user@sender.localhost", mbody="genuine")
        reply = await wait(sender.messages.get(), "the echo of the genuine message")
        assert reply["body"] == "echo: genuine"
        assert [m["body"] for m in echo.received] == ["genuine"]
        assert echo.errors.empty()
        assert sender.errors.empty()

    run(test, router.port)
