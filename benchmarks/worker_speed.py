"""How much of a plain process's training throughput does a Ray worker keep, per way of starting Ray's workers?

    .venv/bin/python benchmarks/worker_speed.py [--pairs 2] [--seconds 40]
        [--setting preload=torch,niceness=0 preload=,niceness=0 ...]

A Ray worker and a plain Python process train the same digits MLP (``DigitsTask``, SGD, 1 torch thread) at
the same time, side by side on the machine's cores, for ``--seconds``; both start at the same wall-clock
instant and count optimizer steps. Running both at once means the shared machine's drifting speed hits both
alike, which back-to-back runs cannot promise. The local Ray is started as ``metaopt run`` starts it
(:func:`metaopt.runtime.local_ray_options`) with each ``--setting`` in turn (``ray.worker_preload``: modules
the workers import before they connect to Ray, empty = none; ``ray.worker_niceness``), ``--pairs`` times,
alternating. The default compares the platform's default (torch preloaded, niceness 0) with no preload.
Printed per run: steps/s of each side, the Ray / plain ratio, and steps per CPU-second of each side (work
done per unit of CPU, which preemption, cache refills and slower code lower), and whether the worker had
imported torch before Ray. The last line is ``ratio: X.XX`` = the mean Ray / plain throughput at the first
``--setting``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def train_for(seconds: float, start_at: float) -> dict[str, float]:
    """Digits SGD steps in chunks of 250 from ``start_at`` (epoch seconds) for ``seconds``."""
    import torch

    from metaopt.tasks.digits import DigitsTask

    torch.set_num_threads(1)
    task = DigitsTask({}, {"name": "sgd", "momentum": 0.9}, seed=0)
    task.train(200, lambda _step: 0.05)  # warm-up: first kernels
    while time.time() < start_at:
        time.sleep(0.01)
    steps, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        task.train(250, lambda _step: 0.05)
        steps += 250
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from metaopt.worker_start import imported_before_ray

    return {
        "steps_per_s": steps / wall,
        "steps_per_cpu_s": steps / cpu,
        "niceness": os.nice(0),
        "torch_first": imported_before_ray("torch"),
    }


def parse_setting(text: str) -> dict:
    """``preload=torch,niceness=0`` -> RayConfig fields (``preload=`` alone: nothing preloaded)."""
    fields = dict(part.split("=", 1) for part in text.split(",") if part)
    unknown = set(fields) - {"preload", "niceness"}
    if unknown:
        raise SystemExit(f"--setting {text!r}: unknown {', '.join(sorted(unknown))}; allowed: preload, niceness")
    preload = [m for m in fields.get("preload", "torch").split("+") if m]
    return {"worker_preload": preload, "worker_niceness": int(fields.get("niceness", 0))}


def side_by_side(setting: dict, seconds: float) -> dict[str, dict[str, float]]:
    import ray

    from metaopt.config import RayConfig
    from metaopt.runtime import local_ray_options

    ray.init(**local_ray_options(RayConfig(num_cpus=2, **setting)), log_to_driver=False)
    try:
        start_at = time.time() + 15  # both sides have imported torch and warmed up by then
        in_ray = ray.remote(num_cpus=1)(train_for).remote(seconds, start_at)
        plain = subprocess.run(
            [sys.executable, __file__, "--plain", str(seconds), str(start_at)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return {"plain": json.loads(plain.stdout.strip().splitlines()[-1]), "ray": ray.get(in_ray)}
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain"]:
        print(json.dumps(train_for(float(argv[1]), float(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="runs per setting, alternating")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long both sides train in each run")
    parser.add_argument(
        "--setting",
        nargs="+",
        default=["preload=torch,niceness=0", "preload=,niceness=0"],
        help="ways to start Ray's workers: preload=MOD[+MOD...] (empty: none), niceness=N",
    )
    args = parser.parse_args(argv)
    settings = {text: parse_setting(text) for text in args.setting}
    kept: dict[str, list[float]] = {text: [] for text in settings}
    for run in range(args.pairs):
        for text, setting in settings.items():
            sides = side_by_side(setting, args.seconds)
            ratio = sides["ray"]["steps_per_s"] / sides["plain"]["steps_per_s"]
            kept[text].append(ratio)
            print(
                f"run {run + 1}, {text} (niceness seen {sides['ray']['niceness']:.0f}, torch imported before Ray: "
                f"{sides['ray']['torch_first']}): steps/s plain "
                f"{sides['plain']['steps_per_s']:.0f}, Ray {sides['ray']['steps_per_s']:.0f} -> Ray / plain "
                f"{ratio:.3f}; steps per CPU-second plain {sides['plain']['steps_per_cpu_s']:.0f}, Ray "
                f"{sides['ray']['steps_per_cpu_s']:.0f}; load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    for text, ratios in kept.items():
        print(f"{text}: Ray / plain {', '.join(f'{r:.3f}' for r in ratios)}; mean {statistics.mean(ratios):.3f}")
    for text, ratios in kept.items():
        append("worker_speed", f"Ray / plain, {text}", statistics.mean(ratios), command_line(argv))
    print(f"ratio: {statistics.mean(kept[args.setting[0]]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
