"""`actprune serve` refuses to expose a keyless server (issue 12, finding 6), and keys stay out of
what the server prints: the check is a pure function of vLLM's parsed arguments and the
environment, plus one run of the real command that must stop before vLLM starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from actprune.server.launch import exposure_error
from actprune.server.settings import Settings

EXPOSED = [None, "", "0.0.0.0", "::", "[::]", "10.0.0.5", "192.168.1.20", "203.0.113.7", "2001:db8::1",
           "pod.example.com", "::ffff:10.0.0.1"]
LOOPBACK = ["127.0.0.1", "127.3.4.5", "localhost", "LOCALHOST", "::1", "[::1]", "::ffff:127.0.0.1"]


@pytest.mark.parametrize("host", EXPOSED)
def test_keyless_server_on_a_reachable_address_is_refused_naming_both_fixes(host):
    error = exposure_error(host, None, None, {})
    assert error is not None and "\n" not in error
    assert "VLLM_API_KEY" in error and "--api-key" in error and "ACTPRUNE_ALLOW_NO_KEY=1" in error
    assert ("every interface" if not host else host) in error


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_needs_no_key(host):
    assert exposure_error(host, None, None, {}) is None


@pytest.mark.parametrize(("api_keys", "env"), [
    (["k"], {}),
    (["", "k"], {}),
    (None, {"VLLM_API_KEY": "k"}),
    (None, {"ACTPRUNE_ALLOW_NO_KEY": "1"}),
    (None, {"ACTPRUNE_ALLOW_NO_KEY": "yes"}),
])
def test_a_key_or_explicit_consent_lets_it_listen_everywhere(api_keys, env):
    assert exposure_error("0.0.0.0", None, api_keys, env) is None


@pytest.mark.parametrize(("api_keys", "env"), [
    ([""], {"VLLM_API_KEY": "k"}),  # as in vLLM: --api-key '' wins over the environment, and is no key
    (None, {"VLLM_API_KEY": ""}),
    (None, {"ACTPRUNE_ALLOW_NO_KEY": "0"}),
])
def test_an_empty_key_or_a_no_is_no_key(api_keys, env):
    assert exposure_error("0.0.0.0", None, api_keys, env) is not None


def test_unix_socket_is_not_exposed_and_a_bad_consent_value_is_named():
    assert exposure_error(None, "/tmp/vllm.sock", None, {}) is None
    assert "ACTPRUNE_ALLOW_NO_KEY must be 0 or 1" in exposure_error("0.0.0.0", None, None, {"ACTPRUNE_ALLOW_NO_KEY": "y"})


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], [], ["--host", "127.0.0.1", "--host", "10.1.2.3"],
                                   ["--no-capture", "--host", "0.0.0.0"]])
def test_serve_exits_2_with_one_line_before_vllm_starts(tmp_path, extra):
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "ACTPRUNE_ALLOW_NO_KEY")}
    proc = subprocess.run([sys.executable, "-m", "actprune.server.launch", str(tmp_path / "no-model"), *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("actprune serve: error: refusing to serve on ") and "ACTPRUNE_ALLOW_NO_KEY=1" in last
    assert "Traceback" not in proc.stderr and "no-model" not in proc.stderr  # stopped before loading


def test_settings_repr_never_shows_the_key():
    settings = Settings.from_env({"VLLM_API_KEY": "s3cret-key"})
    assert settings.env_api_key == "s3cret-key"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)


def test_keep_alive_outlasts_client_pools_unless_set_and_a_bad_loader_config_is_one_line():
    from actprune.server.launch import KEEP_ALIVE_S, build_vllm_argv

    _, env = build_vllm_argv(["m"], {})
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == str(KEEP_ALIVE_S) and KEEP_ALIVE_S > 5  # httpx's pools: 5 s
    _, env = build_vllm_argv(["m", "--no-capture"], {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "7"})
    assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "7"
    for bad in ("{", "[1]", "[" * 100_000):
        with pytest.raises(SystemExit) as e:
            build_vllm_argv(["m", "--model-loader-extra-config", bad], {})
        assert str(e.value).startswith("actprune serve: error: --model-loader-extra-config must be a JSON object")


def test_the_engine_gets_a_shutdown_grace_period_unless_one_is_given():
    # vLLM's 0 kills the engine's process tree at the first signal, racing the workers' shard
    # writes; test_persistence.py's Ctrl-C tests are the end-to-end check.
    from actprune.server.launch import SHUTDOWN_TIMEOUT_S, build_vllm_argv

    argv, _ = build_vllm_argv(["m"], {})
    assert argv[argv.index("--shutdown-timeout") + 1] == str(SHUTDOWN_TIMEOUT_S) and SHUTDOWN_TIMEOUT_S > 5
    for given in (["--shutdown-timeout", "3"], ["--shutdown-timeout=3"]):
        argv, _ = build_vllm_argv(["m", *given], {})
        i = argv.index(given[0])
        assert argv[i:i + len(given)] == given and sum(a.startswith("--shutdown-timeout") for a in argv) == 1


def test_prefix_caching_is_off_unless_asked_and_needs_what_counts_the_cached_tokens():
    from actprune.server.launch import build_vllm_argv

    assert "--no-enable-prefix-caching" in build_vllm_argv(["m"], {})[0]
    argv, _ = build_vllm_argv(["m", "--enable-prefix-caching"], {})
    assert "--no-enable-prefix-caching" not in argv and "--enable-prefix-caching" in argv
    assert "--enable-prefix-caching" in build_vllm_argv(["m", "--enable-prefix-caching", "--api-server-count", "1"], {})[0]
    for extra, says in ((["--disable-log-stats"], "drop --disable-log-stats"),
                        (["--api-server-count", "2"], "--api-server-count 1 (got 2)"),
                        (["-asc=4"], "(got 4)")):
        with pytest.raises(SystemExit) as e:
            build_vllm_argv(["m", "--enable-prefix-caching", *extra], {})
        assert str(e.value).startswith("actprune serve: error: --enable-prefix-caching") and says in str(e.value)
    # without prefix caching nothing is cached: the same flags are vLLM's business
    build_vllm_argv(["m", "--disable-log-stats", "--api-server-count", "2"], {})


def test_step_sample_reaches_the_capture_options_and_a_bad_one_is_one_line():
    from actprune.server.launch import build_vllm_argv

    argv, _ = build_vllm_argv(["m", "--step-sample", "0.25", "--model-loader-extra-config",
                               '{"actprune": {"sample_seed": 3}}'], {})
    ours = json.loads(argv[argv.index("--model-loader-extra-config") + 1])["actprune"]
    assert ours["step_sample"] == 0.25 and ours["sample_seed"] == 3
    plain, _ = build_vllm_argv(["m"], {})
    assert "step_sample" not in json.loads(plain[plain.index("--model-loader-extra-config") + 1])["actprune"]
    for bad in ("0", "1.5", "half", "nan"):
        with pytest.raises(SystemExit, match="--step-sample must be a number in"):
            build_vllm_argv(["m", "--step-sample", bad], {})
