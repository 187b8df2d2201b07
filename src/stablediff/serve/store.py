"""Jobs in SQLite: one file, ``jobs.sqlite3`` in the outputs folder, in WAL mode.

A job row holds its id, status (queued, running, done, failed, cancelled), the model it was
queued for, the params JSON (``GenerationParams.to_json_dict``; uploaded init/mask images are
files in the outputs folder, named by job id), its times, its error and its image file names.
Each call opens its own short transaction; one lock serialises writers across threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]'
)
"""


@dataclass
class Job:
    id: str
    status: str
    model: str
    params: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    error: str | None
    images: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "params": self.params,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "error": self.error,
            "images": [f"/api/jobs/{self.id}/images/{n}" for n in range(len(self.images))],
        }


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    """The jobs table of ``folder / "jobs.sqlite3"``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "jobs.sqlite3"
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            db = self._connect()
            try:
                return db.execute(sql, args).rowcount
            finally:
                db.close()

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def add(self, job_id: str, model: str, params: dict[str, Any], status: str = "queued") -> Job:
        now = time.time()
        self._write(
            "INSERT INTO jobs (id, status, model, params, created) VALUES (?, ?, ?, ?, ?)",
            (job_id, status, model, json.dumps(params), now),
        )
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, offset: int = 0, limit: int = 20) -> tuple[list[Job], int]:
        """Newest first; and the total count."""
        rows = self._read("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset))
        total = self._read("SELECT COUNT(*) AS n FROM jobs")[0]["n"]
        return [_job(r) for r in rows], total

    def unfinished(self) -> list[Job]:
        """Jobs left queued or running (e.g. by a killed server), oldest first."""
        rows = self._read("SELECT * FROM jobs WHERE status IN ('queued', 'running') ORDER BY seq")
        return [_job(r) for r in rows]

    def requeue_unfinished(self) -> list[Job]:
        """Mark every queued or running job as queued again (at start) and return them, oldest first."""
        self._write("UPDATE jobs SET status = 'queued', started = NULL WHERE status = 'running'", ())
        return self.unfinished()

    def mark_running(self, job_id: str) -> bool:
        """queued -> running; False if the job is no longer queued (cancelled meanwhile)."""
        return bool(
            self._write(
                "UPDATE jobs SET status = 'running', started = ? WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
        )

    def finish(self, job_id: str, status: str, error: str | None = None, images: list[str] | None = None) -> None:
        assert status in FINISHED
        self._write(
            "UPDATE jobs SET status = ?, finished = ?, error = ?, images = ? WHERE id = ?",
            (status, time.time(), error, json.dumps(images or []), job_id),
        )

    def cancel_queued(self, job_id: str) -> bool:
        """queued -> cancelled; False if it was not queued."""
        return bool(
            self._write(
                "UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
        )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        status=row["status"],
        model=row["model"],
        params=json.loads(row["params"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        error=row["error"],
        images=json.loads(row["images"]),
    )
