"""quickstart.py: the stages chain (each reads what the previous one wrote), with the smallest step counts.

Runs the real command lines one after another (about a minute on a laptop CPU); deselect with -m "not slow"."""
import json

import pytest
import torch
from safetensors.torch import load_file

import quickstart
from model import load_model


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sparkline():
    assert quickstart.sparkline([0.0, 0.5, 1.0]) == "▁▄█"
    assert quickstart.sparkline([-1.0, -1.0]) == "▁▁"


@pytest.mark.slow
def test_stages_chain(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # the text sparkline, whatever is installed
    work = tmp_path / "qs"
    quickstart.main(["--workdir", str(work), "--sft-steps", "1", "--sft-check-samples", "1", "--srl-steps", "2",
                     "--rlvr-steps", "1", "--rollouts", "2", "--max-new-tokens", "8", "--eval-limit", "1"])
    printed = capsys.readouterr().out

    # data_prep -> sft: sft trained one step on the SRL-format file and checked the format on srl_val.jsonl
    for name in ("sft_srl_train", "srl_train", "srl_val", "rlvr_train", "rlvr_val"):
        assert (work / "data" / f"{name}.jsonl").stat().st_size > 0
    sft_metrics = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in sft_metrics] == [1]
    assert json.loads((work / "sft" / "format_check.json").read_text())["samples"] > 0
    # sft -> srl: SRL started from sft/last. Eight new tokens cannot hold "<think>\n" and "</think>", so every
    # rollout scores -1, no group is kept, no update happens, and SRL's best checkpoint is exactly SFT's weights.
    srl_metrics = [json.loads(line) for line in (work / "srl" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in srl_metrics] == [1, 2]
    assert all(m["kept_groups"] == 0 and m["format_failure_rate"] == 1.0 for m in srl_metrics)
    assert same_weights(weights(work / "srl" / "best"), weights(work / "sft" / "last"))
    untrained = load_model("tiny")[0].state_dict()
    untrained.pop("lm_head.weight")  # tied to the embedding, stored once
    assert not same_weights(weights(work / "sft" / "last"), untrained)  # and SFT did train
    # srl -> rlvr: the same argument with the answer reward (eight tokens hold no "\boxed{...}": reward 0)
    rlvr_metrics = [json.loads(line) for line in (work / "rlvr" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["kept_groups"] == 0 for m in rlvr_metrics)
    assert same_weights(weights(work / "rlvr" / "best"), weights(work / "srl" / "best"))
    # rlvr -> evaluate: the evaluation read rlvr/best and the held-out RLVR problems
    summary = json.loads((work / "eval" / "summary.json").read_text().splitlines()[0])
    assert summary["model"] == str(work / "rlvr" / "best")
    assert list(summary["results"]) == ["rlvr_val"] and summary["results"]["rlvr_val"]["problems"] == 1
    # and the ending: the reward curve as a sparkline, the table, the stage times
    assert "SRL reward curve" in printed and "| tiny: sft -> srl -> rlvr |" in printed
    assert "Time per stage: data_prep" in printed
