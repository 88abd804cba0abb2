"""Read and write Hugging Face MiniCPM4 folders: config.json, single or sharded safetensors.

Every key of the published configs is either used or listed in IGNORED_KEYS with the reason; a bad
folder raises CheckpointError with one line that names the file and key, before anything is written.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from export.model import InfLLMv2Config, LongRoPE, MiniCPM, MiniCPMConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE = "MiniCPMForCausalLM"

# Keys the forward pass does not need, and why.
IGNORED_KEYS = {
    "_name_or_path": "provenance only",
    "architectures": "checked only when model_type is absent (the 0.5B config has none)",
    "auto_map": "names the remote-code classes; we bring our own",
    "initializer_range": "training only",
    "torch_dtype": "weights are cast to the requested dtype",
    "transformers_version": "provenance only",
    "use_cache": "the kit always uses a KV cache",
    "pad_token_id": "no padding: rows of a batch keep their own positions",
    "mup_denominator": "not used by the MiniCPM4 forward pass",
}
USED_KEYS = {
    "model_type", "hidden_act", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "scale_emb", "scale_depth", "dim_model_base", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "sparse_config",
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "rms_norm_eps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CheckpointError(Exception):
    """A model folder the kit cannot use; the message names the file and key."""


def file_sha256(path: Path, h=None):
    """sha256 of a file read in 4 MiB chunks (pass h to fold several files into one digest)."""
    import hashlib

    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() if own else h


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def load_config(model_dir: str | os.PathLike) -> MiniCPMConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected a Hugging Face MiniCPM4 folder)")
    return config_from_dict(read_json(path), source=str(path))


def config_from_dict(raw: dict, source: str = "config.json") -> MiniCPMConfig:
    def bad(key, why):
        return CheckpointError(f"{source}: key '{key}' {why}")

    if "model_type" in raw:
        if raw["model_type"] != "minicpm":
            raise bad("model_type", f"is {raw['model_type']!r}; this kit runs MiniCPM4 ('minicpm') only")
    elif ARCHITECTURE not in (raw.get("architectures") or []):
        raise bad("model_type", f"is missing and 'architectures' does not list {ARCHITECTURE}: not MiniCPM4")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise bad(key, "is missing")
    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", f"is {raw['hidden_act']!r}; MiniCPM4 uses 'silu'")
    unknown = sorted(set(raw) - USED_KEYS - set(IGNORED_KEYS))
    if unknown:
        log.warning("%s: ignoring keys this kit does not know: %s", source, ", ".join(unknown))

    def positive_int(key, default=None):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(key, f"must be a positive integer, got {value!r}")
        return value

    def number(key, default):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(key, f"must be a number, got {value!r}")
        return float(value)

    hidden, heads = positive_int("hidden_size"), positive_int("num_attention_heads")
    kv_heads = positive_int("num_key_value_heads", heads)
    if hidden % heads or (hidden // heads) % 2:
        raise bad("hidden_size", f"{hidden} is not num_attention_heads ({heads}) times an even head_dim")
    if heads % kv_heads:
        raise bad("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads ({heads})")
    eos = raw.get("eos_token_id", 2)
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise bad("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
    tie = raw.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise bad("tie_word_embeddings", f"must be true or false, got {tie!r}")
    config = MiniCPMConfig(
        vocab_size=positive_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=positive_int("intermediate_size"),
        num_hidden_layers=positive_int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positive_int("max_position_embeddings"),
        rms_norm_eps=number("rms_norm_eps", None),
        rope_theta=number("rope_theta", 10000.0),
        scale_emb=number("scale_emb", 1.0),
        scale_depth=number("scale_depth", 1.0),
        dim_model_base=positive_int("dim_model_base", hidden),
        tie_word_embeddings=tie,
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_ids=eos,
    )
    config.rope_scaling = parse_rope_scaling(raw.get("rope_scaling"), config.head_dim, bad)
    config.sparse = parse_sparse_config(raw.get("sparse_config"), bad)
    return config


def parse_rope_scaling(rs, head_dim: int, bad) -> LongRoPE | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise bad("rope_scaling", f"must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "longrope":
        raise bad("rope_scaling.rope_type", f"is {kind!r}; supported: 'longrope' (or no rope_scaling)")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = rs.get(key)
        if (not isinstance(value, list) or len(value) != head_dim // 2
                or not all(isinstance(x, (int, float)) and x > 0 for x in value)):
            raise bad(f"rope_scaling.{key}", f"must be {head_dim // 2} positive numbers (head_dim / 2)")
        factors[key] = [float(x) for x in value]
    original = rs.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 1:
        raise bad("rope_scaling.original_max_position_embeddings", f"must be an integer > 1, got {original!r}")
    return LongRoPE(factors["short_factor"], factors["long_factor"], original)


def parse_sparse_config(sc, bad) -> InfLLMv2Config | None:
    if sc is None:
        return None
    if not isinstance(sc, dict):
        raise bad("sparse_config", f"must be an object or null, got {sc!r}")
    defaults = vars(InfLLMv2Config())
    unknown = sorted(set(sc) - set(defaults))
    if unknown:
        raise bad(f"sparse_config.{unknown[0]}", "is not an InfLLM v2 setting this kit knows")
    values = {}
    for key, default in defaults.items():
        value = sc.get(key, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise bad(f"sparse_config.{key}", f"must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(f"sparse_config.{key}", f"must be a positive integer, got {value!r}")
        values[key] = value
    try:
        return InfLLMv2Config(**values)
    except ValueError as e:  # the config's own consistency checks
        raise bad("sparse_config", str(e).removeprefix("sparse_config: ")) from None


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file that holds it."""
    from safetensors import safe_open

    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: key 'weight_map' is missing or empty")
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
               config: MiniCPMConfig | None = None) -> MiniCPM:
    """Build on the meta device and assign the checkpoint's tensors, cast to `dtype` (CPU)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = config or load_config(model_dir)
    with torch.device("meta"):
        model = MiniCPM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    files = weight_files(model_dir)
    hf_names = {("model." + k if not k.startswith("lm_head") else k): k for k in expected}
    missing = sorted(hf for hf in hf_names if hf not in files)
    if missing:
        raise CheckpointError(f"{model_dir}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    state = {}
    by_file: dict[Path, list[str]] = {}
    for hf in hf_names:
        by_file.setdefault(files[hf], []).append(hf)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for hf in names:
                    tensor = f.get_tensor(hf)
                    ours = hf_names[hf]
                    if tuple(tensor.shape) != tuple(expected[ours]):
                        raise CheckpointError(
                            f"{path}: tensor '{hf}' has shape {tuple(tensor.shape)} but config.json implies "
                            f"{tuple(expected[ours])}")
                    state[ours] = tensor.to(dtype)
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found (listed in {INDEX_FILE})") from None
        except Exception as e:  # corrupt or truncated safetensors
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def hf_state_dict(model: MiniCPM) -> dict[str, torch.Tensor]:
    """Our parameter names -> Hugging Face tensor names (tied lm_head left out)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[name if name.startswith("lm_head") else "model." + name] = tensor.contiguous()
    return out


def save_weights(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int = 1):
    """Write safetensors into out_dir: one file, or `shards` files plus the index."""
    from safetensors.torch import save_file

    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map, total = {}, sum(t.numel() * t.element_size() for t in tensors.values())
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


class AtomicDir:
    """Build a folder under a temporary name beside its destination; rename into place on success."""

    def __init__(self, dest: str | os.PathLike, overwrite: bool = False):
        self.dest = Path(dest)
        self.overwrite = overwrite

    def check(self):
        """Refuse an existing, non-empty destination (unless overwriting) or an unwritable place, before any
        work is done."""
        ancestor = self.dest.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise CheckpointError(f"{self.dest}: cannot write here ({ancestor} is not a writable directory)")
        if self.dest.exists() and not self.overwrite:
            if not self.dest.is_dir() or any(self.dest.iterdir()):
                raise CheckpointError(f"{self.dest}: already exists and is not empty (choose another path, "
                                      f"or --force to replace it)")

    def __enter__(self) -> Path:
        self.check()
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", dir=parent))
            umask = os.umask(0)
            os.umask(umask)
            self.tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        except OSError as e:
            raise CheckpointError(f"{self.dest}: cannot write here ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dest.exists():
            shutil.rmtree(self.dest)
        os.replace(self.tmp, self.dest)
        return False
