"""Settings and `actprune serve` options of persistence: the snapshot interval and the instance
identity, refused with one line naming the variable or flag when they cannot work."""

from __future__ import annotations

import json
import socket

import pytest
from actprune.server.launch import build_vllm_argv
from actprune.server.settings import Settings, default_instance_id


@pytest.mark.parametrize("bad", ["0.01", "0.999", "-1", "nan", "inf", "soon"])
def test_snapshot_interval_below_one_second_or_not_finite_is_refused(bad):
    with pytest.raises(ValueError, match="ACTPRUNE_SNAPSHOT_INTERVAL must be 0 .* or at least 1 second"
                       if bad != "soon" else "ACTPRUNE_SNAPSHOT_INTERVAL must be a number"):
        Settings.from_env({"ACTPRUNE_SNAPSHOT_INTERVAL": bad})


def test_snapshot_interval_zero_still_disables_and_one_second_is_the_minimum():
    assert Settings.from_env({"ACTPRUNE_SNAPSHOT_INTERVAL": "0"}).snapshot_interval == 0
    assert Settings.from_env({"ACTPRUNE_SNAPSHOT_INTERVAL": "1"}).snapshot_interval == 1
    assert Settings.from_env({}).snapshot_interval == 60


def test_instance_id_defaults_to_host_and_port_and_must_be_a_file_name_part(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu.pod-7")
    assert default_instance_id(8001) == "gpu_pod-7-8001"
    assert Settings.from_env({}).instance_id == "gpu_pod-7"  # vLLM started without `actprune serve`
    assert Settings.from_env({"ACTPRUNE_INSTANCE_ID": "pod-a"}).instance_id == "pod-a"
    for bad in ("a/b", "../x", "a.b", "x" * 65, " "):
        with pytest.raises(ValueError, match="ACTPRUNE_INSTANCE_ID must be"):
            Settings.from_env({"ACTPRUNE_INSTANCE_ID": bad})


def test_serve_gives_every_server_an_identity_from_its_flag_or_host_and_port(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    assert build_vllm_argv(["m", "--port", "9000"], {})[1]["ACTPRUNE_INSTANCE_ID"] == "node1-9000"
    assert build_vllm_argv(["m", "--port=9001"], {})[1]["ACTPRUNE_INSTANCE_ID"] == "node1-9001"
    assert build_vllm_argv(["m"], {})[1]["ACTPRUNE_INSTANCE_ID"] == "node1-8000"  # vLLM's default port
    argv, env = build_vllm_argv(["m", "--instance-id", "pod-a"], {})
    assert env["ACTPRUNE_INSTANCE_ID"] == "pod-a" and "--instance-id" not in argv and "pod-a" not in argv
    assert build_vllm_argv(["m"], {"ACTPRUNE_INSTANCE_ID": "pod-b"})[1]["ACTPRUNE_INSTANCE_ID"] == "pod-b"


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["m", "--snapshot-interval", "0.01"], {}, "--snapshot-interval"),
    (["m"], {"ACTPRUNE_SNAPSHOT_INTERVAL": "0.01"}, "ACTPRUNE_SNAPSHOT_INTERVAL"),
    (["m", "--instance-id", "a/b"], {}, "--instance-id"),
    (["m"], {"ACTPRUNE_INSTANCE_ID": "a.b"}, "ACTPRUNE_INSTANCE_ID"),
])
def test_serve_refuses_a_bad_interval_or_identity_before_starting_with_one_line(argv, env, named):
    with pytest.raises(SystemExit) as e:
        build_vllm_argv(argv, env)
    message = str(e.value.code)
    assert message.startswith("actprune serve: error: ") and named in message and "\n" not in message


def test_capture_options_in_the_extra_config_reach_the_loader_beside_actprunes_own():
    argv, _ = build_vllm_argv(["m", "--near-zero-threshold", "0.01", "--model-loader-extra-config",
                               '{"actprune": {"stash_mib": 64}, "other": 1}'], {})
    cfg = json.loads(argv[argv.index("--model-loader-extra-config") + 1])
    assert cfg == {"actprune": {"stash_mib": 64, "load_format": "auto", "near_zero_threshold": 0.01}, "other": 1}


@pytest.mark.parametrize("options, named", [
    ({"fold_rows": 0}, "fold_rows must be an integer >= 1"),
    ({"fold_rows": "64"}, "fold_rows must be an integer >= 1"),
    ({"stash_mib": -1}, "stash_mib must be an integer >= 0"),
    ({"fold_row": 64}, "unknown capture options"),
])
def test_the_capture_loader_refuses_bad_options_before_loading_any_weight(options, named):
    from actprune.server.loader import CaptureModelLoader
    from vllm.config.load import LoadConfig

    with pytest.raises(ValueError, match=named):
        CaptureModelLoader(LoadConfig(load_format="actprune", model_loader_extra_config={"actprune": options}))
    CaptureModelLoader(LoadConfig(load_format="actprune", model_loader_extra_config={"actprune": {"fold_rows": 16}}))
