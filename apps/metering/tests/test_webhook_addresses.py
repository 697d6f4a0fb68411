"""A tenant's webhook URL may only reach public addresses: loopback, private networks, link-local
(the clouds' metadata service) and reserved ranges are refused before any connection, and the
request goes to the address that was checked, so a DNS answer that changes in between (rebinding)
cannot redirect it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from apps.metering import webhooks


class _Recorder(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        _Recorder.hosts.append(self.headers.get("host", ""))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_receiver() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.hosts = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def _post(url: str) -> webhooks.Delivery:
    return webhooks.post_json(url=url, payload={"type": "budget.threshold"}, event_id="e1", secret="whsec_x")


@pytest.mark.slow  # listens on a socket
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1"])
def test_a_url_reaching_loopback_is_refused_and_nothing_is_sent(settings, loopback_receiver, host):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False

    delivery = _post(f"http://{host}:{loopback_receiver}/hook")

    assert delivery == webhooks.Delivery(ok=False, result="failed: the host is not a public address")
    assert _Recorder.hosts == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # the clouds' instance metadata service
        "http://10.0.0.5/hook",
        "http://192.168.1.1/hook",
        "http://172.16.0.1/hook",
        "http://100.64.0.1/hook",  # carrier-grade NAT
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_private_link_local_and_reserved_addresses_are_refused(settings, url):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    with pytest.raises(webhooks.URLRefusedError, match="not a public address"):
        webhooks.pinned_target(url)


def test_a_host_that_does_not_resolve_is_refused():
    with pytest.raises(webhooks.URLRefusedError, match="does not resolve"):
        webhooks.pinned_target("https://no-such-host.invalid/hook")


def test_the_request_goes_to_the_checked_address_with_the_names_host_and_tls_server_name(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    answers = iter(["93.184.216.34", "127.0.0.1"])  # a rebinding resolver: public first, loopback next

    def resolve(host, port, *args, **kwargs):
        assert host == "hooks.acme.test"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", resolve)

    url, headers, extensions = webhooks.pinned_target("https://u:p@hooks.acme.test:8443/a/b?c=d")

    # Resolved once; what is connected to is the address checked, not a second answer.
    assert url == "https://u:p@93.184.216.34:8443/a/b?c=d"
    assert headers == {"host": "hooks.acme.test:8443"}
    assert extensions == {"sni_hostname": "hooks.acme.test"}


def test_one_private_answer_among_public_ones_refuses_the_url(settings, monkeypatch):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = False
    monkeypatch.setattr(
        webhooks.socket,
        "getaddrinfo",
        lambda host, port, *a, **k: [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ],
    )
    with pytest.raises(webhooks.URLRefusedError):
        webhooks.pinned_target("https://hooks.acme.test/hook")


@pytest.mark.slow  # listens on a socket
def test_with_private_addresses_allowed_the_delivery_keeps_the_urls_host_header(settings, loopback_receiver):
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True

    delivery = _post(f"http://localhost:{loopback_receiver}/hook")

    assert delivery == webhooks.Delivery(ok=True, result="HTTP 204")
    assert _Recorder.hosts == [f"localhost:{loopback_receiver}"]
