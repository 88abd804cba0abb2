"""128K context the way the MiniCPM4-8B model card says, without editing the checkpoint's config.json.

The card turns 128K on with two config.json edits: a `sparse_config` (InfLLM v2) and LongRoPE factor lists
validated up to 131,072 tokens (minicpm4_128k.json beside this file holds both, with their source). Here
they are overrides: `overrides_for` says which keys a context needs, `config_with` applies them to the
parsed config, and `overlay_folder` gives the exporter a view of the model folder whose config.json carries
them (the weights are links to the originals, nothing is copied and the checkpoint is left as it is).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from export.checkpoint import CheckpointError, config_from_dict, read_json

PUBLISHED = json.loads((Path(__file__).with_name("minicpm4_128k.json")).read_text())


def native_context(raw: dict) -> int:
    """Positions the checkpoint is configured for as it ships (its max_position_embeddings)."""
    return int(raw.get("max_position_embeddings", 0))


def published_shape(raw: dict) -> bool:
    """Whether the published settings were made for this checkpoint's shape: head_dim 128 and, when it has a
    LongRoPE, the same native length (MiniCPM4-8B; not the 0.5B, not MiniCPM4.1 with its 65536)."""
    heads = raw.get("num_attention_heads") or 1
    own = (raw.get("rope_scaling") or {}).get("original_max_position_embeddings")
    original = PUBLISHED["rope_scaling"]["original_max_position_embeddings"]
    return raw.get("hidden_size", 0) // heads == PUBLISHED["head_dim"] and own in (None, original)


def overrides_for(raw: dict, context: int, sparse: bool) -> dict:
    """The config.json keys (name -> published value) that a context beyond the checkpoint's own needs: {} when
    the context fits as shipped or the checkpoint is not of the published shape (its own rope_scaling, if any,
    then decides, and export/profiles.py refuses a context no LongRoPE covers)."""
    if context <= native_context(raw) or not published_shape(raw):
        return {}
    limit = PUBLISHED["validated_context"]
    if context > limit:
        raise CheckpointError(f"--context {context}: MiniCPM4's published LongRoPE factors are validated up to "
                              f"{limit} tokens; choose --context {limit} or less")
    out = {}
    if raw.get("rope_scaling") != PUBLISHED["rope_scaling"]:
        out["rope_scaling"] = PUBLISHED["rope_scaling"]
    if sparse and raw.get("sparse_config") is None:
        out["sparse_config"] = PUBLISHED["sparse_config"]
    return out


def config_with(raw: dict, overrides: dict, source: str = "config.json"):
    """The parsed config of raw config.json contents with the overrides applied."""
    return config_from_dict({**raw, **overrides}, source=f"{source} with {', '.join(overrides) or 'no'} overrides")


def overlay_folder(model_dir: Path, overrides: dict, into: Path) -> Path:
    """A folder that reads like model_dir but whose config.json has the overrides: every other file is a
    symbolic link to the original. `into` must be an empty folder the caller removes afterwards."""
    model_dir = Path(model_dir).resolve()
    raw = read_json(model_dir / "config.json")
    for item in model_dir.iterdir():
        if item.name != "config.json":
            os.symlink(item, into / item.name)
    tmp = into / ".config.json.tmp"
    tmp.write_text(json.dumps({**raw, **overrides}, indent=2) + "\n")
    os.replace(tmp, into / "config.json")
    return into
