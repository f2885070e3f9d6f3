"""Bad input, one mistake at a time, on every command line: each is refused at once (exit status 2, one line in
argparse's style naming the flag, field or file, no traceback), before any process group forms or any model loads,
and every file already there is left byte for byte as it was. The stages run in-process; anything that gets past
their checks raises PastTheChecks instead of loading a model."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_prep
import evaluate
import model as M
import rlvr
import sft
import srl
from machinery import checkpoints, setup

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"data_prep": data_prep.main, "sft": sft.main, "srl": srl.main, "rlvr": rlvr.main, "evaluate": evaluate.main}
SFT_STATE = dict(args={}, optimizer={}, rng={}, step=2, epoch=0, batch_in_epoch=2, skipped_steps=0)
SRL_STATE = dict(args={}, optimizer={}, rng={}, step=2, position=8, best=0.5, skipped=0)


def small_checkpoint(folder, state=None):
    """A checkpoint as save_model writes it, of a decoder far smaller than tiny (the files stay a few KB)."""
    _, tokenizer = M.build_tiny()
    cfg = M.ModelConfig.from_hf(dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=8,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=16, tie_word_embeddings=True, eos_token_id=256))
    checkpoints.write_checkpoint(M.Decoder(cfg), tokenizer, folder, training_state=state)


def finished_run(folder, state):
    small_checkpoint(folder / "last", state)
    shutil.copytree(folder / "last", folder / "best")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1}) + "\n" for i in range(2)))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project folder: data/ from data_prep.py, finished runs of each stage, damaged checkpoints, results."""
    root = tmp_path_factory.mktemp("template")
    data_prep.main(["--out-dir", str(root / "data")])
    data = root / "data"
    line = lambda record: json.dumps(record) + "\n"
    srl_record = json.loads((data / "srl_train.jsonl").read_text().splitlines()[0])
    (data / "srl_no_target.jsonl").write_text(line(srl_record) + line({k: v for k, v in srl_record.items()
                                                                         if k != "target_step"}))
    (data / "srl_bad_steps.jsonl").write_text(line(dict(srl_record, previous_steps="1. a string")))
    (data / "rlvr_no_answer.jsonl").write_text(line({"id": "a", "problem": "1+1?", "answer": "2"})
                                               + line({"id": "b", "problem": "2+2?"}))
    (data / "not_json.jsonl").write_text(line({"id": "a", "problem": "1+1?", "answer": "2"}) + "{oops\n")
    (data / "a_list.jsonl").write_text("[1, 2]\n")
    (data / "empty.jsonl").write_text("\n")
    (data / "binary.jsonl").write_bytes(bytes(range(256)))
    (data / "no_problem.jsonl").write_text(line({"question_text": "1+1?", "answer": "2"}))
    (data / "s1k_like.jsonl").write_text(line({"question": "q", "deepseek_attempt": "1. a\n2. b"})
                                         + line({"question": "q2"}))
    runs = root / "runs"  # finished runs beside the stages' default --out folders (runs/sft, runs/srl, ...)
    finished_run(runs / "sft_done", SFT_STATE)
    finished_run(runs / "srl_done", SRL_STATE)
    finished_run(runs / "rlvr_done", SRL_STATE)
    for name in ("bad_state", "bad_weights", "no_config", "no_tokenizer", "no_weights"):
        finished_run(runs / name, SRL_STATE)
    truncate(runs / "bad_state" / "last" / "training_state.pt")
    truncate(runs / "bad_weights" / "last" / "model.safetensors")
    for name, file in (("no_config", "config.json"), ("no_tokenizer", "tokenizer.json"),
                       ("no_tokenizer", "tokenizer_config.json"), ("no_weights", "model.safetensors")):
        (runs / name / "last" / file).unlink()
    (runs / "eval_done").mkdir()
    (runs / "eval_done" / "builtin.jsonl").write_text(line({"id": "b0", "correct": [True]}))
    (runs / "eval_done" / "summary.json").write_text(line({"model": "tiny"}))
    models = root / "models"
    small_checkpoint(models / "gpt2")
    config = json.loads((models / "gpt2" / "config.json").read_text())
    (models / "gpt2" / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    shutil.copytree(models / "gpt2", models / "not_json")
    (models / "not_json" / "config.json").write_text("{oops")
    (models / "empty").mkdir()
    (root / "a_file").write_text("not a folder\n")
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch):
    """A fresh copy of the template as the working directory, offline, with an empty hub cache."""
    from huggingface_hub import constants
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return root


@pytest.fixture
def checked(project, monkeypatch):
    """The project, where a stage that gets past its checks stops (PastTheChecks) before any process group forms
    or any model loads."""
    def past_the_checks(*args, **kwargs):
        raise PastTheChecks

    for module in (setup, sft, evaluate):  # srl.py and rlvr.py start torchrun in setup.start_rl_run
        monkeypatch.setattr(module, "init_distributed", past_the_checks)
    for module in (M, setup, evaluate):
        monkeypatch.setattr(module, "load_model", past_the_checks)
    return project


class PastTheChecks(Exception):
    pass


def tree(root):
    """Every file and folder under root, with the SHA-256 of each file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(Path(root).rglob("*"))}


# (stage, command line, what the one-line message must name). Each line holds one mistake; everything else is valid
# in the project folder (data/ from data_prep.py, so each stage's default --data exists).
CASES = [
    # data_prep.py
    ("data_prep", "--synthetic 0", ["--synthetic 0"]),
    ("data_prep", "--synthetic 5 --synthetic-steps 3-1", ["--synthetic-steps 3-1"]),
    ("data_prep", "--synthetic 5 --synthetic-max-value 4", ["--synthetic-max-value"]),
    ("data_prep", "--synthetic 5 --synthetic-steps 30", ["--synthetic-max-value", "2 x the steps"]),
    ("data_prep", "--synthetic 5 --synthetic-slip 1.5", ["--synthetic-slip"]),
    ("data_prep", "--context-pairs -1", ["--context-pairs"]),
    ("data_prep", "--max-observation-chars 10", ["--max-observation-chars"]),
    ("data_prep", "--val-problems -1", ["--val-problems"]),
    ("data_prep", "--val-problems 500", ["--val-problems 500"]),
    ("data_prep", "--input data/missing.jsonl", ["data/missing.jsonl"]),
    ("data_prep", "--input data/not_json.jsonl", ["data/not_json.jsonl:2"]),
    ("data_prep", "--input data/binary.jsonl", ["data/binary.jsonl", "UTF-8"]),
    ("data_prep", "--input data/s1k_like.jsonl", ["data/s1k_like.jsonl:2", "deepseek_attempt"]),
    ("data_prep", "--out-dir a_file", ["--out-dir", "a_file"]),
    ("data_prep", "--hf-file train.parquet", ["--hf-file"]),
    # sft.py: flags
    ("sft", "--lr -1", ["--lr -1"]),
    ("sft", "--lr nan", ["--lr nan"]),
    ("sft", "--max-steps -3", ["--max-steps -3"]),
    ("sft", "--max-steps 0", ["--max-steps 0"]),
    ("sft", "--epochs 0", ["--epochs 0"]),
    ("sft", "--batch-size 0", ["--batch-size 0"]),
    ("sft", "--warmup-ratio 1.5", ["--warmup-ratio 1.5"]),
    ("sft", "--max-length 0", ["--max-length 0"]),
    ("sft", "--micro-batch-tokens 0", ["--micro-batch-tokens 0"]),
    ("sft", "--save-every 0", ["--save-every 0"]),
    ("sft", "--check-samples -1", ["--check-samples -1"]),
    ("sft", "--device cuda:99", ["--device cuda:99"]),
    pytest.param("srl", "--device cuda", ["--device cuda", "--device cpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    ("sft", "--device gpu", ["--device gpu"]),
    # sft.py: data
    ("sft", "--data data/missing.jsonl", ["data/missing.jsonl", "data_prep.py"]),
    ("sft", "--data data", ["--data data", "folder"]),
    ("sft", "--data data/empty.jsonl", ["data/empty.jsonl", "no records"]),
    ("sft", "--data data/not_json.jsonl", ["data/not_json.jsonl:2", "JSON"]),
    ("sft", "--data data/a_list.jsonl", ["data/a_list.jsonl:1", "object"]),
    ("sft", "--data data/binary.jsonl", ["data/binary.jsonl", "text"]),
    ("sft", "--data data/rlvr_no_answer.jsonl", ["data/rlvr_no_answer.jsonl:1", "'solution'", "problem"]),
    ("sft", "--data data/srl_train.jsonl", ["data/srl_train.jsonl:1", "'solution'", "target_step"]),
    ("sft", "--data data/sft_train.jsonl --target reasoning", ["data/sft_train.jsonl:1", "'reasoning'"]),
    ("sft", "--val-data data/missing_val.jsonl", ["--val-data", "data/missing_val.jsonl"]),
    ("sft", "--val-data data/srl_no_target.jsonl", ["data/srl_no_target.jsonl:2", "'target_step'", "problem"]),
    # sft.py: model and run folder
    ("sft", "--model qwen-2b", ["qwen-2b", "alias"]),
    ("sft", "--model models/empty", ["models/empty", "config.json"]),
    ("sft", "--model models/gpt2", ["models/gpt2/config.json", "gpt2"]),
    ("sft", "--model models/not_json", ["models/not_json/config.json", "JSON"]),
    ("sft", "--model a_file", ["a_file", "a file"]),
    ("sft", "--model qwen-1.5b", ["qwen-1.5b", "hub cache", "Offline"]),
    ("sft", "--model someone/some-model", ["someone/some-model", "hub cache", "hf download"]),
    ("sft", "--model runs/bad_weights/last", ["runs/bad_weights/last/model.safetensors", "truncated"]),
    ("sft", "--out runs/sft_done", ["--out runs/sft_done", "--resume", "--overwrite"]),
    ("sft", "--out a_file", ["--out a_file", "is a file"]),
    ("sft", "--out a_file/run", ["--out a_file/run", "a_file is a file"]),
    ("sft", "--out runs/sft_done --resume --overwrite", ["--resume", "--overwrite"]),
    ("sft", "--out runs/fresh --resume", ["--resume", "runs/fresh/last/training_state.pt"]),
    ("sft", "--out runs/bad_state --resume", ["runs/bad_state/last/training_state.pt", "cannot be read"]),
    ("sft", "--out runs/srl_done --resume", ["runs/srl_done/last/training_state.pt", "epoch"]),
    # srl.py: flags
    ("srl", "--group-size 1", ["--group-size 1", "at least 2"]),
    ("srl", "--temperature 0", ["--temperature 0", "above 0"]),
    ("srl", "--temperature -1", ["--temperature -1"]),
    ("srl", "--max-steps -3", ["--max-steps -3"]),
    ("srl", "--batch-prompts 0", ["--batch-prompts 0"]),
    ("srl", "--max-new-tokens 0", ["--max-new-tokens 0"]),
    ("srl", "--max-draws 0", ["--max-draws 0"]),
    ("srl", "--sample-batch 0", ["--sample-batch 0"]),
    ("srl", "--epochs 0", ["--epochs 0"]),
    ("srl", "--lr=-1e-6", ["--lr -1e-06"]),
    ("srl", "--lr inf", ["--lr inf"]),
    ("srl", "--clip-low 1.5", ["--clip-low 1.5"]),
    ("srl", "--beta -0.1", ["--beta -0.1"]),
    ("srl", "--std-threshold nan", ["--std-threshold nan"]),
    ("srl", "--updates-per-batch 0", ["--updates-per-batch 0"]),
    ("srl", "--eval-every -1", ["--eval-every -1"]),
    ("srl", "--max-prompt-tokens 0", ["--max-prompt-tokens 0"]),
    ("srl", "--fsdp", ["--fsdp", "torchrun"]),
    ("srl", "--lora-rank -1", ["--lora-rank -1"]),
    ("srl", "--lora-rank 4 --lora-alpha 0", ["--lora-alpha 0"]),
    ("srl", "--gpu-memory 0", ["--gpu-memory 0"]),
    ("sft", "--lora-rank -2", ["--lora-rank -2"]),
    ("sft", "--gpu-memory -8", ["--gpu-memory -8"]),
    ("srl", "--device cuda:99", ["--device cuda:99"]),
    # srl.py: data, model, run folder
    ("srl", "--data data/srl_no_target.jsonl", ["data/srl_no_target.jsonl:2", "'target_step'", "previous_steps"]),
    ("srl", "--data data/srl_bad_steps.jsonl", ["data/srl_bad_steps.jsonl:1", "'previous_steps'", "list"]),
    ("srl", "--data data/empty.jsonl", ["data/empty.jsonl", "no examples"]),
    ("srl", "--data data/missing_train.jsonl", ["data/missing_train.jsonl", "data_prep.py"]),
    ("srl", "--val-data data/missing_val.jsonl", ["--val-data", "data/missing_val.jsonl"]),
    ("srl", "--val-data data/srl_no_target.jsonl", ["data/srl_no_target.jsonl:2", "'target_step'"]),
    ("srl", "--model runs/no_config/last", ["runs/no_config/last", "config.json"]),
    ("srl", "--model qwen-7b", ["qwen-7b", "hub cache"]),
    ("srl", "--out runs/srl_done", ["--out runs/srl_done", "--resume", "--overwrite"]),
    ("srl", "--out runs/fresh --resume", ["runs/fresh/last/training_state.pt"]),
    ("srl", "--out runs/bad_state --resume", ["runs/bad_state/last/training_state.pt", "cannot be read"]),
    ("srl", "--out runs/bad_weights --resume", ["runs/bad_weights/last/model.safetensors", "truncated"]),
    ("srl", "--out runs/no_weights --resume", ["runs/no_weights/last/model.safetensors", "missing"]),
    ("srl", "--out runs/no_tokenizer --resume", ["runs/no_tokenizer/last", "tokenizer"]),
    ("srl", "--out runs/no_config --resume", ["runs/no_config/last", "config.json"]),
    ("srl", "--out runs/sft_done --resume", ["runs/sft_done/last/training_state.pt", "position"]),
    ("srl", "--out runs/srl_done --resume --lora-rank 4", ["runs/srl_done/last/adapter", "no LoRA adapters"]),
    # rlvr.py
    ("rlvr", "--lr -1", ["--lr -1"]),
    ("rlvr", "--group-size 1", ["--group-size 1"]),
    ("rlvr", "--temperature 0", ["--temperature 0"]),
    ("rlvr", "--data data/rlvr_no_answer.jsonl", ["data/rlvr_no_answer.jsonl:2", "'answer'", "id, problem"]),
    ("rlvr", "--data data/srl_no_target.jsonl --val-data data/rlvr_no_answer.jsonl",
     ["data/rlvr_no_answer.jsonl:2", "'answer'"]),
    ("rlvr", "--data data/not_json.jsonl", ["data/not_json.jsonl:2"]),
    ("rlvr", "--out runs/rlvr_done", ["--out runs/rlvr_done", "--resume"]),
    ("rlvr", "--out runs/bad_weights --resume", ["runs/bad_weights/last/model.safetensors"]),
    ("rlvr", "--model Qwen/Qwen2.5-Math-1.5B", ["Qwen/Qwen2.5-Math-1.5B", "hub cache"]),
    # evaluate.py
    ("evaluate", "--samples -1", ["--samples -1"]),
    ("evaluate", "--max-new-tokens 0", ["--max-new-tokens 0"]),
    ("evaluate", "--limit 0", ["--limit 0"]),
    ("evaluate", "--batch-size 0", ["--batch-size 0"]),
    ("evaluate", "--device cuda:99", ["--device cuda:99"]),
    ("evaluate", "--benchmarks amc", ["amc", "aime24"]),
    ("evaluate", "--benchmarks aime24 --data-dir data", ["data/aime24.jsonl", "not found"]),
    ("evaluate", "--benchmarks data/no_problem.jsonl", ["data/no_problem.jsonl:1", "'problem'"]),
    ("evaluate", "--benchmarks data/rlvr_no_answer.jsonl", ["data/rlvr_no_answer.jsonl:2", "'answer'"]),
    ("evaluate", "--benchmarks data/not_json.jsonl", ["data/not_json.jsonl:2", "JSON"]),
    ("evaluate", "--benchmarks data/a_list.jsonl", ["data/a_list.jsonl:1", "object"]),
    ("evaluate", "--benchmarks data/binary.jsonl", ["data/binary.jsonl", "text"]),
    ("evaluate", "--benchmarks data/empty.jsonl", ["data/empty.jsonl", "no problems"]),
    ("evaluate", "--benchmarks data/rlvr_train.jsonl,runs/rlvr_train.jsonl", ["rlvr_train"]),
    ("evaluate", "--out runs/eval_done", ["--out runs/eval_done", "--overwrite"]),
    ("evaluate", "--out a_file", ["--out a_file"]),
    ("evaluate", "--out a_file/eval", ["--out a_file/eval", "a_file is a file"]),
    ("srl", "--model runs/srl_typo", ["runs/srl_typo", "no such folder", "hub cache"]),
    ("evaluate", "--model nope", ["nope"]),
    ("evaluate", "--model runs/bad_weights/last", ["runs/bad_weights/last/model.safetensors"]),
    ("evaluate", "--model qwen-1.5b", ["qwen-1.5b", "hub cache"]),
]


@pytest.mark.parametrize("stage, argv, names", CASES)
def test_bad_input_is_refused_in_one_line_and_nothing_changes(checked, capsys, stage, argv, names):
    before = tree(checked)
    with pytest.raises(SystemExit) as refused:
        MAINS[stage](argv.split())
    err = capsys.readouterr().err
    assert refused.value.code == 2, err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()  # one line, argparse's style
    assert line.startswith(f"{Path(sys.argv[0]).name}: error: ")
    for name in names:
        assert name in line, (name, line)
    assert tree(checked) == before  # not a file written, changed or removed; no folder made


@pytest.mark.parametrize("stage, argv", [
    ("sft", ""), ("sft", "--out runs/sft_done --resume"), ("sft", "--out runs/sft_done --overwrite"),
    ("sft", "--data data/sft_train.jsonl --model runs/srl_done"),
    ("srl", ""), ("srl", "--out runs/srl_done --resume"), ("srl", "--out runs/srl_done --overwrite --model tiny"),
    ("rlvr", "--group-size 2 --temperature 0.7 --lr 1e-5"), ("rlvr", "--out runs/rlvr_done --resume"),
    ("evaluate", "--samples 4 --limit 2"), ("evaluate", "--out runs/eval_done --overwrite --model runs/sft_done"),
])
def test_good_input_passes_the_checks_and_changes_nothing_before_the_model_loads(checked, capsys, stage, argv):
    """The same project folder with valid command lines (--resume and --overwrite included): the checks let them
    through, and an --overwrite has removed nothing by the time the model would load."""
    before = tree(checked)
    with pytest.raises(PastTheChecks):
        MAINS[stage](argv.split())
    assert ": error: " not in capsys.readouterr().err
    assert tree(checked) == before


def test_overwrite_starts_again_and_removes_only_the_old_run(project):
    """--overwrite on a finished run: the new run's metrics replace the old ones, best/ and last/ are the new run's,
    and a file of the user's own in the folder stays."""
    run = project / "runs" / "srl_done"
    (run / "notes.txt").write_text("mine\n")
    old_weights = (run / "last" / "model.safetensors").read_bytes()
    srl.main(["--model", "tiny", "--out", str(run), "--overwrite", "--max-steps", "1", "--batch-prompts", "1",
              "--group-size", "2", "--max-new-tokens", "4", "--val-limit", "1", "--device", "cpu"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "reward_mean" in json.loads((run / "metrics.jsonl").read_text())
    assert (run / "last" / "model.safetensors").read_bytes() != old_weights
    assert checkpoints.load_training_state(run / "last")["step"] == 1 and (run / "best" / "config.json").is_file()
    assert (run / "notes.txt").read_text() == "mine\n"


def test_a_hub_model_in_the_cache_is_checked_offline(checked, tmp_path, capsys):
    """A hub id whose copy is in the hub cache passes the checks without the network; the same copy with truncated
    weights is refused, naming the file in the cache."""
    snapshot = tmp_path / "hub" / "models--someone--small" / "snapshots" / ("a" * 40)
    small_checkpoint(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    with pytest.raises(PastTheChecks):
        sft.main(["--model", "someone/small"])
    truncate(snapshot / "model.safetensors")
    with pytest.raises(SystemExit):
        sft.main(["--model", "someone/small"])
    assert f"{snapshot / 'model.safetensors'}: cannot be read" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("script, argv, name", [
    ("data_prep.py", ["--synthetic", "-1"], "--synthetic"), ("sft.py", ["--lr", "-1"], "--lr"),
    ("srl.py", ["--group-size", "1"], "--group-size"), ("rlvr.py", ["--temperature", "0"], "--temperature"),
    ("evaluate.py", ["--samples", "-1"], "--samples")])
def test_command_lines_refuse_in_one_line_without_a_traceback(template, tmp_path, script, argv, name):
    """As a user sees it: the script run from a shell prints one line and exits with status 2."""
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=template, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"{script}: error: {name}")


@pytest.mark.slow
def test_a_user_error_under_torchrun_ends_every_process(template):
    """Two processes meet the same bad flag before any process group forms: both end at once (no rank waits for
    the other), and the error is printed once."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "srl.py"), "--group-size", "1", "--out", "runs/fresh", "--device", "cpu"],
                            cwd=template, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("srl.py: error: --group-size 1") == 1
