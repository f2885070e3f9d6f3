"""Agent trajectories -> SRL agent-step examples: the paper's software-engineering setting.

SRL (Deng et al. 2025, arXiv 2510.25992) also trains software-engineering agents step by step: each step's action
is the command the expert agent ran, and its context is the issue plus the two previous action/observation
pairs. This file reads the trajectory formats that agent frameworks publish and turns them into those examples.

    from tasks.trajectories import load_trajectories, agent_examples
    for trajectory in load_trajectories("trajs/"):      # a JSON / JSONL file, or a folder of .traj/.json/.jsonl
        examples = agent_examples(trajectory, context_pairs=2, max_observation_chars=4000)

    python data_prep.py --input trajs/ --out-dir data/swe   # the same from the command line (srl_train.jsonl, ...)

Formats, told apart by each record's structure (the fmt argument, or data_prep.py's --format, overrides):
  swe-agent       SWE-agent .traj: "history" (chat messages); the command is a message's "action" field.
  mini-swe-agent  a list of messages whose assistant turns hold one ```mswea_bash_command (or ```bash) block; or
                  its v2 object ("trajectory_format", "messages") with the command in "tool_calls".
  tool-calls      OpenAI-style "tool_calls", content often empty (SWE-Gym, OpenHands).
  swe-smith       <function=NAME><parameter=KEY>VALUE</parameter></function> in the assistant's text.
  nebius          "trajectory" with roles "ai" / "user" and the text in "text" (nebius/SWE-agent-trajectories).
A trajectory becomes {"id", "instance_id", "format", "issue", "steps": [{"thought", "action", "observation"}]}: the
issue is the task statement without the framework's wrapper; the action is the command as readable text (a bash
tool's command itself, any other tool its name and arguments), never the thought before it; the observation is all
the environment answered before the next assistant turn. docs/agents.md says how each case is read.
"""
import json
import re
from pathlib import Path

from machinery.files import InputError, read_jsonl

FORMATS = ("swe-agent", "mini-swe-agent", "tool-calls", "swe-smith", "nebius")
FILE_SUFFIXES = (".traj", ".json", ".jsonl")
BASH_TOOLS = {"bash", "execute_bash", "shell", "terminal"}  # tools whose action is the shell command itself
CALL_SEPARATOR = "\n\n"  # between the calls of one turn, and between their outputs
# How frameworks wrap the task statement in their first user message: (start, end); the issue lies between.
ISSUE_WRAPPERS = [
    ("<pr_description>", "</pr_description>"),  # mini-swe-agent v2, SWE-smith, SWE-Gym / OpenHands
    ("<issue_description>", "</issue_description>"),  # OpenHands
    ("ISSUE:\n", "\n\nINSTRUCTIONS:"),  # SWE-agent (before 1.0), nebius / SWE-rebench
    ("Please solve this issue: ", "\n\nYou can execute bash commands"),  # mini-swe-agent's first template
]
FUNCTION_CALL = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.DOTALL)
MINI_BLOCK = re.compile(r"```(?:mswea_bash_command|bash)[ \t]*\n(.*?)\n```", re.DOTALL)
FENCE_LINE = re.compile(r"^```(\S*)[ \t]*$", re.MULTILINE)


class TrajectoryError(ValueError):
    """Bad input; the message names the file, the line or record, and the field."""


# ----------------------------------------------------------------------------------------------------
# Reading files

def _stem(path):
    name = path.name
    while name.endswith(FILE_SUFFIXES):
        name = name[:name.rfind(".")]
    return name


def _read_one_file(path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrajectoryError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return [], []
    if path.suffix != ".jsonl":
        try:  # one JSON value over the whole file: a .traj object, or a list
            value = json.loads(text)
            if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
                return [{"messages": value}], [str(path)]  # a bare message list is one trajectory
            if isinstance(value, list):
                return value, [f"{path}, record {i + 1}" for i in range(len(value))]
            return [value], [str(path)]
        except json.JSONDecodeError as e:
            first = next((line for line in text.splitlines() if line.strip()), "")
            try:
                json.loads(first)
            except json.JSONDecodeError:  # not JSONL either: report the whole-file error where it is
                raise TrajectoryError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    try:
        pairs = read_jsonl(path, with_lines=True)  # JSONL: one record per line
    except InputError as e:
        raise TrajectoryError(str(e)) from None
    return [record for _, record in pairs], [f"{path}:{line_no}" for line_no, _ in pairs]


def read_json_records(path):
    """(records, locations, names) of a JSON file (one object, or a list of records), a JSONL file, or a folder
    of them (every *.traj, *.json, *.jsonl below it, in sorted order). A bare list of chat messages is one record
    {"messages": [...]}. locations[i] says where record i is, for error messages; names[i] is its file's name
    without suffixes (numbered when the file holds several records): the id of a record that has none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        if not files:
            raise TrajectoryError(f"{path}: a folder without .traj, .json or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise TrajectoryError(f"{path}: no such file or folder")
    records, locations, names = [], [], []
    for file in files:
        file_records, file_locations = _read_one_file(file)
        records += file_records
        locations += file_locations
        several = len(file_records) > 1
        names += [f"{_stem(file)}-{i + 1}" if several else _stem(file) for i in range(len(file_records))]
    if not records:
        raise TrajectoryError(f"{path}: empty input (no records)")
    return records, locations, names


# ----------------------------------------------------------------------------------------------------
# Telling the formats apart, and finding the messages

def text_of(value):
    """Message content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in value)
    return "" if value is None else str(value)


def _message_list(record):
    """record["messages"] as a list (SWE-smith stores it as a JSON string), or None."""
    messages = record.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return None
    return messages if isinstance(messages, list) else None


def detect_format(record):
    """The trajectory format of a record (one of FORMATS), from its structure; None if it is not one."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("history"), list):
        return "swe-agent"
    steps = record.get("trajectory")
    if isinstance(steps, list) and any(isinstance(m, dict) and m.get("role") == "ai" for m in steps):
        return "nebius"
    messages = _message_list(record)
    if messages is None:
        return None
    messages = [m for m in messages if isinstance(m, dict)]
    replies = [text_of(m.get("content")) for m in messages if m.get("role") == "assistant"]
    if str(record.get("trajectory_format", "")).startswith("mini-swe-agent") or any(
            m.get("role") == "exit" for m in messages):
        return "mini-swe-agent"
    if any(m.get("tool_calls") for m in messages if m.get("role") == "assistant"):
        return "tool-calls"
    if any(FUNCTION_CALL.search(reply) for reply in replies):
        return "swe-smith"
    if any(MINI_BLOCK.search(reply) for reply in replies):
        return "mini-swe-agent"
    if any(FENCE_LINE.search(reply) for reply in replies):
        return "swe-agent"  # SWE-agent's replies written as a plain message list
    return None


def _messages(record, fmt, where):
    """The trajectory's chat messages, with nebius's "ai" / "text" mapped to "assistant" / "content" and
    SWE-agent's demonstrations dropped."""
    if fmt == "nebius":
        steps = record.get("trajectory")
        if not isinstance(steps, list):
            raise TrajectoryError(f"{where}: no 'trajectory' list (format nebius)")
        return [{"role": "assistant" if m.get("role") == "ai" else m.get("role"), "content": m.get("text")}
                for m in steps if isinstance(m, dict)]
    messages = record.get("history") if fmt == "swe-agent" and "history" in record else _message_list(record)
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        field = "history" if fmt == "swe-agent" else "messages"
        raise TrajectoryError(f"{where}: no {field!r} list of {{'role', ...}} messages (format {fmt})")
    return [m for m in messages if not m.get("is_demo")]


def _instance_id(record):
    """The record's own instance id: "instance_id", else SWE-agent's replay_config problem statement id."""
    if record.get("instance_id"):
        return str(record["instance_id"])
    replay = record.get("replay_config")
    if isinstance(replay, str):
        try:
            replay = json.loads(replay)
        except json.JSONDecodeError:
            replay = None
    statement = replay.get("problem_statement") if isinstance(replay, dict) else None
    return str(statement["id"]) if isinstance(statement, dict) and statement.get("id") else None


# ----------------------------------------------------------------------------------------------------
# The action of one assistant turn

def call_text(name, arguments):
    """One tool call as readable text: a bash tool's command itself; any other tool its name, then one line per
    argument, "key: value" (a value with line breaks starts on the line after "key:"; non-strings as JSON)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"{name}\n{arguments}".strip()  # arguments that are not JSON stay as written
    if not isinstance(arguments, dict):
        arguments = {"arguments": arguments}
    command = arguments.get("command", arguments.get("cmd"))
    if name in BASH_TOOLS and isinstance(command, str):
        return command.strip()
    lines = [str(name)]
    for key, value in arguments.items():
        value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"{key}:\n{value}" if "\n" in value else f"{key}: {value}")
    return "\n".join(lines)


def last_fenced_block(text):
    """(text around, body) of the last top-level ``` block, as SWE-agent's thought/action parser reads a reply:
    a fence with a word after it opens a block, a bare one closes the innermost open block (or opens one);
    None when the text has no complete block."""
    stack, last = [], None
    for fence in FENCE_LINE.finditer(text):
        if stack and not fence[1]:
            opening = stack.pop()
            if not stack:
                last = (opening, fence)
        else:
            stack.append(fence)
    if last is None:
        return None
    opening, closing = last
    return text[:opening.start()] + text[closing.end():], text[opening.end():closing.start()]


def read_action(message, fmt):
    """(thought, action) of one assistant message in the given format; action is None when the turn ran nothing."""
    content = text_of(message.get("content"))
    if fmt == "swe-agent" and isinstance(message.get("action"), str) and message["action"].strip():
        thought = message.get("thought")
        if not isinstance(thought, str):
            thought = (last_fenced_block(content) or (content, ""))[0]
        return thought.strip(), message["action"].strip()
    if fmt in ("swe-agent", "mini-swe-agent", "tool-calls") and message.get("tool_calls"):
        calls = [call.get("function", call) for call in message["tool_calls"] if isinstance(call, dict)]
        action = CALL_SEPARATOR.join(call_text(c.get("name"), c.get("arguments")) for c in calls)
        return content.strip(), action.strip() or None
    if fmt == "swe-smith":
        calls = list(FUNCTION_CALL.finditer(content))
        if calls:
            # a multi-line value sits on lines of its own between the tags: those two line breaks are markup
            texts = [call_text(c[1], {key: re.sub(r"^\n|\n$", "", value) for key, value in PARAMETER.findall(c[2])})
                     for c in calls]
            thought = content[:calls[0].start()] + content[calls[-1].end():]
            return thought.strip(), CALL_SEPARATOR.join(texts).strip() or None
    if fmt == "mini-swe-agent":
        blocks = list(MINI_BLOCK.finditer(content))
        if len(blocks) == 1:  # mini-swe-agent runs a reply only when it holds exactly one command block
            thought = content[:blocks[0].start()] + content[blocks[0].end():]
            return thought.strip(), blocks[0][1].strip() or None
    if fmt in ("swe-agent", "nebius"):
        block = last_fenced_block(content)
        if block:
            return block[0].strip(), block[1].strip() or None
    return content.strip(), None


# ----------------------------------------------------------------------------------------------------
# Records -> trajectories -> examples

def task_statement(text):
    """The issue inside a framework's first user message (between the markers of ISSUE_WRAPPERS), else the
    whole message."""
    for start, end in ISSUE_WRAPPERS:
        i = text.find(start)
        j = text.find(end, i + len(start)) if i >= 0 else -1
        if j >= 0:
            issue = text[i + len(start):j]
            # mini-swe-agent v2 repeats its own lead-in inside the tags
            return re.sub(r"^\s*Consider the following PR description:", "", issue).strip()
    return text.strip()


def parse_trajectory(record, fmt=None, where="record", name="trajectory"):
    """One record -> {"id", "instance_id", "format", "issue", "steps": [{"thought", "action", "observation"}],
    "turns_without_action"}. fmt: one of FORMATS (None: detect it); name: the id of a record that has none."""
    fmt = fmt or detect_format(record)
    if fmt not in FORMATS:
        raise TrajectoryError(f"{where}: not an agent trajectory of a known format ({', '.join(FORMATS)}); "
                              f"the record has: {', '.join(sorted(record)) if isinstance(record, dict) else '?'}")
    messages = _messages(record, fmt, where)
    first_turn = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    issue = task_statement("\n\n".join(text_of(m.get("content")) for m in messages[:first_turn]
                                       if m["role"] == "user"))
    if not issue:
        raise TrajectoryError(f"{where}: no user message before the agent's first turn (the issue)")
    steps, without_action, current = [], 0, None
    for message in messages[first_turn:]:
        if message["role"] == "assistant":
            thought, action = read_action(message, fmt)
            current = {"thought": thought, "action": action, "observation": []} if action else None
            if current:
                steps.append(current)
            without_action += current is None
        elif message["role"] in ("user", "tool") and current is not None:
            current["observation"].append(text_of(message.get("content")))
    for step in steps:
        step["observation"] = CALL_SEPARATOR.join(step["observation"])
    instance_id = _instance_id(record) or name
    own_id = record.get("traj_id") or record.get("id")
    return {"id": str(own_id or instance_id), "instance_id": instance_id, "format": fmt, "issue": issue,
            "steps": steps, "turns_without_action": without_action}


def trajectories_of(records, locations, names, fmt=None, skip_others=False):
    """(trajectories, skipped): each record read in its own detected format unless fmt is given. A record of no
    known format is an error, or with skip_others (a folder holding other files) skipped: its location is
    listed. Ids are made unique ("#2", "#3", ... after a repeated one); instance ids stay as given."""
    trajectories, skipped, seen = [], [], {}
    for record, where, name in zip(records, locations, names):
        if skip_others and not fmt and not detect_format(record):
            skipped.append(where)
            continue
        trajectory = parse_trajectory(record, fmt, where, name)
        seen[trajectory["id"]] = seen.get(trajectory["id"], 0) + 1
        if seen[trajectory["id"]] > 1:
            trajectory["id"] += f"#{seen[trajectory['id']]}"
        trajectories.append(trajectory)
    return trajectories, skipped


def load_trajectories(path, fmt=None):
    """The trajectories of a file, or of the trajectory files in a folder (others skipped); see
    read_json_records and parse_trajectory."""
    return trajectories_of(*read_json_records(path), fmt, skip_others=Path(path).is_dir())[0]


def cut_middle(text, limit):
    """text, or its head and tail with a marker line between them saying how many characters were cut; the
    result is at most `limit` characters long (limit >= 40), so a long `find` or test log keeps both ends."""
    if len(text) <= limit:
        return text
    keep = limit
    while True:  # the marker's own length counts against the limit, and its count depends on what is kept
        marker = f"\n[... {len(text) - keep:,} characters cut ...]\n"
        if keep == max(limit - len(marker), 0):
            break
        keep = max(limit - len(marker), 0)
    return text[:keep - keep // 2] + marker + text[len(text) - keep // 2:]


def agent_examples(trajectory, context_pairs=2, max_observation_chars=4000):
    """One SRL example per step (paper, software-engineering setting): the context is the issue plus the
    previous `context_pairs` (action, observation) pairs, each observation cut to max_observation_chars; the
    target is the step's action. The thought is recorded beside it, never scored."""
    steps = trajectory["steps"]
    pairs = [{"action": s["action"], "observation": cut_middle(s["observation"], max_observation_chars)}
             for s in steps]
    return [{"id": trajectory["id"], "instance_id": trajectory["instance_id"], "issue": trajectory["issue"],
             "previous_pairs": pairs[max(0, k - context_pairs):k], "target_step": step["action"],
             "thought": step["thought"], "step_index": k + 1, "num_steps": len(steps), "answer": None}
            for k, step in enumerate(steps)]
