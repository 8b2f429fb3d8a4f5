"""Tools an episode's turns can call, the call format, and running a call to its observation text.

A call is written in Qwen's tool format (the Hermes-style blocks of the Qwen2.5 and Qwen3 chat templates):

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "3 + 4 * 2"}}
    </tool_call>

and answered, in order, by `<tool_response>` blocks in the next user turn (`tool_responses`). A tool is a
function `fn(context, **arguments) -> str` registered by name with its description and the JSON schema of
its arguments (`register_tool`); `context` holds what the tool may see of the episode (its images), and
nothing else: tools get no run directory and no handle on the trainer.

Whatever a turn writes, running it never raises: a malformed call, an unknown tool, wrong arguments, a
tool that raises or returns something huge each give an error observation and a counted `ToolError` kind.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

from sapo_ray.data.synthvista import COLOURS

CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
OPEN = "<tool_call>"
# The kinds of failed call, the keys of an episode's `tool_errors` counts (and of its metrics); `env_raised`:
# an environment's own step failed (the episode ends).
ERROR_KINDS = ("malformed_call", "unknown_tool", "bad_arguments", "tool_raised", "timeout", "result_too_long",
               "env_raised")


@dataclass(frozen=True)
class Tool:
    fn: Callable[..., str]
    description: str
    parameters: dict  # JSON schema of the arguments (an object), as chat templates list tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class BadCall:
    """A `<tool_call>` block that names no runnable call; `why` is the observation the model gets."""

    why: str


@dataclass
class ToolContext:
    """What a tool may see of its episode."""

    images: list = field(default_factory=list)  # the example's images (RGB PIL), in order


@dataclass(frozen=True)
class ToolResult:
    text: str  # the observation for this call
    error: str | None = None  # one of ERROR_KINDS, or None


TOOLS: dict[str, Tool] = {}


def register_tool(name: str, description: str, parameters: dict) -> Callable:
    """Decorator registering `fn(context, **arguments) -> str` as the tool `name`."""

    def decorator(fn: Callable[..., str]) -> Callable[..., str]:
        if name in TOOLS:
            raise ValueError(f"a tool named {name!r} is already registered")
        TOOLS[name] = Tool(fn, description, parameters)
        return fn

    return decorator


def load_tool(spec: str) -> str:
    """Register the function of `"path/to/file.py:function"` as a tool named after the function (its
    docstring describes it; a `parameters` attribute, a JSON schema, gives its arguments, else they are
    read from its signature); returns the name. Loading the same spec again is a no-op."""
    from sapo_ray.reward import load_reward_fn  # the same file-and-name loader as a user's reward

    fn = load_reward_fn(spec)
    name = fn.__name__
    if name in TOOLS and TOOLS[name].fn.__code__.co_filename == fn.__code__.co_filename:
        return name
    names = [p for p in inspect.signature(fn).parameters][1:]  # the first is the context
    parameters = getattr(fn, "parameters", {"type": "object", "properties": {n: {} for n in names}})
    register_tool(name, (fn.__doc__ or name).strip(), parameters)(fn)
    return name


def parse_tool_calls(text: str) -> list[ToolCall | BadCall]:
    """The calls of one assistant turn, in order: each `<tool_call>` block as a `ToolCall`, or a `BadCall`
    saying why it is not one (not JSON, not an object, no name, arguments not an object; an unclosed block)."""
    calls: list[ToolCall | BadCall] = []
    for block in CALL.findall(text):
        try:
            value = json.loads(block)
        except json.JSONDecodeError as err:
            calls.append(BadCall(f"the tool call is not valid JSON ({err.msg} at character {err.pos})"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(BadCall('a tool call is a JSON object {"name": ..., "arguments": {...}}'))
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            calls.append(BadCall(f"the arguments of {value['name']!r} must be a JSON object"))
            continue
        calls.append(ToolCall(value["name"], arguments))
    if text.count(OPEN) > len(CALL.findall(text)):
        calls.append(BadCall("a <tool_call> block is not closed by </tool_call>"))
    return calls


def run_call(call: ToolCall | BadCall, context: ToolContext, max_chars: int = 1000,
             allowed: set[str] | None = None) -> ToolResult:
    """Run one call in this process (the caller bounds its time); never raises. `allowed`: the tools a turn
    may call (None: every registered one); any other is unknown."""
    if isinstance(call, BadCall):
        return ToolResult(f"Error: {call.why}.", "malformed_call")
    names = set(TOOLS) if allowed is None else allowed & set(TOOLS)
    tool = TOOLS.get(call.name) if call.name in names else None
    if tool is None:
        return ToolResult(f"Error: there is no tool {call.name!r} (tools: {', '.join(sorted(names))}).", "unknown_tool")
    try:
        inspect.signature(tool.fn).bind(context, **call.arguments)
    except TypeError as err:
        return ToolResult(f"Error: {call.name} takes {_argument_names(tool)}: {err}.", "bad_arguments")
    try:
        text = tool.fn(context, **call.arguments)
    except Exception as err:  # the tool's own failure is the episode's observation
        return ToolResult(f"Error: {call.name} failed: {type(err).__name__}: {err}.", "tool_raised")
    text = str(text)
    if len(text) > max_chars:
        return ToolResult(text[:max_chars] + " [truncated]", "result_too_long")
    return ToolResult(text)


def _argument_names(tool: Tool) -> str:
    names = list(tool.parameters.get("properties", {}))
    return ", ".join(names) if names else "no arguments"


def tool_responses(results: list[ToolResult]) -> str:
    """The user turn answering a turn's calls (Qwen's format), ready to follow the assistant's `<|im_end|>`:
    the assistant's next turn starts right after it."""
    blocks = "\n".join(f"<tool_response>\n{r.text}\n</tool_response>" for r in results)
    return f"\n<|im_start|>user\n{blocks}<|im_end|>\n<|im_start|>assistant\n"


def tool_schemas(names: list[str]) -> list[dict]:
    """The tools `names` as chat templates list them (`{"type": "function", "function": {...}}`)."""
    missing = [n for n in names if n not in TOOLS]
    if missing:
        raise ValueError(f"unknown tools {missing}; registered: {sorted(TOOLS)}")
    return [{"type": "function", "function": {"name": n, "description": TOOLS[n].description,
                                              "parameters": TOOLS[n].parameters}} for n in names]


# ---- built-in tools ------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION = 200  # characters
MAX_MAGNITUDE = 1e15  # results and operands beyond it are refused, so no call computes for long


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("the power is too large")
        value = _BINARY[type(node.op)](left, right)
    else:
        raise ValueError("only numbers, + - * / // % ** and parentheses are allowed")
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError("the result is out of range")
    return value


def format_number(value: float | int) -> str:
    """`7`, `2.5`, `0.333333` (integers without a point, others to 6 significant decimals)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


@register_tool("calculator", "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
               {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. (3 + 4) / 2"}},
                "required": ["expression"]})
def calculator(context: ToolContext, expression: str) -> str:
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression must be a string of at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse {expression!r}") from err
    try:
        return format_number(_evaluate(tree))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


# Named colours the pixel under a point is matched to: synthvista's palette, and its background and lines.
NAMED_COLOURS = {**COLOURS, "white": (255, 255, 255), "grey": (215, 215, 215), "black": (0, 0, 0)}


@register_tool("colour_at", "Name the colour of the image at a point (x, y), in pixels from the top-left corner.",
               {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                                 "image": {"type": "integer", "description": "which image, from 1"}},
                "required": ["x", "y"]})
def colour_at(context: ToolContext, x: float, y: float, image: int = 1) -> str:
    if not context.images:
        raise ValueError("the question has no image")
    if not isinstance(image, int) or not 1 <= image <= len(context.images):
        raise ValueError(f"image must be 1..{len(context.images)}")
    picture = context.images[image - 1]
    if not all(isinstance(v, (int, float)) for v in (x, y)):
        raise ValueError("x and y must be numbers")
    if not (0 <= x < picture.width and 0 <= y < picture.height):
        raise ValueError(f"({x}, {y}) is outside the {picture.width} x {picture.height} image")
    pixel = picture.convert("RGB").getpixel((int(x), int(y)))
    return min(NAMED_COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(NAMED_COLOURS[n], pixel)))
