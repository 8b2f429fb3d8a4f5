"""Tools: Qwen's call format parsed, each built-in checked by hand, every bad call an error observation."""

from __future__ import annotations

import pytest
from PIL import Image

from sapo_ray.envs.tools import (TOOLS, BadCall, ToolCall, ToolContext, ToolResult, parse_tool_calls, register_tool,
                                 run_call, tool_responses, tool_schemas)


def test_calls_are_parsed_in_order_and_bad_blocks_say_why():
    text = ('Let me add. <tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 4"}}\n</tool_call>'
            '<tool_call>{"name": "colour_at", "arguments": "{\\"x\\": 1, \\"y\\": 2}"}</tool_call>'
            "<tool_call>{name: calculator}</tool_call><tool_call>[1, 2]</tool_call>"
            '<tool_call>{"name": "calculator", "arguments": [1]}</tool_call><tool_call>{"name": "x"')
    calls = parse_tool_calls(text)
    assert calls[:2] == [ToolCall("calculator", {"expression": "3 + 4"}), ToolCall("colour_at", {"x": 1, "y": 2})]
    assert [type(c) for c in calls[2:]] == [BadCall] * 4
    assert "not valid JSON" in calls[2].why and "JSON object" in calls[3].why and "arguments" in calls[4].why
    assert "not closed" in calls[5].why
    assert parse_tool_calls("The answer is \\boxed{7}.") == []


@pytest.mark.parametrize("expression, value", [("3 + 4 * 2", "11"), ("(3 + 4) / 2", "3.5"), ("-2 ** 2", "-4"),
                                               ("7 // 2 + 7 % 2", "4"), ("1 / 3", "0.333333"), ("2 ** 10", "1024")])
def test_the_calculator_by_hand(expression, value):
    assert run_call(ToolCall("calculator", {"expression": expression}), ToolContext()) == ToolResult(value)


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "too large"), ("10 ** 16", "out of range"),
    ("__import__('os').system('ls')", "only numbers"), ("open('/etc/passwd')", "only numbers"),
    ("2 +", "cannot parse"), ("1" * 300, "at most 200")])
def test_the_calculator_refuses_what_it_should_not_compute(expression, message):
    result = run_call(ToolCall("calculator", {"expression": expression}), ToolContext())
    assert result.error == "tool_raised" and message in result.text


def test_colour_at_names_the_pixel_under_the_point():
    """A synthvista bar (red, (220, 50, 47)) on white with a grey grid line: each point's nearest colour."""
    image = Image.new("RGB", (40, 40), "white")
    image.paste((220, 50, 47), (10, 10, 20, 40))
    image.paste((215, 215, 215), (0, 5, 40, 6))
    context = ToolContext([image])
    names = [run_call(ToolCall("colour_at", {"x": x, "y": y}), context).text for x, y in ((15, 30), (2, 2), (30, 5))]
    assert names == ["red", "white", "grey"]
    outside = run_call(ToolCall("colour_at", {"x": 40, "y": 0}), context)
    assert outside.error == "tool_raised" and "outside the 40 x 40 image" in outside.text
    assert run_call(ToolCall("colour_at", {"x": 1, "y": 1}), ToolContext()).error == "tool_raised"


def test_every_bad_call_is_an_error_observation_of_its_kind():
    @register_tool("shout", "Repeat a word many times.", {"type": "object", "properties": {"word": {"type": "string"}}})
    def shout(context, word):
        if word == "boom":
            raise RuntimeError("exploded")
        return word * 10_000

    try:
        context = ToolContext()
        cases = {
            "malformed_call": BadCall("the tool call is not valid JSON"),
            "unknown_tool": ToolCall("search_web", {"q": "x"}),
            "bad_arguments": ToolCall("calculator", {"expr": "1"}),
            "tool_raised": ToolCall("shout", {"word": "boom"}),
            "result_too_long": ToolCall("shout", {"word": "ab"}),
        }
        results = {kind: run_call(call, context, max_chars=100) for kind, call in cases.items()}
        assert {kind: r.error for kind, r in results.items()} == {kind: kind for kind in cases}
        assert all(r.text.startswith("Error: ") for kind, r in results.items() if kind != "result_too_long")
        assert "search_web" in results["unknown_tool"].text and "calculator" in results["unknown_tool"].text
        assert "takes expression" in results["bad_arguments"].text and "RuntimeError: exploded" in results["tool_raised"].text
        assert results["result_too_long"].text == "ab" * 50 + " [truncated]"
    finally:
        del TOOLS["shout"]


def test_responses_and_schemas_in_qwens_format():
    turn = tool_responses([ToolResult("7"), ToolResult("Error: x.", "unknown_tool")])
    assert turn == ("\n<|im_start|>user\n<tool_response>\n7\n</tool_response>\n<tool_response>\nError: x.\n"
                    "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    (schema,) = tool_schemas(["calculator"])
    assert schema["type"] == "function" and schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    with pytest.raises(ValueError, match="unknown tools"):
        tool_schemas(["nope"])
