"""MiniCPM4.1 folders: which InfLLM v2 revision a sparse folder needs, read from the remote code it ships.

The released configs of MiniCPM4 and MiniCPM4.1 carry the same sparse_config; their modeling_minicpm.py files
differ. The revision-2 file here is MiniCPM4.1's own modeling code (vendored in tests/official, the same file
the parity harness of tests/test_infllm_v2_rev2.py runs); the revision-1 stand-in is written by the test and
only has to lack the coarse compressor.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from export.checkpoint import CheckpointError, load_config
from export.tiny import write_tiny

OFFICIAL_REV2 = Path(__file__).parent / "official" / "minicpm4_1" / "modeling_minicpm.py"
REV1_CODE = ("class MiniCPMAttention:\n    def __init__(self, config):\n"
             "        self.compress_k = CompressK(2, 128, kernel_size=32, kernel_stride=16)\n")


def sparse_folder(tmp_path: Path, name: str, code: str | None, auto_map: str | None = None,
                  filename: str = "modeling_minicpm.py", revision: int | None = None) -> Path:
    """A tiny sparse folder (no 'revision' key unless given) shipping `code` as `filename`."""
    extra = {"revision": revision} if revision is not None else {}
    folder = write_tiny(tmp_path / name, "sparse", seed=random.randrange(1000),
                        sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                                       "window_size": 128, "topk": 4, "use_nope": False, "dense_len": 320,
                                       **extra})
    if auto_map is not None:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                              "AutoModelForCausalLM": auto_map}
        (folder / "config.json").write_text(json.dumps(config))
    if code is not None:
        (folder / filename).write_text(code)
    return folder


def test_revision_follows_the_shipped_modeling_code(tmp_path):
    rev2 = OFFICIAL_REV2.read_text()
    cases = {  # name: (code, auto_map, the file the code is written to, expected revision)
        "official-4.1": (rev2, "modeling_minicpm.MiniCPMForCausalLM", "modeling_minicpm.py", 2),
        "hub-style-auto-map": (rev2, "openbmb/MiniCPM4.1-8B--modeling_minicpm.MiniCPMForCausalLM",
                               "modeling_minicpm.py", 2),
        "renamed-module": (rev2, "modeling_cpm41.MiniCPMForCausalLM", "modeling_cpm41.py", 2),
        "auto-map-names-another-file": (rev2, "modeling_cpm41.MiniCPMForCausalLM", "modeling_minicpm.py", 1),
        "first-release-style": (REV1_CODE, "modeling_minicpm.MiniCPMForCausalLM", "modeling_minicpm.py", 1),
        "no-auto-map": (rev2, None, "modeling_minicpm.py", 2),   # the file name the released folders use
        "no-code": (None, None, "modeling_minicpm.py", 1),       # the kit's own key (absent: 1) decides
    }
    for name, (code, auto_map, filename, expected) in cases.items():
        folder = sparse_folder(tmp_path, name, code, auto_map, filename)
        assert load_config(folder).sparse.revision == expected, name
    # The explicit key still works without code, and agrees with code that says the same
    assert load_config(sparse_folder(tmp_path, "key-only", None, revision=2)).sparse.revision == 2
    assert load_config(sparse_folder(tmp_path, "both", rev2, revision=2)).sparse.revision == 2


@pytest.mark.parametrize("code, key", [(OFFICIAL_REV2, 1), (None, 2)])
def test_a_key_that_contradicts_the_code_is_refused_in_one_line(code, key, tmp_path):
    text = OFFICIAL_REV2.read_text() if code is not None else REV1_CODE
    folder = sparse_folder(tmp_path, "contradiction", text, revision=key)
    with pytest.raises(CheckpointError, match=r"key 'sparse_config.revision' is \d, but modeling_minicpm.py "
                                              r"implements InfLLM v2 revision \d") as e:
        load_config(folder)
    assert "\n" not in str(e.value) and str(folder / "config.json") in str(e.value)


def test_export_records_the_detected_revision(tmp_path):
    """A MiniCPM4.1-style folder (no key, its own modeling code) exports with revision 2 in export.json: the
    graph traces the selection of config.sparse.revision (tests/test_infllm_v2_rev2.py checks that graph)."""
    from export.onnx_export import ExportOptions, export

    folder = sparse_folder(tmp_path, "rev2", OFFICIAL_REV2.read_text())
    out = export(ExportOptions(folder, tmp_path / "export", "portable", "fp32", 512))
    assert json.loads((out / "export.json").read_text())["sparse_config"]["revision"] == 2
