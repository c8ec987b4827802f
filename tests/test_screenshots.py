"""tools/screenshots.py keeps a screenshot only when the rendered page shows what it must: a login page fails it.

Real Chromium against a local HTTP server whose pages are rendered by JavaScript (like the MLflow and Prefect
UIs): the words must come from the DOM after the scripts ran, and basic-auth credentials from the clients'
variables must reach the server."""

from __future__ import annotations

import base64
import http.server
import shutil
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import screenshots  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(screenshots.CHROMIUM) is None, reason="chromium is not installed")

APP = b"""<html><body><div id="app">loading</div><script>
setTimeout(function () { document.getElementById('app').innerHTML =
  '<h1>detoxflow-default</h1><p>Aliases: @champion</p><p>decision: promoted</p>'; }, 300);
</script></body></html>"""
LOGIN = b"<html><body><form><h1>Sign in</h1><input name=user><input name=password></form></body></html>"


@pytest.fixture
def site():
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("authorization"))
            body = LOGIN if self.path.startswith("/login") else APP
            if self.path.startswith("/private") and self.headers.get("authorization") is None:
                self.send_response(401)
                self.send_header("www-authenticate", 'Basic realm="x"')
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_a_rendered_page_with_the_words_is_kept_a_login_page_is_refused(site, tmp_path, monkeypatch):
    url, _ = site
    monkeypatch.setattr(screenshots, "BUDGET_MS", 3000)
    out = tmp_path / "img"
    kept = screenshots.shoot("model", f"{url}/#/models/x", "mlflow", ["champion", "promoted"], out, tmp_path)
    assert kept == out / "model.png" and kept.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(screenshots.ShotError, match=r"login: .* does not show \['champion', 'promoted'\]"):
        screenshots.shoot("login", f"{url}/login", "mlflow", ["champion", "promoted"], out, tmp_path)
    assert not (out / "login.png").exists()
    # the words must be rendered text, not the page's source: the script that writes them is not enough
    with pytest.raises(screenshots.ShotError, match="does not show"):
        screenshots.shoot("source", f"{url}/#/models/x", "mlflow", ["getElementById"], out, tmp_path)


def test_basic_auth_credentials_come_from_the_client_variables(site, tmp_path, monkeypatch):
    url, seen = site
    monkeypatch.setattr(screenshots, "BUDGET_MS", 3000)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr:t")
    screenshots.shoot("private", f"{url}/private/#/models/x", "mlflow", ["champion"], tmp_path / "img", tmp_path)
    assert "Basic " + base64.b64encode(b"alice:s3cr:t").decode() in seen
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "bob:pw")
    assert screenshots.with_credentials("http://h:1/runs", "prefect") == "http://bob:pw@h:1/runs"
