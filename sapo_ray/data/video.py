"""Videos in examples: a clip is its decoded, sampled frames and their rate (`Video`).

A data row gives a video as a list of frames (images in any form `decode_image` reads) or as a file,
decoded with PyAV (FFmpeg's bindings, the `av` package). Frames are sampled at `fps` per second of
the clip, at most `max_frames` of them spread evenly over the whole clip when it is longer, an even
count (Qwen-VL embeds frames in pairs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from sapo_ray.data.schema import UnreadableImageError, cell_bytes, decode_image


@dataclass
class Video:
    """A clip as decoded frames (RGB PIL images, already sampled) and the rate they were sampled at:
    frame `i` shows the clip at `i / fps` seconds."""

    frames: list
    fps: float

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


@dataclass(frozen=True)
class VideoSampling:
    """How a decoded clip is sampled (`data.video_fps`, `data.max_frames`)."""

    fps: float = 2.0
    max_frames: int = 16


class UnreadableVideoError(ValueError):
    """A video in a row could not be decoded (corrupt file, missing file, no frames, frames of mixed sizes)."""


def sample_indices(total: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Indices of the frames to keep from `total` frames at `source_fps`: `fps` per second, at most
    `max_frames` (spread evenly over the clip), at least 2, an even count unless the clip has 1 frame."""
    if total <= 0:
        return []
    wanted = max(2, min(max_frames, round(total / source_fps * fps)))
    wanted = min(wanted - wanted % 2, total - total % 2) or 1
    step = total / wanted
    return [min(total - 1, int(step * i + step / 2)) for i in range(wanted)]


def sample_video(frames: list, source_fps: float, fps: float, max_frames: int) -> Video:
    """`frames` (decoded, at `source_fps`) sampled to a `Video` (`sample_indices`)."""
    keep = sample_indices(len(frames), source_fps, fps, max_frames)
    if not keep:
        raise UnreadableVideoError("the video has no frames")
    if len({f.size for f in frames}) > 1:
        raise UnreadableVideoError(f"the video's frames differ in size: {sorted({f.size for f in frames})}")
    rate = source_fps * len(keep) / len(frames)
    return Video([frames[i] for i in keep], rate)


def decode_video(value, base_dir: Path | None, fps: float, max_frames: int, source_fps: float | None = None) -> Video:
    """Decode a video cell: a list of frames (at `source_fps`, default `fps`), a path (relative to
    `base_dir`), raw bytes, or a `{"bytes": ...}` / `{"path": ...}` dict; sampled as `sample_video` says."""
    if isinstance(value, Video):
        return value
    try:
        if isinstance(value, (list, tuple)):
            frames = [decode_image(f, base_dir) for f in value]
            return sample_video(frames, source_fps or fps, fps, max_frames)
        data = cell_bytes(value, base_dir)
        if data is None:
            raise UnreadableVideoError("video has neither frames, bytes nor a readable path")
        frames, rate = _decode_file(bytes(data))
        return sample_video(frames, rate, fps, max_frames)
    except UnreadableVideoError:
        raise
    except UnreadableImageError as err:
        raise UnreadableVideoError(f"a frame: {err}") from err
    except (OSError, ValueError, TypeError) as err:
        raise UnreadableVideoError(f"{type(err).__name__}: {err}") from err


def _decode_file(data: bytes) -> tuple[list, float]:
    """All frames of an encoded video (RGB PIL images) and its frame rate."""
    try:
        import av
    except ImportError as err:
        raise ImportError("decoding video files needs PyAV: pip install 'sapo-ray[video]' (or give each video as a "
                          "list of frames)") from err

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            frames = [frame.to_image().convert("RGB") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as err:
        raise UnreadableVideoError(f"{type(err).__name__}: {err}") from err
    if rate is None:
        raise UnreadableVideoError("the video file states no frame rate")
    return frames, rate
