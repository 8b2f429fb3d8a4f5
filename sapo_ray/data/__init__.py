"""Datasets for sapo-ray: the procedural visual-math task (SynthVista), Geometry3K and MathVista.

Every loader returns a list of *Example* dicts (see ``docs/CONTRACTS.md``); ``prompts`` turns an
Example into Qwen-VL chat messages and ``prompt_loader.PromptLoader`` batches them with a resumable state.
"""

from sapo_ray.data.prompt_loader import PromptLoader
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.prompts import DEFAULT_INSTRUCTION, build_messages

__all__ = ["DEFAULT_INSTRUCTION", "PromptLoader", "build_messages", "load_dataset_split"]
