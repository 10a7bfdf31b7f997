"""`make bench`: how many waiting requests one instance holds, and how soon a finished picture reaches its caller.

For each configuration it starts a fresh emulator and the service, fires N concurrent generation
requests from an asyncio client, and prints: succeeded/failed, wall time, latency p50/p95/max,
added delay (upstream result ready -> caller has the answer) p50/p95, status polls per task,
peak RSS of the service's process tree and its CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import requests

from tools.processes import ROOT, PostgresServer, RedisServer, free_port, procfile_command

BENCH_KEY = "bench-key"


@dataclass
class Result:
    status: int
    started: float
    finished: float
    upstream_task_id: str | None  # the emulator knows tasks by this id


@dataclass
class Figures:
    name: str
    succeeded: int
    total: int
    wall: float
    latencies: list[float]
    added_delays: list[float]
    polls: list[int]
    peak_rss_mb: float
    cpu_ms_per_request: float
    refused: int  # submissions the upstream answered 429 for its limits
    rate: str | None  # the upstream's limit, if it had one


@dataclass(frozen=True)
class Config:
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # "{service_url}", "{redis_url}", "{postgres_url}" filled in
    emulator_args: tuple[str, ...] = ()  # the upstream's limits, when it has some

    def environ(self, **urls: str) -> dict[str, str]:
        return {name: value.format(**urls) for name, value in self.env.items()}

    def needs(self, server: str) -> bool:
        return any(f"{{{server}_url}}" in value for value in self.env.values())


CONFIGS = {
    "default": Config(procfile_command()),  # the SQLite store, in a file
    # Redis instead of SQLite: a local redis-server, started for the run
    "redis": Config(procfile_command(), {"REDIS_URL": "{redis_url}"}),
    # PostgreSQL instead of SQLite: a local server, started for the run
    "postgres": Config(procfile_command(), {"DATABASE_URL": "{postgres_url}"}),
    # two workers on one SQLite file, with callbacks (one worker's callback wakes a request waiting in the other)
    "sqlite-2": Config(
        procfile_command(), {"WEB_CONCURRENCY": "2", "PUBLIC_BASE_URL": "{service_url}", "POLL_INTERVAL": "2"}
    ),
    # the upstream calls back; polling is only the sparse fallback
    "callbacks": Config(procfile_command(), {"PUBLIC_BASE_URL": "{service_url}", "POLL_INTERVAL": "2"}),
    # gunicorn's plain defaults (one sync worker): an empty config keeps ./gunicorn.conf.py from being read.
    "sync-baseline": Config(["gunicorn", "--config", "/dev/null", "app:create_app()"]),
    # an upstream that refuses more than 200 submissions per second (the provider's 20 per 10 s, sped up a hundred
    # times so that the row runs in seconds), and the service pacing itself to match
    "queue": Config(procfile_command(), {"UPSTREAM_RATE": "200/1s"}, ("--rate", "200/1s")),
    # threads instead of gevent, for the choice of worker model (`--configs default,gthread`)
    "gthread": Config([*procfile_command()[:-1], "--worker-class", "gthread", "--threads", "1024", "app:create_app()"]),
}
DEFAULT_CONFIGS = "default,callbacks,redis,postgres,sqlite-2,queue,sync-baseline"
UNLIMITED = {"UPSTREAM_RATE": "off", "UPSTREAM_MAX_RUNNING": "off"}  # the emulator has no limits unless told


def wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up within {timeout}s")


class TreeSampler:
    """Peak RSS and CPU time of a process and all its children, sampled in a thread."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> list[psutil.Process]:
        return [self.root, *self.root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = 0
            for process in self.processes():
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += process.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def fire(url: str, count: int, timeout: float, spread: float = 0.0) -> list[Result]:
    """`count` generation requests, started evenly over `spread` seconds (0: all at once), all held open."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(n: int) -> Result:
            await asyncio.sleep(spread * n / count)
            started = time.time()
            try:
                async with session.get(url, params={"prompt": f"bench picture {n}", "user_id": f"bench-{n}"}) as answer:
                    body = await answer.json(content_type=None)
                    return Result(answer.status, started, time.time(), body.get("upstream_task_id"))
            except (TimeoutError, aiohttp.ClientError, ValueError):
                return Result(0, started, time.time(), None)

        return await asyncio.gather(*(one(n) for n in range(count)))


def run_config(name: str, config: Config, args: argparse.Namespace, log_dir: Path) -> Figures:
    """The configuration's run, with the store servers it needs started for it alone."""
    urls, servers = {}, []
    try:
        if config.needs("redis"):
            servers.append(RedisServer().start())
            urls["redis_url"] = servers[-1].url
        if config.needs("postgres"):
            servers.append(PostgresServer().start().create_database())
            urls["postgres_url"] = servers[-1].url
        return run_service(name, config, args, log_dir, urls)
    except FileNotFoundError as missing:
        raise SystemExit(f"the {name} configuration needs it: {missing}") from None
    finally:
        for server in servers:
            server.stop()
            if isinstance(server, PostgresServer):
                server.remove()


def run_service(name: str, config: Config, args: argparse.Namespace, log_dir: Path, urls: dict[str, str]) -> Figures:
    emulator_port, service_port = free_port(), free_port()
    emulator_url = f"http://127.0.0.1:{emulator_port}"
    emulator_command = [
        sys.executable,
        "-m",
        "tools.emulator",
        "--port",
        str(emulator_port),
        "--delay",
        str(args.generation_time),
        *config.emulator_args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_KEYS_")}
    env.update(
        API_KEYS_1=BENCH_KEY,
        NANOBANANA_API_BASE=emulator_url,
        POLL_INTERVAL=str(args.poll_interval),
        POLL_MAX_ATTEMPTS=str(args.poll_max_attempts),
        PORT=str(service_port),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DATABASE_PATH=str(log_dir / f"{name}.sqlite3"),
        **UNLIMITED,
    )
    env.update(config.environ(service_url=f"http://127.0.0.1:{service_port}", **urls))
    with open(log_dir / f"{name}.log", "w") as log:
        emulator = subprocess.Popen(emulator_command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        service = subprocess.Popen(config.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"{emulator_url}/emulator/tasks")
            wait_ready(f"http://127.0.0.1:{service_port}/healthz")
            upstream_cpu = TreeSampler(emulator.pid)
            upstream_cpu_before = upstream_cpu.cpu_seconds()
            with TreeSampler(service.pid) as sampler:
                cpu_before = sampler.cpu_seconds()
                started = time.monotonic()
                timeout = args.poll_interval * args.poll_max_attempts + 30
                url = f"http://127.0.0.1:{service_port}/nanobanana"
                results = asyncio.run(fire(url, args.requests, timeout + args.spread, args.spread))
                wall = time.monotonic() - started
                cpu = sampler.cpu_seconds() - cpu_before
            upstream_cpu_used = upstream_cpu.cpu_seconds() - upstream_cpu_before
            report = requests.get(f"{emulator_url}/emulator/tasks", timeout=30).json()
            limits = requests.get(f"{emulator_url}/_config", timeout=30).json()
        finally:
            for process in (service, emulator):
                stop(process)
    ok = [r for r in results if r.status == 200]
    failures = Counter(r.status for r in results if r.status != 200)
    if failures:
        print(f"  {name}: answers other than 200, by status (0: none in time): {dict(failures)}", flush=True)
    print(f"  {name}: emulator CPU {upstream_cpu_used * 1000 / args.requests:.1f} ms/request", flush=True)
    return Figures(
        name=name,
        succeeded=len(ok),
        total=len(results),
        wall=wall,
        latencies=[r.finished - r.started for r in ok],
        added_delays=[r.finished - report[r.upstream_task_id]["ready_at"] for r in ok if r.upstream_task_id in report],
        polls=[task["polls"] for task in report.values()],
        peak_rss_mb=sampler.peak_rss / 2**20,
        cpu_ms_per_request=cpu * 1000 / max(1, len(results)),
        refused=limits["refused"],
        rate=limits["rate"],
    )


def stop(process: subprocess.Popen) -> None:
    """Stop a server and its workers; one still busy with abandoned requests is killed."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def print_table(all_figures: list[Figures], args: argparse.Namespace) -> None:
    print(
        f"\nsettings: {args.requests} concurrent requests (started over {args.spread:g} s), "
        f"generation {args.generation_time:g} s, "
        f"POLL_INTERVAL={args.poll_interval:g} (unless a configuration sets its own, as its 'running' line shows), "
        f"POLL_MAX_ATTEMPTS={args.poll_max_attempts}, UPSTREAM_RATE=off and UPSTREAM_MAX_RUNNING=off (unless the "
        f"configuration sets its own: the emulator has limits only in the queue row), "
        f"{os.cpu_count()} cores; poll bound per task = {math.ceil(args.generation_time / args.poll_interval) + 1}"
    )
    header = (
        f"{'config':<15}{'ok/total':>11}{'wall s':>8}{'p50 s':>7}{'p95 s':>7}{'max s':>7}"
        f"{'added p50 ms':>14}{'added p95 ms':>14}{'polls mean/max':>16}{'peak RSS MB':>13}{'CPU ms/req':>12}"
    )
    print(header)
    for f in all_figures:
        polls = f"{statistics.mean(f.polls):.2f}/{max(f.polls)}" if f.polls else "-"
        print(
            f"{f.name:<15}{f'{f.succeeded}/{f.total}':>11}{f.wall:>8.1f}"
            f"{percentile(f.latencies, 0.5):>7.2f}{percentile(f.latencies, 0.95):>7.2f}"
            f"{max(f.latencies, default=math.nan):>7.2f}"
            f"{percentile(f.added_delays, 0.5) * 1000:>14.0f}{percentile(f.added_delays, 0.95) * 1000:>14.0f}"
            f"{polls:>16}{f.peak_rss_mb:>13.0f}{f.cpu_ms_per_request:>12.1f}"
        )
    for f in all_figures:
        if f.rate:
            print_queue_figures(f, args)
    by_name = {f.name: f for f in all_figures}
    for name in ("default", "callbacks", "redis", "postgres", "sqlite-2", "gthread"):
        best, base = by_name.get(name), by_name.get("sync-baseline")
        if best and base and base.succeeded:
            ratio = (best.succeeded / best.wall) / (base.succeeded / base.wall)
            print(f"ratio {name} / sync-baseline: {ratio:.0f}x the completed requests per second")


def print_queue_figures(f: Figures, args: argparse.Namespace) -> None:
    """The last answer against the least time the upstream's limit allows: every window full, one after another,
    then one generation and one poll."""
    count, window = f.rate.split("/")
    windows = math.ceil(f.total / int(count)) - 1
    least = windows * float(window.rstrip("s")) + args.generation_time + args.poll_interval
    last = max(f.latencies, default=math.nan)
    print(
        f"{f.name}: upstream limited to {f.rate} per key; {f.succeeded}/{f.total} succeeded, "
        f"{f.refused} submissions refused with 429; the last answer came after {last:.1f} s, "
        f"the least the limit allows is {least:.1f} s ({last / least:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--generation-time", type=float, default=3.0)
    parser.add_argument("--spread", type=float, default=0.0, help="seconds over which the requests start")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--poll-max-attempts", type=int, default=30)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, from {', '.join(CONFIGS)}")
    args = parser.parse_args()
    log_dir = ROOT / "data" / "bench" / time.strftime("%Y%m%d-%H%M%S")  # beside the service's data, not in /tmp
    log_dir.mkdir(parents=True)
    all_figures = []
    for name in args.configs.split(","):
        overrides = " ".join(f"{k}={v}" for k, v in CONFIGS[name].env.items())
        print(f"running {name} {overrides} (service log: {log_dir / name}.log) ...", flush=True)
        all_figures.append(run_config(name, CONFIGS[name], args, log_dir))
    print_table(all_figures, args)


if __name__ == "__main__":
    main()
