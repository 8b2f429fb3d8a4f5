"""The instruction of the paper's setup and Qwen-VL chat messages for an Example."""

from __future__ import annotations

# Geometry3K instruction of verl's ``examples/data_preprocess/geo3k.py`` and EasyR1's geo3k recipes
# (the setup the SAPO paper trains with): answer format `<think>...</think> ... \boxed{...}`.
DEFAULT_INSTRUCTION = (
    r"You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    r"The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \boxed{}."
)
# A short variant for tiny models with a short context.
SHORT_INSTRUCTION = r"Think inside <think> </think>, then put the final answer in \boxed{}."
IMAGE_PLACEHOLDER = "<image>"


def build_messages(example: dict, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """Return Qwen-VL chat messages for an Example: one user turn, images then text.

    The text is ``query + "\\n" + instruction`` (just ``query`` when ``instruction`` is empty).
    One ``{"type": "image"}`` entry per image in ``example["images"]``, in order (pass the images
    to the processor separately). ``<image>`` placeholders in the query (Geometry3K) are replaced by
    the image entries at their positions; without placeholders the images come first. An example
    without images (the text-only twin) gets a plain string content, which both the Qwen2 and the
    Qwen2-VL chat templates accept.
    """
    text = f"{example['query']}\n{instruction}" if instruction else example["query"]
    n_images = len(example.get("images") or [])
    if n_images == 0:
        return [{"role": "user", "content": text.replace(IMAGE_PLACEHOLDER, "")}]
    parts = text.split(IMAGE_PLACEHOLDER)
    n_holders = len(parts) - 1
    if n_holders == 0:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    elif n_holders == n_images:
        content = []
        for i, part in enumerate(parts):
            if part.strip():
                content.append({"type": "text", "text": part})
            if i < n_images:
                content.append({"type": "image"})
    else:
        raise ValueError(f"example {example.get('pid')!r}: {n_holders} {IMAGE_PLACEHOLDER} placeholders "
                         f"but {n_images} images; they must match (or the query has none)")
    return [{"role": "user", "content": content}]
