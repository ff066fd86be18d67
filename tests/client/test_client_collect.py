"""`actprune collect` against ``fake_vllm`` on loopback HTTP, whose OpenAI API (a fake: it is
vLLM's, not ours) counts words as tokens, so the summary's totals are known in advance."""

from __future__ import annotations

import importlib.resources
import json
import re

import pytest
from actprune.client.collect import EXAMPLE_PROMPTS, load_prompts
from actprune.core.errors import UsageError
from fake_vllm import fake_vllm, serve


def _write(tmp_path, lines: list) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def _summary(out: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^([a-z/ ]+):\s+(.+)$", out, re.M)}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "ok"', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"text": "hi"}', "exactly one of 'prompt'"),
        ('{"prompt": "a", "messages": []}', "exactly one of 'prompt'"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be an object with 'role'"),
        ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be a positive integer"),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path, line, message):
    path = _write(tmp_path, [{"prompt": "fine"}, "", line, {"prompt": "never reached"}])
    with pytest.raises(UsageError) as e:
        load_prompts(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_empty_or_missing_prompt_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UsageError, match="no prompts"):
        load_prompts(tmp_path / "empty.jsonl")
    with pytest.raises(UsageError, match="no such file"):
        load_prompts(tmp_path / "absent.jsonl")


def test_example_prompt_file_is_packaged_and_mixes_chat_and_completions():
    packaged = importlib.resources.files("actprune.client") / "data" / "prompts_example.jsonl"
    assert packaged.is_file() and str(EXAMPLE_PROMPTS).endswith("data/prompts_example.jsonl")
    items = load_prompts(EXAMPLE_PROMPTS)
    chats = [i for i in items if i.messages is not None]
    assert 50 <= len(items) <= 80
    assert 15 <= len(chats) <= len(items) - 15
    assert any("tour" in json.dumps(i.messages or i.prompt).lower() for i in items)


def test_collect_replays_every_line_and_sums_usage(tmp_path, capsys, run_cli, raw_a):
    lines = [
        {"prompt": "one two three"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]},
        {"prompt": "four five", "max_tokens": 2},
    ] * 5
    srv = fake_vllm(raw_a, fail_first=2)  # two 503s: retried by the SDK
    with serve(srv) as url:
        code = run_cli(["collect", "--base-url", url, "--prompts", _write(tmp_path, lines),
                        "--concurrency", "4", "--max-tokens", "7"])
    out = capsys.readouterr().out
    assert code == 0, out
    s = _summary(out)
    assert s["requests"] == "15 ok / 15 sent" and s["errors"] == "0"
    assert s["prompt tokens"] == str(5 * (3 + 4 + 2))
    assert s["completion tokens"] == str(5 * (7 + 7 + 2))
    assert float(s["tokens/s"].split()[0]) > 0
    assert len(srv.openai_bodies) == 15
    assert srv.hits["/v1/completions"] + srv.hits["/v1/chat/completions"] == 15 + 2  # 2 retried
    assert {b["model"] for b in srv.openai_bodies} == {"tiny/qwen3"}  # the first /v1/models entry
    assert sum("messages" in b for b in srv.openai_bodies) == 5


def test_failed_requests_are_counted_named_by_line_and_exit_1(tmp_path, capsys, run_cli, raw_a):
    lines = [{"prompt": "fine"}, {"prompt": "please FAIL"}, {"messages": [{"role": "user", "content": "ok"}]}]
    srv = fake_vllm(raw_a, api_key="k")
    with serve(srv) as url:
        code = run_cli(["collect", "--base-url", url + "/v1", "--prompts", _write(tmp_path, lines),
                        "--api-key", "k", "--model", "chosen", "--max-tokens", "3"])
    out = capsys.readouterr().out
    s = _summary(out)
    assert code == 1
    assert s["requests"] == "2 ok / 3 sent" and s["errors"] == "1" and s["completion tokens"] == "6"
    assert "line 2: 400 prompt rejected by the fake" in out
    assert {b["model"] for b in srv.openai_bodies} == {"chosen"}


def test_collect_usage_errors_exit_2_with_one_line(tmp_path, capsys, run_cli):
    path = _write(tmp_path, [{"prompt": "ok"}, "{oops"])
    assert run_cli(["collect", "--base-url", "http://127.0.0.1:9", "--prompts", path]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert run_cli(["collect", "--base-url", "http://127.0.0.1:9", "--prompts", path, "--concurrency", "0"]) == 2
    assert "--concurrency must be >= 1" in capsys.readouterr().err


def test_unreachable_server_is_a_user_error(tmp_path, capsys, run_cli):
    path = _write(tmp_path, [{"prompt": "ok"}])
    code = run_cli(["collect", "--base-url", "http://127.0.0.1:9", "--prompts", path, "--retries", "0"])
    assert code == 2 and "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
