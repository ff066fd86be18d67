"""The client stays light: importing it (and building the CLI of its commands) loads neither
torch nor vLLM, so `actprune stats show` runs on a laptop."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import actprune.client
import actprune.client.cli as cli
import actprune.client.collect, actprune.client.http, actprune.client.stats_cli
import actprune.core.summary, actprune.core.wire.api, actprune.core.wire.stats
import actprune.core.archs, actprune.core.config, actprune.core.planning.planner, actprune.core.files
cli.COMMANDS = {k: v for k, v in cli.COMMANDS.items() if k in ("collect", "stats")}
try:
    cli.main(["stats", "--help"])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "vllm", "openai"))))
"""


def test_importing_the_client_loads_neither_torch_nor_vllm():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    heavy = json.loads(r.stdout.strip().splitlines()[-1])
    assert heavy == [], f"client imports pulled in {heavy}"


def test_every_command_the_dispatcher_names_exists_with_configure_and_run():
    """The dispatcher reaches commands by module name (so that it imports only the one that
    runs); a renamed module must fail here, not on a user's machine."""
    import importlib

    from actprune.client.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        entry = ("main",) if name == "serve" else ("configure", "run")
        assert all(callable(getattr(mod, f, None)) for f in entry), (name, module)
