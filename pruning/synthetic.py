"""Deterministic tiny checkpoints for tests and benchmarks (no model hub).

``build_checkpoint(out_dir, arch="qwen3")`` writes a complete Hugging Face checkpoint —
``config.json``, ``model.safetensors``, ``generation_config.json`` and a byte-level BPE
tokenizer trained locally with ``tokenizers`` on a fixed corpus — that both transformers and
vLLM load. The same arguments always give byte-identical weights.

Default shape (Qwen3): 2 layers, hidden 128, 4 query heads and 2 KV heads of 32 (the vLLM CPU
attention backend needs head_dim >= 32), MLP width 384, vocabulary 512.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["ARCHS", "build_checkpoint", "build_tokenizer", "tiny_config"]

ARCHS = ("qwen3", "qwen2", "llama")

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The old harbour town lies at the mouth of the river, where fishing boats return at dawn.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
    "A tour guide explains the history of the castle, built in the twelfth century.",
    "Neural networks learn representations of language from large amounts of text.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "The museum opens at nine in the morning and closes at six in the evening.",
    "Rivers, mountains and forests cover most of the northern province.",
    "Statistics of activations tell which parts of a network matter for the data.",
    "Please book a table for two at the restaurant near the bridge.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9.",
    "Questions, answers, greetings and directions: where is the station, how far is it?",
]


def tiny_config(arch: str = "qwen3", **overrides: Any) -> dict[str, Any]:
    """A config dict for a tiny model of ``arch`` ('qwen3', 'qwen2' or 'llama')."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    base: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "initializer_range": 0.05,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    extra = {
        "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": False},
        "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
        "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": False, "mlp_bias": False},
    }[arch]
    base.update(extra)
    base.update(overrides)
    return base


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on the fixed corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_checkpoint(
    out_dir: str | Path,
    arch: str = "qwen3",
    dtype: str = "float32",
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random checkpoint of ``arch`` in ``dtype`` ('float32' or 'bfloat16')."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config(arch, **config_overrides)
    build_tokenizer(out, vocab_size=cfg_dict["vocab_size"])
    eos = _token_ids(out)
    cfg_dict.update(bos_token_id=eos["<|endoftext|>"], pad_token_id=eos["<|endoftext|>"],
                    eos_token_id=eos["<|im_end|>"])
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    # Norm weights start at 1 and would stay exactly 1; perturb them so that a slicer that
    # mixes up q_norm / k_norm / layer norms cannot pass a fidelity test by accident.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model = model.to(getattr(torch, dtype))
    model.config.torch_dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(out))
    _normalise_config(out / "config.json", dtype)
    return out


def _token_ids(out: Path) -> dict[str, int]:
    vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    return {t["content"]: t["id"] for t in vocab}


def _normalise_config(path: Path, dtype: str) -> None:
    # transformers 5 writes "dtype"; vLLM and older transformers read "torch_dtype" too.
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
