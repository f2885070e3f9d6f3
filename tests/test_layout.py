"""The project's shape: the top level is the paper (at most ten files), the rest lives in three folders; imports go
one way; grpo.py, engine.py and model.py import nothing else of the project and work copied on their own; only the
stage scripts and machinery/setup.py read the command line; each public name imports from its home file; module
docstrings stay short and carry no dates."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("machinery", "tasks", "study")  # the run's machinery, the data's own code, the study's tooling
CORE = ("grpo", "engine", "model")  # the algorithm, the sampler, the network
STAGES = ("data_prep", "sft", "srl", "rlvr", "evaluate", "quickstart", "walkthrough")  # scripts with a command line


def product_files():
    """{module name: path} of the product code: the top level and the three folders."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    for folder in FOLDERS:
        files.update({f"{folder}.{path.stem}": path for path in (ROOT / folder).glob("*.py")
                      if path.stem != "__init__"})
    return files


def project_imports(path, modules):
    """The project modules a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in modules}


def test_the_top_level_is_the_paper_and_the_rest_lives_in_three_folders():
    top = sorted(path.name for path in ROOT.glob("*.py"))
    assert len(top) <= 10, top
    folders = [p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.py"))
               and p.name not in ("tests", "bench", "docs")]
    assert sorted(folders) == sorted(FOLDERS), folders


def test_imports_go_one_way_and_the_core_imports_only_itself():
    modules = product_files()
    graph = {name: project_imports(path, modules) - {name} for name, path in modules.items()}
    for name in CORE:
        assert graph[name] <= set(CORE), (name, graph[name])
    assert graph["engine"] == {"model"} and graph["model"] == set() and "srl" not in graph["grpo"]
    state = {}  # name -> "open" while its imports are being walked, "done" after

    def walk(name, path):
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [name]))
        if state.get(name) == "done":
            return
        state[name] = "open"
        for other in sorted(graph[name]):
            walk(other, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        walk(name, [])


def test_the_three_core_files_copied_alone_run_a_grpo_step(tmp_path):
    """grpo.py, engine.py and model.py in an empty folder, nothing else of the project on the path: a toy decoder
    samples a group, and one update_policy step changes its weights."""
    for name in CORE:
        shutil.copy(ROOT / f"{name}.py", tmp_path)
    script = """
import sys
sys.path = [p for p in sys.path if p != {root!r}]
import torch
import grpo, model
from grpo import GRPOConfig, Group, PromptStream, collect_groups, rollouts_of, update_policy
assert "machinery" not in sys.modules and all(m.__file__.startswith({here!r}) for m in (grpo, model))
torch.manual_seed(0)
net = model.Decoder(model.ModelConfig.from_hf(dict(model_type="llama", vocab_size=50, hidden_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, eos_token_id=1)))
cfg = GRPOConfig(batch_prompts=2, group_size=4, max_new_tokens=6, max_draws=1, std_threshold=-1.0)
import engine
completions = engine.generate(net, [[2, 3, 4], [5, 6]], 6, num_samples=4, seed=0)
groups = [Group(prompt, completions[4 * i:4 * i + 4], torch.tensor([0.0, 1.0, 0.5, 0.2]))
          for i, prompt in enumerate([[2, 3, 4], [5, 6]])]
rollouts, _ = rollouts_of(groups)
before = [p.detach().clone() for p in net.parameters()]
stats = update_policy(net, torch.optim.AdamW(net.parameters(), lr=1e-2), rollouts, cfg)
assert stats["skipped"] == 0 and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
print("ok", round(stats["loss"], 6))
""".format(root=str(ROOT), here=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_importing_srl_loads_no_grader_sympy_or_agent_readers():
    done = subprocess.run([sys.executable, "-c", "import srl, sys; print(sorted(m for m in ('sympy', 'tasks.grader', "
                           "'tasks.trajectories', 'data_prep') if m in sys.modules))"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_only_the_stage_scripts_and_the_setup_read_the_command_line():
    """No function below the stage scripts and machinery/setup.py takes `args` or reads from it, and none of them
    ends the program (SystemExit, sys.exit, parser.exit)."""
    readers = set(STAGES) | {"machinery.setup", "study.plot", "study.gsm8k"}  # (commands of their own too)
    for name, path in product_files().items():
        if name in readers:
            continue
        text = path.read_text()
        assert not re.search(r"\bargs\.[a-z]|def \w+\([^)]*(?<!\*)\bargs\b", text), name
        assert not re.search(r"SystemExit|sys\.exit|\.exit\(", text), name


def test_module_docstrings_are_short_and_carry_no_dates():
    for name, path in product_files().items():
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert len(docstring.splitlines()) <= 30, (name, len(docstring.splitlines()))
        assert not re.search(r"20\d\d-\d\d-\d\d", text), name


def test_public_names_import_from_their_homes():
    from data_prep import split_steps  # noqa: F401
    from engine import generate  # noqa: F401
    from evaluate import pass_at_k  # noqa: F401
    from grpo import group_advantages, grpo_loss, keep_group  # noqa: F401
    from model import load_model, save_model  # noqa: F401
    from rlvr import math_reward  # noqa: F401
    from srl import srl_reward, step_similarity  # noqa: F401
    from tasks.grader import extract_answer, is_equiv  # noqa: F401
    homes = {split_steps: "data_prep", generate: "engine", pass_at_k: "evaluate", grpo_loss: "grpo",
             group_advantages: "grpo", keep_group: "grpo", load_model: "model", save_model: "model",
             math_reward: "rlvr", srl_reward: "srl", step_similarity: "srl", extract_answer: "tasks.grader",
             is_equiv: "tasks.grader"}
    assert all(function.__module__ == home for function, home in homes.items())
    import model
    import srl
    assert not hasattr(model, "generate") and not hasattr(srl, "grpo_loss")  # no re-exports
