"""docker/entrypoint.sh turns the container's environment into one `actprune serve` command.

Docker and a GPU cannot run on this machine, so the script runs here directly, with a stub
`actprune` first on PATH: the stub stands in for the real command (which would start vLLM) and
records the argv and environment it was exec'd with. The Dockerfile itself is linted by
hadolint in `make lint-docker` (part of `make test`); the checks below tie it to the entrypoint
and to the vLLM version actprune pins.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILE = ROOT / "docker" / "Dockerfile"

STUB = """#!{python}
import json, os, sys
keep = ("VLLM_API_KEY", "ACTPRUNE_SNAPSHOT_DIR", "HF_TOKEN")
with open(os.environ["STUB_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ[k] for k in keep if k in os.environ}}}}, f)
"""


@pytest.fixture
def run_entrypoint(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "actprune"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "exec.json"

    def run(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
        out.unlink(missing_ok=True)
        full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
                    "STUB_OUT": str(out), **env}
        proc = subprocess.run(["bash", str(ENTRYPOINT), *args], env=full_env, capture_output=True,
                              text=True, timeout=60)
        return proc, json.loads(out.read_text()) if out.exists() else None

    return run


def test_model_only_gives_capture_defaults(run_entrypoint, tmp_path):
    snap = tmp_path / "snap"
    proc, got = run_entrypoint({"MODEL": "Qwen/Qwen3-32B", "ACTPRUNE_SNAPSHOT_DIR": str(snap)})
    assert proc.returncode == 0, proc.stderr
    assert got["argv"] == [
        "serve", "Qwen/Qwen3-32B", "--host", "0.0.0.0", "--port", "8000",
        "--tensor-parallel-size", "1", "--snapshot-dir", str(snap), "--snapshot-interval", "60",
    ]
    assert snap.is_dir()  # created before vLLM starts, so a bad volume fails early


def test_every_variable_reaches_argv_and_key_stays_in_env(run_entrypoint, tmp_path):
    snap = tmp_path / "vol" / "actprune"
    env = {
        "MODEL": "/workspace/pruned", "VLLM_API_KEY": "s3cret", "TENSOR_PARALLEL_SIZE": "2",
        "CAPTURE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(snap), "ACTPRUNE_SNAPSHOT_INTERVAL": "30",
        "PORT": "9000", "HOST": "127.0.0.1",
        "EXTRA_VLLM_ARGS": "--max-model-len 8192 --model-loader-extra-config '{\"a\": 1}'",
    }
    proc, got = run_entrypoint(env, "--served-model-name", "qwen")
    assert proc.returncode == 0, proc.stderr
    assert got["argv"] == [
        "serve", "/workspace/pruned", "--host", "127.0.0.1", "--port", "9000",
        "--tensor-parallel-size", "2", "--snapshot-dir", str(snap), "--snapshot-interval", "30",
        "--max-model-len", "8192", "--model-loader-extra-config", '{"a": 1}',
        "--served-model-name", "qwen",
    ]
    assert got["env"]["VLLM_API_KEY"] == "s3cret"
    assert "s3cret" not in " ".join(got["argv"]) and "s3cret" not in proc.stderr


def test_capture_off_serves_plain_vllm_without_snapshot_flags(run_entrypoint):
    proc, got = run_entrypoint({"MODEL": "m", "CAPTURE": "0", "ACTPRUNE_SNAPSHOT_DIR": "/nonexistent/x"})
    assert proc.returncode == 0, proc.stderr
    assert got["argv"] == ["serve", "m", "--host", "0.0.0.0", "--port", "8000",
                           "--tensor-parallel-size", "1", "--no-capture"]


def test_a_command_argument_runs_instead_of_the_server(run_entrypoint, tmp_path):
    marker = tmp_path / "ran"
    proc, got = run_entrypoint({}, "touch", str(marker))  # no MODEL needed: no server
    assert proc.returncode == 0, proc.stderr
    assert got is None and marker.exists()


def test_fractional_snapshot_interval_and_zero_are_accepted(run_entrypoint, tmp_path):
    for value in ("0", "2.5"):
        proc, got = run_entrypoint({"MODEL": "m", "ACTPRUNE_SNAPSHOT_DIR": str(tmp_path),
                                    "ACTPRUNE_SNAPSHOT_INTERVAL": value})
        assert proc.returncode == 0, proc.stderr
        assert got["argv"][-2:] == ["--snapshot-interval", value]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MODEL is not set"),
        ({"MODEL": ""}, "MODEL is not set"),
        ({"MODEL": "m", "TENSOR_PARALLEL_SIZE": "0"}, "TENSOR_PARALLEL_SIZE must be a positive integer, got '0'"),
        ({"MODEL": "m", "TENSOR_PARALLEL_SIZE": "two"}, "TENSOR_PARALLEL_SIZE must be a positive integer"),
        ({"MODEL": "m", "PORT": "http"}, "PORT must be a positive integer, got 'http'"),
        ({"MODEL": "m", "PORT": "70000"}, "PORT must be at most 65535"),
        ({"MODEL": "m", "CAPTURE": "yes"}, "CAPTURE must be 1 (capture statistics) or 0 (plain vLLM), got 'yes'"),
        ({"MODEL": "m", "ACTPRUNE_SNAPSHOT_INTERVAL": "-5"}, "ACTPRUNE_SNAPSHOT_INTERVAL must be a number"),
        ({"MODEL": "m", "ACTPRUNE_SNAPSHOT_INTERVAL": "1m"}, "ACTPRUNE_SNAPSHOT_INTERVAL must be a number"),
        ({"MODEL": "m", "EXTRA_VLLM_ARGS": "--x 'unclosed"}, "EXTRA_VLLM_ARGS: No closing quotation"),
    ],
)
def test_bad_value_stops_with_one_line_naming_the_variable(run_entrypoint, tmp_path, env, message):
    env = {"ACTPRUNE_SNAPSHOT_DIR": str(tmp_path / "snap"), **env}
    proc, got = run_entrypoint(env)
    assert proc.returncode == 2
    assert got is None  # nothing was started
    assert message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_unwritable_snapshot_dir_is_refused(run_entrypoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc, got = run_entrypoint({"MODEL": "m", "ACTPRUNE_SNAPSHOT_DIR": str(blocker / "sub")})
    assert proc.returncode == 2 and got is None
    assert "ACTPRUNE_SNAPSHOT_DIR" in proc.stderr and "not writable" in proc.stderr


def test_dockerfile_base_image_matches_the_pinned_vllm():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    (pin,) = re.findall(r'"vllm==([^"]+)"', (ROOT / "pyproject.toml").read_text())  # the gpu extra
    assert base == f"vllm/vllm-openai:v{pin}"


def test_dockerfile_runs_the_entrypoint_and_checks_health():
    text = DOCKERFILE.read_text()
    (dest,) = re.findall(r"^COPY docker/entrypoint.sh (\S+)", text, flags=re.M)
    assert f'ENTRYPOINT ["{dest}"]' in text
    assert re.search(r"^HEALTHCHECK .*\n.*curl -fsS .*/health", text, flags=re.M)
    assert "EXPOSE 8000" in text and 'VOLUME ["/workspace"]' in text


def test_logged_command_hides_extra_vllm_args_and_every_api_key(run_entrypoint, tmp_path):
    env = {"MODEL": "m", "ACTPRUNE_SNAPSHOT_DIR": str(tmp_path),
           "EXTRA_VLLM_ARGS": "--api-key hunter2 --max-model-len 8192"}
    proc, got = run_entrypoint(env, "--api-key", "s3cret2", "s3cret4", "--api-key=s3cret3", "--served-model-name", "q")
    assert proc.returncode == 0, proc.stderr
    assert got["argv"][-10:] == ["--api-key", "hunter2", "--max-model-len", "8192",  # the command is whole
                                "--api-key", "s3cret2", "s3cret4", "--api-key=s3cret3", "--served-model-name", "q"]
    for secret in ("hunter2", "s3cret2", "s3cret3", "s3cret4", "8192"):
        assert secret not in proc.stderr
    assert "--api-key *** *** --api-key=*** --served-model-name q" in proc.stderr
    assert "(+ 4 words of EXTRA_VLLM_ARGS, not shown)" in proc.stderr


def test_unparsable_extra_vllm_args_are_not_echoed(run_entrypoint, tmp_path):
    proc, got = run_entrypoint({"MODEL": "m", "ACTPRUNE_SNAPSHOT_DIR": str(tmp_path),
                                "EXTRA_VLLM_ARGS": "--api-key 'hunter2"})
    assert proc.returncode == 2 and got is None
    assert "EXTRA_VLLM_ARGS: No closing quotation" in proc.stderr and "hunter2" not in proc.stderr


def test_dockerfile_runs_as_a_numeric_non_root_user_owning_the_volume():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), users
    uid = users[-1].split(":")[0]
    assert re.search(rf"useradd --uid {uid} ", text)
    assert text.index("chown actprune:actprune /workspace") < text.index('VOLUME ["/workspace"]')
