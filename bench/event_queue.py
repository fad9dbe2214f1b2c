"""Event queue throughput and latency per adapter, beside saq, arq and dramatiq, measured in one run.

Run: .venv/bin/python bench/event_queue.py [--count N] [--paced-count N] [--systems a,b]

For each system: enqueue `count` no-op jobs (10 concurrent producers) and
time it; then start one worker process at concurrency 10 and time it from
its first job to its last acknowledged one; then start a fresh worker,
enqueue `paced-count` jobs at a steady pace and record enqueue -> job start
latency (the machine's monotonic clock, shared by every process). Peers run
with their default settings. Writes bench/results/event_queue.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This script is named like the standard library's `queue`, which asyncio and
# the drivers import; its own folder must not shadow it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

_spec = importlib.util.spec_from_file_location("_queue_peers", HERE / "_queue_peers.py")
assert _spec is not None and _spec.loader is not None
peers = importlib.util.module_from_spec(_spec)
sys.modules["_queue_peers"] = peers
_spec.loader.exec_module(peers)
SYSTEMS, System, cleanup, make_system = (
    peers.SYSTEMS,
    peers.System,
    peers.cleanup,
    peers.make_system,
)

RESULTS = Path(__file__).with_name("results") / "event_queue.json"
PRODUCERS = 10
CONCURRENCY = 10
PACE = 1 / 200
PROCESS_BUDGET = 15.0
TARGET_RATIO = 1.5


class Recorder:
    """Counts jobs in a worker process (from any thread) and records start latencies."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.lock = threading.Lock()
        self.done = 0
        self.first_start: float | None = None
        self.last_end = 0.0
        self.latencies: list[float] = []
        self.finished = threading.Event()

    def start(self, sent: float | None) -> None:
        now = time.monotonic()
        with self.lock:
            if self.first_start is None:
                self.first_start = now
            if sent is not None:
                self.latencies.append(now - sent)

    def end(self) -> None:
        with self.lock:
            self.done += 1
            self.last_end = time.monotonic()
            if self.done >= self.count:
                self.finished.set()


# The worker process.


async def worker_main(system_name: str, config: dict[str, Any], count: int, out: Path) -> None:
    system = make_system(system_name, config)
    recorder = Recorder(count)
    ready = out.with_suffix(".ready")
    stop = await system.serve(recorder, CONCURRENCY)
    ready.write_text("ready")
    finished = await asyncio.to_thread(recorder.finished.wait, PROCESS_BUDGET)
    # The time of the last acknowledgement where the system reports it (accord does).
    last = await system.settled(count) or recorder.last_end
    result = {
        "done": recorder.done,
        "finished": finished,
        "first_start": recorder.first_start,
        "last": last,
        "latencies": recorder.latencies,
    }
    out.write_text(json.dumps(result))
    try:
        await stop()
    except BaseException as exc:  # a peer that fails to stop cleanly still reported its figures
        print(f"{system_name}: stop failed: {type(exc).__name__}: {exc}", file=sys.stderr)


# The driver.


def start_worker(
    name: str, config: dict[str, Any], count: int, out: Path
) -> subprocess.Popen[bytes]:
    args = [sys.executable, __file__, "--worker", name, "--config", json.dumps(config)]
    args += ["--count", str(count), "--out", str(out)]
    return subprocess.Popen(args)


async def wait_for(path: Path, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode} before {path.name}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"no {path.name} within {timeout} s")
        await asyncio.sleep(0.02)


async def enqueue_all(system: System, count: int, paced: bool) -> float:
    started = time.monotonic()
    if not paced:
        await system.enqueue_many(count, PRODUCERS)
        return time.monotonic() - started
    for seq in range(count):
        delay = started + seq * PACE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await system.enqueue({"t": time.monotonic()})
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def throughput(name: str, count: int, folder: Path) -> dict[str, Any]:
    """Enqueue `count` jobs, then let one worker process run them (within the budget)."""
    config = await cleanup.prepare(name, folder)
    system = make_system(name, config)
    connected = False
    try:
        await system.connect()
        connected = True
        enqueue_seconds = await enqueue_all(system, count, paced=False)
        out = folder / f"{name}-throughput.json"
        worker = start_worker(name, config, count, out)
        await asyncio.to_thread(worker.wait, PROCESS_BUDGET + 60)
        result: dict[str, Any] = json.loads(out.read_text())
    finally:
        if connected:
            await system.close()
        await cleanup.finish(name, config, system if connected else None)
    result["enqueue_per_s"] = count / enqueue_seconds
    result["process_per_s"] = result["done"] / (result["last"] - result["first_start"])
    return result


async def latency(name: str, count: int, folder: Path) -> list[float]:
    """Enqueue `count` jobs at a steady pace to an idle worker; returns enqueue -> start seconds."""
    config = await cleanup.prepare(name, folder)
    system = make_system(name, config)
    connected = False
    try:
        await system.connect()
        connected = True
        out = folder / f"{name}-latency.json"
        worker = start_worker(name, config, count, out)
        await wait_for(out.with_suffix(".ready"), worker, 60)
        await asyncio.sleep(0.5)
        await enqueue_all(system, count, paced=True)
        await asyncio.to_thread(worker.wait, 60)
        latencies: list[float] = json.loads(out.read_text())["latencies"]
    finally:
        if connected:
            await system.close()
        await cleanup.finish(name, config, system if connected else None)
    return latencies


async def measure(name: str, count: int, paced_count: int, folder: Path) -> dict[str, Any]:
    result = await throughput(name, count, folder)
    latencies = await latency(name, paced_count, folder)
    return {
        "system": name,
        "jobs": count,
        "processed": result["done"],
        "complete": result["finished"],
        "enqueue_per_s": result["enqueue_per_s"],
        "process_per_s": result["process_per_s"],
        "paced_jobs": len(latencies),
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'system':<18} {'enqueue/s':>10} {'process/s':>10} {'p50 ms':>8} {'p99 ms':>8}  note"
    lines = [head, "-" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(
                f"{row['system']:<18} {'-':>10} {'-':>10} {'-':>8} {'-':>8}  {row['error']}"
            )
            continue
        note = "" if row["complete"] else f"only {row['processed']} of {row['jobs']} in budget"
        lines.append(
            f"{row['system']:<18} {row['enqueue_per_s']:>10.0f} {row['process_per_s']:>10.0f} "
            f"{row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}  {note}"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {row["system"]: row for row in rows if "error" not in row}
    out: dict[str, Any] = {}
    peers = [
        by[s]["process_per_s"] for s in ("saq-redis", "arq-redis", "dramatiq-redis") if s in by
    ]
    if "accord-redis" in by and peers:
        ratio = by["accord-redis"]["process_per_s"] / max(peers)
        out["redis_vs_fastest_peer"] = {
            "ratio": ratio,
            "target": TARGET_RATIO,
            "met": ratio >= TARGET_RATIO,
        }
    if "accord-rabbitmq" in by and "dramatiq-rabbitmq" in by:
        ratio = by["accord-rabbitmq"]["process_per_s"] / by["dramatiq-rabbitmq"]["process_per_s"]
        out["rabbitmq_vs_dramatiq"] = {"ratio": ratio, "target": 1.0, "met": ratio >= 1.0}
    return out


async def main(args: argparse.Namespace) -> None:
    names = args.systems.split(",") if args.systems else list(SYSTEMS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="accord-bench-queue-") as tmp:
        for name in names:
            print(f"measuring {name} ...", flush=True)
            try:
                rows.append(await measure(name, args.count, args.paced_count, Path(tmp)))
            except Exception as exc:  # a missing peer or server must not hide the others
                rows.append({"system": name, "error": f"{type(exc).__name__}: {exc}"[:120]})
    print(table(rows))
    checks = verdicts(rows)
    for key, verdict in checks.items():
        state = "met" if verdict["met"] else "NOT met"
        print(f"{key}: {verdict['ratio']:.2f}x (target {verdict['target']}x) {state}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "queue",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "settings": {
                    "producers": PRODUCERS,
                    "concurrency": CONCURRENCY,
                    "pace_per_s": 1 / PACE,
                },
                "rows": rows,
                "targets": checks,
            },
            indent=2,
        )
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--paced-count", type=int, default=1_000)
    parser.add_argument("--systems", default="")
    parser.add_argument("--worker", default="")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--out", default="")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker:
        asyncio.run(
            worker_main(
                arguments.worker, json.loads(arguments.config), arguments.count, Path(arguments.out)
            )
        )
    else:
        asyncio.run(main(arguments))
