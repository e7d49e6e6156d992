"""CPU seconds of one command and of every process it starts, by role, on a shared machine.

    python tests/benchmarks/bench_startup.py [--repeat N] -- CMD ...   ("{i}" in CMD becomes the run's number)

Samples /proc every 0.2 s. Only the command's own process tree counts (a process is the command's when it is first
seen as its descendant: Ray's GCS, raylet, dashboard and workers all descend from a `raysft train` driver that
starts its own Ray), so other users' processes on the machine are left out. Each process is named by role
(RayTrainWorker, TrainController, driver, dashboard, ...); the last sample of a process that exits between two
samples is lost (at most 0.2 s of its CPU). Prints one JSON line per run and, with --repeat, the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, float, float] | None:
    """(parent pid, cpu seconds, start ticks) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / HZ, float(fields[19])


def _role(cmdline: str) -> str:
    """A short name for what the process is in a Ray run."""
    m = re.match(r"ray::(\w+)", cmdline)
    if m:
        return m.group(1)
    for key, name in (
        ("raysft.pipeline.cli", "driver"),
        ("dashboard", "dashboard"),
        ("gcs_server", "gcs_server"),
        ("raylet", "raylet"),
        ("log_monitor", "log_monitor"),
        ("runtime_env/agent", "runtime_env_agent"),
        ("default_worker.py", "idle_worker"),
    ):
        if key in cmdline:
            return name
    return cmdline.split(" ")[0].rsplit("/", 1)[-1] or "?"


def measure(cmd: list[str]) -> dict:
    mine: dict[tuple[str, float], list] = {}  # (pid, start) -> [cpu, role]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = str(proc.pid)
    t0 = time.time()

    def sample() -> None:
        stats = {pid: s for pid in os.listdir("/proc") if pid.isdigit() and (s := _stat(pid))}
        for pid, (_ppid, cpu, start) in stats.items():
            key = (pid, start)
            if key not in mine:
                p, hops = pid, 0
                while p != root and p in stats and hops < 64:
                    p, hops = str(stats[p][0]), hops + 1
                if p != root:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline") as f:
                        cmdline = f.read().replace("\0", " ")
                except OSError:
                    continue
                mine[key] = [cpu, _role(cmdline)]
            mine[key][0] = cpu
            try:  # a worker starts as a fork of the raylet, then Ray sets its title (ray::RayTrainWorker)
                with open(f"/proc/{pid}/cmdline") as f:
                    cmdline = f.read().replace("\0", " ")
            except OSError:
                cmdline = ""
            if cmdline:
                mine[key][1] = _role(cmdline)

    while proc.poll() is None:
        sample()
        time.sleep(0.2)
    wall = time.time() - t0
    by_role: dict[str, float] = {}
    for cpu, role in mine.values():
        by_role[role] = by_role.get(role, 0.0) + cpu
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(by_role.values()), 1),
        "by_role": {k: round(v, 1) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 0.1},
        "load_avg": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    runs = []
    for i in range(args.repeat):
        runs.append(measure([a.replace("{i}", str(i)) for a in cmd]))
        print(json.dumps(runs[-1]), flush=True)
    if args.repeat > 1:
        roles = {r for run in runs for r in run["by_role"]}
        med = {
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "median_by_role": {
                r: round(statistics.median(run["by_role"].get(r, 0.0) for run in runs), 1) for r in sorted(roles)
            },
        }
        print(json.dumps(med), flush=True)
    sys.exit(max(r["rc"] for r in runs))


if __name__ == "__main__":
    main()
