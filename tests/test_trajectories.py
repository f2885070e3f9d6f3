"""trajectories.py, its hook in data_prep.py and the agent prompt in srl.py: published agent trajectories -> one
SRL example per command, with the issue and the last two action/observation pairs as context."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import data_prep
import engine as E
import model as M
import srl
from tasks import trajectories as T

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1000  # observation limit used on the shared samples: small enough that some observations get cut


def run(script, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def long_lines(text, at_least=20):
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= at_least]


# ----------------------------------------------------------------------------------------------------
# The shared samples: real trajectories from SWE-agent and mini-swe-agent, nobody here wrote them

def samples(shared_data):
    return shared_data / "trajectories" / "swe_samples"


def expected_steps(path):
    """(format, actions, observations, system prompt) of a shared sample, read by this test's own means: the
    commands the file records for each step, and the environment's answers between the agent's turns."""
    raw = json.loads(path.read_text())
    if isinstance(raw, list):  # mini-swe-agent's bare message list: the one ```mswea_bash_command block
        messages, fmt = raw, "mini-swe-agent"
        actions = [m["content"].split("```mswea_bash_command\n")[1].split("\n```")[0]
                   for m in messages if m["role"] == "assistant"]
    elif "history" in raw:  # SWE-agent: its "trajectory" list records each step's action separately
        messages, fmt = [m for m in raw["history"] if not m.get("is_demo")], "swe-agent"
        actions = [step["action"].strip() for step in raw["trajectory"]]
    else:  # mini-swe-agent v2: extra.actions records the command of each tool call
        messages, fmt = raw["messages"], "mini-swe-agent"
        actions = ["\n\n".join(a["command"] for a in m["extra"]["actions"])
                   for m in messages if m["role"] == "assistant"]
        assert len(actions) == raw["info"]["model_stats"]["api_calls"]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"] + [len(messages)]
    observations = ["\n\n".join(m["content"] for m in messages[a + 1:b] if m["role"] in ("user", "tool"))
                    for a, b in zip(turns, turns[1:])]
    return fmt, actions, observations, messages[0]["content"]


SAMPLE_COUNTS = {  # the number of actions of each file, as the samples' README lists them
    "sweagent_pydicom-1458.traj": 12, "sweagent_fc_marshmallow-1867.traj": 11,
    "minisweagent_github_issue.traj.json": 10, "minisweagent_v2_toolcall_sqlfluff-2419.traj.json": 48}


@pytest.mark.parametrize("name", sorted(SAMPLE_COUNTS))
def test_shared_samples_one_example_per_recorded_action(shared_data, name):
    path = samples(shared_data) / name
    fmt, actions, observations, system_prompt = expected_steps(path)
    [trajectory] = T.load_trajectories(path)
    assert trajectory["format"] == fmt and len(actions) == SAMPLE_COUNTS[name]
    examples = T.agent_examples(trajectory, context_pairs=2, max_observation_chars=LIMIT)
    assert [e["target_step"] for e in examples] == [a.strip() for a in actions]
    assert [e["step_index"] for e in examples] == list(range(1, len(actions) + 1))
    for k, example in enumerate(examples):
        # the thought is recorded beside the target and none of it is in the target
        assert not any(line in example["target_step"] for line in long_lines(example["thought"]))
        # the context: the issue and the last two (action, observation) pairs, each observation cut to LIMIT
        previous = list(zip(actions, observations))[max(0, k - 2):k]
        assert [p["action"] for p in example["previous_pairs"]] == [a.strip() for a, _ in previous]
        for pair, (_, observation) in zip(example["previous_pairs"], previous):
            shown = pair["observation"]
            assert len(shown) <= LIMIT
            if len(observation) <= LIMIT:
                assert shown == observation
            else:  # head and tail kept, and the marker says how much is missing
                head, rest = shown.split("\n[... ", 1)
                count, tail = rest.split(" characters cut ...]\n", 1)
                assert observation.startswith(head) and observation.endswith(tail)
                assert int(count.replace(",", "")) == len(observation) - len(head) - len(tail)
        # the framework's system prompt never enters the issue, nor does anything but the issue's own text
        assert long_lines(system_prompt)[0] not in example["issue"]
        for framework_text in ("INSTRUCTIONS:", "demonstration", "<pr_description>", "Recommended Workflow"):
            assert framework_text not in example["issue"]


def test_shared_samples_issue_is_the_task_statement(shared_data):
    folder = samples(shared_data)
    [marshmallow] = T.load_trajectories(folder / "sweagent_fc_marshmallow-1867.traj")
    raw = json.loads((folder / "sweagent_fc_marshmallow-1867.traj").read_text())
    assert marshmallow["issue"] == raw["replay_config"]["problem_statement"]["text"].strip()  # recorded apart
    assert marshmallow["instance_id"] == "marshmallow-code__marshmallow-1867"  # the record's own id
    starts = {"sweagent_pydicom-1458.traj": "Pixel Representation attribute should be optional",
              "minisweagent_github_issue.traj.json": "GitHub Issue: SyntaxError: invalid syntax",
              "minisweagent_v2_toolcall_sqlfluff-2419.traj.json": "Rule L060 could give a specific error message"}
    for name, start in starts.items():
        [trajectory] = T.load_trajectories(folder / name)
        assert trajectory["issue"].startswith(start)
    [sqlfluff] = T.load_trajectories(folder / "minisweagent_v2_toolcall_sqlfluff-2419.traj.json")
    assert sqlfluff["instance_id"] == "sqlfluff__sqlfluff-2419" and sqlfluff["issue"].endswith("@jpy-git ?")


def test_shared_samples_through_data_prep_and_the_srl_prompt(shared_data, tmp_path, capsys):
    out = tmp_path / "swe"
    data_prep.main(["--input", str(samples(shared_data)), "--out-dir", str(out), "--max-observation-chars",
                    str(LIMIT)])
    printed = capsys.readouterr().out
    assert "read 4 agent trajectories" in printed and "mini-swe-agent 2, swe-agent 2" in printed
    train, val = read_jsonl(out / "srl_train.jsonl"), read_jsonl(out / "srl_val.jsonl")
    assert len(train) + len(val) == sum(SAMPLE_COUNTS.values())
    assert len({e["instance_id"] for e in val}) == 1 and not {e["instance_id"] for e in val} & {
        e["instance_id"] for e in train}
    sft_srl = read_jsonl(out / "sft_srl_train.jsonl")
    assert all(s["completion"].endswith("\n</think>\n" + s["target_step"]) for s in sft_srl)
    raw_system_prompts = [expected_steps(p)[3] for p in sorted(samples(shared_data).glob("*.traj*"))]
    for example in train + val:
        messages = srl.srl_messages(example)
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == srl.AGENT_SYSTEM_PROMPT and "next command" in messages[0]["content"]
        user = messages[1]["content"]
        assert user.startswith("Issue:\n" + example["issue"] + "\n\n")
        for system_prompt in raw_system_prompts:
            assert long_lines(system_prompt)[0] not in user
        assert all(p["action"] in user and p["observation"] in user for p in example["previous_pairs"])


# ----------------------------------------------------------------------------------------------------
# Hand-written trajectories for the formats without a shared sample (written here, in each format's shape)

TOOL_CALLS = {"instance_id": "demo__calc-7", "run_id": "run-1", "messages": [
    {"role": "system", "content": "You are a careful coding assistant with tools.", "tool_calls": None},
    {"role": "user", "content": "<uploaded_files>\n/workspace/calc\n</uploaded_files>\nI've uploaded a repository. "
     "Consider the following PR description:\n\n<pr_description>\ndivide() raises ZeroDivisionError instead of "
     "returning None\n</pr_description>\n\nMake the minimal change to non-test files.", "tool_calls": None},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "str_replace_editor",
        "arguments": '{"command": "view", "path": "/workspace/calc/calc.py", "view_range": [1, 20]}'}}]},
    {"role": "tool", "tool_call_id": "c1",
     "content": "OBSERVATION:\n     1\tdef divide(a, b):\n     2\t    return a / b"},
    {"role": "assistant", "content": "I will patch divide and run the tests at once.", "tool_calls": [
        {"id": "c2", "type": "function", "function": {"name": "str_replace_editor", "arguments": json.dumps({
            "command": "str_replace", "path": "/workspace/calc/calc.py",
            "old_str": "def divide(a, b):\n    return a / b",
            "new_str": "def divide(a, b):\n    return None if b == 0 else a / b"})}},
        {"id": "c3", "type": "function", "function": {
            "name": "execute_bash", "arguments": '{"command": "cd /workspace/calc && python -m pytest -q"}'}}]},
    {"role": "tool", "tool_call_id": "c2",
     "content": "OBSERVATION:\nThe file /workspace/calc/calc.py has been edited."},
    {"role": "tool", "tool_call_id": "c3", "content": "OBSERVATION:\n3 passed in 0.02s"},
    {"role": "assistant", "content": "The fix is in and the tests pass.", "tool_calls": None},
    {"role": "user", "content": "Please continue on whatever approach you think is suitable."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c4", "type": "function", "function": {"name": "finish", "arguments": "{}"}}]},
]}
TOOL_CALLS_ACTIONS = [
    "str_replace_editor\ncommand: view\npath: /workspace/calc/calc.py\nview_range: [1, 20]",
    "str_replace_editor\ncommand: str_replace\npath: /workspace/calc/calc.py\nold_str:\ndef divide(a, b):\n"
    "    return a / b\nnew_str:\ndef divide(a, b):\n    return None if b == 0 else a / b\n\n"
    "cd /workspace/calc && python -m pytest -q",
    "finish"]

SWE_SMITH = {"instance_id": "demo__stats.1a2b3c4d.func_pm__x", "traj_id": "demo__stats.1a2b3c4d.func_pm__x.r7",
             "resolved": True, "messages": json.dumps([
                 {"role": "system", "content": "You have access to the following functions: bash, str_replace_editor"
                  ", submit. Reply with <function=NAME> markup."},
                 {"role": "user", "content": "<uploaded_files>\n/testbed\n</uploaded_files>\nConsider the following "
                  "PR description:\n\n<pr_description>\nmean([]) should raise ValueError\n</pr_description>\n\n"
                  "Can you help me implement the necessary changes?"},
                 {"role": "assistant", "content": "Let me find the function first.\n\n<function=bash>\n"
                  "<parameter=command>grep -rn \"def mean\" /testbed</parameter>\n</function>"},
                 {"role": "user", "content": "OBSERVATION:\n/testbed/stats.py:4:def mean(xs):"},
                 {"role": "assistant", "content": "Now the edit.\n\n<function=str_replace_editor>\n"
                  "<parameter=command>str_replace</parameter>\n<parameter=path>/testbed/stats.py</parameter>\n"
                  "<parameter=old_str>\ndef mean(xs):\n    return sum(xs) / len(xs)\n</parameter>\n<parameter=new_str>"
                  "\ndef mean(xs):\n    if not xs:\n        raise ValueError(\"empty\")\n    return sum(xs) / len(xs)\n"
                  "</parameter>\n</function>"},
                 {"role": "user", "content": "OBSERVATION:\nThe file /testbed/stats.py has been edited."},
                 {"role": "assistant", "content": "<function=submit>\n</function>"}])}
SWE_SMITH_ACTIONS = [
    'grep -rn "def mean" /testbed',
    "str_replace_editor\ncommand: str_replace\npath: /testbed/stats.py\nold_str:\ndef mean(xs):\n"
    "    return sum(xs) / len(xs)\nnew_str:\ndef mean(xs):\n    if not xs:\n        raise ValueError(\"empty\")\n"
    "    return sum(xs) / len(xs)",
    "submit"]

NEBIUS = {"instance_id": "demo__num-9", "model_name": "some-agent", "target": True, "trajectory": [
    {"role": "system", "system_prompt": "SETTING: You are an autonomous programmer in a special interface.",
     "text": None, "mask": False},
    {"role": "user", "text": "We're currently solving the following issue within our repository. Here's the issue "
     "text:\nISSUE:\nround_half(2.5) returns 2, expected 3\n\nINSTRUCTIONS:\nNow, you're going to solve this issue on "
     "your own.\n\n(Open file: n/a)\n(Current directory: /num)\nbash-$", "mask": False},
    {"role": "ai", "text": "Let's look for the function.\n```\nsearch_dir \"def round_half\"\n```", "mask": True},
    {"role": "user", "text": "Found 1 matches for \"def round_half\" in /num:\n/num/num.py (1 matches)\nbash-$"},
    {"role": "ai", "text": "I think the problem is clear now.", "mask": True},
    {"role": "user", "text": "Your output was not formatted correctly: include one discussion and one command."},
    {"role": "ai", "text": "The call that fails:\n```python\nround_half(2.5)\n```\nNow the fix:\n```\nedit 3:3\n"
     "    return math.floor(x + 0.5)\nend_of_edit\n```", "mask": True},
    {"role": "user", "text": "File updated.\n(Open file: /num/num.py)\nbash-$"},
]}
NEBIUS_ACTIONS = ['search_dir "def round_half"', "edit 3:3\n    return math.floor(x + 0.5)\nend_of_edit"]

HAND_WRITTEN = [  # (record, format, issue, actions, thoughts, turns without an action)
    (TOOL_CALLS, "tool-calls", "divide() raises ZeroDivisionError instead of returning None", TOOL_CALLS_ACTIONS,
     ["", "I will patch divide and run the tests at once.", ""], 1),
    (SWE_SMITH, "swe-smith", "mean([]) should raise ValueError", SWE_SMITH_ACTIONS,
     ["Let me find the function first.", "Now the edit.", ""], 0),
    (NEBIUS, "nebius", "round_half(2.5) returns 2, expected 3", NEBIUS_ACTIONS,
     ["Let's look for the function.", "The call that fails:\n```python\nround_half(2.5)\n```\nNow the fix:"], 1),
]


@pytest.mark.parametrize("record, fmt, issue, actions, thoughts, without_action", HAND_WRITTEN,
                         ids=[h[1] for h in HAND_WRITTEN])
def test_hand_written_formats(record, fmt, issue, actions, thoughts, without_action):
    assert T.detect_format(record) == fmt
    trajectory = T.parse_trajectory(record)
    assert trajectory["format"] == fmt and trajectory["issue"] == issue
    assert trajectory["instance_id"] == record["instance_id"]
    assert [s["action"] for s in trajectory["steps"]] == actions
    assert [s["thought"] for s in trajectory["steps"]] == thoughts
    assert trajectory["turns_without_action"] == without_action
    examples = T.agent_examples(trajectory)
    assert [e["target_step"] for e in examples] == actions
    assert examples[-1]["previous_pairs"] == [
        {"action": s["action"], "observation": s["observation"]} for s in trajectory["steps"][-3:-1]]


def test_observations_of_parallel_calls_and_dropped_turns():
    steps = T.parse_trajectory(TOOL_CALLS)["steps"]
    # two calls in one turn: one action, and their outputs in the same order, a blank line apart
    assert steps[1]["observation"] == ("OBSERVATION:\nThe file /workspace/calc/calc.py has been edited.\n\n"
                                       "OBSERVATION:\n3 passed in 0.02s")
    # the turn without a call and the reply to it are gone: "finish" answers nothing
    assert steps[2]["observation"] == "" and "Please continue" not in json.dumps(steps)
    nebius = T.parse_trajectory(NEBIUS)["steps"]
    assert nebius[0]["observation"].startswith("Found 1 matches") and "not formatted" not in json.dumps(nebius)
    assert T.parse_trajectory(SWE_SMITH)["id"] == SWE_SMITH["traj_id"]


def test_format_flag_overrides_detection_and_bad_records_are_named():
    both = TOOL_CALLS | {"trajectory": NEBIUS["trajectory"]}  # detected as nebius; read as tool calls
    assert T.detect_format(both) == "nebius"
    assert [s["action"] for s in T.parse_trajectory(both, "tool-calls")["steps"]] == TOOL_CALLS_ACTIONS
    # read as mini-swe-agent, the SWE-smith markup holds no ```bash block: no action at all
    as_mini = T.parse_trajectory(SWE_SMITH, "mini-swe-agent")
    assert as_mini["steps"] == [] and as_mini["turns_without_action"] == 3
    with pytest.raises(T.TrajectoryError, match="in.jsonl, line 2: no 'trajectory' list"):
        T.parse_trajectory(TOOL_CALLS, "nebius", where="in.jsonl, line 2")
    with pytest.raises(T.TrajectoryError, match="x.json: not an agent trajectory of a known format"):
        T.parse_trajectory({"question": "?"}, where="x.json")
    no_issue = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "```bash\nls\n```"}]}
    with pytest.raises(T.TrajectoryError, match="no user message before the agent's first turn"):
        T.parse_trajectory(no_issue, where="y.json")


def test_mini_swe_agent_runs_only_a_single_command_block():
    one = {"role": "assistant", "content": "THOUGHT: look.\n\n```mswea_bash_command\nls -la\n```"}
    two = {"role": "assistant", "content": "```bash\nls\n```\nand\n```bash\npwd\n```"}
    assert T.read_action(one, "mini-swe-agent") == ("THOUGHT: look.", "ls -la")
    assert T.read_action(two, "mini-swe-agent")[1] is None  # mini-swe-agent rejects such a reply


def test_call_text_layout():
    assert T.call_text("bash", '{"command": "  ls -la\\n"}') == "ls -la"
    assert T.call_text("execute_bash", {"command": "pwd", "timeout": 30}) == "pwd"
    assert T.call_text("open", {"path": "a.py", "line_number": 12}) == "open\npath: a.py\nline_number: 12"
    assert T.call_text("create", {"path": "a.py", "file_text": "x = 1\ny = 2"}) == \
        "create\npath: a.py\nfile_text:\nx = 1\ny = 2"
    assert T.call_text("submit", "") == "submit" and T.call_text("odd", "not json") == "odd\nnot json"
    assert "\\" not in T.call_text("str_replace_editor", json.dumps({"new_str": 'print("a")\n'}))  # no escaping


def test_cut_middle_keeps_head_and_tail_within_the_limit():
    text = "".join(f"line {i}\n" for i in range(5000))
    for limit in (40, 100, 1000, 4000):
        cut = T.cut_middle(text, limit)
        assert len(cut) <= limit
        head, rest = cut.split("\n[... ", 1)
        count, tail = rest.split(" characters cut ...]\n", 1)
        assert int(count.replace(",", "")) == len(text) - len(head) - len(tail)  # the marker tells the truth
        assert text.startswith(head) and text.endswith(tail) and abs(len(head) - len(tail)) <= 1
    assert T.cut_middle("short", 40) == "short"


def test_reading_files_and_folders(tmp_path):
    folder = tmp_path / "trajs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(TOOL_CALLS) + "\n\n" + json.dumps(TOOL_CALLS) + "\n")
    (folder / "sub" / "smith.json").write_text(json.dumps([SWE_SMITH], indent=2))
    (folder / "sub" / "nebius-run.traj").write_text(json.dumps(NEBIUS, indent=4))  # one object over many lines
    (folder / "preds.json").write_text(json.dumps({"demo__calc-7": {"model_patch": "diff"}}))
    (folder / "notes.txt").write_text("not read")
    trajectories = T.load_trajectories(folder)
    assert [t["id"] for t in trajectories] == ["demo__calc-7", "demo__calc-7#2", "demo__num-9",
                                               SWE_SMITH["traj_id"]]  # files in sorted order, preds.json skipped
    assert [t["instance_id"] for t in trajectories][:2] == ["demo__calc-7", "demo__calc-7"]
    bare = [{"role": "system", "content": "s"}, {"role": "user", "content": "Please solve this issue: fix it\n\n"
             "You can execute bash commands and edit files."}, {"role": "assistant", "content": "```bash\nls\n```"}]
    (tmp_path / "run_42.traj.json").write_text(json.dumps(bare, indent=2))
    [trajectory] = T.load_trajectories(tmp_path / "run_42.traj.json")
    assert (trajectory["id"], trajectory["issue"], trajectory["steps"][0]["action"]) == ("run_42", "fix it", "ls")
    (tmp_path / "bad.traj").write_text('{\n  "history": [\n    {"role": "user",, "content": "x"}\n  ]\n}\n')
    with pytest.raises(T.TrajectoryError, match=r"bad.traj:3: not valid JSON"):
        T.load_trajectories(tmp_path / "bad.traj")
    (tmp_path / "bad.jsonl").write_text(json.dumps(NEBIUS) + "\n{oops\n")
    with pytest.raises(T.TrajectoryError, match=r"bad.jsonl:2: not valid JSON"):
        T.load_trajectories(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.TrajectoryError, match="without .traj, .json or .jsonl files"):
        T.load_trajectories(tmp_path / "empty")


def test_data_prep_on_a_folder(tmp_path):
    folder = tmp_path / "trajs"
    folder.mkdir()
    for i, record in enumerate([TOOL_CALLS, SWE_SMITH, NEBIUS, TOOL_CALLS | {"run_id": "run-2"}]):
        (folder / f"{i}.json").write_text(json.dumps(record))
    (folder / "preds.json").write_text(json.dumps({"demo__calc-7": {"model_patch": "diff"}}))
    result = run("data_prep.py", "--input", folder, "--out-dir", tmp_path / "out", "--val-problems", 1, "--seed", 3)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 files that hold no agent trajectory" in result.stdout and "preds.json" in result.stdout
    assert "read 4 agent trajectories" in result.stdout and "nebius 1, swe-smith 1, tool-calls 2" in result.stdout
    assert "not targets: 3 assistant turns without an action" in result.stdout  # 1 + 1 + 1
    train, val = read_jsonl(tmp_path / "out" / "srl_train.jsonl"), read_jsonl(tmp_path / "out" / "srl_val.jsonl")
    assert len(train) + len(val) == 3 + 3 + 2 + 3
    # both runs on demo__calc-7 sit on the same side of the split
    sides = {("val" if e in val else "train") for e in train + val if e["instance_id"] == "demo__calc-7"}
    assert len(sides) == 1
    sft = read_jsonl(tmp_path / "out" / "sft_train.jsonl")
    assert all(set(t) >= {"id", "instance_id", "issue", "steps"} for t in sft)
    forced = run("data_prep.py", "--input", folder / "1.json", "--out-dir", tmp_path / "o2", "--format",
                 "mini-swe-agent")  # SWE-smith's markup read as mini-swe-agent: no command block, no action
    assert forced.returncode == 0 and "3 assistant turns without an action; 1 trajectories" in forced.stdout
    bad = run("data_prep.py", "--input", folder / "0.json", "--out-dir", tmp_path / "o3", "--format", "nebius")
    assert bad.returncode != 0 and "0.json: no 'trajectory' list" in bad.stderr and not (tmp_path / "o3").exists()


def test_data_prep_detects_trajectories_in_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([NEBIUS, NEBIUS | {"instance_id": "demo__num-10"}]), tmp_path / "n.parquet")
    data_prep.main(["--input", str(tmp_path / "n.parquet"), "--out-dir", str(tmp_path / "out")])
    assert "read 2 agent trajectories" in capsys.readouterr().out
    examples = read_jsonl(tmp_path / "out" / "srl_train.jsonl") + read_jsonl(tmp_path / "out" / "srl_val.jsonl")
    assert sorted(e["target_step"] for e in examples) == sorted(NEBIUS_ACTIONS * 2)


# ----------------------------------------------------------------------------------------------------
# srl.py: the agent prompt, the prompt-length bound, and a short run from the command line

def test_agent_prompt_holds_the_issue_and_the_last_two_pairs_only():
    trajectory = T.parse_trajectory(TOOL_CALLS)
    last = T.agent_examples(trajectory)[-1]
    messages = srl.srl_messages(last)
    assert [m["role"] for m in messages] == ["system", "user"] and messages[0]["content"] == srl.AGENT_SYSTEM_PROMPT
    user = messages[1]["content"]
    assert user.startswith("Issue:\n" + trajectory["issue"]) and "careful coding assistant" not in user
    for step in trajectory["steps"][:2]:
        assert step["action"] in user and step["observation"] in user
    assert "finish" not in user and "I will patch" not in user  # neither the target nor any thought
    first = srl.srl_messages(T.agent_examples(trajectory)[0])[1]["content"]
    assert "You have not run any command yet." in first and "Command:" not in first
    one_pair = srl.srl_messages(T.agent_examples(trajectory, context_pairs=1)[-1])[1]["content"]
    assert "(after 1 earlier)" in one_pair and TOOL_CALLS_ACTIONS[0] not in one_pair


def test_drop_long_prompts_counts_and_prints(capsys):
    _, tokenizer = M.load_model("tiny")
    examples = T.agent_examples(T.parse_trajectory(TOOL_CALLS))
    lengths = [len(E.encode_chat(tokenizer, srl.srl_messages(e))) for e in examples]
    assert lengths[0] < lengths[-1]
    args = srl.training_arguments("t", "", "", 0.0).parse_args(["--max-prompt-tokens", str(lengths[0])])
    train, val = srl.drop_long_prompts(args, tokenizer, srl.srl_messages, examples, examples[:1])
    assert train == [e for e, n in zip(examples, lengths) if n <= lengths[0]] and val == examples[:1]
    assert f"dropped {len(examples) - len(train)} of {len(examples)} training examples" in capsys.readouterr().out
    args.max_prompt_tokens = lengths[0] - 1
    with pytest.raises(SystemExit):
        srl.drop_long_prompts(args, tokenizer, srl.srl_messages, examples, [])
    assert "every training prompt is over --max-prompt-tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_srl_runs_on_agent_steps_from_the_command_line(tmp_path):
    folder = tmp_path / "trajs"
    folder.mkdir()
    for i, record in enumerate([TOOL_CALLS, SWE_SMITH, NEBIUS]):
        (folder / f"{i}.json").write_text(json.dumps(record))
    prep = run("data_prep.py", "--input", folder, "--out-dir", tmp_path / "data", "--val-problems", 1)
    assert prep.returncode == 0, prep.stderr
    train = read_jsonl(tmp_path / "data" / "srl_train.jsonl")
    _, tokenizer = M.load_model("tiny")
    lengths = sorted(len(E.encode_chat(tokenizer, srl.srl_messages(e))) for e in train)
    limit = lengths[-2]  # the longest training prompt is dropped
    result = run("srl.py", "--model", "tiny", "--data", tmp_path / "data" / "srl_train.jsonl", "--out",
                 tmp_path / "run", "--max-steps", 2, "--batch-prompts", 2, "--group-size", 2, "--max-new-tokens", 8,
                 "--eval-every", 0, "--val-limit", 2, "--max-prompt-tokens", limit, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"dropped 1 of {len(train)} training examples" in result.stdout
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and "val_score" in metrics[-1]
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
