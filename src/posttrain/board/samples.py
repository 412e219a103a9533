"""An SFT run's first rows as `posttrain data preview` shows them: the rendered text with the trained
spans inside [[ ]], read from the data and template the run's saved config names."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from posttrain.errors import PosttrainError


def preview_samples(folder: Path, count: int) -> list[dict] | dict:
    """[{"source", "tokens", "trained", "text"}] for the first `count` rows, or {"error"} when the run's data or
    tokenizer cannot be read now (moved, deleted) or the run is not SFT."""
    mtime = (folder / "posttrain_config.yaml").stat().st_mtime_ns if (folder / "posttrain_config.yaml").is_file() else 0
    return _preview(str(folder), mtime, count)


@lru_cache(maxsize=16)
def _preview(folder: str, mtime: int, count: int):
    from posttrain.config import load_config
    from posttrain.data.preview import sft_samples
    from posttrain.model.loading import load_tokenizer

    path = Path(folder) / "posttrain_config.yaml"
    if not mtime:
        return {"error": f"{path} is missing: the board previews samples of posttrain SFT runs"}
    try:
        config = load_config("sft", str(path))
        tokenizer = load_tokenizer(config.model_name_or_path, config.trust_remote_code)
        return sft_samples(config, tokenizer, count)
    except PosttrainError as err:
        return {"error": str(err)}
