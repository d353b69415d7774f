"""Alerts: a healthchecks-style ping per job and a Slack-compatible webhook on new error findings.

Every request has a timeout; a failed alert is logged and never breaks the job that sent it.
Which error findings are new is remembered per store in the state dir.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chachaml_ops.config import AlertsConfig
from chachaml_ops.logs import get_logger
from chachaml_ops.report import Finding, Severity, display_path

USER_AGENT = "chachaml-ops"
_MAX_LISTED = 20
_MEMORY_LOCK = threading.Lock()


def finding_key(f: Finding) -> str:
    return "\x1f".join((f.kind, f.path or "", f.artifact_id or ""))


class Alerter:
    def __init__(self, config: AlertsConfig, state_dir: Path) -> None:
        self.config = config
        self.dir = Path(state_dir) / "alerts"
        self.log = get_logger("chachaml_ops.alerts")

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
            self._save(store, current if complete else known | current)
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

    # -- plumbing --------------------------------------------------------------------------

    def _post(self, url: str, data: bytes, content_type: str) -> bool:
        req = urllib.request.Request(
            url,
            data=data,
            method="POST",
            headers={"Content-Type": content_type, "User-Agent": USER_AGENT},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                resp.read(1024)
            return True
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.log.warning("alert_failed", url=_redact(url), error=str(exc))
            return False

    def _path(self, store: str) -> Path:
        return self.dir / f"{store}.json"

    def _load(self, store: str) -> set[str]:
        try:
            return set(json.loads(self._path(store).read_text("utf-8")))
        except (FileNotFoundError, ValueError):
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
