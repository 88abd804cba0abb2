"""Device profiles (devices/jetson/*.yaml, devices/rtx/*.yaml): what an engine is built for.

A profile states the GPU (SM, memory), the TensorRT flavour, the serving shape (max batch, max context,
dtype, sparse attention) and the share of memory the KV cache may take. The KV capacity follows from that
budget and the model; a combination that cannot fit is refused before any work starts. Speed floors are what
`make test-device` holds a flashed device to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from export.checkpoint import CheckpointError

DEVICES_DIR = Path(__file__).resolve().parents[1] / "devices"
FLAVOURS = ("tensorrt", "tensorrt-rtx", "onnxruntime")  # onnxruntime: devices/cpu, no engine
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
FLOOR_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms", "peak_memory_gb")


class ProfileError(CheckpointError):
    """A device profile that is missing, malformed, or asks for what the device cannot hold."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    sm: int
    memory_gb: float
    trt_flavour: str            # "tensorrt" (JetPack) or "tensorrt-rtx"
    trt_min_version: str        # oldest TensorRT the engine must run on (JetPack 6: 10.3)
    max_batch: int
    max_context: int
    dtype: str
    sparse: bool
    kv_cache_fraction: float    # share of memory_gb the KV cache may take
    default_model: str          # Hugging Face repo id used when MODEL is not given
    jetpack: str = ""
    floors: dict = field(default_factory=dict)
    path: str = ""

    @property
    def target(self) -> str:
        return f"sm_{self.sm}"

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.memory_gb * self.kv_cache_fraction * 2**30)


SCHEMA = {  # key: (type, required)
    "name": (str, True), "description": (str, True), "sm": (int, True), "memory_gb": (float, True),
    "trt_flavour": (str, True), "trt_min_version": (str, True), "max_batch": (int, True),
    "max_context": (int, True), "dtype": (str, True), "sparse": (bool, True), "kv_cache_fraction": (float, True),
    "default_model": (str, True), "jetpack": (str, False), "floors": (dict, False),
}


def profile_paths() -> dict[str, Path]:
    """Profile name -> file, from devices/*/ (the registry behind --device)."""
    return {p.stem: p for p in sorted(DEVICES_DIR.glob("*/*.yaml"))}


def load_profile(name_or_path: str) -> DeviceProfile:
    import yaml

    paths = profile_paths()
    path = Path(name_or_path) if name_or_path.endswith((".yaml", ".yml")) else paths.get(name_or_path)
    if path is None:
        raise ProfileError(f"--device {name_or_path!r}: no such profile; known: {', '.join(paths)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return profile_from_dict(raw, str(path))


def profile_from_dict(raw, source: str) -> DeviceProfile:
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: expected a mapping of keys to values")
    unknown = sorted(set(raw) - set(SCHEMA))
    if unknown:
        raise ProfileError(f"{source}: key '{unknown[0]}' is not a profile key (known: {', '.join(SCHEMA)})")
    values = {}
    for key, (kind, required) in SCHEMA.items():
        if key not in raw:
            if required:
                raise ProfileError(f"{source}: key '{key}' is missing")
            continue
        value = raw[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ProfileError(f"{source}: key '{key}' must be {kind.__name__}, got {value!r}")
        values[key] = value
    p = DeviceProfile(**values, path=source)
    checks = [
        (p.trt_flavour in FLAVOURS, "trt_flavour", f"must be one of {', '.join(FLAVOURS)}"),
        (p.dtype in DTYPE_BYTES, "dtype", f"must be one of {', '.join(DTYPE_BYTES)}"),
        (75 <= p.sm <= 130 or (p.trt_flavour == "onnxruntime" and p.sm == 0), "sm",
         "must be an NVIDIA SM such as 87 (Orin) or 89 (RTX 40) (0 for an onnxruntime profile)"),
        (p.memory_gb > 0, "memory_gb", "must be positive"),
        (0 < p.kv_cache_fraction < 1, "kv_cache_fraction", "must be between 0 and 1"),
        (p.max_batch >= 1, "max_batch", "must be at least 1"),
        (p.max_context >= 16, "max_context", "must be at least 16"),
        (all(k in FLOOR_KEYS for k in p.floors), "floors", f"may hold only {', '.join(FLOOR_KEYS)}"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ProfileError(f"{source}: key '{key}' {why}, got {getattr(p, key)!r}")
    return p


def kv_bytes_per_token(config, dtype: str, sparse: bool) -> int:
    """Cache bytes one position of one row takes: K and V of every layer, plus InfLLM v2's compressed keys
    (one per kernel_stride positions) when sparse attention is on."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]
    if sparse and config.sparse is not None:
        per_layer += math.ceil(config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]
                               / config.sparse.kernel_stride)
    return per_layer * config.num_hidden_layers


def weight_bytes(config, dtype: str) -> int:
    c = config
    per_layer = (2 * c.hidden_size * c.num_attention_heads * c.head_dim
                 + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim + 3 * c.hidden_size * c.intermediate_size)
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (per_layer * c.num_hidden_layers + embed) * DTYPE_BYTES[dtype]


@dataclass
class Plan:
    """What an engine for this profile and model holds."""
    max_batch: int
    max_context: int
    kv_capacity_tokens: int   # positions (rows x context) the KV budget holds
    kv_bytes: int
    weight_bytes: int
    sparse: bool


def plan_for(profile: DeviceProfile, config, model_name: str = "the model") -> Plan:
    """Check that the profile's batch x context fits its KV budget and the weights fit the device."""
    sparse = profile.sparse and config.sparse is not None
    per_token = kv_bytes_per_token(config, profile.dtype, sparse)
    capacity = profile.kv_budget_bytes // per_token
    need = profile.max_batch * profile.max_context
    if need > capacity:
        raise ProfileError(
            f"{profile.path}: max_batch {profile.max_batch} x max_context {profile.max_context} needs "
            f"{need * per_token / 2**30:.1f} GiB of KV cache for {model_name}, but kv_cache_fraction "
            f"{profile.kv_cache_fraction} of {profile.memory_gb} GB allows {profile.kv_budget_bytes / 2**30:.1f} GiB "
            f"({capacity} positions): lower max_context or max_batch, or raise kv_cache_fraction")
    weights = weight_bytes(config, profile.dtype)
    if weights + need * per_token > profile.memory_gb * 2**30 * 0.9:
        raise ProfileError(f"{profile.path}: {model_name} needs {weights / 2**30:.1f} GiB of weights plus "
                           f"{need * per_token / 2**30:.1f} GiB of KV cache, more than 90% of the device's "
                           f"{profile.memory_gb} GB: choose a smaller model or profile")
    if profile.max_context > config.max_position_embeddings and config.rope_scaling is None:
        raise ProfileError(f"{profile.path}: max_context {profile.max_context} exceeds {model_name}'s "
                           f"max_position_embeddings {config.max_position_embeddings} and it has no LongRoPE")
    return Plan(profile.max_batch, profile.max_context, capacity, need * per_token, weights, sparse)
