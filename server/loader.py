"""The ``actprune`` load format: vLLM's default loader, then capture hooks on the model.

Selected with ``--load-format actprune`` (``actprune serve`` adds it). Options travel in
``--model-loader-extra-config '{"actprune": {...}}'`` so that every worker process — local or
on another node under Ray — gets them with the config, not through the environment:

    load_format          the weight format to hand to the default loader ("auto")
    near_zero_threshold  |x| at or below which an activation counts as near zero (1e-3)
    stash_mib            memory for the step buffers (256): steps that fit are folded once, at
                         their end; longer ones tap by tap (docs/capture.md)
    fold_rows            on a CPU, the rows of small steps that gather before one fold (16, at
                         most half the step buffers; docs/capture.md)
    step_sample          the chance a forward step is captured (1.0): opt-in sampling, CPU only;
                         steps not drawn skip the capture's work (``actprune serve --step-sample``)
    sample_seed          the seed of those draws (0); every rank draws the same
"""

from __future__ import annotations

import dataclasses
from typing import Any

from actprune.core.archs import spec_for_architecture
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.distributed import parallel_state as ps
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from .capture import Capture, CaptureOptions, Routing, ShardInfo

__all__ = ["LOAD_FORMAT", "CaptureModelLoader", "attach_capture", "get_capture"]

logger = init_logger("vllm.actprune")
LOAD_FORMAT = "actprune"
_ATTR = "_actprune_capture"


def _split_config(load_config: LoadConfig) -> tuple[LoadConfig, dict[str, Any]]:
    extra = dict(load_config.model_loader_extra_config or {})
    ours = dict(extra.pop("actprune", {}) or {})
    inner_format = ours.pop("load_format", "auto")
    if inner_format == LOAD_FORMAT:
        raise ValueError("actprune: the inner load_format cannot be 'actprune' itself")
    inner = dataclasses.replace(load_config, load_format=inner_format, model_loader_extra_config=extra)
    return inner, ours


@register_model_loader(LOAD_FORMAT)
class CaptureModelLoader(DefaultModelLoader):
    def __init__(self, load_config: LoadConfig):
        inner, ours = _split_config(load_config)
        super().__init__(inner)
        unknown = set(ours) - {f.name for f in dataclasses.fields(CaptureOptions)}
        if unknown:
            raise ValueError(f"actprune: unknown capture options {sorted(unknown)}")
        CaptureOptions(**ours)  # their types and ranges, checked before any weight is loaded
        self.capture_options = ours

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        arch = (model_config.architectures or ["(none)"])[0]
        base = getattr(model_config.hf_config, "actprune_base_architecture", None)
        spec = spec_for_architecture(arch, base)  # an unknown family is refused before loading
        model = super().load_model(vllm_config, model_config, prefix)
        options = CaptureOptions(
            max_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            **self.capture_options,
        )
        shard = ShardInfo(
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pp_group().rank_in_group,
            pp_size=ps.get_pp_group().world_size,
        )
        device = next(model.parameters()).device
        routing = None
        if spec.moe is not None:  # the model's own expert count, top-k and norm_topk_prob
            routing = Routing(*spec.moe.routing(model_config.hf_text_config.to_dict()))
        capture = Capture(
            model, spec.vllm, options, shard, device,
            hidden_size=model_config.get_hidden_size(), routing=routing,
        )
        attach_capture(model, capture)
        logger.info(
            "actprune: capturing %d layers (tp %d/%d, pp %d/%d)",
            len(capture.groups) // 3, shard.tp_rank, shard.tp_size, shard.pp_rank, shard.pp_size,
        )
        return model


def attach_capture(model: nn.Module, capture: Capture) -> None:
    """Attach ``capture`` to ``model`` as a plain attribute (not a submodule): the worker
    extension finds it through the model (:func:`get_capture`)."""
    object.__setattr__(model, _ATTR, capture)


def get_capture(model: nn.Module) -> Capture | None:
    """The Capture attached to a loaded model (looking through CUDA-graph wrappers)."""
    seen = 0
    while model is not None and seen < 4:
        cap = getattr(model, _ATTR, None)
        if cap is not None:
            return cap
        model = getattr(model, "runnable", None) or getattr(model, "model", None)
        seen += 1
    return None
