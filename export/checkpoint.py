"""Read and write Hugging Face MiniCPM4 / MiniCPM5 folders: config.json, single or sharded safetensors.

MiniCPM4 is `model_type: minicpm` (remote code, muP scalars, LongRoPE); MiniCPM5 is `model_type: llama`
(Hugging Face's own LlamaForCausalLM: no muP scalars, explicit head_dim, plain RoPE). Both become one
MiniCPMConfig; the model code has no per-model branches.

Every key of the published configs is either used or listed in IGNORED_KEYS with the reason; a bad
folder raises CheckpointError with one line that names the file and key, before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from export.model import InfLLMv2Config, LongRoPE, MiniCPM, MiniCPMConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURE = "MiniCPMForCausalLM"
# model_type -> the architecture it names, and the family it is in this kit
MODEL_TYPES = {"minicpm": ("MiniCPMForCausalLM", "MiniCPM4"), "llama": ("LlamaForCausalLM", "MiniCPM5")}
MUP_KEYS = ("scale_emb", "scale_depth", "dim_model_base")

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
    "attention_dropout": "training only",
    "pretraining_tp": "Llama: splits the same matmuls for tensor-parallel training; same result",
    "dtype": "transformers 5's name for torch_dtype; weights are cast to the requested dtype",
    "quantization_config": "4-bit GPTQ / AWQ settings, read by export/quantized.py",
}
USED_KEYS = {
    "model_type", "hidden_act", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "scale_emb", "scale_depth", "dim_model_base", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "sparse_config", "head_dim", "attention_bias", "mlp_bias", "rope_parameters",
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
        raise CheckpointError(f"{model_dir}: not a directory (expected a Hugging Face MiniCPM4 or MiniCPM5 folder)")
    raw = read_json(path)
    return with_folder_revision(config_from_dict(raw, source=str(path)), Path(model_dir), raw)


def with_folder_revision(config: MiniCPMConfig, model_dir: Path, raw: dict) -> MiniCPMConfig:
    """The config with its InfLLM v2 revision as the folder's own modeling code implements it."""
    if config.sparse is not None:
        config.sparse = dataclasses.replace(config.sparse,
                                            revision=infllm_revision(model_dir, raw, config.sparse.revision))
    return config


def modeling_file(model_dir: Path, raw: dict) -> Path | None:
    """The remote-code file the folder's auto_map names for AutoModelForCausalLM ("modeling_minicpm.
    MiniCPMForCausalLM", possibly "repo--modeling_minicpm...."), when the folder ships it."""
    auto_map = raw.get("auto_map")
    target = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    module = str(target).split("--")[-1].rsplit(".", 1)[0] if target else "modeling_minicpm"
    path = model_dir / f"{module}.py"
    return path if path.is_file() else None


def infllm_revision(model_dir: Path, raw: dict, configured: int) -> int:
    """Which InfLLM v2 a sparse folder needs (docs/model.md): the released configs of MiniCPM4 and MiniCPM4.1
    carry the same sparse_config, but the remote code shipped beside them differs: MiniCPM4.1's builds a
    second, coarse key compressor (`self.compress_k2 = CompressK(...)`). sparse_config.revision (the kit's own
    key) decides when the folder has no modeling file; when it has one, the two must agree."""
    path = modeling_file(model_dir, raw)
    if path is None:
        return configured
    try:
        code = path.read_text(errors="replace")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    found = 2 if re.search(r"\bcompress_k2\s*=", code) else 1
    explicit = (raw.get("sparse_config") or {}).get("revision")
    if explicit is not None and explicit != found:
        raise CheckpointError(f"{model_dir / 'config.json'}: key 'sparse_config.revision' is {explicit}, but "
                              f"{path.name} implements InfLLM v2 revision {found} ("
                              f"{'builds' if found == 2 else 'has no'} compress_k2); remove the key or fix it")
    return found


def config_from_dict(raw: dict, source: str = "config.json") -> MiniCPMConfig:
    def bad(key, why):
        return CheckpointError(f"{source}: key '{key}' {why}")

    model_type = raw.get("model_type")
    if model_type is None:
        if ARCHITECTURE not in (raw.get("architectures") or []):
            raise bad("model_type", f"is missing and 'architectures' does not list {ARCHITECTURE}: not MiniCPM4")
        model_type = "minicpm"  # the MiniCPM4-0.5B config has no model_type
    elif model_type not in MODEL_TYPES:
        known = ", ".join(f"'{t}' ({family})" for t, (_, family) in MODEL_TYPES.items())
        raise bad("model_type", f"is {model_type!r}; this kit runs {known}")
    family = MODEL_TYPES[model_type][1]
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise bad(key, "is missing")
    if raw.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", f"is {raw['hidden_act']!r}; {family} uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key, False) is not False:
            raise bad(key, f"is {raw[key]!r}; the kit's model has no biases ({family} ships false)")
    if model_type == "llama":  # Hugging Face's Llama has no muP scalars: a config that sets them is not MiniCPM5
        for key in MUP_KEYS:
            if key in raw:
                raise bad(key, "is set, but model_type 'llama' (LlamaForCausalLM) has no muP scalars; "
                               "use model_type 'minicpm' for a MiniCPM4 checkpoint")
        if raw.get("sparse_config") is not None:
            raise bad("sparse_config", "is set, but MiniCPM5 (model_type 'llama') is not trained for InfLLM v2 "
                                       "sparse attention; remove it")
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
    if model_type == "llama" and raw.get("head_dim") is not None:
        head_dim = positive_int("head_dim")  # MiniCPM5: 128 while hidden / heads is 96 (1B) or 128 (2B)
        if head_dim % 2:
            raise bad("head_dim", f"{head_dim} must be even (RoPE rotates pairs)")
    else:
        if hidden % heads or (hidden // heads) % 2:
            raise bad("hidden_size", f"{hidden} is not num_attention_heads ({heads}) times an even head_dim")
        head_dim = hidden // heads
        if raw.get("head_dim") not in (None, head_dim):  # MiniCPM4's remote code derives it
            raise bad("head_dim", f"is {raw['head_dim']!r} but MiniCPM4 uses hidden_size / num_attention_heads "
                                  f"= {head_dim}")
    if heads % kv_heads:
        raise bad("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads ({heads})")
    eos = raw.get("eos_token_id", 2)
    eos = [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise bad("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
    tie = raw.get("tie_word_embeddings", model_type == "minicpm")  # the two config classes' defaults
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
        residual_scale=1.0 if model_type == "llama" else 0.0,  # 0: scale_depth / sqrt(layers)
        tie_word_embeddings=tie,
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_ids=eos,
        head_dim=head_dim,
        model_type=model_type,
    )
    if model_type == "llama":
        config.rope_theta = llama_rope_theta(raw, config.rope_theta, bad)
    else:
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


def llama_rope_theta(raw: dict, theta: float, bad) -> float:
    """Plain RoPE for model_type llama: MiniCPM5 ships `rope_scaling: null` (transformers 5 may write
    `rope_parameters: {rope_type: default, rope_theta}`); any other scaling type is refused by name."""
    rs = raw.get("rope_scaling")
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else rs
        if kind != "default":
            raise bad("rope_scaling", f"is {kind!r}; MiniCPM5 ships none and the kit supports none for model_type "
                                      f"'llama' (only null or rope_type 'default')")
    rp = raw.get("rope_parameters")
    if rp is None:
        return theta
    if not isinstance(rp, dict) or rp.get("rope_type", "default") != "default":
        kind = rp.get("rope_type") if isinstance(rp, dict) else rp
        raise bad("rope_parameters.rope_type", f"is {kind!r}; supported for model_type 'llama': 'default'")
    value = rp.get("rope_theta", theta)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise bad("rope_parameters.rope_theta", f"must be a positive number, got {value!r}")
    if "rope_theta" in raw and float(raw["rope_theta"]) != float(value):
        raise bad("rope_parameters.rope_theta", f"is {value} but rope_theta is {raw['rope_theta']}: which one?")
    return float(value)


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
    from export.quantized import load_quantized_linears, quantized_weight_names, read_quant_config
    quant = read_quant_config(model_dir)  # GPTQ / AWQ: those projections become Int4Linear below
    if quant is not None:
        hf_names = {hf: k for hf, k in hf_names.items() if hf not in quantized_weight_names(files)}
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
    if quant is not None:
        load_quantized_linears(model, files, quant, dtype)
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
