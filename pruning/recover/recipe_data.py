"""The data side of the fine-tuning recipe: which rows it trains and validates on, and which
rows each optimizer step reads.

Separate from :mod:`.finetune` (models, losses, the loop, checkpoints) because the data schedule
is its own contract: sizes fitted to the data (:mod:`.sizing`), rows packed once, and the order a
pure function of (seed, epoch), so a resumed run and the teacher's top-k cache read the same rows.
A mixin of :class:`~actprune.pruning.recover.finetune.FinetuneRecipe`, so the methods keep their
names and :class:`~actprune.pruning.recover.distributed.DistributedRecipe` still overrides
``micro_batches``.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from actprune.pruning import data as data_mod
from actprune.pruning.recover import sizing

__all__ = ["RecipeData"]


class RecipeData:
    """Reads the recipe's ``cfg``, ``tok``, ``world`` and ``_say``; sets ``train_rows`` (N, L),
    ``val_rows`` (M, L) or None, ``steps_per_epoch``, ``total_steps`` and ``cfg`` (with the sizes
    picked from the data)."""

    def _setup_data(self) -> None:
        """Tokenize, fill in the sizes left unset from the data (sizing), split and pack."""
        cfg = self.cfg
        docs = data_mod.tokenize(self.tok, data_mod.load_texts(cfg.data, cfg.text_field, self.tok))
        val_docs = None
        if cfg.val_data:
            val_docs = data_mod.tokenize(self.tok, data_mod.load_texts(cfg.val_data, cfg.text_field, self.tok))
        req = sizing.Requested(
            seq_len=cfg.seq_len, batch_size=cfg.batch_size, val_fraction=cfg.val_fraction,
            epochs=cfg.epochs, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
            rows_per_batch_row=cfg.grad_accum * self.world)
        sizes, note = sizing.fit_sizes([len(d) + 1 for d in docs], req, seed=cfg.seed,
                                       val_doc_tokens=None if val_docs is None else [len(d) + 1 for d in val_docs])
        if note:
            self._say(note)
        self.cfg = cfg = replace(cfg, **asdict(sizes))
        if val_docs is not None:
            train, val = docs, val_docs
        else:
            train, val = data_mod.split_train_val(docs, cfg.val_fraction, cfg.seed)
        if cfg.mix_data:
            train = train + self._mix_docs(sum(len(d) + 1 for d in train))
        eos = self.tok.eos_token_id
        self.train_rows = data_mod.pack(train, cfg.seq_len, eos)  # (N, L)
        self.val_rows = data_mod.pack(val, cfg.seq_len, eos) if val else None  # (M, L)
        self.steps_per_epoch = len(self.train_rows) // (cfg.batch_size * cfg.grad_accum * self.world)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    def _mix_docs(self, own: int) -> list[list[int]]:
        """Documents of ``--mix-data``, in file order, filling ``--mix-share`` of the training
        tokens beside the ``own`` tokens of ``--data``: general text that keeps more of what
        the model knew outside the traffic (BENCHMARKS.md, issue 14). Validation stays on
        ``--data``'s domain; the shuffled rows mix the two."""
        cfg = self.cfg
        want = round(own * cfg.mix_share / (1.0 - cfg.mix_share))
        try:
            texts = data_mod.load_texts(cfg.mix_data, None, self.tok)
        except data_mod.DataError as e:
            raise data_mod.DataError(str(e).replace("--data", "--mix-data", 1)) from None
        docs, got = [], 0
        for text in texts:
            if got >= want:
                break
            ids = data_mod.tokenize(self.tok, [text])[0]
            docs.append(ids)
            got += len(ids) + 1
        short = "" if got >= want else f" (all it has; {cfg.mix_share:.0%} asked)"
        self._say(f"--mix-data: {got} tokens of {cfg.mix_data} beside {own} of {cfg.data}, "
                  f"{got / (own + got):.0%} of the training tokens{short}")
        return docs

    def _order(self, epoch: int) -> torch.Tensor:
        """The data order of ``epoch``: a function of (seed, epoch) only, so a resume repeats it."""
        return torch.randperm(len(self.train_rows), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def batch_rows(self, step: int) -> torch.Tensor:
        """The rows of optimizer step ``step``, all ranks': (grad_accum · world · batch_size, L)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        n = self.cfg.batch_size * self.cfg.grad_accum * self.world
        return self.train_rows[self._order(epoch)[k * n : (k + 1) * n]]

    def visited_rows(self) -> torch.Tensor:
        """The training rows the run's steps read, in file order: (≤ N, L). The teacher's top-k is
        needed for these only — a short run (``--max-steps``) over a large file reads a small part
        of it. All N rows when the run covers whole epochs."""
        n = self.cfg.batch_size * self.cfg.grad_accum * self.world
        used = torch.zeros(len(self.train_rows), dtype=torch.bool)
        for epoch in range(-(-self.total_steps // self.steps_per_epoch)):
            steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
            used[self._order(epoch)[: steps * n]] = True
        return self.train_rows[used]

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This process's micro-batches of step ``step``: grad_accum × (batch_size, L)."""
        return list(self.batch_rows(step).split(self.cfg.batch_size))

    def val_batches(self) -> list[torch.Tensor]:
        """The validation batches scored: the first ``max_val_batches`` × (≤ B, L)."""
        return list(self.val_rows.split(self.cfg.batch_size)[: self.cfg.max_val_batches])
