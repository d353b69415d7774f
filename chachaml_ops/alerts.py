"""Alerts: a healthchecks-style ping per job and a Slack-compatible webhook on new error findings.

Every request has a total deadline (not a per-read timeout: a server trickling bytes cannot hold
a job); a failed alert is logged and never breaks the job that sent it. Watcher findings go out
in batches from a sender thread. Which error findings are new is remembered per store.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from chachaml_ops.config import AlertsConfig
from chachaml_ops.logs import get_logger
from chachaml_ops.report import Finding, Severity, display_path

USER_AGENT = "chachaml-ops"
_MAX_LISTED = 20
_MEMORY_LOCK = threading.Lock()
# Watcher findings: one POST per burst (this many seconds), a bounded backlog.
BATCH_WINDOW_S = 5.0
QUEUE_LIMIT = 1000
# Once the daemon stops, an unfinished request gets at most this long before it is dropped.
_STOPPING_GRACE_S = 1.0


def finding_key(f: Finding) -> str:
    return "\x1f".join((f.kind, f.path or "", f.artifact_id or ""))


class Alerter:
    def __init__(
        self,
        config: AlertsConfig,
        state_dir: Path,
        should_stop: Callable[[], bool] = lambda: False,
        batch_window: float = BATCH_WINDOW_S,
    ) -> None:
        self.config = config
        self.dir = Path(state_dir) / "alerts"
        self.log = get_logger("chachaml_ops.alerts")
        self.should_stop = should_stop
        self.batch_window = batch_window
        self._queue: queue.Queue[tuple[str, Finding]] = queue.Queue(QUEUE_LIMIT)
        self._sender: threading.Thread | None = None
        self._closed = threading.Event()
        self._dropped = 0

    # -- healthchecks-style pings ---------------------------------------------------------

    def ping(self, suffix: str, run_id: str, body: str = "") -> bool:
        """GET-like POST to ping_url[/suffix]?rid=... ; `rid` pairs a start with its end."""
        if not self.config.ping_url:
            return False
        url = self.config.ping_url + (f"/{suffix}" if suffix else "") + f"?rid={run_id}"
        return self._post(url, body.encode("utf-8")[:10000], "text/plain; charset=utf-8")

    # -- webhook on new error findings ----------------------------------------------------

    def new_errors(
        self, store: str, findings: Iterable[Finding], *, complete: bool
    ) -> list[Finding]:
        """Error findings not alerted before. `complete`: this run saw the whole store, so
        problems it no longer sees are forgotten (and alert again if they come back)."""
        errors = [f for f in findings if f.severity is Severity.ERROR]
        with _MEMORY_LOCK:  # a verify job and the watcher may finish at the same moment
            known = self._load(store)
            new = [f for f in errors if finding_key(f) not in known]
            current = {finding_key(f) for f in errors}
            try:
                self._save(store, current if complete else known | current)
            except OSError as exc:
                # Alert anyway (a repeat beats silence); the memory is fixed when it can be.
                self.log.error("alert_memory_write_failed", store=store, error=str(exc))
        return new

    def webhook(self, store: str, job: str, new: list[Finding]) -> bool:
        if not self.config.webhook_url or not new:
            return False
        lines = [f"chachaml-ops: {len(new)} new error finding(s) in store {store} ({job})"]
        for f in new[:_MAX_LISTED]:
            lines.append(
                f"• {f.kind}: {display_path(f.path)}" + (f" — {f.detail}" if f.detail else "")
            )
        if len(new) > _MAX_LISTED:
            lines.append(f"… and {len(new) - _MAX_LISTED} more")
        body: dict[str, Any] = {
            "text": "\n".join(lines),
            "store": store,
            "job": job,
            "findings": [f.to_json() for f in new[:100]],
        }
        return self._post(self.config.webhook_url, json.dumps(body).encode(), "application/json")

    # -- watcher findings: queued, batched, sent off the watcher's thread --------------------

    def queue_webhook(self, store: str, new: list[Finding]) -> None:
        """Hand new findings to the sender thread; never blocks (a full queue drops, logged)."""
        if not self.config.webhook_url or not new:
            return
        with _MEMORY_LOCK:
            if self._sender is None and not self._closed.is_set():
                self._sender = threading.Thread(
                    target=self._send_batches, name="webhook-sender", daemon=True
                )
                self._sender.start()
        for f in new:
            try:
                self._queue.put_nowait((store, f))
            except queue.Full:
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 100 == 0:
                    self.log.warning(
                        "alert_dropped", store=store, dropped=self._dropped, reason="queue full"
                    )

    def _send_batches(self) -> None:
        while not self._closed.is_set():
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            end = time.monotonic() + self.batch_window
            while (left := end - time.monotonic()) > 0 and not self._closed.is_set():
                try:
                    batch.append(self._queue.get(timeout=left))
                except queue.Empty:
                    break
            by_store: dict[str, list[Finding]] = {}
            for store, f in batch:
                by_store.setdefault(store, []).append(f)
            for store, findings in by_store.items():
                if self._closed.is_set():
                    return
                self.webhook(store, "watch", findings)

    def close(self) -> None:
        """Stop the sender (what is still queued is dropped: the next full run reports it)."""
        self._closed.set()

    # -- plumbing --------------------------------------------------------------------------

    def _post(self, url: str, data: bytes, content_type: str) -> bool:
        """POST with a total deadline of `timeout`, and a short one once the daemon stops.

        urllib's timeout is per socket operation, so the request runs on a daemon thread and
        is abandoned (logged) when the deadline passes; it never holds a job or a shutdown.
        """
        req = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": content_type, "User-Agent": USER_AGENT},
        )
        result: list[BaseException | None] = []

        def send() -> None:
            try:
                with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                    resp.read(1024)
                result.append(None)
            except BaseException as exc:  # reported by the waiting thread
                result.append(exc)

        thread = threading.Thread(target=send, name="alert-post", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.config.timeout
        while thread.is_alive():
            now = time.monotonic()
            if self.should_stop():
                deadline = min(deadline, now + _STOPPING_GRACE_S)
            if now >= deadline:
                break
            thread.join(timeout=min(0.1, deadline - now))
        if not result:
            self.log.warning(
                "alert_failed", url=_redact(url), error=f"no answer within {self.config.timeout}s"
            )
            return False
        exc = result[0]
        if exc is None:
            return True
        if isinstance(exc, Exception):  # URLError, OSError, http.client's, a bad URL...
            self.log.warning("alert_failed", url=_redact(url), error=str(exc) or repr(exc))
            return False
        raise exc

    def _path(self, store: str) -> Path:
        return self.dir / f"{store}.json"

    def _load(self, store: str) -> set[str]:
        try:
            return set(json.loads(self._path(store).read_text("utf-8")))
        except (OSError, ValueError):
            return set()

    def _save(self, store: str, keys: set[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(store).with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(keys)), "utf-8")
        os.replace(tmp, self._path(store))


def _redact(url: str) -> str:
    # Ping and webhook URLs carry their secret in the path; logs get the host only.
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/…"
