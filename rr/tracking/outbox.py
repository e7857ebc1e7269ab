"""A write-ahead outbox for MLflow: every record goes to a JSONL file in the job dir first, then to the store.

An unreachable tracking server delays records, never loses them and never stops the job: sending is retried
with exponential backoff, and what is still unsent when the job ends stays in the outbox for the next run.
Replaying a record is harmless (runs are created once, metrics carry their own timestamp and MLflow drops exact
duplicates, a run's model version is looked up before one is created).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from rr.core.files import atomic_write

# Errors that resending cannot fix (the record itself is wrong): they go to rejected.jsonl, with the reason.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                    "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_URL"}
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


def is_transient(error: Exception) -> bool:
    """Connection refused, timeouts, 5xx, a locked database: worth sending again later."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in PERMANENT_ERRORS
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith(("requests", "urllib3"))


@contextmanager
def mlflow_http_defaults(defaults: dict[str, str]):
    """MLflow's HTTP settings (MLFLOW_HTTP_REQUEST_* variables) inside the block, where the user set none; the
    environment is restored after."""
    saved = {key: os.environ.get(key) for key in defaults}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fail_fast_http():
    """MLflow's own HTTP retries wait minutes before giving up; the outbox has its own backoff, so fail at once."""
    return mlflow_http_defaults({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"})


class Outbox:
    """Records (dicts with an "op") queued in `directory/outbox.jsonl` and sent in order by `send(record)`.

    `state.json` beside it keeps what sending produced (run ids by key, the registered version) and what the
    recorder already queued, so a resumed job neither creates a second run nor queues a record twice.
    """

    def __init__(self, directory: Path, send: Callable[[dict], None], say: Callable[[str], None], what: str):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = directory / "outbox.jsonl"
        self.rejected_path = directory / "rejected.jsonl"
        self.state_path = directory / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.state.setdefault("runs", {})
        self.state.setdefault("queued", [])
        self.send = send
        self.say = say
        self.what = what  # the store, for messages
        self.retry_at = 0.0
        self.backoff = FIRST_BACKOFF_S
        self.offline_since: float | None = None

    # ---- state ---------------------------------------------------------------------------
    def save_state(self) -> None:
        text = json.dumps(self.state, indent=1)
        atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(text))

    def queued(self, marker: str) -> bool:
        return marker in self.state["queued"]

    def mark_queued(self, marker: str) -> None:
        if marker not in self.state["queued"]:
            self.state["queued"].append(marker)
            self.save_state()

    # ---- the queue -----------------------------------------------------------------------
    def put(self, record: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def pending(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # the tail of a line cut by a kill: its record was queued again by the resumed job
        return records

    def replace_pending(self, records: list[dict]) -> None:
        """Replace what is queued (rr's own queue: the recorder redacts records an older rr queued)."""
        self._rewrite(records)

    def _rewrite(self, records: list[dict]) -> None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    # ---- sending -------------------------------------------------------------------------
    def flush(self, wait_s: float = 0.0) -> int:
        """Send what is queued, in order; returns how many records are still waiting.

        With wait_s = 0 it makes at most one attempt, and none while backing off (the job never waits). With
        wait_s > 0 (the end of a job) it keeps retrying with backoff for up to wait_s seconds.
        """
        deadline = time.monotonic() + wait_s
        while True:
            records = self.pending()
            if not records:
                return 0
            now = time.monotonic()
            if now < self.retry_at:
                if self.retry_at > deadline:
                    return len(records)
                time.sleep(self.retry_at - now)
            if self._send_all(records) == 0 or time.monotonic() >= deadline:
                return len(self.pending())

    def _send_all(self, records: list[dict]) -> int:
        sent = 0
        with fail_fast_http():
            while records:
                try:
                    self.send(records[0])
                except Exception as error:  # noqa: BLE001 - sorted below: wait and resend, or set aside
                    if is_transient(error):
                        self._went_offline(error, len(records))
                        return len(records)
                    self._reject(records[0], error)
                records = records[1:]
                sent += 1
                self._rewrite(records)
        if self.offline_since is not None:
            self.say(f"tracking: {self.what} is reachable again; sent {sent} buffered records")
        self.offline_since = None
        self.backoff = FIRST_BACKOFF_S
        self.retry_at = 0.0
        return 0

    def _went_offline(self, error: Exception, waiting: int) -> None:
        if self.offline_since is None:
            self.offline_since = time.monotonic()
            first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            self.say(f"tracking: cannot reach {self.what} ({first_line}); the job goes on and {waiting} records wait "
                     f"in {self.path}, retried with backoff")
        self.retry_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)

    def _reject(self, record: dict, error: Exception) -> None:
        with self.rejected_path.open("a") as handle:
            handle.write(json.dumps({"record": record, "error": f"{type(error).__name__}: {error}"}, default=str) + "\n")
        self.say(f"tracking: {self.what} refused a {record.get('op')} record ({error}); it is kept in "
                 f"{self.rejected_path} and the job goes on")
