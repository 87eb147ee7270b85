"""Run our commands on a running Ray cluster through the Ray Jobs API, and watch them.

    raytune-minicpmv submit [--address URL] [--follow] [--env K=V ...] -- raytune-minicpmv tune --config configs/x.yaml
    raytune-minicpmv status JOB_ID [--address URL]     # JSON: status, message, entrypoint, times
    raytune-minicpmv logs   JOB_ID [--address URL] [--follow]
    raytune-minicpmv stop   JOB_ID [--address URL]

How it works: `submit` uploads the project directory as the job's working_dir (the config file travels with it) minus
secrets, data, checkpoints, environments and whatever .gitignore/.rayignore list (job_upload.py), prints the count and
size first and refuses a package over the Jobs API's 100 MiB limit before uploading; it forwards NCCL_* / RAY_TRAIN_* settings of the submitting
shell plus `--env` pairs, and asks for one unit of the head's driver resource (`trial_driver`) when the cluster has
it, so the job driver runs on the CPU head and not on a GPU node that the autoscaler may remove.

Address: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (when it is an http(s) URL), else
http://127.0.0.1:8265 (e.g. through `ray dashboard cluster.yaml`). The chosen address is the only one contacted (Ray's
client would replace it by RAY_ADDRESS), and a cluster that does not answer within CONNECT_TIMEOUT_S is an error. Token authentication: the token is read the way
Ray reads it (RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) and sent as a
bearer header, whether or not RAY_AUTH_MODE is set in the submitting shell.

Exit codes: submit without --follow: 0 once the job is accepted. With --follow (and `logs --follow`): 0 when the job
SUCCEEDED, 1 when it FAILED or was STOPPED. 2: the cluster refused or could not be reached.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from ..config import RayConfig
from .job_upload import DEFAULT_EXCLUDES, UploadError, check_upload_size, plan_upload

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 10.0  # the first request to the Jobs API; Ray's client itself never times out
# Settings of the submitting shell that the job needs on every node (networking, Train timeouts).
FORWARDED_ENV_PREFIXES = ("NCCL_", "RAY_TRAIN_")
FORWARDED_ENV_KEYS = ("TORCH_CUDA_ARCH_LIST", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TORCH_EXTENSIONS_DIR")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """A submission problem the user can fix (printed without a traceback)."""


def cli(args) -> int:
    """Entry of `raytune-minicpmv submit|status|logs|stop` (argparse namespace from cli.py)."""
    from ray.exceptions import AuthenticationError

    try:
        if args.command == "submit":
            return _submit_cmd(args)
        client = make_client(resolve_address(args.address))
        if args.command == "status":
            print(json.dumps(job_status(client, args.job_id), indent=2))
            return 0
        if args.command == "logs":
            if args.follow:
                return follow(client, args.job_id)
            print(client.get_job_logs(args.job_id), end="")
            return 0
        if args.command == "stop":
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: " + ("stop requested" if stopped else "already finished"))
            return 0
    except AuthenticationError as e:
        print(f"error: the cluster refused the request: {e}\nGive the cluster's token: export RAY_AUTH_TOKEN=... "
              "(on the head: `ray get-auth-token`), or RAY_AUTH_TOKEN_PATH=FILE, or put it in ~/.ray/auth_token.",
              file=sys.stderr)
        return 2
    except (ConnectionError, RuntimeError, ValueError) as e:  # JobError, UploadError; the SDK's "job not found"
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)


def _submit_cmd(args) -> int:
    entrypoint = _strip_separator(args.entrypoint)
    working_dir = Path(args.working_dir).resolve()
    check_entrypoint(entrypoint, working_dir)  # before any upload or connection
    runtime_env = build_runtime_env(working_dir, args.env, args.exclude)
    plan = plan_upload(working_dir, runtime_env["excludes"])
    if args.dry_run:
        for path, size in plan.files:
            print(f"{size:>12,d}  {path}")
        print(plan.summary().replace("uploading", "would upload"), file=sys.stderr)
        return 0
    check_upload_size(plan, runtime_env["excludes"])
    print(plan.summary(), file=sys.stderr, flush=True)
    client = make_client(resolve_address(args.address))
    resources = entrypoint_resources(client.get_address())
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                               submission_id=args.submission_id, entrypoint_resources=resources or None)
    print(job_id, flush=True)
    log.info("submitted %s to %s (entrypoint resources %s)", job_id, client.get_address(), resources or "none")
    if not args.follow:
        print(f"follow it with: raytune-minicpmv logs {job_id} --follow", file=sys.stderr)
        return 0
    return follow(client, job_id)


# --------------------------------------------------------------------------------------------------------------
# Building blocks (each usable on its own)


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the local port-forward."""
    if address:
        # host:port without a scheme is the dashboard too (Ray's client would read it as a GCS address)
        return address if "://" in address else f"http://{address}"
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    # RAY_ADDRESS may also hold a GCS address (host:6379) meant for ray.init; only a dashboard URL fits here.
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """The bearer header for the cluster's token, found the way Ray's own clients find it; {} without a token.

    Ray's job client only attaches the token when RAY_AUTH_MODE=token is set in the submitting shell; we always
    attach it when one is found (a cluster without token auth ignores it).
    """
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since the last call in this process
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def make_client(address: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A JobSubmissionClient talking to `address` and nothing else; JobError when it does not answer in time."""
    import requests
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers()
    try:  # Ray's client sends its first requests without a timeout: a silent host would hang it for minutes
        requests.get(f"{address.rstrip('/')}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.RequestException as e:
        raise JobError(f"cannot reach the Ray Jobs API at {address} within {timeout_s:.0f} s "
                       f"({type(e).__name__}). Is the cluster up and the dashboard forwarded "
                       "(`ray dashboard cluster.yaml`)? Give the address with --address http://HOST:8265.") from None
    # Ray's client replaces the address it is given by RAY_API_SERVER_ADDRESS / RAY_ADDRESS; the one we resolved
    # (the --address flag first) must win, so hide them while it is built (it keeps the address it resolved).
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(saved)


def build_runtime_env(working_dir: Path, env_pairs: list[str], extra_excludes: list[str] = ()) -> dict:
    """working_dir + excludes (ours, then --exclude patterns) + the env vars the job needs (forwarded settings,
    then --env pairs)."""
    if not working_dir.is_dir():
        raise JobError(f"--working-dir {working_dir} is not a directory")
    env = {"PYTHONUNBUFFERED": "1"}  # logs stream to `--follow` as they are written
    for key, value in os.environ.items():
        if key.startswith(FORWARDED_ENV_PREFIXES) or key in FORWARDED_ENV_KEYS:
            env[key] = value
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *extra_excludes], "env_vars": env}


def check_entrypoint(entrypoint: list[str], working_dir: Path) -> None:
    """Fail before uploading: an empty command, or a --config of ours that will not be in the job's working dir."""
    if not entrypoint:
        raise JobError("nothing to run: give the command after `--`, e.g. "
                       "`raytune-minicpmv submit -- raytune-minicpmv tune --config configs/x.yaml`")
    if Path(entrypoint[0]).name != "raytune-minicpmv":
        return  # someone else's command: its flags mean something else (python -c ...)
    for flag, value in zip(entrypoint, entrypoint[1:]):
        if flag not in ("--config", "-c"):
            continue
        path = Path(value)
        resolved = path if path.is_absolute() else working_dir / path
        if not resolved.is_file():
            raise JobError(f"{flag} {value}: no such file under the working dir {working_dir}")
        if not path.is_absolute() and not resolved.resolve().is_relative_to(working_dir):
            raise JobError(f"{flag} {value}: lies outside the working dir {working_dir}; it would not be uploaded")
        if path.is_absolute():
            log.warning("%s %s is absolute: it must exist at that path on the head node (a relative path under "
                        "the working dir travels with the job)", flag, value)


def entrypoint_resources(address: str) -> dict[str, float]:
    """{driver_resource: 1} when an alive node of the cluster advertises it (the CPU head of cluster.yaml), else {}."""
    name = RayConfig().driver_resource
    nodes = alive_nodes(address)
    if any((n.get("resources_total") or {}).get(name, 0) >= 1 for n in nodes):
        return {name: 1.0}
    return {}


def alive_nodes(address: str, headers: dict[str, str] | None = None) -> list[dict]:
    """The cluster's alive nodes from the State API's REST endpoint (what `ray list nodes` reads), with the token
    (`headers`, default: the token found by `auth_headers`).

    Plain HTTP on purpose: Ray's StateApiClient replaces the address it is given by RAY_API_SERVER_ADDRESS.
    """
    import requests

    r = requests.get(f"{address.rstrip('/')}/api/v0/nodes", headers=auth_headers() if headers is None else headers,
                     timeout=60,
                     params={"limit": 10000, "filter_keys": "state", "filter_predicates": "=",
                             "filter_values": "ALIVE"})
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def job_status(client, job_id: str) -> dict:
    info = client.get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status), "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time, "driver_node_id": info.driver_node_id,
            "driver_exit_code": info.driver_exit_code}


def follow(client, job_id: str, poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED, 1 otherwise."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
        status = str(client.get_job_status(job_id))
        while status not in TERMINAL:  # the log stream can close (network blip) before the job ends
            time.sleep(poll_s)
            status = str(client.get_job_status(job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (raytune-minicpmv stop {job_id})", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _strip_separator(entrypoint: list[str]) -> list[str]:
    return entrypoint[1:] if entrypoint[:1] == ["--"] else list(entrypoint)
