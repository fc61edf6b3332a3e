"""SFT: loss falls on scripted segments; bad input stops before anything is written."""

import json

import pytest
from conftest import MICRO

from memact.dcpo.config import load_config
from memact.dcpo.data import DataError, read_trajectories


def _sft_args(data, out, model, *extra):
    return ["sft", "--data", str(data), "--out", str(out), f"model.path={model}", "logging.progress=false",
            "run.threads=1", *extra]


def test_sft_loss_falls(micro_model_dir, scripted_jsonl, tmp_path):
    from memact.dcpo.cli_train import main

    out = tmp_path / "sft"
    rc = main(_sft_args(scripted_jsonl, out, micro_model_dir, "optim.lr=1e-2", "optim.warmup_steps=0",
                        "sft.epochs=8", "sft.segments_per_step=64", "sft.shuffle=false",
                        "batch.max_tokens_per_micro_batch=4096", "batch.max_seq_len=1024"))
    assert rc == 0
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses
    # The output is an HF model directory that the rollout CLI can load.
    from memact.models.model import load_policy

    model, tok = load_policy(out)
    assert model.config.hidden_size == MICRO["hidden_size"]
    assert not list(tmp_path.glob(".*partial"))


def test_max_minutes_stops_early_and_saves(micro_model_dir, scripted_jsonl, tmp_path, capsys):
    from memact.dcpo.cli_train import main

    out = tmp_path / "sft"
    rc = main(_sft_args(scripted_jsonl, out, micro_model_dir, "sft.epochs=3", "sft.segments_per_step=4",
                        "sft.max_minutes=1e-9"))
    assert rc == 0
    assert len(open(out / "metrics.jsonl").readlines()) == 1  # the time box is checked after each step
    assert "sft.max_minutes=1e-09 reached; stopping after step 1 of" in capsys.readouterr().out
    assert (out / "config.json").exists() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(SystemExit, match="sft.max_minutes"):
        main(_sft_args(scripted_jsonl, tmp_path / "bad", micro_model_dir, "sft.max_minutes=-1"))


def _write(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def test_malformed_line_is_named_and_nothing_written(micro_model_dir, scripted_jsonl, tmp_path):
    from memact.dcpo.cli_train import main

    good = scripted_jsonl.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    _write(bad, [good[0] + "\n", good[1] + "\n", '{"segments": [ oops\n'])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3: not valid JSON"):
        main(_sft_args(bad, out, micro_model_dir))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_overlong_segment_is_named_and_nothing_written(micro_model_dir, scripted_jsonl, tmp_path):
    from memact.dcpo.cli_train import main

    rows = [json.loads(line) for line in scripted_jsonl.read_text().splitlines()]
    limit = max(len(s["prompt_ids"]) + len(s["response_ids"]) for r in rows for s in r["segments"])
    k = len(rows[1]["segments"]) - 1
    seg = rows[1]["segments"][k]  # grow line 2's last segment past every other one
    extra = limit + 1 - len(seg["prompt_ids"]) - len(seg["response_ids"])
    seg["response_ids"] += [5] * extra
    seg["loss_mask"] += [1] * extra
    seg["logprobs"] += [0.0] * extra
    data = tmp_path / "long.jsonl"
    _write(data, rows)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"long\.jsonl:2 segment {k}: {limit + 1} tokens is longer than "
                                         rf"batch.max_seq_len={limit}"):
        main(_sft_args(data, out, micro_model_dir, f"batch.max_seq_len={limit}"))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl"]


def test_segment_fields_must_agree(tmp_path):
    data = tmp_path / "t.jsonl"
    _write(data, [{"segments": [{"prompt_ids": [1, 2], "response_ids": [3, 4], "loss_mask": [1],
                                 "logprobs": [0.0, 0.0]}]}])
    with pytest.raises(DataError, match="t.jsonl:1 segment 0: response_ids, loss_mask and logprobs"):
        read_trajectories(data, 100)


def test_existing_output_dir_is_refused(micro_model_dir, scripted_jsonl, tmp_path):
    from memact.dcpo.sft import sft

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = load_config(None, [f"model.path={micro_model_dir}", f"sft.data={scripted_jsonl}",
                             f"run.out_dir={out}"])
    with pytest.raises(FileExistsError, match="not empty"):
        sft(cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("beyond", [0, -1])
def test_out_of_vocabulary_id_is_named_and_nothing_written(micro_model_dir, scripted_jsonl, tmp_path, tokenizer,
                                                           beyond):
    """Issue 21, item 7: an id outside the model's vocabulary used to reach the embedding as a raw IndexError."""
    from memact.dcpo.cli_train import main

    rows = [json.loads(line) for line in scripted_jsonl.read_text().splitlines()]
    vocab = len(tokenizer)
    bad_id = vocab if beyond == 0 else -1
    rows[1]["segments"][0]["response_ids"][0] = bad_id
    data = tmp_path / "oov.jsonl"
    _write(data, rows)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"oov\.jsonl:2 segment 0: token id {bad_id} is outside the model's "
                                         rf"vocabulary \(0\.\.{vocab - 1}\)"):
        main(_sft_args(data, out, micro_model_dir))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["oov.jsonl"]
