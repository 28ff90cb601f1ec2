"""The dashboards in a real headless Chromium: no console errors, app.js works, hostile data runs nothing.

Pages are loaded from file:// and from a local static server (127.0.0.1, free port) and driven over the
DevTools protocol (websocket client: `websockets`, a dependency of prefect). Screenshots of the index and a
latent page are taken with Chromium's --screenshot; set DIFFSAE_SCREENSHOT_DIR to keep them.
Needs /usr/bin/chromium (Debian package `chromium`): skipped without it, except under CI=true (then it fails).

    pytest -m slow tests/test_browser.py
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dashboards import render_to_dir
from diffsae.config import DashboardsConfig
from tests.synthetic import inject, synthetic_summary, synthetic_tables

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
HOSTILE = (
    "<script>window.__pwned=1;document.title='PWNED'</script>"
    ' "><img src=x onerror="document.title=\'PWNED\'">'
)
CFG = DashboardsConfig(top_latents=15, n_contexts=5, n_high_kl_tokens=20)
RANK_BY = "peak_token"  # the site's summary rank_by: the second of the synthetic recovery scores, not the first


def _need_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} missing in CI (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium); required in CI")


class CDP:
    """A minimal DevTools-protocol client: one page target, console/exception/log errors collected."""

    def __init__(self, user_data: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = user_data / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def call(
        self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30
    ) -> dict:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def eval(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expr}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def load(self, url: str) -> None:
        """Navigate and wait until app.js marked the document ready."""
        self.call("Page.navigate", {"url": "about:blank"}, session=True)  # always a fresh document
        deadline = time.monotonic() + 30
        while self.eval("location.href") != "about:blank":
            assert time.monotonic() < deadline, "about:blank never loaded"
            time.sleep(0.05)
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        deadline = time.monotonic() + 30
        probe = "document.readyState + '/' + document.documentElement?.getAttribute('data-app')"
        while True:
            try:
                if self.eval(probe) == "complete/ready":
                    break
            except RuntimeError:  # the execution context is being replaced mid-navigation
                pass
            assert time.monotonic() < deadline, f"{url}: app.js never became ready"
            time.sleep(0.1)
        self.eval("0")  # drain events queued during load

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(
                    f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p['args']]}"
                )
            elif m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {p['entry'].get('text')}")
        return out

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], str]:
    tables, _, _ = inject(synthetic_tables(n_latents=128, n_docs=60, doc_len=48, seed=2), HOSTILE)
    out = tmp_path_factory.mktemp("site")
    res = render_to_dir(tables, {**synthetic_summary(tables), "rank_by": RANK_BY}, CFG, out)
    return out, list(res.latent_ids), HOSTILE


@pytest.fixture(scope="module")
def server(site: tuple[Path, list[int], str]) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site[0]))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CDP]:
    _need_chromium()
    cdp = CDP(tmp_path_factory.mktemp("chromium-profile"))
    yield cdp
    cdp.close()


@pytest.mark.parametrize("origin", ["file", "http"])
def test_pages_load_clean_and_js_works(
    browser: CDP, site: tuple[Path, list[int], str], server: str, origin: str
) -> None:
    out, ids, _ = site
    base = out.as_uri() if origin == "file" else server
    # the error collector works: a deliberate console.error is seen
    browser.load(f"{base}/index.html")
    browser.eval("console.error('diffsae-probe')")
    assert any("diffsae-probe" in e for e in browser.errors())

    browser.load(f"{base}/index.html")
    assert browser.errors() == []
    assert browser.eval("document.querySelectorAll('#latents tbody tr').length") == CFG.top_latents
    ids_of = "Array.from(document.querySelectorAll('#{} tbody tr')).map(r => +r.cells[1].dataset.v)"
    top, broad = browser.eval(ids_of.format("latents")), browser.eval(ids_of.format("broad"))
    assert broad and ids == top + [i for i in broad if i not in top]  # every listed latent has a page
    rows_by = "Array.from(document.querySelectorAll('#latents tbody tr')).map(r => +r.cells[{}].dataset.v)"
    browser.eval("document.querySelector('#latents th[data-key=\"kl_attr_mean\"]').click()")
    assert browser.eval("document.getElementById('latents').dataset.sortKey") == "kl_attr_mean"
    means = browser.eval(rows_by.format(3))
    assert means == sorted(means, reverse=True)
    assert browser.eval(rows_by.format(1)) != ids  # rows really moved (rank order differs from mean order)
    browser.eval("document.querySelector('#latents th[data-key=\"kl_attr_mean\"]').click()")
    assert browser.eval(rows_by.format(3)) == sorted(means)
    query = str(ids[3])
    browser.eval(
        f"const i = document.getElementById('latent-filter'); i.value = '{query}';"
        "i.dispatchEvent(new Event('input'))"
    )
    visible = browser.eval(
        "Array.from(document.querySelectorAll('#latents tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.textContent)"
    )
    assert visible and all(query in t for t in visible) and len(visible) < len(ids)
    assert browser.eval("location.hash").startswith("#sort=kl_attr_mean&dir=asc&q=")
    # the recovery selector shows one score at a time
    shown = browser.eval(
        "Array.from(document.querySelectorAll('#recovery tbody'))"
        ".filter(b => !b.hidden).map(b => b.dataset.score)"
    )
    assert shown == [browser.eval("document.getElementById('score-select').value")]
    # state in the hash is applied on load
    browser.load(f"{base}/index.html#sort=frequency&dir=asc")
    freqs = browser.eval(rows_by.format(4))
    assert freqs == sorted(freqs)
    # and when the hash changes (back/forward, edited link)
    browser.eval("location.hash = '#sort=max_activation&dir=desc'")
    deadline = time.monotonic() + 10
    while browser.eval("document.getElementById('latents').dataset.sortKey") != "max_activation":
        assert time.monotonic() < deadline, "hashchange not applied"
        time.sleep(0.05)
    acts = browser.eval(rows_by.format(5))
    assert acts == sorted(acts, reverse=True)
    assert browser.errors() == []

    for page in (f"latents/{ids[0]}.html", f"latents/{ids[-1]}.html", "tokens.html"):
        browser.load(f"{base}/{page}")
        assert browser.errors() == [], page
        assert browser.eval("getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)", page


@pytest.mark.parametrize("origin", ["file", "http"])
def test_score_selector_opens_on_rank_by(
    browser: CDP, site: tuple[Path, list[int], str], server: str, origin: str
) -> None:
    """The recovery selector opens on the run's rank_by score (not its first option), and app.js shows only that
    score's rows; changing it still switches the rows."""
    out, _, _ = site
    browser.load(f"{out.as_uri() if origin == 'file' else server}/index.html")
    options = browser.eval("Array.from(document.getElementById('score-select').options).map(o => o.value)")
    assert RANK_BY in options and options[0] != RANK_BY
    assert browser.eval("document.getElementById('score-select').value") == RANK_BY
    shown = "Array.from(document.querySelectorAll('#recovery tbody')).filter(b => !b.hidden).map(b => b.dataset.score)"
    assert browser.eval(shown) == [RANK_BY]
    browser.eval(
        f"const s = document.getElementById('score-select'); s.value = {options[0]!r};"
        "s.dispatchEvent(new Event('change'))"
    )
    assert browser.eval(shown) == [options[0]]
    assert browser.errors() == []


def test_hostile_data_runs_nothing(browser: CDP, site: tuple[Path, list[int], str]) -> None:
    out, ids, hostile = site
    for page in ("index.html", "tokens.html", f"latents/{ids[0]}.html"):
        browser.load((out / page).as_uri())
        assert browser.eval("typeof window.__pwned") == "undefined", page
        assert "PWNED" not in browser.eval("document.title"), page
        assert browser.eval("document.images.length") == 0, page
        assert browser.eval("document.scripts.length") == 1, page
        assert hostile in browser.eval("document.body.textContent"), page
        assert browser.errors() == [], page


def test_screenshots(site: tuple[Path, list[int], str], tmp_path: Path) -> None:
    _need_chromium()
    out, ids, _ = site
    keep = os.environ.get("DIFFSAE_SCREENSHOT_DIR")
    shots = Path(keep) if keep else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    for name, page in (("index.png", "index.html"), ("latent.png", f"latents/{ids[0]}.html")):
        profile = tmp_path / f"profile-{name}"
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,1600"]
        subprocess.run(
            [*cmd, f"--screenshot={shots / name}", (out / page).as_uri()],
            check=True,
            timeout=120,
            capture_output=True,
        )
        data = (shots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, name
        shutil.rmtree(profile, ignore_errors=True)
