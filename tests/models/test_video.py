"""Videos: frames encoded as Qwen-VL's video processors lay them out, prompts expanded as each family
expects, decoded files, and video rows through the engine and the learner in every layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import learner_cfg, local_process_group, sample_batch
from sapo_ray.data.video import UnreadableVideoError, Video, decode_video, sample_indices
from sapo_ray.models import load_processor
from sapo_ray.models.processor import FrameVideoProcessor


def _frames(n: int, size: int = 112, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_two_equal_frames_are_the_image_repeated_over_time(vlm_dir):
    """The image processor repeats a still image over the temporal patch: a clip of that image twice is
    exactly the image's patches, one temporal patch long."""
    proc = load_processor(vlm_dir)
    frame = _frames(1)[0]
    patches, grid = proc.video_processor.encode(Video([frame, frame], 2.0))
    image = proc.image_processor(images=[frame], return_tensors="pt")
    assert grid == image["image_grid_thw"][0].tolist() == [1, 8, 8]
    assert torch.equal(patches, image["pixel_values"])


@pytest.mark.parametrize("frames", [4, 3])
def test_patches_follow_the_layout_of_transformers_video_processors(vlm_dir, frames):
    """Against `patchify` of transformers' Qwen3-VL video processor (the Qwen2-VL one is the same code, but
    imports torchvision) on the normalised frames: the same patches in the same order; an odd last frame
    repeated."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    proc = load_processor(vlm_dir)  # 112 px frames stay 112 px (8 x 8 patches of 14)
    ip = proc.image_processor
    clip = _frames(frames, seed=frames)
    mean, std = np.array(ip.image_mean, dtype=np.float32), np.array(ip.image_std, dtype=np.float32)
    normalised = np.stack([((np.asarray(f, dtype=np.float32) / 255 - mean) / std).transpose(2, 0, 1) for f in clip])
    reference, t, h, w = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(normalised)[None], patch_size=14,
                                                        merge_size=2, temporal_patch_size=2)
    patches, grid = proc.video_processor.encode(Video(clip, 2.0))
    assert grid == [t, h, w] == [2, 8, 8]
    torch.testing.assert_close(patches, reference[0], rtol=0, atol=1e-5)


def test_frames_are_resized_to_the_video_pixel_budget(vlm_dir):
    """`data.video_max_pixels` bounds each frame (Qwen's smart_resize: 300 x 200 px over 3136 px is scaled by
    sqrt(60000 / 3136) = 4.37 and floored to multiples of 28, 56 x 28 px -> 4 x 2 patches of 14); frames of
    mixed sizes are refused."""
    proc = load_processor(vlm_dir, video_max_pixels=3136)
    _, grid = proc.video_processor.encode(Video([Image.new("RGB", (300, 200), "white")] * 2, 2.0))
    assert grid == [1, 2, 4]
    with pytest.raises(ValueError, match="share one size"):
        FrameVideoProcessor(proc.image_processor).encode(Video([Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))], 2.0))


def test_prompts_expand_videos_as_each_family_does(random_tiny_models):
    """Qwen2.5-VL: one `<|video_pad|>` per merged patch and `second_per_grid_ts` = 2 frames / fps. Qwen3-VL:
    per temporal patch its time (the mean of its two frames': 4 frames at 4 fps -> 0.125 and 0.625 s, shown
    with one decimal) and its own vision start and end, in place of the template's pair."""
    clip = Video(_frames(4), 4.0)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which grew?"}]}]
    proc = load_processor(random_tiny_models["vlm"])
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = proc(text=[text], videos=[clip], return_tensors="pt")
    pad = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert out["video_grid_thw"].tolist() == [[2, 8, 8]] and int((out["input_ids"] == pad).sum()) == 2 * 8 * 8 // 4
    assert out["second_per_grid_ts"].tolist() == [0.5]
    assert out["mm_token_type_ids"][out["input_ids"] == pad].eq(2).all()

    proc = load_processor(random_tiny_models["qwen3_vl"])  # 16 px patches: 112 px frames become 96 px, 6 x 6
    out = proc(text=[text], videos=[clip], return_tensors="pt")
    frame = "<|vision_start|>" + "<|video_pad|>" * 9 + "<|vision_end|>"
    decoded = proc.tokenizer.decode(out["input_ids"][0])
    assert "<|vision_start|><0.1 seconds>" not in decoded  # the template's own pair is gone
    assert f"<0.1 seconds>{frame}<0.6 seconds>{frame}Which grew?" in decoded
    assert "second_per_grid_ts" not in out


def _video_file(frames: list[Image.Image], fps: int) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_a_video_file_decodes_to_its_frames_sampled_at_the_asked_rate(tmp_path):
    """6 frames at 6 fps (one second, red to blue) sampled at 2 fps: 2 frames, from each half of the clip,
    at 2 fps; a list of frames samples alike; a corrupt file or no frames is an `UnreadableVideoError`."""
    colours = [(255 - 40 * i, 0, 40 * i) for i in range(6)]
    frames = [Image.new("RGB", (64, 48), c) for c in colours]
    (tmp_path / "clip.mp4").write_bytes(_video_file(frames, 6))
    video = decode_video("clip.mp4", tmp_path, fps=2.0, max_frames=16)
    assert len(video.frames) == 2 and video.fps == pytest.approx(2.0) and video.frames[0].size == (64, 48)
    kept = sample_indices(6, 6.0, 2.0, 16)
    assert kept == [1, 4]
    for got, i in zip(video.frames, kept):  # lossy codec: colours within a few levels
        assert np.abs(np.asarray(got, dtype=int) - np.array(colours[i])).mean() < 12
    listed = decode_video(frames, None, fps=2.0, max_frames=16, source_fps=6.0)
    assert [f.getpixel((0, 0)) for f in listed.frames] == [colours[1], colours[4]]
    assert sample_indices(100, 10.0, 2.0, 4) == [12, 37, 62, 87]  # 20 frames wanted, 4 kept, spread evenly
    assert sample_indices(3, 1.0, 2.0, 16) == [0, 2]  # an even count, spread over the clip
    with pytest.raises(UnreadableVideoError):
        decode_video({"bytes": b"not a video"}, None, fps=2.0, max_frames=4)
    with pytest.raises(UnreadableVideoError, match="no frames"):
        decode_video([], None, fps=2.0, max_frames=4)
    with pytest.raises(UnreadableVideoError):
        decode_video("missing.mp4", tmp_path, fps=2.0, max_frames=4)


@pytest.mark.parametrize("model", ["vlm", "qwen3_vl"])
def test_video_rows_agree_between_engine_and_learner_in_every_layout(model, random_tiny_models):
    """Clips (4 frames at 4 fps: Qwen2.5-VL's temporal positions step by 0.5 s, not the default 1) beside
    bar charts: the learner's per-token log-probs and entropies equal the engine's within 1e-4 in each layout,
    and the critic's values agree across layouts."""
    from sapo_ray.learner.worker import CriticWorker, PolicyWorker

    path = random_tiny_models[model]
    batch, _ = sample_batch(path, prompts=4, n=2, max_new_tokens=10, templates=["bar_grew", "bar_max"], clip_fps=4.0)
    kinds = [("video" if v.pixel_values_videos is not None else "image") for v in batch.vision]
    assert "video" in kinds and "image" in kinds
    valid = batch.response_mask.bool()
    values = {}
    with local_process_group():
        for layout in ("padded", "shared_prompt", "packed"):
            policy = PolicyWorker(0, 1, learner_cfg(path, layout=layout, videos=True))
            policy.setup()
            out = policy.compute_logprobs(batch)
            assert float((out.logp - batch.rollout_logp).abs()[valid].max()) < 1e-4, layout
            assert float((out.entropy - batch.rollout_entropy).abs()[valid].max()) < 1e-4, layout
            critic = CriticWorker(0, 1, learner_cfg(path, role="critic", layout=layout, videos=True))
            critic.setup()
            values[layout] = critic.compute_values(batch)
    for layout in ("shared_prompt", "packed"):
        torch.testing.assert_close(values[layout][valid], values["padded"][valid], rtol=0, atol=1e-5)


def test_the_clip_is_seen(random_tiny_models):
    """The frames reach the model: another clip of the same question changes the response's log-probs."""
    from sapo_ray.learner.forward import policy_forward

    batch, engine = sample_batch(random_tiny_models["vlm"], prompts=1, n=1, max_new_tokens=6, templates=["bar_grew"])
    vision = batch.vision[0]
    other = type(vision)(**{**vision.tensors(), "pixel_values_videos": vision.pixel_values_videos.flip(0)})
    logp, _ = policy_forward(engine.model, batch, 1.0, engine.banned, engine.vision_tokens)
    changed, _ = policy_forward(engine.model, batch.with_fields(vision=[other]), 1.0, engine.banned, engine.vision_tokens)
    assert float((logp - changed).abs().max()) > 1e-4


@pytest.mark.slow
def test_video_rows_train_end_to_end(ray_cluster, tmp_path):
    """`data=synthvista_clip` (clips and bar charts) with SAPO for two steps: the rollouts hold clips, the
    policy and the critic update, and the learners run the tower twice in every forward pass."""
    import json

    from helpers import tiny_cfg
    from sapo_ray.main import run

    run(tiny_cfg(tmp_path / "run", "bundled:tiny-vlm", "data=synthvista_clip", "trainer.dump_rollouts=true"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["actor/grad_norm"] > 0 and r["critic/grad_norm"] > 0 and r["sync/bytes"] > 0 for r in rows[1:])
    rollouts = [json.loads(line) for f in sorted((tmp_path / "run" / "generations").glob("rollout_*.jsonl"))
                for line in f.read_text().splitlines()]
    assert any("Which bar grew the most?" in r["prompt"] for r in rollouts)
