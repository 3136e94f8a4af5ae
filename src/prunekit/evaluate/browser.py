"""The browser check of a report page: open it in headless Chromium and say how it rendered.

No Python dependency: the page is copied to a temporary folder with a small probe ``<script>`` put right after its
``<meta charset>`` (before the page's Content-Security-Policy, so the policy that forbids scripts in the page itself
does not block it; the page on disk is never changed). The probe records errors (``window`` error events, which
include images that fail to load, Content-Security-Policy violations, ``console.error``) and, after the load event,
writes a JSON result into the DOM: the load time from the page's own Performance API (navigation start to the end
of the load event), the images and how many decoded, the title, and any resource fetched from a URL. Chromium runs
``--headless --dump-dom`` with its network resolver pointed nowhere; the dumped DOM is parsed, and the console
messages Chromium logs on stderr (``--enable-logging=stderr``) are added to the errors (the page runs no script of
its own, so any console message is a problem).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
RESULT_ID = "__prunekit_check__"

PROBE = """<script>(function () {
  var errs = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errs.push(e.message ? "error: " + e.message + (e.filename ? " (" + e.filename + ":" + e.lineno + ")" : "")
                        : "failed to load: " + ((t && (t.currentSrc || t.src || t.href)) || String(t)).slice(0, 120));
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errs.push("unhandled rejection: " + e.reason); });
  document.addEventListener("securitypolicyviolation", function (e) {
    errs.push("blocked by the Content-Security-Policy (" + e.violatedDirective + "): "
              + String(e.blockedURI).slice(0, 120));
  });
  var ce = console.error;
  console.error = function () {
    errs.push(Array.prototype.map.call(arguments, String).join(" "));
    return ce.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    setTimeout(function () {  // loadEventEnd is set once the load handlers have returned
      var nav = performance.getEntriesByType("navigation")[0];
      var imgs = Array.prototype.slice.call(document.images);
      var res = performance.getEntriesByType("resource").map(function (r) { return r.name; })
        .filter(function (u) { return u.indexOf("data:") !== 0; });
      var out = {
        load_ms: nav ? nav.loadEventEnd - nav.startTime
                     : performance.timing.loadEventEnd - performance.timing.navigationStart,
        images: imgs.length,
        images_loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
        console_errors: errs,
        title: document.title,
        resources: res
      };
      var pre = document.createElement("pre");
      pre.id = "%s";
      pre.textContent = JSON.stringify(out);
      document.documentElement.appendChild(pre);
    }, 0);
  });
})();</script>""" % RESULT_ID

_CONSOLE = re.compile(r":CONSOLE[:(]?\d*\)?\] \"(.*)\", source: ")


def find_chromium() -> str | None:
    """The first of chromium, chromium-browser, google-chrome(-stable) on PATH, or None."""
    for name in CHROMIUMS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _with_probe(page: str) -> str:
    m = re.search(r"<meta\s+charset\s*=[^>]*>", page, re.I) or re.search(r"<head[^>]*>", page, re.I)
    if m is None:
        return PROBE + page
    return page[: m.end()] + PROBE + page[m.end():]


def check_page(path: str | Path, timeout: float = 30, chromium: str | None = None) -> dict:
    """Open ``path`` in headless Chromium; returns ``{"load_ms", "images", "images_loaded", "console_errors",
    "title", "resources", "wall_s"}`` (``resources``: URLs fetched other than ``data:``; ``wall_s``: the whole
    check). Raises ``RuntimeError`` when no Chromium is found, it does not finish within ``timeout`` seconds, or it
    reports nothing."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError(f"No Chromium found on PATH (looked for {', '.join(CHROMIUMS)}).")
    page = Path(path).read_text(encoding="utf-8", errors="replace")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunekit-browser-") as tmp:
        copy = Path(tmp) / (Path(path).stem + ".html")
        copy.write_text(_with_probe(page), encoding="utf-8")
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={Path(tmp) / 'profile'}",
               "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={int(min(timeout, 10) * 1000)}",
               "--dump-dom", copy.as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: a timeout ends every helper
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"Chromium did not render {path} within {timeout} s.") from None
    wall = time.perf_counter() - t0
    dom, log = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    m = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', dom, re.S)
    if m is None:
        tail = " | ".join(ln for ln in log.splitlines() if ln.strip() and "dbus" not in ln)[-600:]
        raise RuntimeError(f"Chromium (exit {proc.returncode}) reported nothing for {path}: {tail}")
    res = json.loads(html.unescape(m.group(1)))
    for msg in _CONSOLE.findall(log):
        if not any(msg in e or e in msg for e in res["console_errors"]):
            res["console_errors"].append(f"console: {msg}")
    res["wall_s"] = wall
    return res
