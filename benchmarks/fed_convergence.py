"""FedHyper vs FedAvg on non-IID digits: rounds to a target accuracy at the default lr, and final accuracy when
the initial lr is 10x too small (Wang et al. ICLR 2024, Sec. 5: faster convergence, robustness to a bad lr).

    .venv/bin/python benchmarks/fed_convergence.py [--clients 10] [--rounds 40] [--seeds 0 1 2] [--target 0.8]

In-process clients (:class:`metaopt.federated.rounds.FederatedRun` over ``InProcessClients``: the algorithms, not Ray,
are measured), digits with a Dirichlet(0.5) label skew, all clients every round, 1 local epoch of SGD.
Strategies: fedavg, fedhyper_g, fedhyper_gm, fedhyper_g_cl. Prints per strategy the mean and per-seed rounds to
reach ``--target`` validation accuracy (``>rounds`` when never) at ``--lr``, and the final accuracy at
``--lr / 10``. The last line is ``ratio: X.XX`` = FedAvg's mean rounds-to-target / FedHyper-G's (> 1: G is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

STRATEGIES = ("fedavg", "fedhyper_g", "fedhyper_gm", "fedhyper_g_cl")


def run_curve(strategy: str, lr: float, seed: int, args) -> list[float]:
    from metaopt.federated.clients import Client, InProcessClients
    from metaopt.federated.data import load_dataset, make_client_shards
    from metaopt.federated.rounds import FederatedRun, RoundSettings
    from metaopt.federated.strategies import make_strategy

    data = load_dataset("digits")
    shards = make_client_shards(data, args.clients, "dirichlet", 0.5, 0.2, seed=seed)
    hidden = tuple(args.hidden)
    options = {"num_clients_total": args.clients, "fraction": 1.0} if "cl" in strategy else {}
    run = FederatedRun(
        shards,
        InProcessClients([Client(i, s, 64, 10, hidden) for i, s in enumerate(shards)]),
        make_strategy(strategy, **options),
        RoundSettings(lr0=lr, seed=seed),
        64,
        10,
        hidden,
    )
    return [run.run_round()["accuracy"] for _ in range(args.rounds)]


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(curve) if acc >= target), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05, help="the default initial local lr")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(
        f"digits, {args.clients} clients, Dirichlet 0.5, {args.rounds} rounds, seeds {args.seeds}; "
        f"target accuracy {args.target} at lr {args.lr}; final accuracy at lr {args.lr / 10:g}",
        flush=True,
    )
    mean_rounds = {}
    header = f"{'strategy':<16}{'rounds to target (mean; per seed)':<40}{'final acc, lr/10 (mean; per seed)'}"
    print(header)
    for strategy in STRATEGIES:
        hits = [rounds_to(run_curve(strategy, args.lr, s, args), args.target) for s in args.seeds]
        lows = [run_curve(strategy, args.lr / 10, s, args)[-1] for s in args.seeds]
        counted = [h if h is not None else args.rounds + 1 for h in hits]  # never = rounds + 1 (a lower bound)
        mean_rounds[strategy] = statistics.mean(counted)
        per_seed = ", ".join(str(h) if h is not None else f">{args.rounds}" for h in hits)
        print(
            f"{strategy:<16}{f'{mean_rounds[strategy]:.1f}; {per_seed}':<40}"
            f"{statistics.mean(lows):.4f}; {', '.join(f'{x:.3f}' for x in lows)}",
            flush=True,
        )
    for strategy, rounds in mean_rounds.items():
        append("fed_convergence", f"{strategy} mean rounds to {args.target}", rounds, command_line(argv))
    append("fed_convergence", "ratio", mean_rounds["fedavg"] / mean_rounds["fedhyper_g"], command_line(argv))
    print(f"ratio: {mean_rounds['fedavg'] / mean_rounds['fedhyper_g']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
