"""Time per federated round with client Ray actors vs the same clients trained in one process, one after another.

    .venv/bin/python benchmarks/fed_rounds.py [--clients 10] [--rounds 10] [--epochs 1] [--hidden 64] [--pairs 30]

Both sides run :class:`metaopt.federated.rounds.FederatedRun` with FedAvg on digits (Dirichlet 0.5), the same
shards, seeds and rounds: once with every client a Ray actor (:class:`ClientPool`, Ray limited to 2 CPUs), once
with in-process :class:`Client` objects trained sequentially (the limit on 2 cores when one client's training
cannot use both). One warm-up round each is not timed.

The shared 2-core machine's speed drifts within seconds (the same single-threaded local epoch, timed once a
second for 100 s with nothing else running, varied several-fold; figures in results.csv), so the two sides are
measured in *pairs of adjacent blocks* of ``--rounds`` rounds, actors then in-process, ``--pairs`` times, with
Ray and the client actors alive throughout (idle while the in-process side runs). The last line is
``ratio: X.XX`` = the median over the pairs of actor seconds per round / in-process seconds per round (goal
<= 1.3). Also printed, for comparison: in-process blocks run before Ray starts (no Ray process on the machine)
and the ratio of the fastest actor block to the fastest of those. The final accuracies of both sides are
printed as a check that they trained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--cpus-per-client", type=float, default=0.2)
    parser.add_argument("--pairs", type=int, default=30, help="adjacent (actors, in-process) block pairs")
    parser.add_argument("--repeats", type=int, default=3, help="in-process blocks before Ray starts")
    args = parser.parse_args(argv)

    import ray
    import torch

    from metaopt.config import RayConfig
    from metaopt.federated.clients import Client, ClientPool, InProcessClients, evaluate
    from metaopt.federated.data import load_dataset, make_client_shards
    from metaopt.federated.rounds import FederatedRun, RoundSettings
    from metaopt.federated.strategies import make_strategy
    from metaopt.runtime import local_ray_options

    torch.set_num_threads(1)
    hidden = tuple(args.hidden)
    data = load_dataset("digits")
    shards = make_client_shards(data, args.clients, "dirichlet", 0.5, 0.2, seed=0)
    settings = RoundSettings(fraction=1.0, epochs=args.epochs, lr0=0.05, seed=0)
    print(
        f"digits, {args.clients} clients (Dirichlet 0.5), FedAvg, {args.epochs} local epoch(s), MLP {hidden}, "
        f"{args.rounds} timed rounds; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    def block(run: FederatedRun) -> float:
        started = time.perf_counter()
        for _ in range(args.rounds):
            run.run_round()
        return (time.perf_counter() - started) / args.rounds

    local = FederatedRun(
        shards,
        InProcessClients([Client(i, s, 64, 10, hidden) for i, s in enumerate(shards)]),
        make_strategy("fedavg"),
        settings,
        64,
        10,
        hidden,
    )
    local.run_round()  # warm-up: first kernels

    def blocks(run: FederatedRun, label: str, count: int) -> list[float]:
        out = []
        for repeat in range(count):
            out.append(block(run))
            print(
                f"  {label} block {repeat + 1}: {out[-1] * 1e3:.1f} ms per round; "
                f"load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        return out

    no_ray_blocks = blocks(local, "in-process, no Ray running", args.repeats)
    ray.init(**local_ray_options(RayConfig(num_cpus=2)), log_to_driver=False)  # as `metaopt run` starts it
    pool = ClientPool(shards, 64, 10, hidden, cpus=args.cpus_per_client)
    remote = FederatedRun(shards, pool, make_strategy("fedavg"), settings, 64, 10, hidden)
    remote.run_round()  # warm-up: actor start-up, imports, first kernels
    remote_blocks, local_blocks = [], []
    for pair in range(args.pairs):
        remote_blocks.append(block(remote))
        local_blocks.append(block(local))
        print(
            f"  pair {pair + 1}: {args.clients} client actors {remote_blocks[-1] * 1e3:.1f} ms, in-process "
            f"{local_blocks[-1] * 1e3:.1f} ms per round: {remote_blocks[-1] / local_blocks[-1]:.2f}; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    paired = [r / loc for r, loc in zip(remote_blocks, local_blocks)]
    local_acc = evaluate(local.model, local.global_params, local.val_x, local.val_y)["accuracy"]
    remote_acc = evaluate(remote.model, remote.global_params, remote.val_x, remote.val_y)["accuracy"]
    print(
        f"in one process, clients one after another: median {statistics.median(local_blocks) * 1e3:.1f} ms per "
        f"round, fastest {min(local_blocks) * 1e3:.1f} (final accuracy {local_acc:.4f}); before Ray started: "
        f"fastest {min(no_ray_blocks) * 1e3:.1f} ms"
    )
    print(
        f"{args.clients} Ray client actors on 2 CPUs:          median {statistics.median(remote_blocks) * 1e3:.1f} ms "
        f"per round, fastest {min(remote_blocks) * 1e3:.1f} (final accuracy {remote_acc:.4f})"
    )
    print(
        f"paired ratios: min {min(paired):.2f}, median {statistics.median(paired):.2f}, max {max(paired):.2f}; "
        f"fastest actor block / fastest in-process block before Ray: {min(remote_blocks) / min(no_ray_blocks):.2f}"
    )
    pool.close()
    ray.shutdown()
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    append("fed_rounds", "ratio", statistics.median(paired), command_line(argv))
    print(f"ratio: {statistics.median(paired):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
