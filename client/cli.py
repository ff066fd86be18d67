"""The `actprune` command.

Each sub-command lives in the package that does its work (``client`` for the light commands,
``server`` for ``serve``, ``pruning.cli`` for the offline ones) in a module that exposes
``configure(parser)`` and ``run(args) -> int``. This dispatcher names those modules in one
table and imports only the one that runs, so `actprune stats show` works on a laptop without
torch or vLLM, and nothing in ``actprune.client`` imports ``server`` or ``pruning``. ``serve``
passes every argument it does not know straight to vLLM, so it is dispatched before argparse.

Exit codes: 0 success, 1 failure while working, 2 a mistake the user can fix (any
:class:`~actprune.core.errors.ActpruneError`, or a full disk / read-only file system: one line
on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from actprune.core.errors import ActpruneError

__all__ = ["COMMANDS", "main"]

# sub-command -> (module, one-line help). Add a command by adding a line.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("actprune.server.launch", "start vLLM's OpenAI server with activation capture"),
    "plan": ("actprune.pruning.cli.plan", "score units from stats and write a pruning plan (plan.json)"),
    "prune": ("actprune.pruning.cli.prune", "slice a checkpoint by a plan, tensor by tensor"),
    "sensitivity": ("actprune.pruning.cli.sensitivity", "measure each layer's loss increase, for per-layer widths"),
    "compress": ("actprune.pruning.cli.compress", "remove a parameter budget from heads and MLP where it costs least, refitted"),
    "collect": ("actprune.client.collect", "replay JSONL prompts through a server's OpenAI API"),
    "stats": ("actprune.client.stats_cli", "pull and merge stats from servers; show a stats file"),
    "record": ("actprune.pruning.cli.record", "record activation stats offline with transformers"),
    "finetune": ("actprune.pruning.cli.finetune", "recover a pruned checkpoint: fine-tune / distil"),
    "eval": ("actprune.pruning.cli.eval", "perplexity, KL and generations of checkpoints, with a report"),
    "iterate": ("actprune.pruning.cli.iterate", "gradual pruning: prune, recover, re-collect, repeat"),
}


# Storage errors reported in one line (exit 2) rather than a traceback.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return int(importlib.import_module(COMMANDS["serve"][0]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="actprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the command that runs: one broken command can't break others
            module = importlib.import_module(module_name)
            module.configure(sp)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except ActpruneError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        _close_progress_bars()
        print(f"actprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        # A full disk or a read-only mount is the user's to fix, not a bug to trace; libraries
        # (safetensors, torch) wrap the OSError, so the chain is searched.
        storage = _storage_error(e)
        if storage is None:
            raise
        _close_progress_bars()
        print(f"actprune {args.command}: error: {storage}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"actprune {args.command}: interrupted", file=sys.stderr)
        return 130


def _storage_error(e: BaseException) -> str | None:
    """One line for a storage error anywhere in ``e``'s chain, else None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _STORAGE_ERRNOS:
            where = f": {cur.filename}" if cur.filename else ""
            return f"{cur.strerror or cur}{where}"
        text = " ".join(str(cur).split())
        if any(f"(os error {n})" in text for n in _STORAGE_ERRNOS):  # a Rust library's io::Error
            return text[:300]
        cur = cur.__cause__ or cur.__context__
    return None


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, before the error is printed: a bar left
    open is closed when its frame is freed, which redraws it *after* the message, so the
    message would no longer be the last line."""
    std = sys.modules.get("tqdm.std")
    if std is not None:
        for bar in list(getattr(std.tqdm, "_instances", ())):
            bar.close()
