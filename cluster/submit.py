"""`zeray submit`: send a command of this project to a Ray cluster as a Ray Job.

The job gets the project as its working_dir (the command runs in an unpacked copy of it), minus what must never
travel: the virtualenv, git history, run outputs and anything that looks like a secret. Dependencies come from the
cluster's image (the launcher and KubeRay configs in cluster/ install zeray there) or, with `--install`, from
pyproject.toml through the runtime_env's pip. Token authentication is whatever Ray's own client finds
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); zeray never passes or logs a token.
"""

import asyncio
import fnmatch
import os
import shlex
import sys
import time

import tomllib

from core.errors import UserError, first_line
from core.fs import is_uri

# never uploaded: the environment, history, outputs, caches
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis"]
# never uploaded, and named when present so the user knows they stayed home
SECRET_PATTERNS = [
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    ".netrc",
    ".npmrc",
    ".pypirc",
    ".aws",
    ".ssh",
    ".gcloud",
    "credentials*",
    "*credentials.json",
    "*.p12",
    "*.pfx",
    ".git-credentials",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def project_root() -> str:
    """The directory holding zeray's pyproject.toml: what a job needs to import zeray, pipelines, trainers..."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_command(command: list[str], config: str, overrides: list[str] = ()) -> str:
    """The job's entrypoint: the given command, or `zeray train CONFIG [k=v ...]`; `zeray ...` runs as
    `python -m zeray ...` so it works from the uploaded copy whether or not the cluster has the console script."""
    if not command:
        command = ["zeray", "train", config, *overrides]
    if command[0] == "zeray":
        command = ["python", "-m", "zeray", *command[1:]]
    return shlex.join(command)


def secrets_in(root: str) -> list[str]:
    """Files and directories under `root` that match a secret pattern (relative paths, sorted)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [
            d
            for d in dirnames
            if d not in (".venv", ".git", "runs", "__pycache__")
            and not _is_secret(d, os.path.normpath(os.path.join(rel, d)), found)
        ]
        for name in filenames:
            _is_secret(name, os.path.normpath(os.path.join(rel, name)), found)
    return sorted(found)


def _is_secret(name: str, rel: str, found: list[str]) -> bool:
    if any(fnmatch.fnmatch(name, pattern) for pattern in SECRET_PATTERNS):
        found.append(rel)
        return True
    return False


def runtime_env(root: str, storage: str, install: bool) -> dict:
    """working_dir = the project without environment, outputs and secrets; pip from pyproject.toml if asked."""
    excludes = EXCLUDES + SECRET_PATTERNS  # gitignore syntax: a pattern without "/" matches at any depth
    if storage and not is_uri(storage):
        rel = os.path.relpath(os.path.abspath(storage), root)
        if not rel.startswith(".."):
            excludes.append(rel)  # the config's storage inside the project: outputs never travel
    env: dict = {"working_dir": root, "excludes": excludes}
    if install:
        env["pip"] = dependencies(root)
    return env


def dependencies(root: str) -> list[str]:
    """The project's runtime dependencies as pyproject.toml declares them."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def submit(
    cfg,
    config_path: str,
    overrides: list[str],
    command: list[str],
    address: str | None,
    follow: bool,
    install: bool,
    root: str | None = None,
    out=sys.stdout,
) -> int:
    """Submit the job (`cfg` is `config_path` with `overrides`, validated by the caller); print its id; with
    `follow`, stream its logs and return its exit status."""
    root = os.path.abspath(root or project_root())
    rel_config = os.path.relpath(os.path.abspath(config_path), root)
    if rel_config.startswith("..") and not command:
        raise UserError(
            f"{config_path} is outside the project {root} that the job gets as its working_dir; "
            "move it into the project or give the command after --"
        )
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError(
            "zeray submit needs a cluster: give --address http://<head>:8265, set cluster.address in "
            f"{config_path}, or set RAY_ADDRESS"
        )
    if address.startswith("ray://"):
        raise UserError(
            f"--address {address}: Ray Jobs are submitted to the dashboard, http://<head>:8265, "
            "not to the ray:// client port"
        )
    client = _client(address)
    left_home = secrets_in(root)
    if left_home:
        print(f"not uploaded (look like secrets): {', '.join(left_home)}", file=out, flush=True)
    entrypoint = job_command(command, rel_config, overrides)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env=runtime_env(root, cfg.storage, install),
        metadata={"zeray_config": rel_config, "zeray_run": cfg.name},
    )
    print(f"submitted job {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if not follow:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}", file=out, flush=True)
        return 0
    return follow_job(client, job_id, out)


def follow_job(client, job_id: str, out=sys.stdout) -> int:
    """Stream the job's logs until it ends; its exit status: the driver's exit code, 1 if it has none."""

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop {job_id}", file=out, flush=True)
        return 130
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL:  # the log stream can close a moment before the status settles
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(info.status)
    print(
        f"job {job_id} {status.lower()}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
        file=out,
        flush=True,
    )
    if status == "SUCCEEDED":
        return 0
    return info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1


def _client(address: str):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _use_token_if_present()
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise UserError(
            f"the cluster at {address} refused the token: {first_line(exc)} "
            "(Ray reads it from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    except ConnectionError as exc:
        raise UserError(
            f"no Ray dashboard answers at {address} ({exc}); is the cluster up, and is the address "
            "the dashboard's http://<head>:8265?"
        ) from None


def _use_token_if_present() -> None:
    """Send Ray's token when one is configured, as `ray start` decides: RAY_AUTH_MODE if set, else token mode as
    soon as Ray finds a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
    from ray._raylet import AuthenticationTokenLoader

    if AUTH_MODE_ENV_VAR not in os.environ and AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()
