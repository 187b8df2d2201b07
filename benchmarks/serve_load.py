"""Server load test: `stablediff serve` under many concurrent clients, and its overhead per job.

    .venv/bin/python benchmarks/serve_load.py [--jobs 200] [--clients 50] [--steps 10] [--seq-jobs 20]

Starts a real server (`python -m stablediff serve --model tiny --port <free> --outputs <tmp>`) as a
subprocess, waits until it answers, runs one warm-up job, then:

1. Overhead per job, without contention: ``--seq-jobs`` jobs submitted one after another through
   ``POST /api/jobs`` (followed by polling ``GET /api/jobs/{id}``), alternating with the same
   generation called directly on a pipeline loaded in this process (``load_pipeline("tiny")``,
   ``pipe.generate``). Reported: median and p95 of the paired differences (server - direct), with
   the server's time taken both from its own job record (``finished - started``: the job as its
   worker ran it) and as the client sees it (from the POST to the poll that sees "done", every
   ``--poll-interval`` s), and the CPU time of each side (the server process's user + system time
   from /proc over its job, this process's over its call). Each call follows a ``--settle`` pause,
   so that neither side's idle OpenMP threads are still spinning. The server's image must equal
   the direct one (same seed, same model). On a machine shared with other work these figures
   move a lot: run it on an otherwise idle machine.
2. Load: ``--clients`` threads, each with its own ``httpx.Client``, together submit ``--jobs`` jobs
   (64x64, ``--steps`` steps, distinct seeds). A 429 (the queue of 16 waiting jobs is full) is
   retried after its ``Retry-After`` (plus up to 0.5 s of jitter), until accepted; each client then
   follows its job's Server-Sent Events (``--follow sse``, or polls with ``--follow poll``) until
   "done" and fetches its image. Reported: end-to-end latency (first POST attempt to image
   received) and accepted-to-done latency (median, p95), and throughput (jobs/s).

Checks (the script exits 1 if any fails): every request answered 2xx or 429 (any other status or
connection error is listed); the server process alive and answering at the end; no job lost (every
accepted job "done" in the ``GET /api/jobs`` listing, with its image fetched as a PNG); no error or
traceback in the server's log; the server's resident memory (VmRSS from /proc/<pid>/status) after
the run within 100 MB of its value after the warm-up job; the server stops within 30 s of SIGTERM.
A Markdown table of the results is printed at the end (``--out FILE`` also writes them as JSON).
Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPT = "a red circle above a blue square"
SIZE = 64
RSS_TARGET_MB = 100.0
FINISHED = ("done", "failed", "cancelled")
LOG_PROBLEM = re.compile(r"Traceback|ERROR|Exception|CRITICAL|\" 5\d\d ")


class Recorder:
    """Thread-safe counts of the answers (per kind of request and status) and the failures."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []

    def status(self, kind: str, code: int) -> None:
        with self.lock:
            self.counts[(kind, code)] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def total(self, predicate) -> int:
        with self.lock:
            return sum(n for (_, code), n in self.counts.items() if predicate(code))


def call(client: httpx.Client, rec: Recorder, kind: str, method: str, url: str, **kwargs) -> httpx.Response | None:
    """One request; its status counted, anything but 2xx/429 (or no answer) recorded as a failure."""
    try:
        response = client.request(method, url, **kwargs)
    except httpx.HTTPError as err:
        rec.fail(f"{method} {url}: {type(err).__name__}: {err}")
        return None
    rec.status(kind, response.status_code)
    if not (200 <= response.status_code < 300 or response.status_code == 429):
        rec.fail(f"{method} {url}: HTTP {response.status_code}: {response.text[:300]}")
    return response


def job_body(seed: int, steps: int) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "width": SIZE,
        "height": SIZE,
        "steps": steps,
        "guidance_scale": 7.5,
        "sampler": "dpmpp_2m",
        "seed": seed,
    }


def submit(client: httpx.Client, rec: Recorder, body: dict, deadline: float) -> tuple[dict | None, int]:
    """POST /api/jobs until accepted (201), honouring Retry-After on 429; (the job, number of 429s)."""
    refused = 0
    while time.monotonic() < deadline:
        response = call(client, rec, "POST /api/jobs", "POST", "/api/jobs", json=body)
        if response is None or response.status_code not in (201, 429):
            return None, refused
        if response.status_code == 201:
            return response.json(), refused
        refused += 1
        try:
            wait = float(response.headers.get("Retry-After", "1"))
        except ValueError:
            wait = 1.0
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())) + random.uniform(0, 0.5))
    rec.fail(f"POST /api/jobs seed {body['seed']}: still refused (429) at the deadline after {refused} tries")
    return None, refused


def poll(client: httpx.Client, rec: Recorder, job_id: str, interval: float, deadline: float) -> dict | None:
    """GET /api/jobs/{id} every ``interval`` seconds until the job is finished."""
    while time.monotonic() < deadline:
        response = call(client, rec, "GET /api/jobs/{id}", "GET", f"/api/jobs/{job_id}")
        if response is None or response.status_code != 200:
            return None
        job = response.json()
        if job["status"] in FINISHED:
            return job
        time.sleep(interval)
    rec.fail(f"job {job_id}: not finished at the deadline (polling)")
    return None


def follow(client: httpx.Client, rec: Recorder, job_id: str, deadline: float) -> dict | None:
    """Follow GET /api/jobs/{id}/events (Server-Sent Events) until its `done` event; the job."""
    url = f"/api/jobs/{job_id}/events"
    timeout = httpx.Timeout(30.0, read=max(1.0, deadline - time.monotonic()))
    try:
        with client.stream("GET", url, timeout=timeout) as response:
            rec.status("GET /api/jobs/{id}/events", response.status_code)
            if response.status_code != 200:
                rec.fail(f"GET {url}: HTTP {response.status_code}: {response.read()[:300]!r}")
                return None
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: ") and event == "done":
                    return json.loads(line[len("data: ") :])
                if time.monotonic() > deadline:
                    break
    except httpx.HTTPError as err:
        rec.fail(f"GET {url}: {type(err).__name__}: {err}")
        return None
    rec.fail(f"GET {url}: the stream ended without a `done` event")
    return None


def fetch_image(client: httpx.Client, rec: Recorder, job: dict) -> bytes | None:
    if job.get("status") != "done" or not job.get("images"):
        rec.fail(f"job {job.get('id')}: status {job.get('status')!r}, error {job.get('error')!r}, no image")
        return None
    response = call(client, rec, "GET /api/jobs/{id}/images/{n}", "GET", job["images"][0])
    if response is None or response.status_code != 200:
        return None
    if not response.content.startswith(b"\x89PNG\r\n\x1a\n"):
        rec.fail(f"GET {job['images'][0]}: not a PNG ({len(response.content)} bytes)")
        return None
    return response.content


def rss_mb(pid: int) -> float:
    """VmRSS of process ``pid`` in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) used so far by process ``pid``, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m stablediff serve --model tiny` in a subprocess; its output goes to a log file."""

    def __init__(self, outputs: Path, port: int, log_path: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
        command = [sys.executable, "-m", "stablediff", "serve", "--model", "tiny", "--port", str(port)]
        self.process = subprocess.Popen(
            [*command, "--outputs", str(outputs)], stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 180.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/api/models", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> tuple[bool, int | None]:
        """SIGTERM, then wait; (stopped in time, exit status). Killed if it does not stop."""
        if not self.alive():
            return True, self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return True, self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return False, None
        finally:
            self._log.close()


def overhead_phase(server: Server, rec: Recorder, n: int, steps: int, interval: float, settle: float) -> dict[str, Any]:
    """Jobs one after another through the server, alternating with direct ``pipe.generate`` calls."""
    from PIL import Image

    from stablediff import GenerationParams, load_pipeline

    pipe = load_pipeline("tiny")  # the same weights as the server's (presets are seeded, seed 0)
    direct, server_run, client_seen, queue_wait, identical = [], [], [], [], 0
    direct_cpu, server_cpu = [], []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(n + 1):  # i == 0: warm-up of the direct path (the server's was done before)
            seed = 100 + i
            params = GenerationParams(PROMPT, width=SIZE, height=SIZE, steps=steps, seed=seed)
            order = ("direct", "server") if i % 2 == 0 else ("server", "direct")
            for which in order:
                time.sleep(settle)  # the other side's idle OpenMP threads stop spinning
                t0 = time.perf_counter()
                if which == "direct":
                    c0 = time.process_time()
                    image = pipe.generate(params)[0]
                    t_direct = time.perf_counter() - t0
                    c_direct = time.process_time() - c0
                    continue
                c0 = cpu_s(server.pid)
                job, _ = submit(client, rec, job_body(seed, steps), time.monotonic() + 300)
                done = poll(client, rec, job["id"], interval, time.monotonic() + 300) if job else None
                t_client = time.perf_counter() - t0
                c_server = cpu_s(server.pid) - c0
                png = fetch_image(client, rec, done) if done else None
            if i == 0 or done is None or png is None:
                continue
            direct.append(t_direct)
            direct_cpu.append(c_direct)
            server_cpu.append(c_server)
            client_seen.append(t_client)
            server_run.append(done["finished"] - done["started"])
            queue_wait.append(done["started"] - done["created"])
            identical += bool(np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(image)))
    run_over = [s - d for s, d in zip(server_run, direct, strict=True)]
    seen_over = [c - d for c, d in zip(client_seen, direct, strict=True)]
    cpu_over = [c - d for c, d in zip(server_cpu, direct_cpu, strict=True)]
    return {
        "jobs": n,
        "measured": len(direct),
        "identical_images": identical,
        "direct_s": direct,
        "server_run_s": server_run,
        "client_seen_s": client_seen,
        "queue_wait_s": queue_wait,
        "run_overhead_s": run_over,
        "client_overhead_s": seen_over,
        "direct_cpu_s": direct_cpu,
        "server_cpu_s": server_cpu,
        "cpu_overhead_s": cpu_over,
    }


def load_phase(
    server: Server, rec: Recorder, jobs: int, clients: int, steps: int, mode: str, interval: float, timeout: float
) -> dict[str, Any]:
    """``clients`` threads submit ``jobs`` jobs together, each following its job and fetching its image."""
    work: queue.Queue[int] = queue.Queue()
    for i in range(jobs):
        work.put(i)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + timeout
    peak = [rss_mb(server.pid)]
    running = threading.Event()
    running.set()

    def sample_rss() -> None:
        while running.is_set():
            try:
                peak[0] = max(peak[0], rss_mb(server.pid))
            except (OSError, RuntimeError):
                return
            time.sleep(0.25)

    def client_loop() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                seed = 10_000 + i
                t0 = time.perf_counter()
                job, refused = submit(client, rec, job_body(seed, steps), deadline)
                entry: dict[str, Any] = {"seed": seed, "refused": refused, "id": job["id"] if job else None}
                if job is not None:
                    entry["accepted_s"] = time.perf_counter() - t0
                    if mode == "sse":
                        done = follow(client, rec, job["id"], deadline)
                    else:
                        done = poll(client, rec, job["id"], interval, deadline)
                    if done is not None:
                        entry["done_s"] = time.perf_counter() - t0
                        entry["status"] = done["status"]
                        entry["server_queue_to_done_s"] = done["finished"] - done["created"]
                        png = fetch_image(client, rec, done)
                        if png is not None:
                            entry["image_s"] = time.perf_counter() - t0
                with lock:
                    results.append(entry)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client_loop, daemon=True, name=f"client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 120)
    wall = time.perf_counter() - t0
    running.clear()
    sampler.join(5)
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        rec.fail(f"{len(stuck)} client threads still waiting after the deadline (a hang?): {stuck[:10]}")
    with lock:
        results = list(results)
    return {"wall_s": wall, "results": results, "stuck_clients": len(stuck), "rss_peak_mb": peak[0]}


def list_all_jobs(server: Server, rec: Recorder) -> dict[str, dict]:
    """Every job in GET /api/jobs (pages of 100), by id."""
    found: dict[str, dict] = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        offset = 0
        while True:
            response = call(client, rec, "GET /api/jobs", "GET", "/api/jobs", params={"offset": offset, "limit": 100})
            if response is None or response.status_code != 200:
                break
            page = response.json()
            found.update((job["id"], job) for job in page["jobs"])
            offset += len(page["jobs"])
            if not page["jobs"] or offset >= page["total"]:
                break
    return found


def fmt_ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1e3:.0f} ms / {pct(values, 95) * 1e3:.0f} ms" if values else "n/a"


def fmt_s(values: list[float]) -> str:
    return f"{pct(values, 50):.2f} s / {pct(values, 95):.2f} s" if values else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs submitted under load (default 200)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps per job (default 10)")
    parser.add_argument("--seq-jobs", type=int, default=20, help="jobs of the overhead phase (default 20)")
    parser.add_argument("--follow", choices=("sse", "poll"), default="sse", help="how clients wait under load")
    parser.add_argument("--poll-interval", type=float, default=0.02, help="seconds between polls (default 0.02)")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds of pause before each call of the overhead phase (0.5)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="deadline of the load phase in seconds")
    parser.add_argument("--keep", action="store_true", help="keep the outputs folder and the server log")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args()

    import torch  # after parsing, so that --help is quick

    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    outputs = tmp / "outputs"
    rec = Recorder()
    checks: list[tuple[str, str, str, bool]] = []  # (what, value, target, passed)
    figures: list[tuple[str, str]] = []
    server = Server(outputs, free_port(), tmp / "server.log")
    print(f"server pid {server.pid}, {server.url}, outputs {outputs}, log {server.log_path}", flush=True)
    try:
        ready = server.wait_ready()
        print(f"server answering after {ready:.1f} s", flush=True)
        with httpx.Client(base_url=server.url, timeout=60) as client:  # warm-up
            job, _ = submit(client, rec, job_body(1, args.steps), time.monotonic() + 300)
            done = poll(client, rec, job["id"], 0.05, time.monotonic() + 300) if job else None
            if done is None or fetch_image(client, rec, done) is None:
                raise RuntimeError(f"the warm-up job failed: {rec.failures}")
        rss_warm = rss_mb(server.pid)
        print(f"warm-up done; server RSS {rss_warm:.1f} MB", flush=True)

        seq = overhead_phase(server, rec, args.seq_jobs, args.steps, args.poll_interval, args.settle)
        print(
            f"overhead phase: {seq['measured']}/{seq['jobs']} jobs; direct {fmt_ms(seq['direct_s'])}, "
            f"server run {fmt_ms(seq['server_run_s'])}, client-seen {fmt_ms(seq['client_seen_s'])} (median / p95)",
            flush=True,
        )
        rss_before = rss_mb(server.pid)
        print(f"load phase: {args.jobs} jobs from {args.clients} clients ({args.follow}); RSS {rss_before:.1f} MB")
        load = load_phase(
            server, rec, args.jobs, args.clients, args.steps, args.follow, args.poll_interval, args.timeout
        )
        time.sleep(1.0)  # let the last requests' buffers go
        alive = server.alive()
        answering = False
        if alive:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                response = call(client, rec, "GET /api/models", "GET", "/api/models")
                answering = response is not None and response.status_code == 200
        rss_after = rss_mb(server.pid) if alive else float("nan")
        listed = list_all_jobs(server, rec) if alive else {}
        log_before_stop = server.log()
    except BaseException:
        print(f"the run broke off; the server's log ends with:\n{''.join(server.log().splitlines(True)[-40:])}")
        raise
    finally:
        stopped, exit_status = server.stop()
    log_problems = [line for line in log_before_stop.splitlines() if LOG_PROBLEM.search(line)]

    results = load["results"]
    accepted = [r for r in results if r["id"]]
    request_failures = len(rec.failures)  # statuses, connection errors, timeouts (before the lost jobs)
    lost = []
    for r in accepted:
        job = listed.get(r["id"])
        if job is None or job["status"] != "done" or len(job["images"]) != 1 or "image_s" not in r:
            lost.append(r["id"])
            state = "missing from the listing" if job is None else f"{job['status']}, {len(job['images'])} images"
            rec.fail(f"job {r['id']} (seed {r['seed']}) lost: {state}, image fetched: {'image_s' in r}")
    not_accepted = args.jobs - len(accepted)
    ok_2xx = rec.total(lambda c: 200 <= c < 300)
    n_429 = rec.total(lambda c: c == 429)
    n_201 = rec.counts[("POST /api/jobs", 201)]
    e2e = [r["image_s"] for r in results if "image_s" in r]
    to_done = [r["server_queue_to_done_s"] for r in results if "server_queue_to_done_s" in r]
    done_jobs = sum(1 for r in results if r.get("status") == "done")
    throughput = done_jobs / load["wall_s"] if load["wall_s"] > 0 else 0.0
    rss_diff = rss_after - rss_warm

    checks += [
        (
            "requests answered 2xx or 429",
            f"{ok_2xx} 2xx ({n_201} x 201), {n_429} x 429",
            "all",
            not request_failures,
        ),
        ("other statuses, connection errors, timeouts", str(request_failures), "0", not request_failures),
        ("server alive and answering at the end", "yes" if alive and answering else "no", "yes", alive and answering),
        (
            "jobs accepted / done with image / lost",
            f"{len(accepted)} / {len(accepted) - len(lost)} / {len(lost) + not_accepted}",
            f"{args.jobs} / {args.jobs} / 0",
            not lost and not not_accepted,
        ),
        ("errors in the server log", str(len(log_problems)), "0", not log_problems),
        (
            "server RSS: after warm-up / after the run / diff",
            f"{rss_warm:.1f} / {rss_after:.1f} / {rss_diff:+.1f} MB",
            f"diff <= {RSS_TARGET_MB:.0f} MB",
            rss_diff <= RSS_TARGET_MB,
        ),
        (
            "server images equal to direct ones (same seed)",
            f"{seq['identical_images']} / {seq['measured']}",
            f"{args.seq_jobs} / {args.seq_jobs}",
            seq["identical_images"] == seq["measured"] == args.seq_jobs,
        ),
        (
            "server stops on SIGTERM",
            f"in time, exit status {exit_status}" if stopped else "no (killed after 30 s)",
            "within 30 s",
            stopped,
        ),
    ]
    figures += [
        ("server RSS before the load phase / peak during it", f"{rss_before:.1f} / {load['rss_peak_mb']:.1f} MB"),
        ("429 answers per job under load: max", str(max((r["refused"] for r in results), default=0))),
        ("direct `pipe.generate` (median / p95)", fmt_ms(seq["direct_s"])),
        ("server job run, its record's finished - started (median / p95)", fmt_ms(seq["server_run_s"])),
        ("overhead per job, server run - direct (median / p95)", fmt_ms(seq["run_overhead_s"])),
        ("client POST -> done seen, sequential (median / p95)", fmt_ms(seq["client_seen_s"])),
        ("overhead per job, client-seen - direct (median / p95)", fmt_ms(seq["client_overhead_s"])),
        ("CPU time per job: direct, benchmark process (median / p95)", fmt_ms(seq["direct_cpu_s"])),
        ("CPU time per job: server process, POST to done seen (median / p95)", fmt_ms(seq["server_cpu_s"])),
        ("CPU overhead per job, server - direct (median / p95)", fmt_ms(seq["cpu_overhead_s"])),
        ("queue wait when idle, started - created (median / p95)", fmt_ms(seq["queue_wait_s"])),
        ("latency under load, first POST -> image received (median / p95)", fmt_s(e2e)),
        ("latency under load, accepted -> done, server record (median / p95)", fmt_s(to_done)),
        ("throughput under load", f"{throughput:.2f} jobs/s ({done_jobs} jobs in {load['wall_s']:.1f} s)"),
    ]

    print()
    print("Answers by request:")
    for (kind, code), n in sorted(rec.counts.items()):
        print(f"  {kind}: {code} x {n}")
    if rec.failures:
        print(f"Failures ({len(rec.failures)}):")
        for line in rec.failures[:50]:
            print(f"  {line}")
    if log_problems:
        print(f"Server log problems ({len(log_problems)}; log {server.log_path}):")
        for line in log_problems[:30]:
            print(f"  {line}")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print()
    print(
        f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}; "
        f"{args.jobs} jobs, {args.clients} clients ({args.follow}), tiny {SIZE}x{SIZE}, {args.steps} steps, "
        f"{args.seq_jobs} sequential jobs"
    )
    print()
    print("| check | value | target | ok |")
    print("|---|---|---|---|")
    for what, value, target, passed in checks:
        print(f"| {what} | {value} | {target} | {'yes' if passed else '**NO**'} |")
    print()
    print("| figure | value |")
    print("|---|---|")
    for what, value in figures:
        print(f"| {what} | {value} |")

    failed = [what for what, _, _, passed in checks if not passed]
    if args.out:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": cpu,
            "args": vars(args),
            "checks": [{"what": w, "value": v, "target": t, "ok": p} for w, v, t, p in checks],
            "figures": dict(figures),
            "answers": {f"{k} {c}": n for (k, c), n in sorted(rec.counts.items())},
            "failures": rec.failures,
            "log_problems": log_problems,
            "sequential": seq,
            "load": {**load, "results": results},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if failed or args.keep:
        print(f"\noutputs and server log kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
