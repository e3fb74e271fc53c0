"""The tool registry and the built-in tools, each called as the model would call it.

Every call goes through `run_tool_call` with the text a model writes
(`function\\n{name}\\n{json}`), so parsing, argument checks and the error path are the
ones a rollout uses. Errors must come back as text (ok=False), never raise.
"""

from __future__ import annotations

import builtins
import json
import os
from datetime import datetime
from datetime import timezone as tz

import pytest

from vocalign.data.tool_tasks import VOICE_REQUESTS
from vocalign import tools
from vocalign.tools import clock, registry, voice_library
from vocalign.tools import (
    DEFAULT_VOICE_LIBRARY,
    ToolOutput,
    calculate,
    format_tool_call,
    get_tool,
    list_tools,
    parse_tool_call,
    resolve_tools,
    run_tool_call,
    tool,
    tool_schemas,
)

ALL = ["calculator", "datetime", "retrieval", "audio_search"]


def call(name: str, arguments: dict | str, enabled=ALL, options=None):
    body = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return run_tool_call(f"function\n{name}\n{body}", enabled, options)


# --- a user's tools: one plain function, named as module:function ---------------------------


def shout(text: str, times: int | None = 1) -> str:
    """Repeat text in capitals."""
    return " ".join([text.upper()] * times)


# --- calculator -------------------------------------------------------------------------


@pytest.mark.parametrize("expression, value", [
    ("347 * 29", "10063"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("-7 + 2", "-5"), ("7 / 2", "3.5"),
    ("10 / 2", "5"), ("17 // 5", "3"), ("17 % 5", "2"), ("2 ** 10", "1024"), ("2 ^ 10", "1024"),
    ("3 x 4", "12"), ("1 / 3", "0.3333333333"), ("-(2 - 5) ** 2", "-9"),
])
def test_calculator_computes(expression, value):
    result = call("calculator", {"expression": expression})
    assert (result.ok, result.text, result.name) == (True, value, "calculator")


def test_calculator_never_evaluates_code(monkeypatch):
    """It walks the syntax tree itself: with eval/exec gone it still works, and code is refused."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the calculator must not call eval/exec")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert call("calculator", {"expression": "6 * 7"}).text == "42"
    for expression, why in [
        ("__import__('os')", "a function call"),
        ("__import__('os').system('echo hacked')", "a function call"),
        ("().__class__.__bases__", "an attribute"),
        ("(1).__class__", "an attribute"),
        ("().__class__.__bases__[0]", "indexing"),
        ("os", "a name"),
        ("'a' * 3", "only numbers are allowed"),
        ("1 < 2", "a comparison"),
        ("True + 1", "only numbers are allowed"),
        ("lambda: 1", "Lambda"),
        ("[1, 2]", "List"),
    ]:
        result = call("calculator", {"expression": expression})
        assert not result.ok and result.text.startswith("error:") and why in result.text, (expression, result.text)


@pytest.mark.parametrize("expression, why", [
    ("9 ** 9 ** 9", "exponent 387420489 is too large"),
    ("2 ** 100000", "too large"),
    ("99 ** 99 ** 2", "too large"),
    ("7 ** 99 * 7 ** 99 * 7 ** 99 * 7 ** 99 * 7 ** 99", "more than 300 digits"),
    ("10.0 ** 99 * 10.0 ** 99 * 10.0 ** 99 * 10.0 ** 99", "too large"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 201, "the limit is 200"),
])
def test_calculator_refuses_huge_or_invalid_expressions(expression, why):
    result = call("calculator", {"expression": expression})
    assert not result.ok and why in result.text, result.text
    with pytest.raises(tools.ToolCallError):
        calculate(expression)


# --- datetime ---------------------------------------------------------------------------


def test_datetime_reads_the_injectable_clock(monkeypatch):
    monkeypatch.setattr(clock, "clock", lambda: datetime(2025, 1, 2, 23, 30, 0, tzinfo=tz.utc))
    assert call("datetime", {}).text == "2025-01-02 23:30:00 (Thursday), UTC+00:00"
    assert call("datetime", {"utc_offset": "+05:30"}).text == "2025-01-03 05:00:00 (Friday), UTC+05:30"
    assert call("datetime", {"utc_offset": "UTC-3"}).text == "2025-01-02 20:30:00 (Thursday), UTC-03:00"
    assert call("datetime", {"timezone": "America/New_York"}).text == "2025-01-02 18:30:00 (Thursday), UTC-05:00"
    for arguments, why in [
        ({"utc_offset": "+15"}, "out of range"),
        ({"utc_offset": "soon"}, "not an offset"),
        ({"timezone": "Mars/Olympus"}, "not known"),
        ({"timezone": "../../etc/passwd"}, "not known"),
        ({"timezone": "UTC", "utc_offset": "+1"}, "not both"),
        ({"utc_offset": 5}, "must be a string"),
    ]:
        result = call("datetime", arguments)
        assert not result.ok and why in result.text, (arguments, result.text)


# --- retrieval --------------------------------------------------------------------------


@pytest.fixture
def documents(tmp_path):
    """docs/ with three documents, and outside it a secret file and folder that symlinks point to."""
    docs = tmp_path / "docs"
    (docs / "animals").mkdir(parents=True)
    (docs / "cats.md").write_text(
        "# Cats\n\nCats sleep for about sixteen hours a day.\n\nA cat purrs when it is content, and sometimes when hurt.\n"
    )
    (docs / "animals" / "dogs.txt").write_text("Dogs were domesticated from wolves.\n\nA dog's sense of smell is strong.\n")
    (docs / "trains.rst").write_text("The night train leaves at ten.\n")
    (docs / "image.png").write_bytes(b"\x89PNG sleep sleep sleep")
    (tmp_path / "secret.txt").write_text("The zebra password is hunter2.\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "zebra.md").write_text("Zebra stripes confuse flies; the zebra password again.\n")
    os.symlink(tmp_path / "secret.txt", docs / "link.md")
    os.symlink(outside, docs / "outlink")
    os.symlink(docs / "cats.md", docs / "animals" / "cats_again.md")  # a symlink that stays inside: allowed
    return docs


def test_retrieval_returns_the_best_passages_with_file_names(documents):
    options = {"retrieval": {"root": str(documents)}}
    result = call("retrieval", {"query": "how long do cats sleep", "top_k": 1}, options=options)
    assert result.ok and result.text == "[1] cats.md: Cats sleep for about sixteen hours a day."
    result = call("retrieval", {"query": "dog smell"}, options=options)
    assert result.text.splitlines()[0] == "[1] animals/dogs.txt: A dog's sense of smell is strong."
    only = call("retrieval", {"query": "cat", "file": "animals/cats_again.md", "top_k": 5}, options=options)
    assert only.ok and only.text.splitlines() and all(": " in line and "cats_again.md" in line for line in only.text.splitlines())
    assert call("retrieval", {"query": "quantum chromodynamics"}, options=options).text == "no passage matches 'quantum chromodynamics'"


def test_retrieval_never_reads_outside_its_root(documents, tmp_path):
    options = {"retrieval": {"root": str(documents)}}
    # the symlinked file and the symlinked folder lead outside: their words are never found
    result = call("retrieval", {"query": "zebra password hunter2 stripes", "top_k": 10}, options=options)
    assert result.ok and result.text == "no passage matches 'zebra password hunter2 stripes'"
    for file, why in [
        ("../secret.txt", "may not contain '..'"),
        ("animals/../../secret.txt", "may not contain '..'"),
        (str(tmp_path / "secret.txt"), "must be a path relative"),
        ("link.md", "leads outside"),
        ("outlink/zebra.md", "leads outside"),
        ("missing.md", "there is no document"),
        ("image.png", "is not a text document"),
    ]:
        result = call("retrieval", {"query": "zebra", "file": file}, options=options)
        assert not result.ok and why in result.text and "hunter2" not in result.text, (file, result.text)
    # the model cannot move the root: it is an operator option, not an argument
    moved = call("retrieval", {"query": "zebra", "root": str(tmp_path)}, options=options)
    assert not moved.ok and "has no argument 'root'" in moved.text
    unset = call("retrieval", {"query": "cats"})
    assert not unset.ok and "rollouts.tool_options.retrieval.root" in unset.text
    gone = call("retrieval", {"query": "cats"}, options={"retrieval": {"root": str(tmp_path / "nowhere")}})
    assert not gone.ok and "does not exist" in gone.text


def test_retrieval_sees_edited_documents(documents):
    options = {"retrieval": {"root": str(documents)}}
    assert "no passage" in call("retrieval", {"query": "giraffe"}, options=options).text
    (documents / "giraffes.md").write_text("A giraffe has seven neck bones.\n")
    assert call("retrieval", {"query": "giraffe"}, options=options).text == "[1] giraffes.md: A giraffe has seven neck bones."


# --- audio_search -------------------------------------------------------------------------


@pytest.mark.parametrize("voice_id", list(VOICE_REQUESTS))
def test_every_requested_voice_is_found_by_its_requests(voice_id):
    for request in VOICE_REQUESTS[voice_id]:
        result = call("audio_search", {"query": request})
        assert result.ok and result.data["voice_id"] == voice_id, (request, result)
        assert result.data["voice"] == DEFAULT_VOICE_LIBRARY[voice_id]["voice"]
        assert result.text.startswith(f"voice {voice_id}: ")


def test_audio_search_with_a_user_library_and_no_match(tmp_path):
    library = {"narrator": {"description": "a slow storyteller", "voice": "en-us+m2"},
               "robot": {"description": "a metallic robot", "voice": "en-us+klatt"}}
    as_json, as_yaml = tmp_path / "voices.json", tmp_path / "voices.yaml"
    as_json.write_text(json.dumps(library))
    as_yaml.write_text("robot: {description: a metallic robot, voice: en-us+klatt}\n")
    found = call("audio_search", {"query": "metallic robot voice"}, options={"audio_search": {"library": str(as_json)}})
    assert found.ok and found.data == {"voice": "en-us+klatt", "voice_id": "robot"}
    found = call("audio_search", {"query": "a robot"}, options={"audio_search": {"library": str(as_yaml)}})
    assert found.ok and found.data["voice"] == "en-us+klatt"
    none = call("audio_search", {"query": "purple elephant"}, options={"audio_search": {"library": str(as_json)}})
    assert not none.ok and "no voice matches" in none.text and "a slow storyteller" in none.text
    missing = call("audio_search", {"query": "robot"}, options={"audio_search": {"library": str(tmp_path / "x.json")}})
    assert not missing.ok and "does not exist" in missing.text


# --- the registry and the error path ------------------------------------------------------


def test_malformed_calls_come_back_as_errors_not_exceptions():
    for raw, why, name in [
        ("function\ncalc\n{}", "there is no tool 'calc'; the tools are: audio_search, calculator, datetime, retrieval", "calc"),
        ('function\ncalculator\n{"expression": "1+1"', "not valid JSON", "calculator"),
        ('function\ncalculator\n["1+1"]', "must be a JSON object", "calculator"),
        ("calculator\n{}", "must read 'function'", ""),
        ("", "must read 'function'", ""),
        ("function\nnot a name!\n{}", "is not a tool name", ""),
        ("function\ncalculator\n{}", "needs the argument 'expression'", "calculator"),
        ('function\ncalculator\n{"expression": "1", "mode": "x"}', "has no argument 'mode'", "calculator"),
        ('function\ncalculator\n{"expression": ["1"]}', "must be a string", "calculator"),
    ]:
        result = run_tool_call(raw, ALL)
        assert (result.ok, result.name) == (False, name), (raw, result)
        assert result.text.startswith("error: ") and why in result.text, (raw, result.text)


def test_a_user_tool_by_decorator_and_by_module_reference():
    @tool("test_weather", description="today's weather", parameters={"city": "string"}, options=("units",))
    def weather(city: str, units: str = "C") -> str:
        if city == "Atlantis":
            raise RuntimeError("no station there")
        return f"{city}: 21 {units}"

    try:
        assert get_tool("test_weather").schema()["function"] == {
            "name": "test_weather", "description": "today's weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
        assert "test_weather" in [t.name for t in list_tools()]
        enabled = ["test_weather", "test_tools:shout"]
        assert call("test_weather", {"city": "Oslo"}, enabled).text == "Oslo: 21 C"
        assert call("test_weather", {"city": "Oslo"}, enabled, {"test_weather": {"units": "F"}}).text == "Oslo: 21 F"
        failed = call("test_weather", {"city": "Atlantis"}, enabled)
        assert not failed.ok and failed.text == "error: tool test_weather failed: RuntimeError: no station there"
        assert call("shout", {"text": "hi", "times": 2}, enabled).text == "HI HI"
        assert not call("shout", {"text": "hi", "times": "2"}, enabled).ok  # the annotation says integer
        assert tool_schemas(["test_tools:shout"])[0]["function"] == {
            "name": "shout", "description": "Repeat text in capitals.",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}, "times": {"type": "integer"}},
                           "required": ["text"]},
        }
        with pytest.raises(ValueError, match="already registered"):
            tool("test_weather")(weather)
    finally:
        registry._REGISTRY.remove("test_weather")


def test_operator_mistakes_raise_before_generation():
    with pytest.raises(ValueError, match="did you mean 'calculator'"):
        resolve_tools(["calculater"])
    with pytest.raises(ValueError, match="enabled twice"):
        resolve_tools(["calculator", "vocalign.tools.calculator:calculator_tool"])
    with pytest.raises(ValueError, match="has no function 'nope'"):
        get_tool("vocalign.tools.calculator:nope")
    with pytest.raises(ValueError, match="both options"):
        tool("test_clash", parameters={"root": "string"}, options=("root",))(lambda root: root)
    with pytest.raises(ValueError, match="has type 'text'"):
        tool("test_badtype", parameters={"x": "text"})(lambda x: x)
    assert "test_clash" not in registry._REGISTRY and "test_badtype" not in registry._REGISTRY


def test_results_are_cut_and_calls_round_trip():
    raw = format_tool_call("calculator", {"expression": "2 ** 100"})
    assert raw.startswith("<tool_call>function\ncalculator\n") and parse_tool_call(raw) == ("calculator", {"expression": "2 ** 100"})
    result = run_tool_call(raw, ["calculator"], max_chars=10)
    assert result.ok and result.text == "1267650..." and len(result.text) == 10
    wrapped = run_tool_call(raw, {"calculator": get_tool("calculator")})
    assert wrapped.text == str(2**100)
    assert isinstance(voice_library.audio_search_tool("a whisper"), ToolOutput)


# --- the tool_use task and the tool_call reward ---------------------------------------------


def test_tool_use_rows_hold_a_call_that_runs_and_the_answer_it_gives():
    from vocalign.data.tool_tasks import tool_use
    from vocalign.model.loading import embedded_policy

    rows = tool_use(40, seed=3, kinds=("calculator", "audio_search"), rows="both", describe_tools="json")
    assert [r.id.endswith("-answer") for r in rows] == [False, True] * 40
    assert {r.meta["expected_tool"] for r in rows} == {"calculator", "audio_search"}
    tokenizer = embedded_policy().tokenizer
    for call_row, answer_row in zip(rows[::2], rows[1::2]):
        assert json.loads(call_row.messages[0].content)[0]["function"]["name"] in ("audio_search", "calculator")
        name, arguments = parse_tool_call(call_row.target.text)
        assert (name, arguments) == (call_row.meta["expected_tool"], call_row.meta["expected_args"])
        result = run_tool_call(call_row.target.text, [name])
        assert answer_row.messages[-2:][0].content == call_row.target.text and answer_row.messages[-1].role == "input"
        assert answer_row.messages[-1].content == result.text
        if name == "calculator":
            assert result.text == str(call_row.meta["answer"]) == answer_row.target.text
            # the operands are the same tokens in the question and in the call: copied, not translated
            question = tokenizer.text_ids("human\n" + call_row.messages[-1].content)
            call = tokenizer.text_ids(call_row.target.text)
            for operand in map(str, call_row.meta["operands"]):
                first = tokenizer.text_ids(operand)  # as it follows the call's quote
                spaced = tokenizer.text_ids(" " + operand)  # as it follows " * "
                assert any(question[k : k + len(t)] == t for t in (first, spaced) for k in range(len(question)))
                assert any(call[k : k + len(t)] == t for t in (first, spaced) for k in range(len(call)))
        else:
            assert result.data["voice"] == call_row.meta["voice"] and answer_row.target.speech == call_row.meta["text"]
    assert [r.id for r in tool_use(3, seed=3, rows="answer")] == ["tool_use-3-0-answer", "tool_use-3-1-answer", "tool_use-3-2-answer"]
    with pytest.raises(ValueError, match="rows='all'"):
        tool_use(2, seed=0, rows="all")
    with pytest.raises(ValueError, match="kinds=\\['weather'\\]"):
        tool_use(2, seed=0, kinds=["weather"])


def test_tool_use_spoken_questions_carry_audio():
    from vocalign.data.tool_tasks import tool_use

    prompts = tool_use(2, seed=0, spoken=True, max_operand=20, describe_tools="none")
    for p in prompts:
        (audio,) = p.audio
        assert p.messages[-1].content == "" and audio.seconds > 0.5 and p.target.text.startswith("<tool_call>")


def _rollout(meta: dict, calls: list[str]):
    from vocalign.data.types import Message, Prompt, Rollout

    prompt = Prompt("p", [Message("human", "q")], meta=meta)
    return Rollout(prompt, "", "", "", [], None, 0, [], [], [], tool_calls=[{"raw": c} for c in calls])


def test_tool_call_reward_scores_the_best_call():
    from vocalign.rewards import RewardError, RewardSpec, score

    meta = {"expected_tool": "calculator", "expected_args": {"expression": "347 * 29"}}
    body = "function\ncalculator\n"
    rollouts = [
        _rollout(meta, [body + '{"expression": "347 * 29"}']),
        _rollout(meta, [body + '{"expression": "347*29"}']),  # spaces differ
        _rollout(meta, [body + '{"expression": "29 * 347"}']),  # same result
        _rollout(meta, [body + '{"expression": "1 + 1"}']),  # right tool only
        _rollout(meta, ["function\ndatetime\n{}"]),
        _rollout(meta, [body + "{not json"]),
        _rollout(meta, []),
        _rollout(meta, [body + '{"expression": "1 + 1"}', body + '{"expression": "347 * 29"}']),
        _rollout({"answer": 3}, []),
        _rollout({"expected_tool": None}, []),
        _rollout({"expected_tool": ""}, [body + '{"expression": "1"}']),
    ]
    def run(**params):
        return score(rollouts, [RewardSpec("tool_call", params=params)]).components["tool_call"]

    assert run() == [1.0, 1.0, 0.5, 0.5, 0.0, 0.5, 0.0, 1.0, None, 1.0, 0.0]
    assert run(compare="exact") == [1.0, 0.5, 0.5, 0.5, 0.0, 0.5, 0.0, 1.0, None, 1.0, 0.0]
    assert run(compare="result") == [1.0, 1.0, 1.0, 0.5, 0.0, 0.5, 0.0, 1.0, None, 1.0, 0.0]
    assert run(name_credit=0.0, extra_call_penalty=0.25) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75, None, 1.0, 0.0]
    with pytest.raises(RewardError, match="compare='fuzzy' is not known"):
        run(compare="fuzzy")
