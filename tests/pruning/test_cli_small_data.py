"""A new user's first commands on a small file (60 short prompt/response records): fine-tuning
and evaluation run with the defaults, say in one line what they adapted, and data too small
for anything is one line with exit code 2."""

from __future__ import annotations

import json

from actprune.client.cli import main as cli


def test_finetune_with_default_sizes_trains_on_sixty_short_records(tiny, tour_jsonl, tmp_path, capsys):
    out = tmp_path / "recovered"
    rc = cli(["finetune", "--model", str(tiny), "--data", str(tour_jsonl), "--text-field", "response",
              "-o", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    notes = [ln for ln in printed.splitlines() if ln.startswith("sizes picked from the data")]
    assert len(notes) == 1 and "(60 documents" in notes[0], printed
    cfg = json.loads((out / "finetune_config.json").read_text())
    assert cfg["seq_len"] == 128 and f"--seq-len {cfg['seq_len']}" in notes[0]
    assert cfg["warmup_steps"] < 10
    log = [json.loads(x) for x in (out / "finetune_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) >= 12
    assert max(e["lr"] for e in steps) == cfg["lr"]  # the warm-up ends inside the run
    assert any("val_loss" in e for e in log)  # the validation part holds a row
    assert (out / "model.safetensors").is_file()


def test_finetune_on_one_record_is_one_line_and_exit_2(tiny, tour_jsonl, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(tour_jsonl.read_text().splitlines()[0] + "\n")
    rc = cli(["finetune", "--model", str(tiny), "--data", str(one), "--text-field", "prompt", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert errors == [err.splitlines()[-1]] and errors[0].endswith("fewer than one row of 32; add data"), err


def test_eval_without_output_prints_the_table_and_writes_nothing(tiny, tiny_llama, tour_jsonl, tmp_path,
                                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = cli(["eval", "--model", str(tiny), "--model", str(tiny_llama), "--data", str(tour_jsonl),
              "--text-field", "response", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| model | parameters | perplexity")
    assert [ln.split("|")[1].strip() for ln in table[2:]] == [tiny.name, tiny_llama.name]
    assert "small data" not in out  # 2.5k tokens fill 4 rows of the default 512
    assert list(tmp_path.iterdir()) == []


def test_eval_picks_shorter_rows_for_a_small_file_and_says_so(tiny, tour_jsonl, tmp_path, capsys):
    three = tmp_path / "three.jsonl"
    three.write_text("".join(tour_jsonl.read_text().splitlines(keepends=True)[:3]))
    rc = cli(["eval", "--model", str(tiny), "--data", str(three), "--text-field", "response",
              "--max-new-tokens", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "small data (" in out and "--seq-len 32" in out
    assert sum(ln.startswith("| ") for ln in out.splitlines()) == 3


def test_eval_on_data_shorter_than_one_row_is_one_line_and_exit_2(tiny, tour_jsonl, tmp_path, capsys):
    one = tmp_path / "one.jsonl"
    one.write_text(tour_jsonl.read_text().splitlines()[0] + "\n")
    rc = cli(["eval", "--model", str(tiny), "--data", str(one), "--text-field", "prompt"])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert errors == [err.splitlines()[-1]] and errors[0].endswith("not enough for one block of 32; add data"), err
