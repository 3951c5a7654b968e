"""deploy/nginx.conf with a real nginx in front of the server: TLS, API keys passing through, JSON errors from
the proxy, and a 503 with Retry-After while the server is down. Skips where nginx is not installed (.ci/run
installs it)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serving_helpers import OCTET, make_frame
from transformers_alignedvq.serving import BackgroundServer, create_app
from transformers_alignedvq.testing import save_tiny_deployment

NGINX = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
CONFIG = Path(__file__).parents[1] / "deploy" / "nginx.conf"
KEY = "nginx-test-key-0123456789"
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def render(folder: Path, *, listen: int, upstream: int, cert: Path, key: Path) -> Path:
    """The shipped file with this test's ports, certificate and writable paths put in."""
    text = CONFIG.read_text()
    for old, new in [("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
                     ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
                     ("/etc/alignedvq/cert.pem", str(cert)), ("/etc/alignedvq/key.pem", str(key)),
                     ("/run/alignedvq-nginx.pid", str(folder / "nginx.pid")),
                     ("/var/log/nginx/", f"{folder}/"),
                     ("worker_processes auto;", "worker_processes 1;")]:
        assert old in text, old
        text = text.replace(old, new)
    temp_paths = "".join(f"    {kind}_temp_path {folder / kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp_paths, 1)
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture
def proxied(tmp_path):
    """(nginx https URL, SSL context trusting it, the BackgroundServer behind it)."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.cert_chain_pems[0].write_to_path(cert)
    certificate.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    authority.configure_trust(context)

    deployment = save_tiny_deployment(tmp_path / "model")
    server = BackgroundServer(create_app(deployment, max_new_tokens=2, max_wait_ms=0, api_keys=[KEY])).start()
    listen = free_port()
    config = render(tmp_path, listen=listen, upstream=server.port, cert=cert, key=key)
    nginx = subprocess.Popen([NGINX, "-c", str(config), "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                              "-g", "daemon off;"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                assert nginx.poll() is None, nginx.stdout.read()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield f"https://127.0.0.1:{listen}", context, server
    finally:
        nginx.terminate()
        nginx.wait(20)
        server.stop()


def test_nginx_terminates_tls_and_passes_keys_and_errors_through(proxied):
    url, context, server = proxied
    frame = make_frame(server.app.state.engine)
    with httpx.Client(base_url=url, verify=context, timeout=30) as client:
        assert client.get("/healthz").json()["status"] == "ok"
        refused = client.post("/v1/answer", content=frame, headers=OCTET)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
        answered = client.post("/v1/answer", content=frame, headers={**OCTET, "Authorization": f"Bearer {KEY}"})
        assert answered.status_code == 200 and isinstance(answered.json()["answer"], str)
        too_large = client.post("/v1/answer", content=bytes(100_000), headers=OCTET)
        assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "payload_too_large"
        server.stop()  # the model server goes away: clients get a 503 they retry, not a 502
        down = client.get("/healthz")
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert down.json()["error"]["type"] == "unavailable"
