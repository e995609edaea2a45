"""``metaopt run | submit | status | logs | list`` plus the verbs capabilities add — parse, load, dispatch.

Nothing else lives here, and no capability is named here: a capability's extra verbs (pbt's ``replay``) come
from its :class:`~metaopt.registry.Command` entries. User mistakes (a bad experiment file, a bad ``--set``, an
unreachable cluster) print one line ``metaopt: error: <field>: <problem>`` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from metaopt import registry
from metaopt.errors import ConfigError

EXIT_USAGE = 2


def build_parser(commands: list[registry.Command] | None = None) -> argparse.ArgumentParser:
    """The whole command line: the platform's verbs, then every capability's (``commands``; default: those of
    every installed capability)."""
    parser = argparse.ArgumentParser(
        prog="metaopt", description="Adapt the learning process itself, on Ray, tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run an experiment file (local Ray by default, or --address)")
    run.add_argument("file", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--address", help="Ray cluster address (default: ray.address in the file, RAY_ADDRESS, or local)")
    _add_overrides(run)
    loudness = run.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="only the final summary")
    loudness.add_argument("--verbose", action="store_true", help="Tune's full progress output")

    submit = sub.add_parser("submit", help="submit an experiment file to a Ray cluster as a Ray Job")
    submit.add_argument("file")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--working-dir", default=".", help="project directory shipped with the job (default: .)")
    submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    _add_overrides(submit)

    for name, text in (("status", "show a submitted job's status"), ("logs", "print a submitted job's logs")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job", help="job id printed by metaopt submit")
        cmd.add_argument(
            "--address",
            default=default_jobs_address(),
            help="Ray dashboard address (default: $RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)",
        )
        if name == "logs":
            cmd.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    lst = sub.add_parser("list", help="list the experiment files under experiments/")
    lst.add_argument("directory", nargs="?", default="experiments")

    for command in capability_commands() if commands is None else commands:
        if command.name in sub.choices:
            raise ConfigError(command.name, "a capability's command has the name of another command; rename it")
        verb = sub.add_parser(command.name, help=command.help)
        command.add_arguments(verb)
        verb.set_defaults(capability_handler=command.run)
    return parser


def capability_commands(failures: list[ConfigError] | None = None) -> list[registry.Command]:
    """Every installed capability's extra verbs, in kind order. A capability that cannot be loaded (a broken
    plugin) adds none, and its error goes to ``failures``: the other verbs keep working, and using its kind
    still names the problem."""
    commands = []
    for kind in registry.kinds():
        try:
            commands.extend(registry.get(kind).commands)
        except ConfigError as err:
            if failures is None:
                raise
            failures.append(err)
    return commands


def default_jobs_address() -> str:
    """Where ``status``/``logs`` look when no --address is given: Ray's own variable, else a local head."""
    import os

    return os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set pbt.population=8 (repeatable)",
    )


def cmd_run(args) -> int:
    """Exit status: 0 complete, 1 when a trial failed, 128 + the signal when stopped (130 Ctrl-C, 143 SIGTERM)."""
    from metaopt import config, session, stopping

    experiment = config.load(args.file, args.overrides)
    runner = config.runner_for(experiment.kind)
    stopping.enable()
    before = len(session.ended_sweeps())
    try:
        runner(experiment, address=args.address, verbose=0 if args.quiet else 2 if args.verbose else 1)
    except KeyboardInterrupt as stop:
        signum = stopping.received() or getattr(getattr(stop, "outcome", None), "stop_signal", None)
        print(f"metaopt: stopped by {stopping.signal_name(signum)}", file=sys.stderr)
        return stopping.exit_code(signum)
    finally:
        stopping.disable()  # the handlers go back to what they were
    ended = session.ended_sweeps()[before:]
    return max((outcome.exit_code for outcome in ended), default=0)


def cmd_submit(args) -> int:
    from metaopt import config, jobs
    from metaopt.redact import redact_uri

    # fail here, before anything reaches the cluster; paths and database drivers are the cluster's to have
    experiment = config.load(args.file, args.overrides, check_paths=False)
    overrides = list(args.overrides)
    uri, warning = jobs.resolve_tracking_uri_for_cluster(experiment.tracking.uri, args.address)
    if warning:
        print(f"metaopt: warning: {warning}", file=sys.stderr)
    if uri != experiment.tracking.uri:
        overrides.append(f"tracking.uri={uri}")
    # Credentials in --set values travel in the job's environment, not its command line (see jobs.submit).
    job_id = jobs.submit(args.file, args.address, overrides, working_dir=args.working_dir, tracking_uri=uri)
    address = redact_uri(args.address)  # printed: no credentials on screen or in shell logs
    print(f"submitted {experiment.name} as job {job_id}")
    print(f"  status: metaopt status {job_id} --address {address}")
    print(f"  logs:   metaopt logs {job_id} --address {address} --follow")
    print(f"  runs:   MLflow experiment {experiment.mlflow_experiment!r} at {redact_uri(uri)}")
    if args.wait:
        jobs.logs(job_id, args.address, follow=True)
        final = jobs.status(job_id, args.address)
        print(f"job {job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    return 0


def cmd_status(args) -> int:
    from metaopt import jobs

    print(jobs.status(args.job, args.address))
    return 0


def cmd_logs(args) -> int:
    from metaopt import jobs

    jobs.logs(args.job, args.address, follow=args.follow)
    return 0


def cmd_list(args) -> int:
    from metaopt import config

    directory = Path(args.directory)
    if not directory.is_dir():
        raise ConfigError(str(directory), "no such directory of experiment files")
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    if not files:
        print(f"no experiment files in {directory}/")
    for path in files:
        try:
            exp = config.load(path, check_paths=False)  # a *_cluster file names the cluster's paths, not ours
            print(f"{path!s:<44} {exp.kind:<8} {first_line(exp.description)}")
        except ConfigError as err:
            print(f"{path!s:<44} INVALID  {err}")
    return 0


def first_line(text: str) -> str:
    """The first non-blank line of a description ('' for a blank one): what ``metaopt list`` shows."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
    "list": cmd_list,
}


def main(argv: list[str] | None = None) -> int:
    failures: list[ConfigError] = []
    try:
        commands = capability_commands(failures)  # loads every capability
        parser = build_parser(commands)
    except ConfigError as err:
        print(f"metaopt: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    verb = next(iter(sys.argv[1:] if argv is None else argv), "-")
    known = {*COMMANDS, *(command.name for command in commands)}
    if failures and not verb.startswith("-") and verb not in known:
        # perhaps a verb of the capability that failed to load: say why it may be missing, then argparse's usual
        # "invalid choice" (it may be a plain typo)
        for err in failures:
            print(f"metaopt: warning: {err}", file=sys.stderr)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = getattr(args, "capability_handler", None) or COMMANDS[args.command]
    try:
        return handler(args)
    except ConfigError as err:
        print(f"metaopt: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("metaopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
