"""The dispatcher's error contract: a mistake the user can fix, or a storage error, is one line
on stderr, exit 2, and it is the LAST line even when a progress bar was running."""

from __future__ import annotations

import errno
import sys
import types

import pytest
from actprune.client import cli
from actprune.core.errors import UsageError
from tqdm.auto import tqdm


def _command(monkeypatch, fail: BaseException) -> None:
    """Register `actprune boom`: it starts a progress bar, advances it, then raises ``fail``
    (like `finetune`, whose bar is open while a checkpoint is written)."""
    mod = types.ModuleType("actprune_test_boom")

    def run(args) -> int:
        bar = tqdm(total=10, desc="working", file=sys.stderr)  # closed only when the frame is freed
        bar.update(3)
        raise fail

    mod.configure = lambda parser: None
    mod.run = run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMANDS", {"boom": (mod.__name__, "fails half way")})


@pytest.mark.parametrize(("fail", "message"), [
    (UsageError("the data ran out"), "actprune boom: error: the data ran out"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
     "actprune boom: error: No space left on device: /out/model.safetensors"),
    (RuntimeError("safetensors: File too large (os error 27)"), "actprune boom: error: safetensors: File too large"),
], ids=["usage", "disk-full", "wrapped-by-a-library"])
def test_an_error_during_a_progress_bar_is_the_last_line(monkeypatch, capsys, fail, message):
    _command(monkeypatch, fail)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(message), err[-500:]
    assert "Traceback" not in err


def test_other_errors_keep_their_traceback(monkeypatch):
    _command(monkeypatch, OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(OSError):
        cli.main(["boom"])
