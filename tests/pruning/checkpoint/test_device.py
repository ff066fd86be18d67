"""Where the offline passes (sensitivity, refit, compress's validation) run their model:
``--device`` (auto / cpu / cuda / cuda:N) and ``load_causal_lm(device=)``.

No GPU on the test machine: what a missing GPU does is tested for real; moving a model to a GPU
and running out of its memory are tested with PyTorch's "meta" device as the stand-in (it holds
shapes, not values), and the memory error is raised by the test, as the comments say."""

from __future__ import annotations

import logging

import pytest
import torch
from actprune.client.cli import main
from actprune.pruning.checkpoint import hf_io
from actprune.pruning.checkpoint.hf_io import DeviceError, compute_device, load_causal_lm

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests what a machine without a GPU answers")


def test_auto_is_the_gpu_when_one_is_visible_else_the_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert compute_device().type == compute_device("auto").type == want
    assert compute_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("name", "says"), [("gpu", "not a device name"), ("mps", "only cpu and cuda"),
                                            ("cuda:99", "cuda")])
def test_a_device_that_is_not_there_is_one_line(name, says):
    with pytest.raises(DeviceError, match=says):
        compute_device(name)


@no_gpu
@pytest.mark.parametrize("command", [
    ["compress", "--model", "M", "--stats", "S", "--data", "D", "--param-ratio", "0.2", "-o", "O"],
    ["sensitivity", "--model", "M", "--plan", "P", "-o", "O"],
    ["prune", "--model", "M", "--plan", "P", "-o", "O", "--refit", "wiki:calibration"],
])
def test_commands_refuse_a_missing_gpu_before_reading_anything(command, capsys):
    # M, S, P name no file: the device is checked first, so the error is about the device
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is visible here" in err and "\n" not in err.strip()


def _meta_is_the_gpu(monkeypatch):
    """The stand-in GPU: compute_device answers "meta" for "auto" and "cuda"."""
    real = hf_io.compute_device
    monkeypatch.setattr(hf_io, "compute_device",
                        lambda name=None: torch.device("meta") if name in (None, "auto", "cuda") else real(name))


def test_the_whole_model_moves_to_the_device(tiny, monkeypatch):
    _meta_is_the_gpu(monkeypatch)
    model = load_causal_lm(tiny, torch.float32, device="cuda")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.device.type for p in load_causal_lm(tiny, torch.float32, device="cpu").parameters()} == {"cpu"}


def test_a_model_too_big_for_the_gpu(tiny, monkeypatch, caplog):
    _meta_is_the_gpu(monkeypatch)
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):  # the GPU's memory runs out (raised by this test; a meta
        if args and torch.device(args[0]).type == "meta":  # tensor could not come back)
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    with pytest.raises(DeviceError, match=r"GiB in float32\) does not fit on meta; use --device cpu"):
        load_causal_lm(tiny, torch.float32, device="cuda")  # named: the user is told
    with caplog.at_level(logging.WARNING):
        model = load_causal_lm(tiny, torch.float32, device="auto")  # auto: the CPU, with a warning
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert "does not fit" in caplog.text and "running on the CPU" in caplog.text
