"""Device profiles (devices/jetson/*.yaml, devices/rtx/*.yaml): what an engine is built for.

A profile states the GPU (SM, memory), the TensorRT flavour, the serving shape (max batch, max context,
dtype, sparse attention) and the share of memory the KV cache may take. The KV capacity follows from that
budget and the model; a combination that cannot fit is refused, with its memory plan, before any work starts.

Speed floors come from a bandwidth model: batch-1 decode reads every weight and the attended KV once per
token, so memory_bandwidth_gbs / bytes-per-token is the ceiling no engine passes; the floor `make test-device`
holds a flashed device to is that ceiling times the profile's `efficiency` (plus its per-step overhead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from export.checkpoint import CheckpointError

DEVICES_DIR = Path(__file__).resolve().parents[1] / "devices"
FLAVOURS = ("tensorrt", "tensorrt-rtx", "onnxruntime")  # onnxruntime: devices/cpu, no engine
DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# The weights an engine holds: "float" (the profile's dtype) or "int4" (W4A16: the attention and MLP
# projections as 4-bit codes with one dtype scale per group of weight_group_size inputs; embeddings, norms and
# lm_head stay in the dtype, as in the GPTQ/AWQ checkpoints OpenBMB publishes).
WEIGHT_FORMATS = ("float", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
FLOOR_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms", "gpu_memory_gb")
EFFICIENCY_KEYS = ("decode", "prefill")


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
    floors: dict = field(default_factory=dict)   # explicit floors; else the speed model's (speed_model)
    memory_bandwidth_gbs: float = 0.0   # GB/s (1e9): what bounds batch-1 decode
    tensor_tflops: float = 0.0          # dense matmul TFLOPS in the profile's dtype (GPU: tensor cores, fp32
                                        # accumulate): what bounds prefill
    efficiency: dict = field(default_factory=dict)  # decode / prefill: share of those a healthy engine reaches
    step_overhead_ms: float = 0.0       # fixed cost of one engine call (launches, Python plugins)
    prefill_chunk: int = 512            # prompt tokens per agent step: a long prompt never stalls the others
    weights: str = "float"              # WEIGHT_FORMATS: what `make engine` exports a float checkpoint to
    weight_group_size: int = 128        # int4: inputs per scale
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
    "memory_bandwidth_gbs": (float, False), "tensor_tflops": (float, False), "efficiency": (dict, False),
    "step_overhead_ms": (float, False), "prefill_chunk": (int, False), "weights": (str, False),
    "weight_group_size": (int, False),
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
        (p.prefill_chunk >= 1, "prefill_chunk", "must be at least 1"),
        (p.weights in WEIGHT_FORMATS, "weights", f"must be one of {', '.join(WEIGHT_FORMATS)}"),
        (p.weight_group_size in INT4_GROUP_SIZES, "weight_group_size",
         f"must be one of {', '.join(map(str, INT4_GROUP_SIZES))}"),
        (all(k in FLOOR_KEYS for k in p.floors), "floors", f"may hold only {', '.join(FLOOR_KEYS)}"),
        (p.memory_bandwidth_gbs >= 0 and p.tensor_tflops >= 0 and p.step_overhead_ms >= 0, "memory_bandwidth_gbs",
         "and tensor_tflops, step_overhead_ms must not be negative"),
        (all(k in EFFICIENCY_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
             for k, v in p.efficiency.items()), "efficiency",
         f"must map {' / '.join(EFFICIENCY_KEYS)} to a share in (0, 1]"),
        (("decode" in p.efficiency or not p.memory_bandwidth_gbs) and ("prefill" in p.efficiency or not p.tensor_tflops),
         "efficiency", "must state decode (with memory_bandwidth_gbs) and prefill (with tensor_tflops)"),
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


def projection_shapes(config) -> list[tuple[int, int]]:
    """(out_features, in_features) of one layer's attention and MLP projections (q, k, v, o, gate, up, down)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return [(q, c.hidden_size), (kv, c.hidden_size), (kv, c.hidden_size), (c.hidden_size, q),
            (c.intermediate_size, c.hidden_size), (c.intermediate_size, c.hidden_size),
            (c.hidden_size, c.intermediate_size)]


def int4_bytes(out_features: int, in_features: int, dtype: str, group_size: int, zeros: bool = False) -> int:
    """One int4 linear in the kit's layout (trt_plugins/int4): two codes a byte, a dtype scale per group,
    and with asymmetric weights a 4-bit zero point per group."""
    groups = -(-in_features // group_size)
    return (out_features * in_features // 2 + out_features * groups * DTYPE_BYTES[dtype]
            + (out_features * -(-groups // 2) if zeros else 0))


def weight_bytes(config, dtype: str, weights: str = "float", group_size: int = 128) -> int:
    """Every weight the engine holds, embedding table (and an untied lm_head) included."""
    c = config
    if weights == "int4":
        projections = sum(int4_bytes(n, k, dtype, group_size) for n, k in projection_shapes(c))
    else:
        projections = sum(n * k for n, k in projection_shapes(c)) * DTYPE_BYTES[dtype]
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    return projections * c.num_hidden_layers + (embed + norms) * DTYPE_BYTES[dtype]


def profile_weight_bytes(profile: DeviceProfile, config) -> int:
    return weight_bytes(config, profile.dtype, profile.weights, profile.weight_group_size)


# --- what an engine holds, and how fast it can be -------------------------------------------------------
# device-test's speed run (agent/device_check.py reads these from the bundle's plan.json): one prompt of
# about this many tokens, then this many new tokens, batch 1.
SPEED_TEST = {"prompt_tokens": 512, "decode_tokens": 64}
GIB = 2**30


def kv_cache_bytes_per_position(config, dtype: str) -> int:
    """K and V of every layer for one position of one row (what the engine's cache tensors hold)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * DTYPE_BYTES[dtype]


def activation_bytes_per_token(config, dtype: str) -> int:
    """Live tensors of one layer for one prefill token (residual, normed input, q, k, v, attention out, gate,
    up, their product); TensorRT reuses them layer after layer. An estimate: the builder decides the rest."""
    c = config
    return (2 * c.hidden_size + 2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim
            + 3 * c.intermediate_size) * DTYPE_BYTES[dtype]


@dataclass
class Plan:
    """What an engine for this profile, model and context holds in device memory (bytes)."""
    max_batch: int
    max_context: int
    sparse: bool
    weight_bytes: int          # every weight, embedding table included
    kv_bytes: int              # K and V caches: batch x context positions, every layer
    compressed_key_bytes: int  # InfLLM v2 compressed keys (fp32 state of every layer, every row)
    workspace_bytes: int       # InfLLM v2 stage-1 scores, block lists and counts (one chunk of queries)
    activation_bytes: int      # the largest prefill's live tensors (estimate)
    budget_bytes: int          # 90% of the device's memory
    kv_budget_bytes: int       # kv_cache_fraction of it

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.kv_bytes + self.compressed_key_bytes + self.workspace_bytes
                + self.activation_bytes)

    @property
    def kv_capacity_tokens(self) -> int:
        """Positions (rows x context) the KV budget holds."""
        per_position = self.kv_bytes // (self.max_batch * self.max_context)
        return self.kv_budget_bytes // per_position

    @property
    def fits(self) -> bool:
        return self.kv_bytes + self.compressed_key_bytes <= self.kv_budget_bytes and self.total_bytes <= self.budget_bytes

    def lines(self) -> list[str]:
        rows = [("weights", self.weight_bytes), ("KV cache", self.kv_bytes),
                ("compressed keys", self.compressed_key_bytes), ("workspace", self.workspace_bytes),
                ("activations", self.activation_bytes), ("total", self.total_bytes)]
        out = [f"  {name:<16}{n / GIB:9.2f} GiB" for name, n in rows]
        out.append(f"  (batch {self.max_batch} x context {self.max_context}, sparse {'on' if self.sparse else 'off'}; "
                   f"KV budget {self.kv_budget_bytes / GIB:.2f} GiB, device budget {self.budget_bytes / GIB:.2f} GiB)")
        return out

    def as_dict(self) -> dict:
        names = ("weight_bytes", "kv_bytes", "compressed_key_bytes", "workspace_bytes", "activation_bytes",
                 "budget_bytes", "kv_budget_bytes")
        return {"max_batch": self.max_batch, "max_context": self.max_context, "sparse": self.sparse,
                **{n: getattr(self, n) for n in names}, "total_bytes": self.total_bytes}


def memory_plan(profile: DeviceProfile, config, context: int | None = None, batch: int | None = None) -> Plan:
    """The memory an engine of this shape needs. With sparse attention the compressed keys (state every layer
    keeps) and the workspace are those of the attention op's own launch plan (trt_plugins/plans.py), for the
    largest shapes the engine takes: a prefill chunk of one row, a decode step of every row."""
    context = context or profile.max_context
    batch = batch or profile.max_batch
    sparse = profile.sparse and config.sparse is not None
    kc = work = 0
    if sparse and config.sparse.revision != 1:
        raise ProfileError(f"{profile.path}: sparse: true, but the model's sparse_config.revision "
                           f"{config.sparse.revision} (MiniCPM4.1) has no TensorRT kernels yet; use a profile with "
                           f"sparse: false")
    if sparse:
        from trt_plugins.plans import SPARSE_CHUNK, AttentionShape, attention_plan

        c = config
        plans = [attention_plan(AttentionShape(rows, tokens, c.num_attention_heads, c.num_key_value_heads, context,
                                               c.head_dim), profile.dtype, c.sparse)
                 for rows, tokens in ((1, min(context, SPARSE_CHUNK)), (batch, 1))]
        kc = c.num_hidden_layers * plans[1].buffer("kc").nbytes
        work = max(p.workspace_bytes for p in plans)
    return Plan(batch, context, sparse, profile_weight_bytes(profile, config),
                batch * context * kv_cache_bytes_per_position(config, profile.dtype), kc, work,
                min(context, profile.prefill_chunk) * activation_bytes_per_token(config, profile.dtype),  # longest prefill call
                int(profile.memory_gb * GIB * 0.9), profile.kv_budget_bytes)


def plan_for(profile: DeviceProfile, config, model_name: str = "the model", context: int | None = None) -> Plan:
    """The memory plan, refused (with the plan in the message) when it does not fit the device."""
    if context is not None and context < 16:
        raise ProfileError(f"--context {context}: must be at least 16")
    plan = memory_plan(profile, config, context)
    where = f"{profile.path}: " if context is None else f"--context {plan.max_context} on {profile.name}: "
    if not plan.fits:
        cache = plan.kv_bytes + plan.compressed_key_bytes
        if cache > plan.kv_budget_bytes:
            why = (f"the KV cache needs {cache / GIB:.2f} GiB, kv_cache_fraction {profile.kv_cache_fraction} "
                   f"of {profile.memory_gb} GB allows {plan.kv_budget_bytes / GIB:.2f} GiB")
        else:
            why = (f"{plan.total_bytes / GIB:.2f} GiB in all, more than 90% of the device's {profile.memory_gb} GB")
        raise ProfileError(f"{where}{model_name} does not fit: {why}; lower the context or max_batch, or choose "
                           f"a smaller model. Memory plan: " + "; ".join(" ".join(line.split()) for line in plan.lines()))
    if plan.max_context > config.max_position_embeddings and config.rope_scaling is None:
        raise ProfileError(f"{where}context {plan.max_context} exceeds {model_name}'s "
                           f"max_position_embeddings {config.max_position_embeddings} and it has no LongRoPE")
    return plan


def weights_read_per_token(profile: DeviceProfile, config) -> int:
    """Weight bytes one decode step reads: every matrix, but only one row of an untied embedding table
    (a gather); a tied table is read whole as the lm_head."""
    c = config
    untouched = 0 if c.tie_word_embeddings else (c.vocab_size - 1) * c.hidden_size * DTYPE_BYTES[profile.dtype]
    return profile_weight_bytes(profile, config) - untouched


def parameters_per_token(config) -> int:
    """Multiply-adds per token of the matrices a decode step reads (the projections, the lm_head): what
    prefill computes per token, whatever the weights' storage."""
    c = config
    return sum(n * k for n, k in projection_shapes(c)) * c.num_hidden_layers + c.vocab_size * c.hidden_size


def kv_read_per_token(config, dtype: str, position: int, sparse: bool) -> int:
    """Cache bytes one decode step of one row reads at `position`: K and V of every attended position. Dense
    (and InfLLM v2 below dense_len, where the rows go dense) that is all of them; beyond dense_len the
    selected blocks (at most max_selected) plus the compressed keys stage 1 scores (fp32, every layer)."""
    per_position = kv_cache_bytes_per_position(config, dtype)
    s = config.sparse
    if not sparse or s is None or position < s.dense_len:
        return position * per_position
    kernels = max(0, (position - s.kernel_size) // s.kernel_stride + 1)
    compressed = config.num_hidden_layers * config.num_key_value_heads * kernels * config.head_dim * 4
    return min(position, s.max_selected * s.block_size) * per_position + compressed


def speed_model(profile: DeviceProfile, config, plan: Plan, prompt_tokens: int | None = None,
                decode_tokens: int | None = None) -> dict:
    """Ceilings (what the hardware allows) and floors (what device-test demands) for batch-1 speed.

    decode: memory-bound, ceiling = memory_bandwidth / bytes read per token (weights + KV at the mean position
    of the run); floor = 1 / (1 / (ceiling x efficiency.decode) + step_overhead). prefill: compute-bound,
    ceiling = tensor_tflops / (2 x multiply-adds per token); floor = ceiling x efficiency.prefill.
    Empty when the profile states no memory_bandwidth_gbs."""
    if not profile.memory_bandwidth_gbs:
        return {}
    prompt = min(prompt_tokens or SPEED_TEST["prompt_tokens"], plan.max_context // 2)
    decode = decode_tokens or SPEED_TEST["decode_tokens"]
    position = prompt + decode // 2
    read = weights_read_per_token(profile, config) + kv_read_per_token(config, profile.dtype, position, plan.sparse)
    ceiling = profile.memory_bandwidth_gbs * 1e9 / read
    eff = profile.efficiency
    overhead = profile.step_overhead_ms / 1000
    at_full = weights_read_per_token(profile, config) + kv_read_per_token(config, profile.dtype,
                                                                          plan.max_context - 1, plan.sparse)
    out = {"bytes_read_per_decode_token": read, "position": position, "prompt_tokens": prompt,
           "decode_ceiling_at_full_context": profile.memory_bandwidth_gbs * 1e9 / at_full,
           "decode_tokens": decode, "memory_bandwidth_gbs": profile.memory_bandwidth_gbs, "efficiency": eff,
           "step_overhead_ms": profile.step_overhead_ms,
           "ceilings": {"decode_tokens_per_s": ceiling},
           "floors": {"decode_tokens_per_s": 1 / (1 / (ceiling * eff["decode"]) + overhead)}}
    if profile.tensor_tflops:
        flops = 2 * parameters_per_token(config)
        prefill_ceiling = profile.tensor_tflops * 1e12 / flops
        prefill_floor = prefill_ceiling * eff["prefill"]
        out["ceilings"]["prefill_tokens_per_s"] = prefill_ceiling
        out["floors"]["prefill_tokens_per_s"] = prefill_floor
        # first token: the prompt at the prefill floor, one decode step, the step overheads of both
        out["floors"]["time_to_first_token_ms"] = 1000 * (prompt / prefill_floor + 2 * overhead
                                                          + 1 / out["floors"]["decode_tokens_per_s"])
    # device memory: the plan, 10% for what it does not count in detail, 1 GiB for the CUDA context and
    # TensorRT's own; never more than the device has
    out["floors"]["gpu_memory_gb"] = min(plan.total_bytes * 1.1 + GIB, profile.memory_gb * GIB) / 1e9
    return out


def expectations(profile: DeviceProfile, config, plan: Plan, model_name: str) -> dict:
    """The bundle's plan.json: memory plan, speed model and floors, for `cpm-edge device-test` on the device
    (the agent does not import export/: the decisions travel as data)."""
    explicit = dict(profile.floors)
    model = speed_model(profile, config, plan)
    floors = {**model.get("floors", {}), **explicit}
    for key, ceiling in model.get("ceilings", {}).items():
        if key in explicit and explicit[key] > ceiling:
            raise ProfileError(f"{profile.path}: floors.{key} {explicit[key]} is above what the hardware allows "
                               f"for {model_name} ({ceiling:.1f} by the bandwidth model): lower it")
    return {"model": model_name, "device": profile.name, "memory": plan.as_dict(), "speed_model": model,
            "speed_test": {"prompt_tokens": model.get("prompt_tokens", SPEED_TEST["prompt_tokens"]),
                           "decode_tokens": model.get("decode_tokens", SPEED_TEST["decode_tokens"])},
            "floors": floors}
