"""The built docs site, rendered in a real headless browser (Chromium), offline.

The site is built with ``mkdocs build --strict`` (or taken from ``TENSORMOE_SITE_DIR``,
which CI sets to the site it has just built), served on 127.0.0.1 by a thread of this
process, and opened with Debian's ``chromium-headless-shell`` or ``chromium``.  A probe
script injected into each page waits for MathJax and reports what a reader sees:
typeset formulas, the width of the page and of every code block at 1280 px, the text
that the copy buttons of ``pycon`` blocks copy, and the signatures on API pages.

Skips when no browser is installed (``apt-get install chromium-headless-shell`` as root;
``.ci/run`` does it) or when mkdocs is missing.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
WIDTH = 1280

#: Injected before </body>: waits for MathJax, then writes what it measured into <body data-probe="...">.
PROBE = """
<script>
(async () => {
  const out = {};
  try { if (window.MathJax && MathJax.startup) { await MathJax.startup.promise; } }
  catch (e) { out.mathjax_error = String(e); }
  await new Promise((done) => setTimeout(done, 300));
  const formulas = [...document.querySelectorAll(".arithmatex")];
  out.formulas = formulas.length;
  out.typeset = formulas.filter((f) => f.querySelector("mjx-container")).length;
  out.raw = formulas.filter((f) => !f.querySelector("mjx-container")).map((f) => f.textContent.slice(0, 40));
  out.page_width = document.documentElement.scrollWidth;
  out.viewport = window.innerWidth;
  out.overflowing_code = [...document.querySelectorAll("pre > code")]
    .filter((c) => c.scrollWidth > c.clientWidth + 1)
    .map((c) => c.textContent.split("\\n").reduce((a, b) => (b.length > a.length ? b : a), ""));
  out.overflowing_tables = [...document.querySelectorAll(".md-typeset__scrollwrap")]
    .filter((w) => w.scrollWidth > w.clientWidth + 1).length;
  out.pycon_copy = [...document.querySelectorAll("div.language-pycon")].map((d) => d.getAttribute("data-copy"));
  out.signatures = Object.fromEntries([...document.querySelectorAll(".doc-heading")]
    .filter((h) => h.id).map((h) => {
      let s = h.nextElementSibling;
      return [h.id, s && s.classList.contains("doc-signature") ? s.innerText : null];
    }));
  out.images = Object.fromEntries([...document.querySelectorAll("article img")].map((i) => [i.src, i.naturalWidth]));
  out.repo_link = (document.querySelector(".md-header__source a") || {}).href || null;
  document.body.setAttribute("data-probe", JSON.stringify(out));
})();
</script>
"""


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> pathlib.Path:
    """The site: ``TENSORMOE_SITE_DIR`` if set, else a fresh ``mkdocs build --strict`` into a temporary folder."""
    given = os.environ.get("TENSORMOE_SITE_DIR")
    if given:
        site = pathlib.Path(given)
        if not (site / "index.html").is_file():
            pytest.fail(f"TENSORMOE_SITE_DIR={given!r} holds no built site (no index.html)")
        return site
    pytest.importorskip("mkdocs")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return site


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; pages asked for with ``?probe`` get the probe script."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if query != "probe":
            return super().do_GET()
        file = pathlib.Path(self.translate_path(path))
        if file.is_dir():
            file = file / "index.html"
        body = file.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>", 1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serve(site: pathlib.Path):
    """Serve ``site`` on 127.0.0.1 (a free port) for the duration of the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def chromium(browser: str, *args: str, timeout: float = 90) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--window-size={WIDTH},1000", "--hide-scrollbars", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def probe(browser: str, url: str) -> dict:
    """What the probe script measured on the page at ``url``, after MathJax has finished."""
    dom = chromium(browser, "--virtual-time-budget=20000", "--dump-dom", f"{url}?probe")
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, f"the probe did not run on {url}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def site_url(built_site):
    browser = find_browser()
    if browser is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}); as root: apt-get install chromium-headless-shell")
    with serve(built_site) as url:
        yield browser, url


@pytest.fixture(scope="module")
def pages(site_url):
    browser, url = site_url
    cache = {}

    def get(path: str) -> dict:
        if path not in cache:
            cache[path] = probe(browser, f"{url}/{path}")
        return cache[path]

    return get


def test_formulas_are_typeset_offline(pages):
    page = pages("guides/factorizations/")
    assert "mathjax_error" not in page, page
    assert page["formulas"] > 0 and page["typeset"] == page["formulas"], page["raw"]


def test_the_site_loads_mathjax_from_itself(built_site):
    site = built_site
    text = (site / "guides" / "factorizations" / "index.html").read_text()
    scripts = re.findall(r'<script src="([^"]+)"', text)
    assert any(s.endswith("javascripts/mathjax/tex-mml-chtml.js") for s in scripts), scripts
    assert not [s for s in scripts if s.startswith(("http:", "https:", "//"))], scripts
    assert (site / "javascripts" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


def test_api_page_shows_the_signature_of_cpmmoe(pages):
    page = pages("api/layers.mmoe/")
    signature = page["signatures"].get("tensormoe.layers.mmoe.CPMMoE")
    assert signature is not None, sorted(page["signatures"])
    assert re.match(r"^CPMMoE\(\s*in_dim", signature), signature
    assert "rank" in signature and "expert_dims" in signature
    assert "\n" in signature  # formatted over several lines, not one long scrolling line


def test_pycon_copy_buttons_copy_only_the_code(pages):
    page = pages("guides/ranks/")
    assert page["pycon_copy"], "no pycon block on the page"
    first = page["pycon_copy"][0]
    assert first.startswith("import tensormoe\nm = tensormoe.match_rank(")
    for text in page["pycon_copy"]:
        assert ">>>" not in text and "..." not in text.replace('"..."', ""), text


@pytest.mark.parametrize(
    "path", ["", "getting-started/", "guides/factorizations/", "guides/choosing/", "examples/", "api/layers.mmoe/"]
)
def test_no_horizontal_overflow_at_1280_px(pages, path):
    page = pages(path)
    assert page["page_width"] <= page["viewport"] == WIDTH, page
    assert page["overflowing_code"] == [], page["overflowing_code"]
    assert page["overflowing_tables"] == 0


def test_gallery_pictures_load(pages):
    page = pages("examples/")
    assert len(page["images"]) >= 2 and all(width > 300 for width in page["images"].values()), page["images"]


def test_header_links_the_repository(pages):
    assert (pages("")["repo_link"] or "").startswith("https://")
