"""Symbolic optimizer search at scale: throughput, dedupe cache hit rate and dead code (Chen et al. 2023).

    .venv/bin/python benchmarks/symbolic_search.py [--mutations 5000 | --quick] [--population 100]
        [--tournament 2] [--batch 16] [--steps 40] [--lrs 1 10] [--hidden 16] [--seed 0]
        [--mutation-config FIELD=VALUE ...] [--set KEY=VALUE ...] [--alt-digits 3 4]

Runs the real regularized-evolution search of :mod:`metaopt.symbolic.search` (``init_search`` +
``search_step`` with a :class:`~metaopt.symbolic.proxies.LocalScorer`, no Ray) from AdamW for
``--mutations`` children on a cheap but real proxy: the digits MLP (hidden [16]) trained for ``--steps``
steps at each of ``--lrs``; every child whose functional hash is new is really trained. The section is
``experiments/symbolic_tiny.yaml`` with the sizes above as overrides (``--set`` adds any other one).

Reported: wall time (and how much of it went to training, hashing and the rest), children mutated,
unique programs trained (cache misses), unique programs trained per second, the dedupe cache hit rate
(hits / mutations, as ``search_metrics`` counts it), the fraction of statements that are redundant
(mean over programs of 1 - live / statements, ``analysis.live_statements``) over all evaluated programs
and over the final population, mean program length, and the best proxy score vs the start program's.

Why a child hits or misses (observation only, the search is not changed): per child, whether it computes
the same function as its parent (same hash), whether the mutation only touched dead code (pruned child ==
pruned parent), the mutation kinds applied (``mutate`` is wrapped by ``mutate_verbose`` with the same
generator, which gives the same child), for single ``modify`` mutations what was changed (constant ->
constant, variable -> variable, ...), and whether a syntactic cache (pruned program text) would have hit.
``--alt-digits`` recomputes the hash with fewer significant digits for every child, and an update-only
hash (same inputs, only the updates hashed, not ``m``/``v``) is computed too; neither is used by the
search. For each, the benchmark reports how many more children it would have matched and whether its
merges join programs whose trained scores differ. Also reported: statements that do not affect ``update``
(dead code plus statements that only feed an ``m``/``v`` that ``update`` never reads).

``--mutation-config FIELD=VALUE`` sets a :class:`metaopt.symbolic.mutation.MutationConfig` field
(``weights=1,1,1``, ``max_statements=20``, ``const_prob=0.2`` ...): ``search_step`` calls ``mutate`` with
the default config, so the benchmark passes the config in its wrapper. The last line is
``hit_rate: 0.XX``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))

EXPERIMENT = REPO / "experiments" / "symbolic_tiny.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mutations", type=int, default=5000, help="children mutated and looked up (the budget)")
    p.add_argument("--quick", action="store_true", help="300 mutations (a smoke run)")
    p.add_argument("--population", type=int, default=100)
    p.add_argument("--tournament", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="children per search_step")
    p.add_argument("--start", default="adamw")
    p.add_argument("--steps", type=int, default=40, help="proxy: optimizer steps per lr")
    p.add_argument("--lrs", type=float, nargs="+", default=[1.0, 10.0], help="proxy: lr values tried")
    p.add_argument("--hidden", type=int, nargs="+", default=[16], help="proxy: digits MLP hidden widths")
    p.add_argument("--restart-after", type=int, default=0, help="symbolic.restart_after (0: never)")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--progress-every", type=int, default=500, help="mutations between progress lines")
    p.add_argument(
        "--mutation-config",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a metaopt.symbolic.mutation.MutationConfig field (repeatable)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    p.add_argument(
        "--alt-digits",
        type=int,
        nargs="*",
        default=[3],
        help="also hash each child with these significant digits (analysis only; none: skip)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.mutations = 300
        args.progress_every = 100
    if args.mutations < 1:
        p.error("--mutations must be >= 1")
    return args


def mutation_config(items: list[str]):
    from metaopt.symbolic.mutation import MutationConfig

    fields = {f.name: f for f in dataclasses.fields(MutationConfig)}
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise SystemExit(f"--mutation-config {item!r}: expected FIELD=VALUE with FIELD in {', '.join(fields)}")
        text = text.strip()
        if key == "weights":
            values[key] = tuple(float(x) for x in text.split(","))
            if len(values[key]) != 3 or min(values[key]) < 0 or sum(values[key]) <= 0:
                raise SystemExit("--mutation-config weights=I,D,M: three non-negative numbers, not all 0")
        elif key in ("max_statements", "max_chain"):
            values[key] = None if text.lower() in ("none", "") else int(text)
        else:
            values[key] = float(text)
    return MutationConfig(**values)


def load_section(args):
    from metaopt import config

    hidden = "[" + ", ".join(str(h) for h in args.hidden) + "]"
    lrs = "[" + ", ".join(repr(float(x)) for x in args.lrs) + "]"
    overrides = [
        f"symbolic.start={args.start}",
        f"symbolic.population={args.population}",
        f"symbolic.tournament={args.tournament}",
        f"symbolic.batch={args.batch}",
        f"symbolic.evaluations={args.mutations + 1}",
        f"symbolic.restart_after={args.restart_after}",
        f"symbolic.proxy.steps={args.steps}",
        f"symbolic.proxy.lrs={lrs}",
        f"symbolic.proxy.task_options.hidden={hidden}",
        f"symbolic.seeds=[{args.seed}]",
        *args.set,
    ]
    return config.load(EXPERIMENT, overrides).section


class Timer:
    def __init__(self):
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return wrapped


class TimedScorer:
    def __init__(self, inner):
        self.inner = inner
        self.timer = Timer()
        self.programs = 0

    def score(self, programs, proxy):
        self.programs += len(programs)
        return self.timer.wrap(self.inner.score)(programs, proxy)


def modify_change(parent, child) -> str:
    """What a single ``modify`` changed: const->const, const->var, var->var or var->const."""
    from metaopt.symbolic.program import Const

    for a, b in zip(parent.statements, child.statements):
        if a != b:
            for x, y in zip(a.args, b.args):
                if x != y:
                    return f"{'const' if isinstance(x, Const) else 'var'}->{'const' if isinstance(y, Const) else 'var'}"
    return "?"


def redundancy(program, live_statements) -> float:
    n = len(program)
    return 1.0 - len(live_statements(program)) / n if n else 0.0


def _canonical(tensor, digits: int) -> str:
    values = tensor.detach().double().numpy().ravel()
    scale = max((abs(x) for x in values if math.isfinite(x)), default=0.0)
    out = []
    for x in values.tolist():
        if not math.isfinite(x):
            out.append(repr(x))
        elif abs(x) <= 1e-9 * scale or x == 0.0:
            out.append("0")
        else:
            out.append(f"{x:.{digits}g}")
    return ",".join(out)


def update_hash(program, *, steps: int = 3, digits: int = 6, shapes=((3, 4), (5,)), lr: float = 0.01) -> str:
    """Analysis only: like ``functional_hash`` (same inputs) but hashing only the sequence of updates (what
    training sees), not the ``m``/``v`` values a program carries but may never read."""
    import hashlib

    import torch

    from metaopt.symbolic.interpreter import run_program

    generator = torch.Generator().manual_seed(0)

    def draw(shape):
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float64)

    params = [draw(s) for s in shapes]
    m = [draw(s) for s in shapes]
    v = [draw(s).abs() for s in shapes]
    grads = [[draw(s) for s in shapes] for _ in range(steps)]
    digest = hashlib.sha256()
    for step in range(steps):
        result = run_program(
            program,
            [p.clone() for p in params],
            [g.clone() for g in grads[step]],
            [t.clone() for t in m],
            [t.clone() for t in v],
            lr,
        )
        for tensor in result.updates:
            digest.update(_canonical(tensor, digits).encode() + b";")
        params = [p - u.to(p.dtype) for p, u in zip(params, result.updates)]
        m = [t.to(torch.float64) for t in result.m]
        v = [t.to(torch.float64) for t in result.v]
    return digest.hexdigest()


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def main(argv=None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()

    from metaopt.symbolic import analysis, mutation
    from metaopt.symbolic.analysis import functional_hash, live_statements, prune, training_outputs

    def training_live(program):
        return live_statements(program, training_outputs(program))

    from metaopt.symbolic.proxies import LocalScorer
    from metaopt.symbolic.search import init_search, search_metrics, search_step
    from metaopt.symbolic.text import format_program

    section = load_section(args)
    mconfig = mutation_config(args.mutation_config)

    # Observation hooks (module attributes that search_step imports at call time; the library is unchanged).
    kinds_log: list[tuple[str, ...]] = []
    original_mutate_verbose = mutation.mutate_verbose

    def recording_mutate(program, rng, max_tries=50, config=None):
        out = original_mutate_verbose(program, rng, max_tries, mconfig if config is None else config)
        kinds_log.append(out.kinds)
        return out.program

    mutation.mutate = recording_mutate
    hash_timer = Timer()
    analysis.functional_hash = hash_timer.wrap(functional_hash)
    scorer = TimedScorer(LocalScorer())

    proxy = section.proxy
    print(
        f"symbolic search benchmark: start {section.start}, population {section.population}, tournament "
        f"{section.tournament}, batch {section.batch}, {args.mutations} mutations, seed {args.seed}"
    )
    print(
        f"proxy: {proxy.task} {proxy.task_options}, {proxy.steps} steps x lrs {proxy.lrs}, {proxy.seeds} seed(s); "
        f"mutation config: {mconfig}"
    )
    print(
        f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
        f"({os.cpu_count()} CPUs visible)",
        flush=True,
    )

    t0 = time.perf_counter()
    state = init_search(section, args.seed, scorer)
    start = state.start
    records = []  # per child: dict of observations
    # Other keys the cache could have used (analysis only): coarser rounding, and the updates alone.
    alt_keys = {f"functional_hash, {d} digits": functools.partial(functional_hash, digits=d) for d in args.alt_digits}
    alt_keys["update-only hash, 6 digits"] = update_hash
    alt_seen: dict[str, set] = {name: set() for name in alt_keys}
    alt_hits = Counter()
    alt_fine: dict[str, dict[str, set]] = {name: defaultdict(set) for name in alt_keys}
    syntactic_seen = {format_program(prune(start.program))}
    start_program = start.program
    for name, fn in alt_keys.items():
        key = fn(start_program)
        alt_seen[name].add(key)
        alt_fine[name][key].add(start.hash)
    pruned_cache: dict[int, object] = {0: prune(start_program)}
    program_cache: dict[int, object] = {0: start_program}
    done, next_report, last_report = 0, args.progress_every, 0
    while done < args.mutations:
        step_section = (
            section
            if args.mutations - done >= section.batch
            else section.model_copy(update={"batch": args.mutations - done})
        )
        first = len(state.history)
        kinds_log.clear()
        state = search_step(state, step_section, scorer)
        new = state.history[first:]
        assert len(new) == len(kinds_log) == step_section.batch
        for scored, kinds in zip(new, kinds_log):
            child = scored.program
            parent_scored = state.history[scored.parent]
            parent = program_cache[scored.parent]
            parent_pruned = pruned_cache[scored.parent]
            child_pruned = prune(child)
            program_cache[scored.index] = child
            pruned_cache[scored.index] = child_pruned
            text = format_program(child_pruned)
            rec = {
                "hit": scored.cached,
                "same_as_parent": scored.hash == parent_scored.hash,
                "dead_only": child_pruned == parent_pruned,
                "syntactic_hit": text in syntactic_seen,
                "kinds": kinds,
                "change": modify_change(parent, child) if kinds == ("modify",) else None,
                "length": len(child),
                "redundant": redundancy(child, live_statements),
                "finite": math.isfinite(scored.score),
            }
            syntactic_seen.add(text)
            for name, fn in alt_keys.items():
                key = fn(child)
                if key in alt_seen[name]:
                    alt_hits[name] += 1
                alt_seen[name].add(key)
                alt_fine[name][key].add(scored.hash)
            records.append(rec)
        done += step_section.batch
        if done >= next_report or done == args.mutations:
            next_report += args.progress_every
            hits = sum(r["hit"] for r in records)
            recent = records[last_report:]
            last_report = done
            pop_len = statistics.fmean(len(program_cache[s.index]) for s in state.population)
            pop_red = statistics.fmean(redundancy(program_cache[s.index], live_statements) for s in state.population)
            print(
                f"[{done:5d}/{args.mutations}] {time.perf_counter() - t0:6.0f}s  hit {hits / done:.2f} "
                f"(last {len(recent)}: {sum(r['hit'] for r in recent) / len(recent):.2f})  "
                f"trained {done - hits:4d}  best {state.best.score:.4f} (start {start.score:.4f})  "
                f"pop len {pop_len:4.1f} redundant {pop_red:.2f}",
                flush=True,
            )
    wall = time.perf_counter() - t0
    load_end = os.getloadavg()

    # ---- summary ---------------------------------------------------------------------------------------
    n = len(records)
    hits = sum(r["hit"] for r in records)
    misses = n - hits
    metrics = search_metrics(state)
    assert metrics["cache_hits"] == hits and metrics["trained"] == misses + 1, (metrics, hits, misses)
    hit_rate = hits / n
    everything = [start_program] + [program_cache[i] for i in range(1, len(state.history))]
    red_all = statistics.fmean(redundancy(p, live_statements) for p in everything)
    red_stmt_all = 1 - sum(len(live_statements(p)) for p in everything) / max(1, sum(len(p) for p in everything))
    population = [program_cache[s.index] for s in state.population]
    red_pop = statistics.fmean(redundancy(p, live_statements) for p in population)
    red_stmt_pop = 1 - sum(len(live_statements(p)) for p in population) / max(1, sum(len(p) for p in population))
    eff_all = statistics.fmean(1 - len(training_live(p)) / len(p) for p in everything)
    eff_pop = statistics.fmean(1 - len(training_live(p)) / len(p) for p in population)
    len_all = statistics.fmean(len(p) for p in everything)
    len_pop = statistics.fmean(len(p) for p in population)
    other = wall - scorer.timer.seconds - hash_timer.seconds

    print()
    print(
        f"wall time               {wall:8.1f} s  (training {scorer.timer.seconds:.1f} s, functional hash "
        f"{hash_timer.seconds:.1f} s in {hash_timer.calls} calls, mutation/analysis/rest {other:.1f} s)"
    )
    print(
        f"load average            start {load_start[0]:.2f}, end {load_end[0]:.2f} (1 min); {load_end[1]:.2f} (5 min)"
    )
    print(f"programs mutated        {n:8d}")
    print(f"unique programs trained {misses:8d}  (cache misses; + the start program = {scorer.programs} scored)")
    print(
        f"trained per second      {misses / wall:8.2f}  (unique programs / wall time; "
        f"{scorer.timer.seconds / max(1, scorer.programs) * 1000:.0f} ms per training)"
    )
    print(f"dedupe cache hits       {hits:8d}  hit rate {hit_rate:.3f} (hits / mutations; paper: ~0.89)")
    print(
        f"redundant statements    all evaluated programs: mean {red_all:.3f} (pooled {red_stmt_all:.3f}); "
        f"final population: mean {red_pop:.3f} (pooled {red_stmt_pop:.3f})  (paper: ~0.70)"
    )
    print(
        f"  not affecting update  all evaluated programs: mean {eff_all:.3f}; final population: mean {eff_pop:.3f} "
        f"(also dead: statements that only feed an m/v that update never reads)"
    )
    print(
        f"mean program length     all evaluated {len_all:.1f}, final population {len_pop:.1f} "
        f"(start {len(start_program)})"
    )
    finite = sum(r["finite"] for r in records)
    print(
        f"best proxy score        {state.best.score:.4f} vs start {start.score:.4f} "
        f"({state.best.score - start.score:+.4f}; best is #{state.best_index}, {len(state.best.program)} statements)"
        f"  non-finite children: {n - finite}"
    )

    print("\nwhy children hit or miss the cache (share of all mutations; hit rate within the group):")
    groups = [
        ("same function as parent", lambda r: r["same_as_parent"]),
        ("  of which: touched only dead code", lambda r: r["dead_only"]),
        ("  of which: live code changed, same function", lambda r: r["same_as_parent"] and not r["dead_only"]),
        ("differs from parent, seen before", lambda r: r["hit"] and not r["same_as_parent"]),
        ("new function (trained)", lambda r: not r["hit"]),
        ("syntactic cache (pruned text) would hit", lambda r: r["syntactic_hit"]),
    ]
    for label, pred in groups:
        k = sum(1 for r in records if pred(r))
        print(f"  {label:46s} {k:6d} {pct(k / n)}")
    print("  by mutation kinds applied (one kind = first valid child; more = re-mutated invalid children):")
    by_kind = defaultdict(list)
    for r in records:
        key = r["kinds"][0] if len(r["kinds"]) == 1 else "chain of " + str(len(r["kinds"]))
        by_kind[key].append(r)
    for key in sorted(by_kind, key=lambda k: -len(by_kind[k])):
        group = by_kind[key]
        h = sum(r["hit"] for r in group)
        dead = sum(r["dead_only"] for r in group)
        print(
            f"    {key:14s} {len(group):6d} {pct(len(group) / n)}  hit rate {h / len(group):.2f}  "
            f"dead code only {dead / len(group):.2f}"
        )
    by_change = defaultdict(list)
    for r in records:
        if r["change"]:
            by_change[r["change"]].append(r)
    if by_change:
        print("  single modify, by what changed:")
        for key in sorted(by_change, key=lambda k: -len(by_change[k])):
            group = by_change[key]
            h = sum(r["hit"] for r in group)
            dead = sum(r["dead_only"] for r in group)
            print(
                f"    {key:14s} {len(group):6d} {pct(len(group) / n)}  hit rate {h / len(group):.2f}  "
                f"dead code only {dead / len(group):.2f}"
            )
    print(f"  other cache keys (analysis only; the search used functional_hash, 6 digits: hit rate {hit_rate:.3f}):")
    for name in alt_keys:
        merged = [fines for fines in alt_fine[name].values() if len(fines) > 1]
        spreads = []
        for fines in merged:
            scores = [state.cache[h][0] for h in fines if h in state.cache]
            if len(scores) > 1:
                finite_scores = [x for x in scores if math.isfinite(x)]
                mixed = len(finite_scores) not in (0, len(scores))
                spreads.append(
                    math.inf if mixed else (max(finite_scores) - min(finite_scores) if finite_scores else 0.0)
                )
        big = sum(1 for x in spreads if x > 0.01)
        print(
            f"    {name:28s} hit rate {alt_hits[name] / n:.3f}; {len(merged)} keys merge several functional hashes "
            f"({sum(len(f) for f in merged)} in all); trained-score spread within a key: max "
            f"{max(spreads, default=0.0):.4f}, {big} keys > 0.01"
        )

    print("\nbest program (pruned):")
    print(format_program(prune(state.best.program)))
    append("symbolic_search", "hit_rate", hit_rate, command_line(argv))
    print(f"hit_rate: {hit_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
