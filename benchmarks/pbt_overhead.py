"""How much wall time does a PBT sweep spend beyond the training it does?

    .venv/bin/python benchmarks/pbt_overhead.py [--iterations 20] [--steps-per-iteration 5000]
        [--perturbation-interval 4] [--population 4] [--synch true|false] [--naive-steps 100]
        [--skip-naive] [--compare-synch] [--repeats 2] [--sequential] [--show-sweep-output] [--set KEY=VALUE ...]

Measured in one run:

* pure compute: the sweep's optimizer steps (population x iterations x steps_per_iteration, with the
  per-iteration validation the trainable does) on ``DigitsTask`` in 2 processes at once (the sweep's Ray has
  2 CPUs, 1 per trial), 1 torch thread each, no Ray, no Tune -- and no Ray process running: Ray's idle
  processes wake often enough to slow a neighbour down, which is a cost of the sweep, not of the compute.
  With ``--sequential`` the same steps also run one after another in this process (on the 2-core development
  machine two processes at once gained from a whole second core to nothing; figures in benchmarks/results.csv).
* ours: ``metaopt.pbt.sweep.run(exp)`` wall time on experiments/quickstart.yaml (population, sizes from the
  command line, Tune results and a fresh MLflow sqlite store in a temporary directory: as every new store, a copy
  of the empty store in metaopt's cache once the first store on the machine has made it; each sweep's header
  says which), with Ray started
  just before (its start-up is printed separately and not counted) and shut down after. Phases of the call
  (MLflow store/parent run, tune.fit, the MLflow trial callback inside it, lineage/summary, MLflow
  artifacts) are timed by wrapping functions from outside, no platform code changes; a Tune callback
  records when trials start and complete, how many trials were inside step() at once, how many iterations
  ran, and which worker processes ran them. Also per sweep: each worker's time between one step() and the
  next, and the CPU-seconds (psutil) of the driver, Ray's daemons and the trial processes.
  Every pure pass and sweep also prints the hypervisor's steal over its span (``/proc/stat``, Linux).
* the order: a pure compute pass, then ``--repeats`` times (default 2) a sweep followed by another pure
  compute pass, so that the shared machine's drifting speed hits both sides. The fastest sweep is compared
  with the fastest pure compute pass (every pass and the medians are printed).
* with ``--compare-synch``: the same sweep with ``pbt.synch`` flipped (informational).
* naive: a function trainable that reports *and checkpoints* after every optimizer step, restoring via
  ``tune.get_checkpoint()``, same task, population and PBT scheduler (interval scaled to its smaller step
  budget ``--naive-steps`` per trial), no MLflow. Its wall time is normalised per optimizer step.

The last line is ``ratio: X.XX`` = the fastest sweep / the fastest pure compute pass. Goal <= 1.25.
``--set KEY=VALUE`` passes any other override (e.g. ``ray.cpus_per_trial=0.5``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import append, command_line
from sweep_watchdog import make_watchdog  # benchmarks/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "quickstart.yaml"
CORES = 2  # the sweep's Ray gets num_cpus=2 and 1 CPU per trial


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--iterations", type=int, default=20)
    # 5,000 digits steps make iterations of seconds, so the sweep's compute outweighs its fixed costs (trial
    # processes importing torch and Ray Tune, a fresh MLflow store), which stay the same whatever the size; the
    # figures are in results.csv.
    p.add_argument("--steps-per-iteration", type=int, default=5000)
    p.add_argument("--perturbation-interval", type=int, default=4)
    p.add_argument("--naive-steps", type=int, default=100, help="optimizer steps per trial for the naive trainable")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="sweeps, each followed by a 2-process pure compute pass (one more runs before the first)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="also time the pure compute sequentially in this process (a candidate for the reference)",
    )
    # Asynchronous by default: a trial at its boundary pauses while another waits, so the 4 trials take turns on
    # the 2 CPUs with no barrier to wait at (quickstart.yaml itself is synchronous: its 50-step iterations are
    # too short for asynchronous exploits to show on the terminal).
    p.add_argument(
        "--synch", choices=["true", "false"], default="false", help="pbt.synch of the measured sweep (default false)"
    )
    p.add_argument(
        "--compare-synch", action="store_true", help="also run the sweep with pbt.synch flipped (informational)"
    )
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=180.0,
        help="abort (error) a sweep after this long without any trial progress",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other experiment override (repeatable)")
    p.add_argument("--show-sweep-output", action="store_true", help="do not hide what sweep.run prints")
    args = p.parse_args(argv)
    args.synch = None if args.synch is None else args.synch == "true"
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def log(*parts) -> None:
    print(*parts, flush=True)


# --------------------------------------------------------------------------------------------- pure compute
def baseline_lrs(section) -> list[float]:
    """Learning rates inside the searched range that do not diverge (a diverged DigitsTask.train stops early,
    which would make the reference do less work; the cost of a step does not depend on the lr otherwise)."""
    import numpy as np

    hi = min(section.lr_max, 0.05)
    lo = min(section.lr_min, hi)
    return [float(v) for v in np.geomspace(lo, hi, section.population)]


def train_trials(section_dict: dict, lrs: list[float]) -> tuple[float, int]:
    """Train one fresh DigitsTask per lr for the sweep's budget, in this process; (seconds, optimizer steps)."""
    import torch

    from metaopt.tasks import build_task

    torch.set_num_threads(1)
    s = section_dict
    steps = 0
    started = time.perf_counter()
    for lr in lrs:
        task = build_task(s["task"], s["task_options"], s["optimizer"], s["seed"])
        for _ in range(s["iterations"]):
            task.train(s["steps_per_iteration"], lambda _step, lr=lr: lr)
        steps += task.step
    return time.perf_counter() - started, steps


def _worker(args):
    section_dict, lrs = args
    return train_trials(section_dict, lrs)


def parallel_compute(section_dict: dict, lrs: list[float]) -> float:
    """The same trials split over CORES fresh processes (spawned before the clock starts)."""
    groups = [lrs[i::CORES] for i in range(CORES)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(CORES) as pool:
        pool.map(_warm_worker, range(CORES), chunksize=1)  # imports torch/sklearn/metaopt, loads the data
        started = time.perf_counter()
        pool.map(_worker, [(section_dict, g) for g in groups if g], chunksize=1)
        return time.perf_counter() - started


def _warm_worker(_):
    warm = {
        "task": "digits",
        "task_options": {},
        "optimizer": {"name": "sgd"},
        "seed": 0,
        "iterations": 1,
        "steps_per_iteration": 20,
    }
    import metaopt.tasks.digits as d

    train_trials(warm, [0.01])
    return d.__name__


def store_origin() -> str:
    """How the sweep's new MLflow store will be made: copied from the empty store in metaopt's cache (made once per
    MLflow release, by the first store on a machine), or built by MLflow's migrations when there is none yet."""
    from metaopt.tracking import empty_store_template_path

    if empty_store_template_path().exists():
        return "a copy of the cached empty store"
    return "no cached empty store yet: MLflow's migrations build it"


# --------------------------------------------------------------------------------------------- CPU accounting
def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds a live process has used, or None (gone, or psutil missing)."""
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
    except Exception:  # accounting is informational; a vanished process just has no figure
        return None
    return times.user + times.system


def process_label(cmdline: list[str]) -> str:
    """A short name for one of Ray's processes: its ``ray::`` title, the Python script it runs, or its binary."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    scripts = [Path(arg).name for arg in cmdline if arg.endswith(".py")]
    return scripts[0] if scripts else (Path(cmdline[0]).name if cmdline else "?")


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds) for this process and every process under it (Ray's daemons, live workers)."""
    try:
        import psutil
    except ImportError:
        return {}
    me = psutil.Process()
    snapshot = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                label = "driver (this process)" if proc.pid == me.pid else process_label(proc.cmdline())
        except psutil.Error:
            continue
        snapshot[proc.pid] = (label, times.user + times.system)
    return snapshot


def machine_cpu_times() -> tuple[float, ...] | None:
    """The machine's aggregate CPU times from ``/proc/stat`` (user nice system idle iowait irq softirq steal),
    in clock ticks; None where there is no ``/proc`` (not Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return tuple(float(v) for v in fields[1:9]) if fields and fields[0] == "cpu" and len(fields) >= 9 else None


def steal_share(before: tuple[float, ...] | None, after: tuple[float, ...] | None) -> str:
    """The share of the CPUs' time the hypervisor gave to other guests (steal) between two readings, as text:
    a noisy neighbour shows here, and it slows whatever runs then (both sides of the ratio alike)."""
    if before is None or after is None:
        return ""
    deltas = [b - a for a, b in zip(before, after)]
    total = sum(deltas)
    return f"; steal {deltas[7] / total:.1%} of CPU time" if total > 0 else ""


def cpu_used_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per label used between two snapshots by the processes alive in both (the driver and Ray's
    daemons; trial workers start and end inside the sweep and are counted by the Counter callback)."""
    used: dict[str, float] = {}
    for pid, (label, seconds) in after.items():
        if pid in before:
            used[label] = used.get(label, 0.0) + seconds - before[pid][1]
    return used


def worker_gaps(steps_by_pid: dict[int, list[tuple[float, float]]]) -> list[tuple[float, int]]:
    """Per worker: (seconds between the end of one step() and the start of its next, number of such gaps)."""
    gaps = []
    for intervals in steps_by_pid.values():
        ordered = sorted(intervals)
        between = [max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(ordered)]
        gaps.append((sum(between), len(between)))
    return gaps


# --------------------------------------------------------------------------------------------- ours, phased
class Phases:
    """Wall time of named phases, accumulated; wraps functions without changing them."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def make_counter_callback():
    from ray.tune import Callback

    class Counter(Callback):
        """Sums the trainables' own step() time (time_this_iter_s), counts results and checkpoints, and keeps
        each step() as an interval on the driver's clock (approximate: it ends when the driver sees the result)."""

        def __init__(self):
            self.step_seconds = 0.0
            self.results = 0
            self.checkpoints = 0
            self.intervals: list[tuple[float, float]] = []
            self.steps_by_pid: dict[int, list[tuple[float, float]]] = {}  # each worker's step() intervals
            self.first_start: float | None = None
            self.starts = 0
            self.pids: set[int] = set()
            self.trial_cpu: dict[int, float] = {}  # pid -> CPU seconds (user + system) at its latest result
            self.completed: list[float] = []  # driver clock when each trial completed

        def on_trial_start(self, iteration, trials, trial, **info):
            self.starts += 1
            if self.first_start is None:
                self.first_start = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            now = time.perf_counter()
            seconds = float(result.get("time_this_iter_s", 0.0))
            self.results += 1
            pid = int(result.get("pid", 0))
            self.pids.add(pid)
            cpu = cpu_seconds_of(pid)  # the trial process's CPU so far; it is gone once the sweep ends
            if cpu is not None:
                self.trial_cpu[pid] = cpu
            self.step_seconds += seconds
            self.intervals.append((now - seconds, now))
            self.steps_by_pid.setdefault(pid, []).append((now - seconds, now))

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            self.checkpoints += 1

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.append(time.perf_counter())

        def busy_profile(self, start: float, end: float) -> dict[int, float]:
            """Seconds of [start, end] during which 0, 1, 2, ... trials were inside step()."""
            edges = sorted([(a, 1) for a, _ in self.intervals] + [(b, -1) for _, b in self.intervals])
            profile: dict[int, float] = {}
            level, t = 0, start
            for at, delta in edges:
                at = min(max(at, start), end)
                profile[level] = profile.get(level, 0.0) + at - t
                level, t = level + delta, at
            profile[level] = profile.get(level, 0.0) + end - t
            return profile

    return Counter()


def run_ours(exp, show_output: bool, stall_seconds: float = 180.0):
    """sweep.run(exp) with its phases timed from outside; (wall seconds, summary, phases, counter, fit window)."""
    import contextlib
    import io

    from metaopt import runtime, tracking
    from metaopt.pbt import sweep

    phases = Phases()
    window: dict[str, float] = {}
    saved = {
        (sweep, "build_tuner"): sweep.build_tuner,
        (sweep, "summarise_trials"): sweep.summarise_trials,
        (sweep, "log_summary"): sweep.log_summary,
        (runtime, "init"): runtime.init,
        (tracking, "connect"): tracking.connect,
        (tracking.ParentRun, "__init__"): tracking.ParentRun.__init__,
        (tracking.ParentRun, "finish"): tracking.ParentRun.finish,
        (tracking.MLflowTrialCallback, "on_trial_start"): tracking.MLflowTrialCallback.on_trial_start,
        (tracking.MLflowTrialCallback, "on_trial_result"): tracking.MLflowTrialCallback.on_trial_result,
        (tracking.MLflowTrialCallback, "on_trial_complete"): tracking.MLflowTrialCallback.on_trial_complete,
    }

    def build_tuner(*a, **k):
        tuner = saved[(sweep, "build_tuner")](*a, **k)
        fit = phases.wrap("tune.fit (incl. MLflow trial callback)", tuner.fit)

        def windowed_fit():
            window["start"] = time.perf_counter()
            try:
                return fit()
            finally:
                window["end"] = time.perf_counter()

        tuner.fit = windowed_fit
        return tuner

    sweep.build_tuner = phases.wrap("build Tuner", build_tuner)
    sweep.summarise_trials = phases.wrap(
        "summarise trials (progress.csv, lineage, checkpoint reads)", sweep.summarise_trials
    )
    sweep.log_summary = phases.wrap("log summary to MLflow (schedules.json, 2 PNG plots, csv)", sweep.log_summary)
    runtime.init = phases.wrap("connect to Ray (already running)", runtime.init)
    # open_session opens MLflow in a background thread while Tune starts: these two overlap tune.fit (indented,
    # so they are not subtracted from the wall time as a phase of their own).
    tracking.connect = phases.wrap(
        "  MLflow connect, background (creates the sqlite store on first use)", tracking.connect
    )
    tracking.ParentRun.__init__ = phases.wrap(
        "  MLflow parent run, background: create + log params", tracking.ParentRun.__init__
    )
    tracking.ParentRun.finish = phases.wrap("MLflow parent run: finish", tracking.ParentRun.finish)
    for (owner, name), fn in saved.items():
        if owner is tracking.MLflowTrialCallback:
            setattr(owner, name, phases.wrap("  MLflow trial callback (driver, inside tune.fit)", fn))
    counter = make_counter_callback()
    sink = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if not show_output:
                stack.enter_context(contextlib.redirect_stdout(sink))
            started = window["run_start"] = time.perf_counter()
            summary = sweep.run(exp, callbacks=[counter, make_watchdog(stall_seconds)], verbose=0)
            wall = time.perf_counter() - started
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
    return wall, summary, phases, counter, window


def report_ours(exp, show_output: bool, slots: int, stall_seconds: float) -> tuple[float, int]:
    """Run the sweep, print where its wall time went; return (wall time, training iterations it ran)."""
    from metaopt.pbt import lineage

    section = exp.section
    cpu_before, ticks = cpu_snapshot(), machine_cpu_times()
    wall, summary, phases, counter, window = run_ours(exp, show_output, stall_seconds)
    cpu_used, steal = cpu_used_between(cpu_before, cpu_snapshot()), steal_share(ticks, machine_cpu_times())
    exploits = len(lineage.read_pbt_global(Path(summary.experiment_path) / "pbt_global.txt"))
    diverged = sum(t.diverged for t in summary.trials)
    steps = sum(getattr(t, "steps", t.iterations * section.steps_per_iteration) for t in summary.trials)
    log(f"  wall time of sweep.run: {wall:.2f} s  (its own wall_seconds: {summary.wall_seconds:.2f} s){steal}")
    accounted = 0.0
    for name, sec in phases.seconds.items():
        log(f"    {name:<62} {sec:7.2f} s  ({phases.calls[name]} calls)")
        if not name.startswith("  "):
            accounted += sec
    log(f"    {'rest (table, prints, glue)':<62} {wall - accounted:7.2f} s")
    if "start" in window and counter.first_start is not None:
        log(
            f"  inside tune.fit: first trial started after {counter.first_start - window['start']:.2f} s "
            f"(actor start-up: worker process, imports), {counter.first_start - window['run_start']:.2f} s after "
            "sweep.run began"
        )
        profile = counter.busy_profile(window["start"], window["end"])
        busy = ", ".join(f"{k} training: {v:.2f} s" for k, v in sorted(profile.items()))
        log(f"  tune.fit time by number of trials inside step() at once: {busy}")
    log(
        f"  trainables' step() time (sum of time_this_iter_s): {counter.step_seconds:.2f} s "
        f"over {counter.results} results"
        f" ({section.population * section.iterations} without exploits moving iterations)"
        f" -> /{slots} = {counter.step_seconds / slots:.2f} s if perfectly parallel"
    )
    if len(counter.completed) >= slots and "end" in window:
        done = sorted(counter.completed)
        log(
            f"  end of the sweep: the last trial completed {done[-1] - done[-slots]:.2f} s after the one before it "
            f"(fewer than {slots} trials left to run); tune.fit returned {window['end'] - done[-1]:.2f} s after that"
        )
    gaps = worker_gaps(counter.steps_by_pid)
    if gaps:
        log(
            "  between one step() and the next on the same worker (result, pause, checkpoint, trial switch): "
            + ", ".join(f"{total:.2f} s over {count} gaps" for total, count in gaps)
        )
    log(
        f"  worker processes that ran trials: {len(counter.pids)} "
        f"(a sweep that kept its {slots} actors would use {slots}); "
        f"trial (re)starts: {counter.starts}; checkpoints saved: {counter.checkpoints}; PBT exploits: {exploits}; "
        f"optimizer steps {steps} (expected {section.population * section.iterations * section.steps_per_iteration}); "
        f"diverged trials: {diverged}"
    )
    if cpu_used:
        # Where the 2 cores went: the trial processes' own CPU against their step() time, and what the driver and
        # Ray's daemons took beside them (on 2 busy cores, every CPU-second they use is one a trial waits for).
        capacity = slots * wall
        others = sorted(cpu_used.items(), key=lambda kv: -kv[1])
        log(
            f"  CPU-seconds during sweep.run ({slots} cores x {wall:.1f} s = {capacity:.1f} available): "
            + ", ".join(f"{label} {sec:.1f}" for label, sec in others if sec >= 0.05)
            + f"; driver and Ray daemons together {sum(cpu_used.values()):.1f} "
            + f"({sum(cpu_used.values()) / capacity:.1%})"
        )
        if counter.trial_cpu:
            trial_cpu = sum(counter.trial_cpu.values())
            log(
                f"  trial processes: {trial_cpu:.1f} CPU-s by their last result (start-up imports included) "
                f"for {counter.step_seconds:.1f} s inside step()"
            )
    best = summary.best()
    if best:
        log(
            f"  best trial {best.trial_id}: val_accuracy {best.final_metric:.4f}, "
            f"schedule {lineage.describe(best.schedule)}"
        )
    return wall, counter.results


# --------------------------------------------------------------------------------------------- naive
def naive_trainable(config):
    """Function trainable: one optimizer step, then report + checkpoint; restores from tune.get_checkpoint()."""
    import torch
    from ray import tune

    from metaopt.tasks import build_task

    torch.set_num_threads(1)
    s = config["exp"]
    task = build_task(s["task"], s["task_options"], s["optimizer"], s["seed"])
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            task.restore(torch.load(Path(d) / "state.pt", weights_only=False))
    lr = float(config["lr"])  # after an exploit: the clone's weights, this trial's (perturbed) lr
    while task.step < config["naive_steps"]:
        metrics = task.train(1, lambda _step: lr)  # evaluates on val, as the metric PBT needs
        with tempfile.TemporaryDirectory() as d:
            torch.save(task.state(), Path(d) / "state.pt")
            tune.report({**metrics, "lr": lr, "step": task.step}, checkpoint=tune.Checkpoint.from_directory(d))


def run_naive(exp, naive_steps: int, storage: str, stall_seconds: float = 180.0):
    from ray import tune

    from metaopt.pbt.tune import build_scheduler, initial_lrs
    from metaopt.tuning import seeded_random_search

    section = exp.section
    # Same PBT settings; its interval counts Tune iterations, which are single steps here: keep the number of
    # perturbations per trial the same as the sweep's. Tune's own PBT: no end-of-sweep levelling.
    interval = max(1, round(section.perturbation_interval * naive_steps / section.iterations))
    naive_section = section.model_copy(update={"perturbation_interval": interval, "even_finish": False})
    tuner = tune.Tuner(
        tune.with_resources(naive_trainable, {"cpu": exp.ray.cpus_per_trial}),
        param_space={
            "lr": initial_lrs(naive_section),
            "exp": naive_section.model_dump(mode="json"),
            "naive_steps": naive_steps,
        },
        tune_config=tune.TuneConfig(
            scheduler=build_scheduler(naive_section, "val_accuracy", "max"),
            num_samples=section.population,
            search_alg=seeded_random_search(section.seed),
        ),
        run_config=tune.RunConfig(
            name="naive",
            storage_path=storage,
            stop={"training_iteration": naive_steps},
            callbacks=[make_watchdog(stall_seconds)],
            verbose=0,
        ),
    )
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # Tune's configuration box
        started = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - started
    steps = sum(int((r.metrics or {}).get("step", 0)) for r in results)
    errors = sum(1 for r in results if r.error)
    return wall, steps, interval, errors


# --------------------------------------------------------------------------------------------- main
def load_experiment(args, tmp: Path, synch: bool | None, name: str):
    from metaopt import config

    overrides = [
        f"pbt.population={args.population}",
        f"pbt.iterations={args.iterations}",
        f"pbt.steps_per_iteration={args.steps_per_iteration}",
        f"pbt.perturbation_interval={args.perturbation_interval}",
        "pbt.scheduler=pbt",
        f"ray.num_cpus={CORES}",
        f"ray.storage_path={tmp / 'ray_results'}",
        f"tracking.uri=sqlite:///{tmp / (name + '.db')}",
        f"name={name}",
    ]
    if synch is not None:
        overrides.append(f"pbt.synch={str(synch).lower()}")
    overrides += list(args.set or [])
    return config.load(EXPERIMENT, overrides), overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # PBT's per-exploit INFO lines
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")

    tmp = Path(tempfile.mkdtemp(prefix="pbt_overhead_"))
    exp, overrides = load_experiment(args, tmp, args.synch, "pbt-overhead")
    section = exp.section
    s = section.model_dump(mode="json")
    total_steps = section.population * section.iterations * section.steps_per_iteration
    slots = min(CORES, section.population)
    lrs = baseline_lrs(section)
    shown = " ".join(o for o in overrides if "tmp" not in o and "name=" not in o)
    log(f"experiment: {EXPERIMENT.relative_to(REPO)} with {shown}")
    log(
        f"  task digits {s['task_options']}, optimizer {s['optimizer']}, synch={s['synch']}, "
        f"checkpoint every {section.checkpoint_every} iterations"
    )
    log(
        f"  budget: {section.population} trials x {section.iterations} iterations "
        f"x {section.steps_per_iteration} steps "
        f"= {total_steps} optimizer steps; machine: {os.cpu_count()} CPUs"
        + (f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    )
    log(f"  scratch: {tmp}")

    # warm-up: imports, data load, torch kernels
    train_trials({**s, "iterations": 2, "steps_per_iteration": 200}, [0.01])

    import ray

    def pure_pass(label: str) -> float:
        ticks = machine_cpu_times()
        seconds = parallel_compute(s, lrs)
        log(
            f"\n[pure compute, {label}: the same trials in {CORES} processes at once ({slots} groups), 1 torch thread "
            f"each, no Ray running] {seconds:.2f} s{steal_share(ticks, machine_cpu_times())}"
        )
        return seconds

    from metaopt.runtime import local_ray_options

    def start_ray() -> None:  # as `metaopt run` starts its local Ray (ray.worker_niceness from the experiment)
        t = time.perf_counter()
        ray.init(**local_ray_options(exp.ray), log_to_driver=False)
        log(
            f"  ray.init(num_cpus={CORES}, worker niceness {exp.ray.worker_niceness}) start-up: "
            f"{time.perf_counter() - t:.2f} s (not counted)"
        )

    seq = None
    if args.sequential:
        seq, steps = train_trials(s, lrs)
        assert steps == total_steps, (steps, total_steps)
        log(
            f"\n[pure compute, sequential in this process] {seq:.2f} s "
            f"({seq / total_steps * 1e6:.0f} us/step incl. val)"
        )
    pures, walls, rans = [pure_pass("before sweep 1")], [], []
    for repeat in range(args.repeats):
        if repeat == 0:
            run_exp = exp
        else:
            (tmp / f"repeat{repeat + 1}").mkdir()
            run_exp = load_experiment(args, tmp / f"repeat{repeat + 1}", args.synch, "pbt-overhead")[0]
        log(
            f"\n[ours, sweep {repeat + 1} of {args.repeats}: metaopt.pbt.sweep.run, synch={s['synch']}, a fresh MLflow "
            f"store ({store_origin()}) and Ray]"
        )
        start_ray()
        wall, ran = report_ours(run_exp, args.show_sweep_output, slots, args.stall_seconds)
        ray.shutdown()
        walls.append(wall)
        rans.append(ran)
        pures.append(pure_pass(f"after sweep {repeat + 1}"))

    par = min(pures)
    reference = min([par] + ([seq] if seq is not None else []))
    wall = min(walls)
    ran = rans[walls.index(wall)]
    log(
        f"\n  sweeps: {', '.join(f'{w:.2f}' for w in walls)} s; pure compute passes in {CORES} processes: "
        f"{', '.join(f'{x:.2f}' for x in pures)} s" + (f"; sequential {seq:.2f} s" if seq is not None else "")
    )
    log(f"  reference = the fastest pure compute measured: {reference:.2f} s; ours = the fastest sweep: {wall:.2f} s")
    log(
        f"  medians: sweep {statistics.median(walls):.2f} s / pure {statistics.median(pures):.2f} s = "
        f"{statistics.median(walls) / statistics.median(pures):.2f}; slowest sweep / fastest pure: "
        f"{max(walls) / reference:.2f} (informational)"
    )
    # Each sweep against the mean of the pure passes just before and just after it: a drift that is linear over the
    # ~4 minutes of a bracket cancels (informational; the ratio below stays fastest / fastest).
    bracketed = [w / ((before + after) / 2) for w, before, after in zip(walls, pures, pures[1:])]
    log(
        f"  bracketed: each sweep / the mean of the pure passes either side of it: "
        f"{', '.join(f'{b:.2f}' for b in bracketed)}; median {statistics.median(bracketed):.2f} (informational)"
    )
    if seq is not None:
        log(
            f"  ours / ideal {CORES}-core speed-up (sequential / {slots} = {seq / slots:.2f} s, "
            f"not always reached on a shared machine): {wall / (seq / slots):.2f} (informational)"
        )

    if args.compare_synch or not args.skip_naive:
        start_ray()
    if args.compare_synch:
        other = not s["synch"]
        exp2, _ = load_experiment(args, tmp, other, "pbt-overhead-alt")
        log(f"\n[for comparison, not the ratio: the same sweep with pbt.synch={str(other).lower()}]")
        wall2, ran2 = report_ours(exp2, args.show_sweep_output, slots, args.stall_seconds)
        log(f"  ratio with synch={str(other).lower()}: {wall2 / reference:.2f} ({ran2} iterations run)")

    if not args.skip_naive:
        log("\n[naive: function trainable, report + checkpoint after every optimizer step, no MLflow]")
        nwall, nsteps, ninterval, nerrors = run_naive(
            exp, args.naive_steps, str(tmp / "naive_results"), args.stall_seconds
        )
        per_step_naive = nwall / max(nsteps, 1)
        per_step_ref = reference / total_steps
        log(
            f"  smaller budget, normalised per optimizer step: {section.population} trials x {args.naive_steps} steps "
            f"(not {section.iterations * section.steps_per_iteration}); PBT interval {ninterval} steps (same number of "
            f"perturbations per trial), synch={s['synch']}"
        )
        log(f"  wall time of tuner.fit: {nwall:.2f} s for {nsteps} optimizer steps ({nerrors} errored trials)")
        log(
            f"  per step: naive {per_step_naive * 1e3:.2f} ms vs reference {per_step_ref * 1e3:.3f} ms "
            f"(reference / steps)"
        )
        log(f"  naive ratio: {per_step_naive / per_step_ref:.2f}")
        append("pbt_overhead", "naive ratio", per_step_naive / per_step_ref, command_line(argv))

    ratio = wall / reference
    planned = section.population * section.iterations
    log(f"\nours: {wall:.2f} s wall of the fastest sweep.run / {reference:.2f} s, the fastest pure compute")
    # An exploit restarts a trial from its donor's last checkpoint, which can be ahead of or behind the trial's own
    # iteration: the sweep may train a few iterations more or fewer than population x iterations.
    log(
        f"  iterations the sweep trained: {ran} of {planned} planned; against the pure compute of the iterations it "
        f"trained ({reference * ran / planned:.2f} s): {wall / (reference * ran / planned):.2f} (informational)"
    )
    append("pbt_overhead", "bracketed median", statistics.median(bracketed), command_line(argv))
    append("pbt_overhead", "ratio", ratio, command_line(argv))
    log(f"ratio: {ratio:.2f}")
    if ray.is_initialized():
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
