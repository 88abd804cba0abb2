"""128K the way the model card says: `cpm-edge engine --context N` applies the published InfLLM v2 sparse_config
and LongRoPE factors as overrides (config.json untouched), prints the memory plan first, and refuses a context
that does not fit with the plan in the message. Numbers are checked against arithmetic written out here."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import run_cli

CONFIGS = Path(__file__).parent / "data" / "configs"
DEVICES = Path(__file__).resolve().parents[1] / "devices"
# docs/reference MINICPM4.md, "Published values" of InfLLM v2
PUBLISHED_SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                    "topk": 64, "use_nope": False, "dense_len": 8192}
GIB = 2**30


def config_8b() -> dict:
    return json.loads((CONFIGS / "MiniCPM4-8B.config.json").read_text())


def folder_with_config(tmp_path, raw: dict) -> Path:
    """A model folder holding only config.json: enough for the plan, which is made before any weight is read."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def test_the_published_settings_are_the_model_cards():
    from export.long_context import PUBLISHED

    assert PUBLISHED["sparse_config"] == PUBLISHED_SPARSE and PUBLISHED["validated_context"] == 131072
    rope = PUBLISHED["rope_scaling"]
    shipped = config_8b()["rope_scaling"]
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 32768
    assert rope["long_factor"] == rope["short_factor"] and len(rope["long_factor"]) == 4096 // 32 // 2
    # the 128K list starts as the shipped 32K one and then grows far beyond it (to ~124 instead of ~31)
    assert rope["long_factor"][:21] == shipped["long_factor"][:21] and rope["long_factor"][21] > shipped["long_factor"][21]
    assert all(b > a for a, b in zip(rope["long_factor"], rope["long_factor"][1:]))
    assert 124 < rope["long_factor"][-1] < 125 and shipped["long_factor"][-1] < 32


def test_overrides_only_beyond_the_native_context_and_only_for_the_published_shape():
    from export.checkpoint import config_from_dict
    from export.long_context import PUBLISHED, config_with, overrides_for

    raw = config_8b()
    assert overrides_for(raw, 32768, sparse=True) == {}
    over = overrides_for(raw, 131072, sparse=True)
    assert set(over) == {"rope_scaling", "sparse_config"}
    assert set(overrides_for(raw, 65536, sparse=False)) == {"rope_scaling"}  # a dense profile: no sparse_config
    config = config_with(raw, over)
    assert config.rope_scaling.long_factor == PUBLISHED["rope_scaling"]["long_factor"]
    assert vars(config.sparse) == {**vars(config.sparse), **PUBLISHED_SPARSE}
    assert config_from_dict(raw).sparse is None  # the checkpoint's own config is unchanged
    small = json.loads((CONFIGS / "MiniCPM4-0.5B.config.json").read_text())  # head_dim 64: not for it
    assert overrides_for(small, 131072, sparse=True) == {}
    own = {**raw, "rope_scaling": {**raw["rope_scaling"], "original_max_position_embeddings": 65536}}
    assert "rope_scaling" not in overrides_for(own, 131072, sparse=True)  # a LongRoPE of its own is kept


def test_orin_holds_minicpm4_8b_at_128k_by_independent_arithmetic():
    from export.long_context import config_with, overrides_for
    from export.profiles import load_profile, plan_for, speed_model

    import dataclasses

    raw = config_8b()
    config = config_with(raw, overrides_for(raw, 131072, sparse=True))
    orin = dataclasses.replace(load_profile("orin"), weights="float")  # fp16 weights here; int4: the next test
    assert orin.max_context == 131072
    plan = plan_for(orin, config, "openbmb/MiniCPM4-8B", 131072)
    L, H, Hkv, D, hid, inter, V, B, S = 32, 32, 2, 128, 4096, 16384, 73448, 4, 131072
    weights = 2 * (L * (2 * hid * H * D + 2 * hid * Hkv * D + 3 * hid * inter + 2 * hid) + 2 * V * hid + hid)
    assert plan.weight_bytes == weights and 16.3e9 < weights < 16.4e9  # "about 16.4 GB"
    assert plan.kv_bytes == B * S * L * 2 * Hkv * D * 2 == 16 * GIB
    up = lambda n: -(-n // 256) * 256  # noqa: E731  (the plugin's 256-byte alignment of workspace slices)
    kernels = (S - 32) // 16 + 1
    assert plan.compressed_key_bytes == L * B * Hkv * kernels * D * 4  # fp32 state of every layer and row
    chunk, width = 256, 64 + 2048 // 64  # queries per stage-1 pass; blocks one query attends at most
    assert plan.workspace_bytes == up(Hkv * chunk * kernels * 4) + up(Hkv * chunk * width * 4) + Hkv * chunk * 4
    assert plan.activation_bytes == orin.prefill_chunk * (2 * hid + 2 * H * D + 2 * Hkv * D + 3 * inter) * 2
    assert plan.fits and plan.total_bytes < 0.9 * 64 * GIB

    model = speed_model(orin, config, plan)
    per_position = L * 2 * Hkv * D * 2
    read = weights - (V - 1) * hid * 2 + (512 + 32) * per_position  # the embedding table: one row gathered
    ceiling = 204.8e9 / read
    assert model["ceilings"]["decode_tokens_per_s"] == pytest.approx(ceiling, rel=1e-12)
    assert 204.8e9 / weights == pytest.approx(12.5, abs=0.05)  # the "caps it near 12.5"
    assert 12.5 < ceiling < 13.1
    # at the last position InfLLM v2 reads 96 blocks of 64 positions and every compressed key, not 128K keys
    at_full = weights - (V - 1) * hid * 2 + 96 * 64 * per_position + L * Hkv * ((S - 1 - 32) // 16 + 1) * D * 4
    assert model["decode_ceiling_at_full_context"] == pytest.approx(204.8e9 / at_full, rel=1e-12)
    assert model["floors"]["decode_tokens_per_s"] < ceiling  # the old floor said 15
    assert model["floors"]["prefill_tokens_per_s"] < model["ceilings"]["prefill_tokens_per_s"]


@pytest.mark.parametrize("group", [32, 128])
def test_int4_weights_are_counted_by_independent_arithmetic(group):
    """MiniCPM4-8B with W4A16 projections (4 bits a weight, one fp16 scale per `group` inputs; embeddings,
    lm_head and norms in fp16): the plan, the decode ceiling and the prefill ceiling."""
    import dataclasses

    from export.checkpoint import config_from_dict
    from export.profiles import load_profile, memory_plan, speed_model

    config = config_from_dict(config_8b())
    orin = load_profile("orin")
    L, H, Hkv, D, hid, inter, V = 32, 32, 2, 128, 4096, 16384, 73448
    params = 2 * hid * H * D + 2 * hid * Hkv * D + 3 * hid * inter          # one layer's projections
    fp16 = 2 * (L * (params + 2 * hid) + 2 * V * hid + hid)
    int4 = L * (params // 2 + params // group * 2 + 2 * 2 * hid) + 2 * (2 * V * hid + hid)
    plans = {w: memory_plan(dataclasses.replace(orin, weights=w, weight_group_size=group), config, 4096)
             for w in ("float", "int4")}
    assert plans["float"].weight_bytes == fp16 and plans["int4"].weight_bytes == int4
    assert 0.28 < int4 / fp16 < 0.34  # 8B: projections at 4.125-4.5 bits a weight; the 1.2 GB embeddings stay fp16
    models = {w: speed_model(dataclasses.replace(orin, weights=w, weight_group_size=group), config, plans[w])
              for w in plans}
    kv = (512 + 32) * L * 2 * Hkv * D * 2
    for w, total in (("float", fp16), ("int4", int4)):
        read = total - (V - 1) * hid * 2 + kv
        assert models[w]["ceilings"]["decode_tokens_per_s"] == pytest.approx(204.8e9 / read, rel=1e-12)
    # prefill computes the same multiply-adds whatever the storage
    assert models["int4"]["ceilings"]["prefill_tokens_per_s"] == models["float"]["ceilings"]["prefill_tokens_per_s"]
    assert models["int4"]["ceilings"]["prefill_tokens_per_s"] == pytest.approx(42.5e12 / (2 * (L * params + V * hid)))
    shipped = load_profile("orin")  # AGX Orin serves MiniCPM4-8B in int4 by default, groups of 128
    if group == shipped.weight_group_size:
        assert shipped.weights == "int4" and memory_plan(shipped, config, 4096).weight_bytes == int4


def test_profile_weights_key_is_checked(tmp_path):
    from export.profiles import ProfileError, load_profile

    text = (DEVICES / "jetson" / "orin.yaml").read_text()
    for extra, needle in (("weights: int3\n", "key 'weights' must be one of float, int4"),
                          ("weights: int4\nweight_group_size: 100\n", "key 'weight_group_size' must be one of 32")):
        path = tmp_path / "bad.yaml"
        path.write_text(text + extra)
        with pytest.raises(ProfileError, match=needle):
            load_profile(str(path))


def test_a_context_beyond_the_published_one_is_refused(tmp_path, capsys):
    model = folder_with_config(tmp_path, config_8b())
    code, _, err = run_cli(capsys, "engine", "--device", "orin", "--model", model, "--context", 200000,
                           "--out", tmp_path / "out")
    assert code == 2 and "validated up to 131072" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, context, why", [
    ("rtx4090", 131072, "the KV cache needs 17.00 GiB"),  # 4 rows x 128K x 32 KiB + 1 GiB of compressed keys
    ("rtx", None, "more than 90% of the device's 8.0 GB"),  # 8B in fp16 on an 8 GB RTX (orin-nano holds it in int4)
])
def test_a_context_that_does_not_fit_is_refused_with_the_plan(device, context, why, tmp_path, capsys):
    model = folder_with_config(tmp_path, config_8b())
    args = ["engine", "--device", device, "--model", model, "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, *args, *(["--context", context] if context else []))
    assert code == 2 and why in err and len(err.strip().splitlines()) == 1, err
    weights = 2 * (32 * (2 * 4096 * 4096 + 2 * 4096 * 256 + 3 * 4096 * 16384 + 2 * 4096) + 2 * 73448 * 4096 + 4096)
    assert f"Memory plan: weights {weights / GIB:.2f} GiB; KV cache" in err and "total" in err
    assert not (tmp_path / "out").exists()


def test_engine_context_exports_the_published_settings_and_leaves_config_json_alone(tmp_path, capsys):
    """A tiny model of the 8B's head_dim (128) and LongRoPE kind, native 1024: --context 2048 is its '128K'."""
    import torch

    from agent.backends import open_bundle
    from agent.device_check import check_first_logits
    from export.checkpoint import load_model
    from export.long_context import PUBLISHED
    from export.profiles import load_profile
    from export.tiny import write_tiny

    g = torch.Generator().manual_seed(5)
    own = sorted(float(x) for x in 1 + 3 * torch.rand(64, generator=g))
    tiny = write_tiny(tmp_path / "tiny", "dense", seed=3, num_attention_heads=2, num_key_value_heads=1,
                      rope_scaling={"rope_type": "longrope", "short_factor": own, "long_factor": own,
                                    "original_max_position_embeddings": 32768})
    before = hashlib.sha256((tiny / "config.json").read_bytes()).hexdigest()
    raw = yaml.safe_load(Path(load_profile("cpu").path).read_text())
    profile = tmp_path / "cpu-sparse.yaml"
    profile.write_text(yaml.safe_dump({**raw, "name": "cpu-sparse", "sparse": True, "max_context": 1024}))
    code, _, err = run_cli(capsys, "engine", "--device", profile, "--model", tiny, "--context", 2048,
                           "--out", tmp_path / "bundle")
    assert code == 0, err
    lines = err.splitlines()
    first_export = next(i for i, line in enumerate(lines) if "[1/5] export" in line)
    assert any("config overrides" in line and "rope_scaling, sparse_config" in line for line in lines[:first_export])
    assert any("memory plan:" in line for line in lines[:first_export])
    bundle = tmp_path / "bundle"
    assert hashlib.sha256((tiny / "config.json").read_bytes()).hexdigest() == before  # untouched

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["config_overrides"] == ["rope_scaling", "sparse_config"] and manifest["max_context"] == 2048
    shipped = json.loads((bundle / "config.json").read_text())  # the config the export ran with
    published = json.loads((Path(__file__).parents[1] / "export" / "minicpm4_128k.json").read_text())
    assert shipped["rope_scaling"] == published["rope_scaling"] and shipped["sparse_config"] == PUBLISHED_SPARSE
    info = json.loads((bundle / "export.json").read_text())
    assert info["sparse_config"] == {**PUBLISHED_SPARSE, "revision": 1} and info["max_seq"] == 2048
    assert info["source"] == str(tiny.resolve()) and info["config_overrides"] == ["rope_scaling", "sparse_config"]
    assert PUBLISHED == published

    plan = json.loads((bundle / "plan.json").read_text())["memory"]
    L, Hkv, D = 2, 1, 128
    assert plan["kv_bytes"] == raw["max_batch"] * 2048 * L * 2 * Hkv * D * 4 and plan["sparse"] is True
    assert plan["compressed_key_bytes"] == L * raw["max_batch"] * Hkv * ((2048 - 32) // 16 + 1) * D * 4

    # The graph runs with the published factors: ONNX Runtime matches the torch model of the overridden config
    # (the golden logits) and differs from the torch model of the checkpoint's own config.json.
    backend, _, _ = open_bundle(bundle, max_batch=1)
    assert all(r["logits_pass"] for r in check_first_logits(backend, bundle))
    case = json.loads((bundle / "golden.json").read_text())["cases"][0]
    mine = load_model(tiny)
    mine.setup_cache(1, 2048)
    with torch.inference_mode():
        theirs = mine(torch.tensor([case["ids"]]), torch.arange(len(case["ids"]))[None])[0, -1].numpy()
    golden = np.load(bundle / "golden_logits.npy")[0]
    assert np.abs(theirs - golden).max() > 1e-3 * np.abs(golden).max()


@pytest.mark.parametrize("changes, needle", [
    ({"efficiency": {"prefill": 0.25}}, "must state decode"),
    ({"efficiency": {"decode": 1.5, "prefill": 0.25}}, "share in (0, 1]"),
    ({"efficiency": {"decode": 0.5, "prefill": 0.25, "memory": 0.9}}, "share in (0, 1]"),
    ({"memory_bandwidth_gbs": -1.0}, "must not be negative"),
    ({"floors": {"peak_memory_gb": 40}}, "may hold only"),  # GPU memory is gpu_memory_gb, measured where it lives
])
def test_speed_model_keys_are_checked(changes, needle):
    from export.profiles import ProfileError, load_profile, profile_from_dict

    raw = {k: v for k, v in vars(load_profile("orin")).items() if k != "path"}
    with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        profile_from_dict({**raw, **changes}, "p.yaml")
