"""Which files of a directory hold a dataset split."""

from __future__ import annotations

from pathlib import Path

# File stems that name a split: a directory whose files use none of them is one split.
KNOWN_SPLITS = ("train", "validation", "val", "test", "testmini")


def split_files(root: Path, split: str, key: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of `split` under `root` with one of `suffixes`: `root` itself if it is a file, else
    `{split}.*` or `{split}-*.*` at any depth (the hub's `data/train-00000-of-00001.parquet` layout), or
    every file when none is named after a known split. `key` is the config key an error names."""
    if root.is_file():
        if root.suffix not in suffixes:
            raise ValueError(f"{key}={str(root)!r}: a {root.suffix or 'suffixless'} file; want one of {suffixes}")
        return [root]
    every = sorted(f for f in root.rglob("*") if f.suffix in suffixes and f.is_file())
    files = [f for f in every if f.stem == split or f.stem.startswith(f"{split}-")]
    if not files and not any(f.stem.split("-")[0] in KNOWN_SPLITS for f in every):
        files = every  # no file is named after a split: the directory is one split
    if not files:
        found = ", ".join(str(f.relative_to(root)) for f in every) or "none"
        raise FileNotFoundError(f"{key}={str(root)!r}: no {'/'.join(suffixes)} file for split {split!r} "
                                f"(want {split}.* or {split}-*.*; found: {found})")
    return files
