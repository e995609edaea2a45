"""Check metaopt's GPU paths on a machine with a CUDA GPU and print what each one measured.

    python benchmarks/gpu_check.py [--out results.json] [--quick]

1. torch: the digits task on ``device: cuda`` vs the CPU (same steps; accuracy and steps/s of each);
2. JAX: the vmapped PPO inner loop (:mod:`metaopt.objectives.ppo`) on the GPU -- CartPole with a large
   population and SpaceInvaders-MinAtar at paper settings -- in env steps/s, with compile time apart;
3. the ES meta-trainer (:class:`metaopt.objectives.meta_train.MetaTrainer`) for two generations on the GPU
   (``--experiment experiments/ta_lpo_minatar.yaml`` times a real lpo experiment's generations instead);
4. optimizer programs scored on the digits and tiny-LM proxies on CUDA vs the CPU (:mod:`metaopt.symbolic`);
5. GRPO post-training (:mod:`metaopt.posttrain`, roles colocated) on CUDA vs the CPU: completions/s, accuracy;
6. GRPO with Ray actor roles sharing the GPU (fractional ``num_gpus``) in a placement group;
7. GRPO from a 0.5B-shaped checkpoint saved to a local path, colocated and as Ray actors;
8. Ray: ``ray.init`` sees the GPU (``num_gpus``) and a task asking for ``num_gpus=1`` runs on it,
   when Ray is installed.

Each check runs on its own; a failing one is reported and the others go on. Exit code 0 when every check
that could run passed. Not a test: CI has no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from results import append, command_line  # benchmarks/ is on sys.path when a script here runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def check_torch_digits(quick: bool) -> dict:
    import torch

    from metaopt.tasks.digits import DigitsTask

    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    steps = 200 if quick else 1000
    out = {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for device in ("cpu", "cuda"):
        task = DigitsTask(
            {"hidden": [256, 256], "batch_size": 256, "device": device}, {"name": "sgd", "momentum": 0.9}, seed=0
        )
        task.train(10, lambda _s: 0.05)  # warm-up (CUDA context, kernels)
        started = time.perf_counter()
        metrics = task.train(steps, lambda _s: 0.05)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        out[device] = {"steps_per_second": steps / seconds, "val_accuracy": metrics.get("val_accuracy")}
    return out


def check_jax_ppo(quick: bool) -> dict:
    import jax

    from metaopt.objectives.drifts import make_drift
    from metaopt.objectives.ppo import ppo_config_for, train_many

    devices = [str(d) for d in jax.devices()]
    out = {"jax": jax.__version__, "devices": devices, "backend": jax.default_backend()}
    if jax.default_backend() != "gpu" and not DRY_RUN:
        out["skipped"] = "JAX has no GPU backend here"
        return out
    drift_fn, zeros = make_drift("lpo", hidden=128)

    def population(size: int):
        """The drift's initial parameters repeated along a leading population axis of ``size`` members."""
        return jax.tree.map(lambda x: jax.numpy.broadcast_to(x, (size, *x.shape)), zeros)

    runs = [("CartPole-v1", 64 if quick else 256, 100_000), ("SpaceInvaders-MinAtar", 8 if quick else 32, 1_000_000)]
    if DRY_RUN:
        runs = [("CartPole-v1", 2, 2048), ("SpaceInvaders-MinAtar", 2, 16384)]
    for env, members, steps in runs:
        config = ppo_config_for(env, total_timesteps=steps)
        batch = population(members)
        started = time.perf_counter()
        first = jax.block_until_ready(train_many(config, drift_fn, jax.random.PRNGKey(0), batch, 1))
        with_compile = time.perf_counter() - started
        started = time.perf_counter()
        returns = jax.block_until_ready(train_many(config, drift_fn, jax.random.PRNGKey(1), batch, 1))
        seconds = time.perf_counter() - started
        total = members * config.num_updates * config.batch_size
        out[env] = {
            "members": members,
            "steps_per_member": config.num_updates * config.batch_size,
            "compile_seconds": with_compile - seconds,
            "run_seconds": seconds,
            "env_steps_per_second": total / seconds,
            "mean_final_return": float(returns.mean()),
            "first_call_mean_return": float(first.mean()),
        }
    return out


def check_meta_trainer(quick: bool) -> dict:
    import jax

    from metaopt import config
    from metaopt.objectives.meta_train import MetaTrainer

    if jax.default_backend() != "gpu" and not DRY_RUN:
        return {"skipped": "JAX has no GPU backend here"}
    if EXPERIMENT:
        exp = config.load(EXPERIMENT, OVERRIDES)
    else:
        steps = 2048 if DRY_RUN else 100_000
        exp = config.from_dict(
            {
                "name": "gpu-check",
                "kind": "lpo",
                "lpo": {
                    "drift": "ta_lpo",
                    "envs": [{"env": "CartPole-v1", "total_timesteps": steps}],
                    "horizons": [0.5, 1.0],
                    "baseline_seeds": 4,
                    "es": {"population": 4 if DRY_RUN else 32 if quick else 64, "generations": 2},
                },
            }
        )
    trainer = MetaTrainer(exp.section, meta_seed=0)
    state = trainer.init_state()
    out = {"experiment": exp.name, "population": exp.section.es.population, "generations": []}
    out["eval_start"] = trainer.evaluate_mean(state, 0)  # the ES mean at generation 0 is PPO's objective
    for generation in range(GENERATIONS):
        state, result = trainer.generation(state, generation)
        out["generations"].append(
            {
                "seconds": result.seconds,
                "fitness_mean": float(result.fitness.mean()),
                "fitness_max": float(result.fitness.max()),
                "horizons": result.horizons,
                "env_steps_per_second": result.env_steps / result.seconds,
            }
        )
        print(f"[gpu-check]   generation {generation}: {out['generations'][-1]}", flush=True)
        if EVAL_EVERY and (generation + 1) % EVAL_EVERY == 0:
            out.setdefault("evals", {})[generation + 1] = trainer.evaluate_mean(state, generation + 1)
            print(f"[gpu-check]   eval of the ES mean: {out['evals'][generation + 1]}", flush=True)
    out["baselines"] = trainer.baselines
    out["compile_seconds"] = trainer.evaluator.compile_seconds
    out["eval"] = trainer.evaluate_mean(state, GENERATIONS)
    return out


def check_symbolic_proxies(quick: bool) -> dict:
    """Optimizer programs (AdamW, Lion) scored on the digits and tiny-LM proxies on CUDA vs the CPU."""
    import torch

    from metaopt.symbolic.program import adamw_program, lion_program
    from metaopt.symbolic.proxies import score_program

    if not torch.cuda.is_available() and not DRY_RUN:
        return {"skipped": "torch sees no CUDA device"}
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    proxies = {
        "digits": {"task": "digits", "task_options": {"hidden": [128, 128], "batch_size": 64}, "steps": 300},
        "tiny_lm": {"task": "tiny_lm", "task_options": {"d_model": 64, "layers": 2}, "steps": 200},
    }
    out = {}
    for program_name, program in (("adamw", adamw_program()), ("lion", lion_program(weight_decay=0.1))):
        for proxy_name, proxy in proxies.items():
            for device in devices:
                spec = {
                    **proxy,
                    "task_options": {**proxy["task_options"], "device": device},
                    "lrs": [1.0] if program_name == "adamw" else [3e-4],
                    "seeds": 1,
                }
                started = time.perf_counter()
                result = score_program(program.to_json(), spec)
                out[f"{program_name}/{proxy_name}/{device}"] = {
                    "score": result.score,
                    "failure": result.failure,
                    "seconds": time.perf_counter() - started,
                }
    return out


def arithmetic_section(overrides: list[str]):
    """The posttrain section of experiments/grpo_sec_arithmetic.yaml with ``overrides``."""
    from metaopt import config

    return config.load(
        Path(__file__).resolve().parents[1] / "experiments" / "grpo_sec_arithmetic.yaml", overrides
    ).section


def warmed_up_run(section):
    """Roles started and warmed up for seed 0 with SEC: ``(run, roles, seconds it took)``."""
    from metaopt.posttrain.loop import GRPORun
    from metaopt.posttrain.roles import start_roles

    started = time.perf_counter()
    roles = start_roles(section, 0)
    try:
        run = GRPORun(section, "sec", 0, roles)
        run.warm_up()
    except BaseException:
        roles.close()
        raise
    return run, roles, time.perf_counter() - started


def check_posttrain(quick: bool) -> dict:
    """GRPO post-training (:mod:`metaopt.posttrain`), roles colocated in this process (they put their models on
    the CUDA device when torch sees one): warm-up, GRPO steps and greedy evaluation of the grpo_sec_arithmetic
    model; completions/s, reward, accuracy and where the models ran."""
    import torch

    if not torch.cuda.is_available() and not DRY_RUN:
        return {"skipped": "torch sees no CUDA device"}
    steps = 3 if DRY_RUN else (10 if quick else 40)
    section = arithmetic_section(["posttrain.roles.mode=colocated", f"posttrain.warmup.steps={20 if DRY_RUN else 300}"])
    run, roles, warm = warmed_up_run(section)
    metrics = [run.step() for _ in range(steps)]
    speed = [m["completions_per_s"] for m in metrics[1:]]
    return {
        "warmup_s": warm,
        "completions_per_s": sum(speed) / len(speed),
        "reward": metrics[-1]["reward"],
        "accuracy": run.evaluate()["accuracy"],
        "learner_device": str(roles.learner.device),
        "rollout_device": str(roles.rollout[0].device),
    }


def check_posttrain_actors(quick: bool) -> dict:
    """GRPO with Ray actor roles sharing the GPU: two rollout actors, the learner and a reference actor each ask
    for a quarter of it (``roles.gpus_per_*``), inside a placement group of :func:`role_bundles` whose driver
    captures its child actors, as a Tune trial does; weights travel learner -> rollout through the object store.
    Reports where each role ran, completions/s, reward and accuracy."""
    import torch

    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    except ImportError:
        return {"skipped": "Ray is not installed here"}
    from metaopt.posttrain.roles import role_bundles

    gpu = torch.cuda.is_available()
    if not gpu and not DRY_RUN:
        return {"skipped": "torch sees no CUDA device"}
    share = 0.25 if gpu else 0.0
    steps = 3 if DRY_RUN else (10 if quick else 30)
    overrides = [
        "posttrain.roles.mode=actors",
        "posttrain.roles.rollout_workers=2",
        "posttrain.roles.reference=actor",
        f"posttrain.roles.gpus_per_rollout={share}",
        f"posttrain.roles.gpus_per_learner={share}",
        f"posttrain.roles.cpus_per_actor={0.25 if DRY_RUN else 2}",
        f"posttrain.warmup.steps={20 if DRY_RUN else 300}",
    ]
    section = arithmetic_section(overrides)
    bundles = [{k: v for k, v in b.items() if v > 0} for b in role_bundles(section, {"cpu": 0.25, "gpu": 0.0})]

    def drive() -> dict:
        run, roles, warm = warmed_up_run(section)
        try:
            metrics = [run.step() for _ in range(steps)]
            speed = [m["completions_per_s"] for m in metrics[1:]]
            workers = {
                "learner": roles.learner,
                "reference": roles.reference,
                **{f"rollout{i}": w for i, w in enumerate(roles.rollout)},
            }
            return {
                "warmup_s": warm,
                "completions_per_s": sum(speed) / len(speed),
                "reward": metrics[-1]["reward"],
                "kl": metrics[-1].get("kl"),
                "accuracy": run.evaluate()["accuracy"],
                "placement": {name: roles.get(roles.call(w, "placement")) for name, w in workers.items()},
            }
        finally:
            roles.close()

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4 if DRY_RUN else 10)
    try:
        group = placement_group(bundles, strategy="PACK")
        ray.get(group.ready(), timeout=120)
        strategy = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
        out = ray.get(ray.remote(drive).options(num_cpus=0.25, scheduling_strategy=strategy).remote(), timeout=300)
        out["bundles"] = bundles
        out["cluster_gpus"] = ray.cluster_resources().get("GPU", 0)
        remove_placement_group(group)
        return out
    finally:
        ray.shutdown()


def check_posttrain_checkpoint(quick: bool) -> dict:
    """GRPO from a checkpoint on a local path at a realistic size: a Qwen2 model shaped like a 0.5B one (hidden
    896, 24 blocks, 14 heads; random weights, the character vocabulary) is saved with ``save_pretrained`` and
    trained through ``posttrain.model.path``, first with the roles colocated, then as Ray actors (learner and
    rollout on half the GPU each, the full weights through the object store every step). Reports completions/s,
    the step time, how long each step waited for rollouts, and the GPU memory peak of the colocated run.
    The weights are random, so rewards (and with them advantages, loss and KL) are zero: this times the path
    and the weight traffic, it does not show learning at this size."""
    import tempfile

    import torch

    from metaopt.posttrain.policy import make_policy

    gpu = torch.cuda.is_available()
    if not gpu and not DRY_RUN:
        return {"skipped": "torch sees no CUDA device"}
    shape = {"hidden": 64, "layers": 2, "heads": 4} if DRY_RUN else {"hidden": 896, "layers": 24, "heads": 14}
    steps = 2 if DRY_RUN else 4
    model, tokenizer = make_policy({"arch": "qwen2", "max_positions": 256, **shape}, seed=0)
    out = {"parameters": sum(p.numel() for p in model.parameters()), "modes": {}}
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        del model
        for mode in ("colocated", "actors"):
            overrides = [
                f"posttrain.model={{path: {path}}}",
                "posttrain.warmup.steps=0",
                "posttrain.grpo.group_size=8",
                "posttrain.grpo.prompts_per_step=32",
                "posttrain.grpo.max_new_tokens=24",
                f"posttrain.roles.mode={mode}",
                "posttrain.roles.rollout_workers=1",
                "posttrain.roles.reference=rollout",
                f"posttrain.roles.gpus_per_rollout={0.5 if gpu else 0}",
                f"posttrain.roles.gpus_per_learner={0.5 if gpu else 0}",
                f"posttrain.roles.cpus_per_actor={0.5 if DRY_RUN else 2}",
            ]
            section = arithmetic_section(overrides)
            if mode == "actors":
                try:
                    import ray
                except ImportError:
                    out["modes"][mode] = {"skipped": "Ray is not installed here"}
                    continue
                ray.init(include_dashboard=False, log_to_driver=False, num_cpus=4 if DRY_RUN else 8)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            try:
                run, roles, ready = warmed_up_run(section)
                metrics = []
                for _ in range(steps):
                    step_started = time.perf_counter()
                    metrics.append({**run.step(), "step_s": time.perf_counter() - step_started})
                later = metrics[1:]
                out["modes"][mode] = {
                    "load_and_sync_s": ready,
                    "completions_per_s": sum(m["completions_per_s"] for m in later) / len(later),
                    "step_s": [round(m["step_s"], 3) for m in metrics],
                    "rollout_wait_s": [round(m["rollout_wait_s"], 3) for m in metrics],
                    "loss": metrics[-1].get("loss"),
                    "kl": metrics[-1].get("kl"),
                    "placement": roles.get(roles.call(roles.learner, "placement")),
                    # the driver holds the models only when the roles are colocated
                    "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu and mode == "colocated" else None,
                }
                roles.close()
            finally:
                if mode == "actors":
                    ray.shutdown()  # also ends the actors of a check that failed midway
            print(f"[gpu-check]   {mode}: {out['modes'][mode]}", flush=True)
    return out


def check_ray_gpu(quick: bool) -> dict:
    try:
        import ray
    except ImportError:
        return {"skipped": "Ray is not installed here"}
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        if not resources.get("GPU"):
            if not DRY_RUN:
                raise RuntimeError("Ray sees no GPU on this node")
            return {"num_gpus": 0, "skipped": "Ray sees no GPU on this node"}

        @ray.remote(num_gpus=1)
        def visible():
            import os

            return os.environ.get("CUDA_VISIBLE_DEVICES")

        return {
            "num_gpus": resources.get("GPU", 0),
            "task_cuda_visible_devices": ray.get(visible.remote(), timeout=120),
        }
    finally:
        ray.shutdown()


EXPERIMENT = None  # --experiment: an lpo experiment file whose meta-trainer is timed instead of the built-in one
GENERATIONS = 2
OVERRIDES: list[str] = []
EVAL_EVERY = 0
DRY_RUN = False  # --dry-run-on-cpu: tiny sizes, GPU guards off (checks this script itself without a GPU)

CHECKS = {
    "torch_digits": check_torch_digits,
    "jax_ppo": check_jax_ppo,
    "meta_trainer": check_meta_trainer,
    "symbolic_proxies": check_symbolic_proxies,
    "posttrain": check_posttrain,
    "posttrain_actors": check_posttrain_actors,
    "posttrain_checkpoint": check_posttrain_checkpoint,
    "ray_gpu": check_ray_gpu,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes in all)")
    parser.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    parser.add_argument("--experiment", help="time this lpo experiment's ES generations (e.g. a paper-scale one)")
    parser.add_argument("--generations", type=int, default=2, help="ES generations the meta_trainer check runs")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in the --experiment file")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate the ES mean every N generations")
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="tiny sizes on the CPU, to test the script")
    args = parser.parse_args(argv)
    global DRY_RUN, EXPERIMENT, GENERATIONS, OVERRIDES, EVAL_EVERY
    DRY_RUN, EXPERIMENT, GENERATIONS = args.dry_run_on_cpu, args.experiment, args.generations
    OVERRIDES, EVAL_EVERY = list(args.set or []), args.eval_every
    results, failed = {}, []
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            results[name] = check(args.quick)
        except Exception as err:  # report and go on: each check is independent
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            failed.append(name)
        results[name]["wall_seconds"] = time.perf_counter() - started
        print(
            json.dumps({name: {k: v for k, v in results[name].items() if k != "traceback"}}, indent=1, default=str),
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str))
    if not DRY_RUN:  # headline figures: completions/s of each post-training check, per mode where it has modes
        for name, result in results.items():
            for label, part in [(name, result), *((f"{name} {m}", p) for m, p in result.get("modes", {}).items())]:
                if isinstance(part.get("completions_per_s"), float):
                    append("gpu_check", f"{label} completions/s", part["completions_per_s"], command_line(argv))
    print(f"[gpu-check] failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
