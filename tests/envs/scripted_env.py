"""A scripted environment for the end-to-end tests: the first turn gets a tool response, the second ends."""

from sapo_ray.envs.env import Step
from sapo_ray.envs.tools import ToolResult, tool_responses


class OneObservation:
    def __init__(self, example, tools):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        if self.turns > 1:
            return Step(None)
        return Step(tool_responses([ToolResult("7")]), tool_calls=1)
