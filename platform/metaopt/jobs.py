"""Ray Jobs: send an experiment file to a cluster, and ask about it afterwards.

``metaopt submit X.yaml --address http://HEAD:8265`` runs the local verb (``metaopt run X.yaml --set ...``)
as a Ray Job on the head node, with the submitter's directory as the job's working dir and the submitter's
``metaopt`` package shipped beside it. This module is a thin adapter over
:class:`ray.job_submission.JobSubmissionClient`: it builds the entrypoint and runtime env, and turns the client's
errors into one-line
:class:`~metaopt.errors.ConfigError`\\ s the CLI can print.

Token auth (Ray >= 2.59): ``ray start --head`` turns token auth on when a token exists (``RAY_AUTH_TOKEN``,
the file at ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, but a client
only sends the token when ``RAY_AUTH_MODE=token`` is set in its own process. :func:`enable_token_auth_if_available`
closes that gap so a user who started the cluster on this machine needs no extra step. The token travels in
an HTTP header: over plain ``http://`` to another machine anyone on the path can read it, so the client warns
(:func:`cleartext_token_warning`); reach a remote head through ``ray dashboard cluster.yaml`` (an SSH tunnel to
127.0.0.1:8265) or https instead.

Secrets stay off the job's command line, which ``ray job list`` and the dashboard show to everyone: a
``--set`` value with ``user:password@`` credentials travels in the job's ``runtime_env`` environment
(:func:`keep_credentials_off_the_command_line`), and what is printed is redacted (:mod:`metaopt.redact`).
The upload never includes VCS data, keys, cloud credentials or local tracking stores (:data:`EXCLUDES`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import reprlib
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import requests

from metaopt import user_code
from metaopt.errors import ConfigError
from metaopt.redact import has_credentials, redact_uri, strip_userinfo

AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Never shipped to the cluster with the working dir (Ray runtime_env ``excludes``, .gitignore syntax):
# environments and caches, VCS data, keys and cloud credentials, and local MLflow stores (the tracking URI's own
# sqlite file is added per job, see runtime_env).
EXCLUDES = [
    ".venv",
    "*.egg-info",
    "__pycache__",
    ".git",
    ".ssh",
    ".aws",
    ".env",
    ".env.*",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "id_rsa*",
    "id_ed25519*",
    ".netrc",
    ".pgpass",
    ".pypirc",
    ".npmrc",
    ".kube",
    ".docker",
    ".gnupg",
    ".config/gcloud",
    ".ray",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    ".metaopt",  # the Python API's objects (metaopt.user_code.OBJECTS_FOLDER): local by nature
]
# MLflow's HTTP client reads basic-auth credentials from these variables (mlflow.environment_variables).
MLFLOW_USERNAME_ENV, MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
SECRET_OVERRIDE_ENV = "METAOPT_SECRET_SET_{}"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# The Jobs client has no timeout of its own; a firewalled host would otherwise hang the CLI.
CONNECT_TIMEOUT_S = 10.0
CLUSTER_HINT = "is the cluster up? (ray start --head / ray up cluster.yaml)"


# ---------------------------------------------------------------------------------------------------------------
# submit


def submit(
    experiment_file: str,
    address: str,
    overrides: list[str] | tuple[str, ...] = (),
    working_dir: str = ".",
    tracking_uri: str | None = None,
) -> str:
    """Submit ``metaopt run EXPERIMENT_FILE --set ...`` as a Ray Job; return its submission id.

    ``experiment_file`` must exist and lie inside ``working_dir`` (the directory uploaded to the cluster),
    since the job sees only that directory. Overrides carrying credentials reach the job through its
    environment, not its command line (:func:`keep_credentials_off_the_command_line`); ``tracking_uri`` (the
    experiment's) names a local store to leave out of the upload. Raises ConfigError for bad input or an
    unreachable cluster.
    """
    root = _working_dir(working_dir)
    relative = _file_inside(experiment_file, root)
    refuse_python_objects(root / relative, overrides)
    public, secret_env = keep_credentials_off_the_command_line(overrides)
    return submit_command(
        run_command(relative, public), address, working_dir=str(root), env_vars=secret_env, tracking_uri=tracking_uri
    )


def submit_command(
    command: str,
    address: str,
    working_dir: str = ".",
    env_vars: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Submit an arbitrary shell ``command`` run from an upload of ``working_dir``; return the job id."""
    root = _working_dir(working_dir)
    client = _client(address)
    with _api_errors(address):
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env(root, tracking_uri, env_vars))
        except ValueError as err:  # packaging: e.g. the upload is over Ray's size limit
            raise ConfigError("working_dir", f"cannot upload {root}: {_first_line(err)}") from None


@dataclass(frozen=True)
class FromEnv:
    """A ``--set KEY=VALUE`` whose value the job's shell reads from its environment variable ``variable``."""

    key: str
    variable: str

    def shell(self) -> str:
        """``KEY=`` quoted, then ``"${VARIABLE}"``: the shell expands the variable, word splitting nothing."""
        return shlex.quote(f"{self.key}=") + f'"${{{self.variable}}}"'


def run_command(experiment_file: str, overrides: Sequence[str | FromEnv] = ()) -> str:
    """The shell command the job runs: the local ``run`` verb, arguments quoted for ``sh``.

    ``python -m metaopt.cli`` rather than the ``metaopt`` script: the job gets the package through
    ``py_modules`` (see :func:`runtime_env`), which works whether or not the head has it pip-installed.
    A :class:`FromEnv` override is written as a reference to its variable (Ray runs entrypoints with a shell).
    """
    words = [shlex.quote(word) for word in ("python", "-m", "metaopt.cli", "run", experiment_file)]
    for override in overrides:
        if isinstance(override, FromEnv):
            if not override.key:
                raise ConfigError("--set", "expected KEY=VALUE like pbt.population=8, got a value without a key")
            words += ["--set", override.shell()]
            continue
        if "=" not in override or not override.partition("=")[0].strip():
            raise ConfigError("--set", f"expected KEY=VALUE like pbt.population=8, got {_quoted(override)}")
        words += ["--set", shlex.quote(override)]
    return " ".join(words)


def keep_credentials_off_the_command_line(
    overrides: Sequence[str],
) -> tuple[list[str | FromEnv], dict[str, str]]:
    """Split ``--set`` overrides into what may appear on the job's command line and environment variables.

    The entrypoint is shown by ``ray job list``, the dashboard and the job's logs. A ``tracking.uri`` with
    ``user:password@`` on http(s) loses its userinfo and the job gets ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` instead (MLflow's client sends them as basic auth, so the job's own config
    and logged params never hold them); any other value with credentials (a database URI) moves whole into a
    ``METAOPT_SECRET_SET_<n>`` variable the command references (:class:`FromEnv`). Overrides without
    credentials, and malformed ones (reported by :func:`run_command`), pass through unchanged.
    """
    public: list[str | FromEnv] = []
    env: dict[str, str] = {}
    for index, override in enumerate(overrides):
        key, equals, value = override.partition("=")
        if not equals or not has_credentials(value.strip()):
            public.append(override)
            continue
        value = value.strip()
        if key.strip() == "tracking.uri" and value.lower().startswith(("http://", "https://")):
            parts = urlsplit(value)
            env[MLFLOW_USERNAME_ENV] = unquote(parts.username or "")
            if parts.password is not None:
                env[MLFLOW_PASSWORD_ENV] = unquote(parts.password)
            public.append(f"{key}={strip_userinfo(value)}")
        else:
            variable = SECRET_OVERRIDE_ENV.format(index)
            env[variable] = value
            public.append(FromEnv(key.strip(), variable))
    return public, env


#: Seconds ``ray job stop`` waits for a stopped sweep to end itself before it kills the job's processes.
JOB_STOP_WAIT_S = 60


def runtime_env(
    working_dir: str | Path, tracking_uri: str | None = None, env_vars: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Upload ``working_dir`` (minus :data:`EXCLUDES` and the tracking URI's own sqlite store when it lies
    inside) and the submitter's own ``metaopt`` package; ``env_vars`` for the job's processes.

    Shipping the package as a py_module makes the cluster run exactly the code that was submitted, and puts
    it ahead of any installed copy on the driver's and the Tune workers' ``sys.path``.
    """
    package_dir = Path(__file__).resolve().parent
    excludes = list(EXCLUDES) + _store_excludes(Path(working_dir), tracking_uri)
    env: dict[str, Any] = {"working_dir": str(working_dir), "py_modules": [str(package_dir)], "excludes": excludes}
    # `ray job stop` sends SIGTERM and, after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s), SIGKILL. A sweep
    # needs longer to stop its trials and mark its MLflow runs KILLED (metaopt.stopping).
    env["env_vars"] = {"RAY_JOB_STOP_WAIT_TIME_S": str(JOB_STOP_WAIT_S), **dict(env_vars or {})}
    return env


def _store_excludes(root: Path, tracking_uri: str | None) -> list[str]:
    """A root-anchored exclude for the sqlite/file store ``tracking_uri`` names when it lies under ``root``
    (its ``-wal``/``-journal`` companions included); none for servers or stores elsewhere.

    A relative store path is taken from the current directory, where ``metaopt run`` would create it.
    """
    local_path = _local_store_path(tracking_uri) if tracking_uri else None
    if not local_path:
        return []
    store = Path(local_path).expanduser().resolve()  # resolved like root, so symlinked paths compare equal
    root = root.expanduser().resolve()
    if not store.is_relative_to(root) or store == root:
        return []
    relative = re.sub(r"([\\\[\]*?!])", r"\\\1", store.relative_to(root).as_posix())  # literal in .gitignore syntax
    return [f"/{relative}", f"/{relative}-*"]


def _working_dir(working_dir: str) -> Path:
    """The absolute working dir, or ConfigError if it is not a directory or is ``/`` or the home directory
    (uploading those would ship every key and credential under them)."""
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError("working_dir", f"{_quoted(working_dir)} is not a directory")
    if root == Path(root.anchor) or root == Path.home().resolve() or root in Path.home().resolve().parents:
        raise ConfigError(
            "working_dir",
            f"refusing to upload {root} (the filesystem root, your home directory or a folder above it) "
            "to the cluster; "
            "submit from your project's directory or pass --working-dir PROJECT",
        )
    return root


def refuse_python_objects(experiment_file: Path, overrides: Sequence[str] = ()) -> None:
    """One ConfigError line when the experiment names what the Python API wrote under
    :data:`metaopt.user_code.OBJECTS_FOLDER` (a ``pickle:`` object, arrays saved as .npz): that folder is never
    uploaded (:data:`EXCLUDES`), and the objects in it are this machine's."""
    try:
        with experiment_file.open(encoding="utf-8", errors="replace") as stream:
            text = stream.read(1 << 20)
    except OSError:
        return  # config.load reports an unreadable file
    named = "\n".join([text, *overrides])
    if user_code.PICKLE_PREFIX in named or user_code.OBJECTS_FOLDER.as_posix() in named:
        raise ConfigError(
            str(experiment_file.name), "in-memory Python objects cannot be submitted; name a module:function"
        )


def _quoted(text: str) -> str:
    """User input for an error message: repr, truncated."""
    return reprlib.repr(text)


def _file_inside(experiment_file: str, root: Path) -> str:
    """``experiment_file`` relative to ``root`` (POSIX form, as the cluster sees it), or ConfigError."""
    path = Path(experiment_file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(experiment_file, "file not found")
    if not path.is_relative_to(root):
        raise ConfigError(
            experiment_file,
            f"lies outside the working dir {root}, which is all the cluster receives; "
            "submit from a directory that contains it",
        )
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------------------------------------------
# status, logs, wait


def status(job_id: str, address: str) -> str:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = _client(address)
    with _api_errors(address, job_id):
        return _status_name(client.get_job_status(job_id))


def logs(job_id: str, address: str, follow: bool = False, out: TextIO | None = None) -> str:
    """Write the job's logs to ``out`` (default stdout); with ``follow``, stream them until the job ends.

    Returns the job's status afterwards (final when following), so callers can pick an exit code.
    """
    out = out if out is not None else sys.stdout
    client = _client(address)
    with _api_errors(address, job_id):
        current = _status_name(client.get_job_status(job_id))  # an unknown id fails here, cleanly
        if not follow:
            out.write(client.get_job_logs(job_id))
            out.flush()
            return current
        asyncio.run(_tail(client, job_id, out))
        return _status_name(client.get_job_status(job_id))


def stop(job_id: str, address: str) -> bool:
    """Ask Ray to stop the job (``ray job stop``): SIGTERM to its processes, SIGKILL after
    :data:`JOB_STOP_WAIT_S`. A metaopt sweep stops its trials and marks its MLflow runs KILLED in between."""
    client = _client(address)
    with _api_errors(address, job_id):
        return bool(client.stop_job(job_id))


def wait(job_id: str, address: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal status and return it; TimeoutError after ``timeout_s``."""
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _api_errors(address, job_id):
        while True:
            current = _status_name(client.get_job_status(job_id))
            if current in TERMINAL_STATUSES:
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {current} after {timeout_s:g}s")
            time.sleep(poll_s)


async def _tail(client, job_id: str, out: TextIO) -> None:
    """Copy the log stream to ``out`` chunk by chunk; the server closes the stream when the job ends."""
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _status_name(job_status) -> str:
    """JobStatus enum (a str subclass) -> its plain name."""
    return getattr(job_status, "value", str(job_status))


# ---------------------------------------------------------------------------------------------------------------
# tracking URIs on a cluster


def resolve_tracking_uri_for_cluster(uri: str, address: str) -> tuple[str, str | None]:
    """Make a local tracking ``uri`` meaningful to a job; return ``(uri, warning or None)``.

    A job runs in a temporary copy of the working dir on the head node, so a relative store such as
    ``sqlite:///mlflow.db`` would vanish with it. When the head is this machine (loopback address) the
    path is made absolute against the submitter's cwd, so runs land where ``metaopt run`` puts them.
    For a remote head a local store cannot be reached from here: the URI is kept and a warning returned.
    """
    local_path = _local_store_path(uri)
    if local_path is None:  # a server or database URI: the same everywhere
        return uri, None
    if not is_loopback(address):
        warning = (
            f"tracking.uri {redact_uri(uri)} is a file on the head node of {address}, not on this machine; "
            "point tracking.uri at an MLflow server (--set tracking.uri=http://HOST:5000) to see the runs here"
        )
        return uri, warning
    if os.path.isabs(local_path):
        return uri, None
    absolute = os.path.abspath(local_path)
    return (f"sqlite:///{absolute}" if uri.startswith("sqlite:") else absolute), None


def _local_store_path(uri: str) -> str | None:
    """The filesystem path behind a sqlite/file/plain-path URI, else None (servers, other databases)."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :]
    if uri.startswith("file:"):
        return urlsplit(uri).path or uri[len("file:") :]
    if "://" in uri or uri.startswith("databricks"):
        return None
    return uri


def is_loopback(address: str) -> bool:
    """True when the Jobs API address names this machine by a loopback name or IP."""
    host = urlsplit(_http_url(address)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# connecting


def enable_token_auth_if_available() -> bool:
    """Turn on Ray token auth for this client process when a token exists and RAY_AUTH_MODE is unset.

    Ray's client sends ``Authorization: Bearer <token>`` only when ``RAY_AUTH_MODE=token`` in its own process,
    while ``ray start --head`` enables token mode merely because a token exists. An explicit RAY_AUTH_MODE
    (e.g. ``disabled``) is respected. Returns whether token mode is on.
    """
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None:
        return mode.strip().lower() == "token"
    from metaopt.compat import ray as compat_ray

    # Same lookup as Ray's own (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
    if not compat_ray.auth_token_exists():
        return False
    os.environ[AUTH_MODE_ENV] = "token"
    compat_ray.reload_auth_mode()  # Ray caches RAY_AUTH_MODE in its C++ config on first read
    return True


def cleartext_token_warning(address: str, sends_token: bool) -> str | None:
    """The warning for sending the Ray auth token unencrypted to another machine, or None.

    None when no token is sent, over https, or to a loopback address (an SSH tunnel such as
    ``ray dashboard cluster.yaml`` ends there, so the token crosses the network encrypted).
    """
    url = _http_url(address)
    if not sends_token or not url.lower().startswith("http://") or is_loopback(url):
        return None
    host = urlsplit(url).hostname or url
    return (
        f"sending the Ray auth token in clear text over http to {host}; anyone on the network path can read it. "
        "Use an SSH tunnel (ray dashboard cluster.yaml, then --address http://127.0.0.1:8265) or https"
    )


def _http_url(address: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT[/]`` -> ``http(s)://HOST:PORT``."""
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def _client(address: str):
    """A connected JobSubmissionClient, or ConfigError('--address', one line) naming the problem."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = _http_url(address)
    if not url.startswith(("http://", "https://")):
        raise ConfigError("--address", f"expected the Ray Jobs API as http://HOST:8265, got {address!r}")
    warning = cleartext_token_warning(url, enable_token_auth_if_available())
    if warning:
        print(f"metaopt: warning: {warning}", file=sys.stderr)
    _check_reachable(url, address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError as err:
        raise ConfigError("--address", _auth_problem(url, err)) from None
    except (ConnectionError, requests.RequestException) as err:
        raise ConfigError("--address", _unreachable(url, _first_line(err))) from None
    except RuntimeError as err:  # the version check: something answers, but not a Ray dashboard
        problem = f"{url} answers but is not a Ray Jobs API ({_first_line(err)}); use the head's dashboard, port 8265"
        raise ConfigError("--address", problem) from None


def _check_reachable(url: str, address: str) -> None:
    """Fail fast, with a timeout, when nothing answers at ``url`` (the client itself would hang)."""
    try:
        requests.get(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S)
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema):
        raise ConfigError("--address", f"expected the Ray Jobs API as http://HOST:8265, got {address!r}") from None
    except requests.Timeout:
        raise ConfigError("--address", _unreachable(url, "timed out")) from None
    except requests.RequestException:
        raise ConfigError("--address", _unreachable(url, "connection refused or unknown host")) from None


def _unreachable(url: str, reason: str) -> str:
    """The one line for 'no Jobs API there'."""
    return f"cannot reach Ray Jobs API at {url} ({reason}); {CLUSTER_HINT}"


def _auth_problem(url: str, err: Exception) -> str:
    """One line for a 401/403 from the Jobs API, saying where Ray looks for the token."""
    refused = "rejected our token" if "403" in str(err) or "Forbidden" in str(err) else "requires a token"
    return (
        f"Ray Jobs API at {url} {refused}; put the cluster's token in ~/.ray/auth_token "
        "(or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) and leave RAY_AUTH_MODE unset or set it to token"
    )


@contextmanager
def _api_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Translate errors of calls made on a connected client into one-line ConfigErrors."""
    import aiohttp
    from ray.exceptions import AuthenticationError

    url = _http_url(address)
    try:
        yield
    except AuthenticationError as err:
        raise ConfigError("--address", _auth_problem(url, err)) from None
    except (ConnectionError, requests.ConnectionError, aiohttp.ClientError) as err:  # aiohttp: the log stream
        raise ConfigError("--address", f"lost the Ray Jobs API at {url} ({_first_line(err)}); {CLUSTER_HINT}") from None
    except RuntimeError as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            problem = f"no job {job_id!r} on the cluster at {url} (list jobs: ray job list --address {url})"
            raise ConfigError("JOB", problem) from None
        raise ConfigError("--address", f"Ray Jobs API at {url} failed: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    """The first non-empty line of an exception's text (the Jobs client's messages run to paragraphs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
