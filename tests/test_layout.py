"""The project's shape: no file imports a file that imports it (directly or through others, imports inside
functions included), and the public names of DESIGN.md's table import from the files it names, each re-export
being the one function, not a copy."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def project_imports(path):
    """The project modules a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES) - {path.stem}


def test_no_file_imports_a_file_that_imports_it():
    graph = {name: project_imports(path) for name, path in MODULES.items()}
    assert graph["engine"] == set() and "engine" in graph["model"]  # the direction the docstrings state
    assert "srl" not in graph["grpo"] and "grpo" in graph["srl"]
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


def test_public_names_import_from_the_files_design_names():
    import data_prep
    import engine
    import evaluate
    import grader
    import grpo
    import model
    import rlvr
    import srl
    from data_prep import split_steps  # noqa: F401
    from evaluate import extract_answer, is_equiv, pass_at_k  # noqa: F401
    from model import generate, load_model, save_model  # noqa: F401
    from rlvr import math_reward  # noqa: F401
    from srl import grpo_loss, srl_reward, step_similarity  # noqa: F401
    assert model.generate is engine.generate and model.completion_logprobs is engine.completion_logprobs
    assert srl.grpo_loss is grpo.grpo_loss and srl.group_advantages is grpo.group_advantages
    assert srl.keep_group is grpo.keep_group and srl.collect_groups is grpo.collect_groups
    assert evaluate.is_equiv is grader.is_equiv and evaluate.extract_answer is grader.extract_answer
    assert rlvr.train is srl.train and data_prep.split_steps.__module__ == "data_prep"
