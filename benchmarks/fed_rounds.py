"""Time per federated round with client Ray actors vs the same clients trained in one process, one after another.

    .venv/bin/python benchmarks/fed_rounds.py [--clients 10] [--rounds 10] [--epochs 1] [--hidden 64]

Both sides run :class:`metaopt.federated.rounds.FederatedRun` with FedAvg on digits (Dirichlet 0.5), the same
shards, seeds and rounds: once with every client a Ray actor (:class:`ClientPool`, Ray limited to 2 CPUs,
started beforehand), once with in-process :class:`Client` objects trained sequentially (the limit on 2 cores
when one client's training cannot use both). One warm-up round each is not timed. Each side runs ``--repeats``
blocks of ``--rounds`` rounds and its fastest block counts (every block is printed; the shared machine's
speed drifts): in-process before Ray starts, then the actors, then in-process again with Ray and the idle
client actors alive (informational: Ray's idle processes slow a neighbour down). The last line is
``ratio: X.XX`` = actor seconds per round / in-process seconds per round (goal <= 1.3). The final accuracies
of both are printed as a check that they did the same work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--cpus-per-client", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5, help="blocks of --rounds rounds per side, interleaved")
    args = parser.parse_args(argv)

    import ray
    import torch

    from metaopt.config import RayConfig
    from metaopt.federated.clients import Client, ClientPool, evaluate
    from metaopt.federated.data import load_dataset, make_client_shards
    from metaopt.federated.rounds import FederatedRun, RoundSettings
    from metaopt.federated.strategies import make_strategy
    from metaopt.runtime import local_ray_options

    torch.set_num_threads(1)
    hidden = tuple(args.hidden)
    data = load_dataset("digits")
    shards = make_client_shards(data, args.clients, "dirichlet", 0.5, 0.2, seed=0)
    settings = RoundSettings(fraction=1.0, epochs=args.epochs, lr0=0.05, seed=0)
    print(f"digits, {args.clients} clients (Dirichlet 0.5), FedAvg, {args.epochs} local epoch(s), MLP {hidden}, "
          f"{args.rounds} timed rounds; load average {os.getloadavg()[0]:.1f}", flush=True)

    def block(run: FederatedRun) -> float:
        started = time.perf_counter()
        for _ in range(args.rounds):
            run.run_round()
        return (time.perf_counter() - started) / args.rounds

    local = FederatedRun(shards, [Client(i, s, 64, 10, hidden) for i, s in enumerate(shards)],
                         make_strategy("fedavg"), settings, 64, 10, hidden, remote=False)
    local.run_round()  # warm-up: first kernels

    def blocks(run: FederatedRun, label: str) -> list[float]:
        out = []
        for repeat in range(args.repeats):
            out.append(block(run))
            print(f"  {label} block {repeat + 1}: {out[-1] * 1e3:.1f} ms per round; load average {os.getloadavg()[0]:.1f}",
                  flush=True)
        return out

    local_blocks = blocks(local, "in-process, no Ray running")
    ray.init(**local_ray_options(RayConfig(num_cpus=2)), log_to_driver=False)  # as `metaopt run` starts it
    pool = ClientPool(shards, 64, 10, hidden, cpus=args.cpus_per_client)
    remote = FederatedRun(shards, pool.actors, make_strategy("fedavg"), settings, 64, 10, hidden)
    remote.run_round()  # warm-up: actor start-up, imports, first kernels
    remote_blocks = blocks(remote, "10 client actors")
    shadow_blocks = blocks(local, "in-process, Ray and the idle actors alive")
    local_s, remote_s, shadow_s = min(local_blocks), min(remote_blocks), min(shadow_blocks)
    local_acc = evaluate(local.model, local.global_params, local.val_x, local.val_y)["accuracy"]
    remote_acc = evaluate(remote.model, remote.global_params, remote.val_x, remote.val_y)["accuracy"]
    print(f"in one process, clients one after another: {local_s * 1e3:.1f} ms per round, fastest block "
          f"(final accuracy {local_acc:.4f}; {shadow_s * 1e3:.1f} ms with Ray's idle processes alive)")
    print(f"{args.clients} Ray client actors on 2 CPUs:          {remote_s * 1e3:.1f} ms per round, fastest block "
          f"(final accuracy {remote_acc:.4f})")
    print(f"medians: in-process {statistics.median(local_blocks) * 1e3:.1f} ms, actors "
          f"{statistics.median(remote_blocks) * 1e3:.1f} ms; against in-process with Ray alive: "
          f"{remote_s / shadow_s:.2f} (informational)")
    pool.close()
    ray.shutdown()
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"ratio: {remote_s / local_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
