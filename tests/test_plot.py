"""plot.py: the picture of any run folder (a PNG with matplotlib, lines of text without it)."""
import json
import sys

import pytest

from study import plot


def run_folder(path, steps=12, rl=True):
    path.mkdir(parents=True)
    records = [dict(step=s, reward_mean=-1 + s / steps, kept_group_rate=0.5, response_length=40 + s, entropy=1.0,
                    skipped_steps=0, **({"val_score": 0.1 * s / steps} if s % 4 == 0 else {})) if rl else
               dict(step=s, loss=5 / s, lr=1e-3, grad_norm=1.0) for s in range(1, steps + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 13, "rew')
    return path


def test_a_picture_of_one_run_and_of_two_side_by_side(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: pip install matplotlib")
    srl, rlvr = run_folder(tmp_path / "srl"), run_folder(tmp_path / "rlvr")
    plot.main([str(srl)])
    assert (srl / "metrics.png").stat().st_size > 10_000
    plot.main([str(srl), str(rlvr), "--out", str(tmp_path / "both.png")])
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.main([str(run_folder(tmp_path / "sft", rl=False))])
    assert (tmp_path / "sft" / "metrics.png").stat().st_size > 10_000


def test_without_matplotlib_the_curves_are_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    plot.main([str(run_folder(tmp_path / "srl"))])
    out = capsys.readouterr().out
    assert "mean reward, srl: ▁" in out and "-> 0" in out and "pip install matplotlib" in out
    assert not (tmp_path / "srl" / "metrics.png").exists()


def test_a_folder_without_metrics_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path)])
    assert stop.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


def test_smooth_is_a_centred_moving_average():
    assert plot.smooth([0, 3, 6, 9], 3) == [1.5, 3, 6, 7.5]
    assert plot.smooth([1, 2], 1) == [1, 2]
