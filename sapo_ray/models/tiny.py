"""Build the tiny offline models: a Qwen2.5-VL-family VLM and its text-only Qwen2 twin.

Nothing is downloaded: the byte-level BPE tokenizer is trained here on SynthVista text (digits
split into single characters, Qwen's pre-tokenizer and special tokens) and the weights are random.
`python -m sapo_ray.sft` then warm-starts them; the results ship in `sapo_ray/assets/`.

The VLM uses the production model's classes (`Qwen2_5_VLForConditionalGeneration`, Qwen2-VL image
processor, Qwen chat template), scaled down: text 256 x 4 layers, vision depth 2 / dim 256,
patch 14, merge 2, so a 112x112 image is 8x8 patches -> 16 image tokens.
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2Config, Qwen2Tokenizer, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from sapo_ray.models.loading import build_from_config
from sapo_ray.models.processor import QwenVLProcessor, load_tokenizer

# Qwen2's pre-tokenizer regex: letters in words, every digit alone (\p{N}), punctuation runs.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5-VL's special tokens (same strings; ids differ), then non-special added tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]
# Qwen2.5-VL's chat template (default system prompt, images as vision_start/image_pad/vision_end).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = 112  # SynthVista images; min/max pixels keep larger images at <= 16 tokens


def tokenizer_corpus(n: int = 2000, seed: int = 1234) -> list[str]:
    """SynthVista text as the models see it, to train the tokenizer on: for image and text-only
    train rows, the system prompt, the query with each instruction of `sapo_ray.data.prompts` in
    turn, and the reference solution. Deterministic."""
    from sapo_ray.data import synthvista
    from sapo_ray.data.prompts import DEFAULT_INSTRUCTION, SHORT_INSTRUCTION

    instructions = [DEFAULT_INSTRUCTION, SHORT_INSTRUCTION, ""]
    texts = []
    for text_only in (False, True):
        for i, row in enumerate(synthvista.generate(n, seed=seed, split="train", text_only=text_only)):
            texts += ["system\nYou are a helpful assistant.\nuser\n", f"{row['query']}\n{instructions[i % 3]}",
                      "assistant\n", row["solution"]]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> Qwen2Tokenizer:
    """Train a Qwen-style byte-level BPE on `texts`; `vocab_size` counts the special and
    `<think>` tokens. Every byte stays encodable, so unseen text never maps to unknown tokens."""
    n_added = len(SPECIAL_TOKENS) - 1 + len(THINK_TOKENS)  # <|endoftext|> is the trainer's own special
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(THINK_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 2048
    return tok


def _token_ids(tok) -> dict:
    return dict(bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))


def tiny_lm_config(tok, hidden: int = 256, layers: int = 4) -> Qwen2Config:
    """Qwen2 causal-LM config of the text-only twin (same text tower as the VLM)."""
    return Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
                       tie_word_embeddings=True, **_token_ids(tok))


def tiny_vlm_config(tok, hidden: int = 256, layers: int = 4, vision_depth: int = 2, vision_dim: int = 256) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL config: text `hidden` x `layers`, vision `vision_depth` x `vision_dim`, patch 14, merge 2."""
    half = hidden // 4 // 2  # rotary frequencies per head, split over (t, h, w) like Qwen's [16, 24, 24]
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = tiny_lm_config(tok, hidden, layers).to_dict()
    text.update(rope_scaling={"type": "mrope", "mrope_section": mrope, "rope_theta": 10000.0})
    vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_heads=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=IMAGE_SIZE,
                  out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_vision_token_ids(tok),
                            **_token_ids(tok))


def _vision_token_ids(tok) -> dict:
    return {k: tok.convert_tokens_to_ids(t) for k, t in [("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>")]}


def tiny_qwen3_vl_config(tok, hidden: int = 64, layers: int = 2, vision_depth: int = 2,
                         vision_dim: int = 32) -> Qwen3VLConfig:
    """Qwen3-VL config: text `hidden` x `layers` (head 16, interleaved multimodal RoPE), vision
    `vision_depth` x `vision_dim` with a DeepStack merger after its first block, patch 16, merge 2."""
    half = 16 // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = tiny_lm_config(tok, hidden, layers).to_dict()
    text.update(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                                              "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden, deepstack_visual_indexes=[0],
                  num_position_embeddings=64)
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_vision_token_ids(tok))


def qwen3_vl_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor for synthvista's 112x112 images: 16 px patches, resized to 96 or 128 px."""
    return Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=IMAGE_SIZE ** 2, patch_size=16, temporal_patch_size=2,
                                    merge_size=2)


def image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image processor for 112x112 inputs: 8x8 patches of 14 px, 16 tokens after 2x2 merge."""
    return Qwen2VLImageProcessorPil(min_pixels=(IMAGE_SIZE // 2) ** 2, max_pixels=IMAGE_SIZE ** 2,
                                    patch_size=14, temporal_patch_size=2, merge_size=2)


def _save(model, tok, out_dir: str, processor=None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    ids = _token_ids(tok)
    model.generation_config = GenerationConfig(bos_token_id=None, pad_token_id=ids["pad_token_id"],
                                               eos_token_id=[ids["eos_token_id"], tok.convert_tokens_to_ids("<|endoftext|>")])
    model.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)  # tokenizer, processor config (as Qwen2_5_VLProcessor), chat template
    else:
        tok.save_pretrained(out_dir)
    return out_dir


def _tokenizer(tokenizer):
    if tokenizer is None:
        return build_tokenizer(tokenizer_corpus())
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer


def build_tiny_vlm(out_dir: str, seed: int = 0, tokenizer=None) -> str:
    """Write a randomly initialised tiny Qwen2.5-VL (~7M params) with tokenizer and processor to
    `out_dir` (loadable by `load_policy` / `load_processor`); returns `out_dir`.

    `tokenizer`: None trains one on SynthVista text (~1 s, deterministic); a path (e.g.
    `"bundled:tiny-vlm"`) or a tokenizer object reuses that one."""
    tok = _tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = build_from_config(tiny_vlm_config(tok))
    processor = QwenVLProcessor(image_processor(), tok, chat_template=tok.chat_template)
    return _save(model, tok, out_dir, processor)


def build_tiny_qwen3_vl(out_dir: str, seed: int = 0, tokenizer=None) -> str:
    """Write a randomly initialised tiny Qwen3-VL (~0.3M params: DeepStack, interleaved multimodal RoPE, 16 px
    patches) with tokenizer and processor to `out_dir`; returns `out_dir`. `tokenizer` as for
    :func:`build_tiny_vlm`."""
    tok = _tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = build_from_config(tiny_qwen3_vl_config(tok))
    processor = QwenVLProcessor(qwen3_vl_image_processor(), tok, chat_template=tok.chat_template)
    processor.stock_class = "Qwen3VLProcessor"
    return _save(model, tok, out_dir, processor)


def build_tiny_lm(out_dir: str, seed: int = 0, tokenizer=None) -> str:
    """Write a randomly initialised tiny Qwen2 causal LM (~4M params, the VLM's tokenizer and text
    tower shape) to `out_dir`; returns `out_dir`. `tokenizer` as for :func:`build_tiny_vlm`."""
    tok = _tokenizer(tokenizer)
    torch.manual_seed(seed)
    return _save(build_from_config(tiny_lm_config(tok)), tok, out_dir)
