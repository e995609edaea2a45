"""How much of a plain process's training throughput does a Ray worker keep, at Ray's niceness and at ours?

    .venv/bin/python benchmarks/worker_niceness.py [--pairs 2] [--seconds 40] [--niceness 0 15]

A Ray worker and a plain Python process train the same digits MLP (``DigitsTask``, SGD, 1 torch thread) at
the same time, side by side on the machine's cores, for ``--seconds``; both start at the same wall-clock
instant and count optimizer steps. Running both at once means the shared machine's drifting speed hits both
alike, which back-to-back runs cannot promise. The local Ray is started as ``metaopt run`` starts it
(:func:`metaopt.runtime.local_ray_options`) with ``ray.worker_niceness`` set to each value of ``--niceness``
in turn, ``--pairs`` times, alternating. Printed per run: steps/s of each side, the Ray / plain ratio, and
steps per CPU-second of each side (work done per unit of CPU, which preemption and cache refills lower).
The last line is ``ratio: X.XX`` = the mean Ray / plain throughput at the first ``--niceness`` value.
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
    return {"steps_per_s": steps / wall, "steps_per_cpu_s": steps / cpu, "niceness": os.nice(0)}


def side_by_side(niceness: int, seconds: float) -> dict[str, dict[str, float]]:
    import ray

    from metaopt.config import RayConfig
    from metaopt.runtime import local_ray_options

    ray.init(**local_ray_options(RayConfig(num_cpus=2, worker_niceness=niceness)), log_to_driver=False)
    try:
        start_at = time.time() + 15  # both sides have imported torch and warmed up by then
        in_ray = ray.remote(num_cpus=1)(train_for).remote(seconds, start_at)
        plain = subprocess.run([sys.executable, __file__, "--plain", str(seconds), str(start_at)],
                               capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return {"plain": json.loads(plain.stdout.strip().splitlines()[-1]), "ray": ray.get(in_ray)}
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain"]:
        print(json.dumps(train_for(float(argv[1]), float(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="runs per niceness value, alternating")
    parser.add_argument("--seconds", type=float, default=40.0, help="how long both sides train in each run")
    parser.add_argument("--niceness", type=int, nargs="+", default=[0, 15], help="worker niceness values to compare")
    args = parser.parse_args(argv)
    kept: dict[int, list[float]] = {n: [] for n in args.niceness}
    for run in range(args.pairs):
        for niceness in args.niceness:
            sides = side_by_side(niceness, args.seconds)
            ratio = sides["ray"]["steps_per_s"] / sides["plain"]["steps_per_s"]
            kept[niceness].append(ratio)
            print(f"run {run + 1}, worker niceness {niceness} (seen {sides['ray']['niceness']:.0f}): steps/s plain "
                  f"{sides['plain']['steps_per_s']:.0f}, Ray {sides['ray']['steps_per_s']:.0f} -> Ray / plain "
                  f"{ratio:.3f}; steps per CPU-second plain {sides['plain']['steps_per_cpu_s']:.0f}, Ray "
                  f"{sides['ray']['steps_per_cpu_s']:.0f}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for niceness, ratios in kept.items():
        print(f"worker niceness {niceness}: Ray / plain {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"mean {statistics.mean(ratios):.3f}")
    print(f"ratio: {statistics.mean(kept[args.niceness[0]]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
