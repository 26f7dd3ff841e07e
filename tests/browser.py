"""A headless Chromium driven over the DevTools protocol, with the standard library only (for tests/test_browser.py).

The protocol runs on a pipe (``--remote-debugging-pipe``: Chromium reads commands on fd 3 and writes replies and
events on fd 4, each a JSON message ended by a NUL byte), so no websocket client and no open port are needed.

    with Chromium(find_chromium(), tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto("http://127.0.0.1:8000/")
        page.wait_for("document.body.dataset.state === 'done'")
        page.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe")

# subprocess keeps passed fds at their numbers, and sh cannot name fds above 9: a tiny Python exec shim moves the two
# pipe ends to fds 3 and 4 (via copies at 10+, in case they already sit on 3 or 4) and becomes Chromium.
MOVE_TO_FDS_3_4 = """
import fcntl, os, sys
copies = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
os.dup2(copies[0], 3)
os.dup2(copies[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


def find_chromium() -> str | None:
    """$EXPBLIP_CHROMIUM, or the first Chromium/Chrome on PATH; None when there is none."""
    if os.environ.get("EXPBLIP_CHROMIUM"):
        return os.environ["EXPBLIP_CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class ProtocolError(RuntimeError):
    """Chromium answered a command with an error, or did not answer in time."""


class Chromium:
    """One headless browser process; ``send`` a DevTools command and wait for its reply."""

    def __init__(self, executable: str, profile: Path, window: tuple[int, int] = (1200, 900), log: Path | None = None):
        commands_read, self._commands = os.pipe()  # we write, Chromium reads as fd 3
        self._events, events_write = os.pipe()  # Chromium writes as fd 4, we read
        argv = [executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
                "about:blank"]
        self._log = open(log or os.devnull, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, "-c", MOVE_TO_FDS_3_4, str(commands_read), str(events_write),
                                         *argv], pass_fds=(commands_read, events_write),
                                        stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(commands_read)
        os.close(events_write)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []  # every event, in order (console messages, exceptions, ...)
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="chromium-cdp", daemon=True)
        self._reader.start()
        self.version = self.send("Browser.getVersion")["product"]

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._events, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._cond:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                self._cond.notify_all()
        with self._cond:  # the browser exited: wake any waiter
            self._cond.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        """Send one command (to a page when ``session`` is given) and return its result."""
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while message_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise ProtocolError(f"{method}: no reply within {timeout:g} s (browser exit code "
                                        f"{self.process.poll()})")
                self._cond.wait(left)
            reply = self._replies.pop(message_id)
        if "error" in reply:
            raise ProtocolError(f"{method}: {reply['error'].get('message')} ({reply['error']})")
        return reply.get("result", {})

    def new_page(self) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except ProtocolError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._commands)
        self._reader.join(5)
        os.close(self._events)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """One tab: navigate, evaluate JavaScript, wait for a condition, set a file input, screenshot."""

    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session
        for domain in ("Page", "Runtime", "Log", "DOM"):
            self.send(f"{domain}.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self.browser.send(method, params, self.session, timeout)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); ProtocolError if it throws."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise ProtocolError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, poll: float = 0.05) -> Any:
        """Poll until the expression is truthy; its value. TimeoutError names the expression."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:g} s for {expression!r}")
            time.sleep(poll)
        return value

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for(f"location.href.startsWith({json.dumps(url)}) && document.readyState === 'complete'", timeout)

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an <input type=file> (DOM.setFileInputFiles; the page gets its change event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise ProtocolError(f"no element matches {selector!r}")
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(Path(p).resolve()) for p in paths]})

    def screenshot(self, path: Path) -> Path:
        """The whole page (not only the window) as a PNG at ``path``."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and browser log errors (CSP violations, failed loads) so far."""
        out = []
        for event in self.browser.events:
            method, params = event.get("method"), event.get("params", {})
            if event.get("sessionId") != self.session:
                continue
            if method == "Runtime.exceptionThrown":
                out.append(f"exception: {params['exceptionDetails'].get('text')} {params['exceptionDetails']}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(f"console.error: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                out.append(f"log: {params['entry'].get('text')} ({params['entry'].get('url')})")
        return out
