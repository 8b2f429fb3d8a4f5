"""The token ids every component must agree on: what is never sampled, what ends a turn, padding."""

from __future__ import annotations

from dataclasses import dataclass

from sapo_ray.batch import VisionTokens


@dataclass(frozen=True)
class TokenIds:
    banned: tuple[int, ...]  # special/vision tokens: suppressed in rollouts, masked in learner log-probs
    eos: tuple[int, ...]  # end-of-turn ids that stop a response
    pad: int
    vision: VisionTokens  # the image and video placeholders (`<|image_pad|>`, `<|video_pad|>`); None in a text model

    @classmethod
    def of(cls, tokenizer) -> "TokenIds":
        from sapo_ray.models.processor import banned_token_ids

        vocab = tokenizer.get_vocab()
        eos = tuple(vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab) or (tokenizer.eos_token_id,)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        return cls(tuple(sorted(banned_token_ids(tokenizer))), eos, pad,
                   VisionTokens(vocab.get("<|image_pad|>"), vocab.get("<|video_pad|>")))
