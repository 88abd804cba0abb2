"""bench/gpu_check.py (`make gpu-check`) without a GPU: its dry run takes the GPU run's code path on CPU in
Triton's interpreter (every kernel and plan against the torch references, the timings and their byte
counts), and its pure parts (arguments, results written whole, the bandwidth arithmetic, the AOT
executor's pointers, a failing check recorded while the rest run, the time guard). On a GPU, the real run
(pytest -m gpu; skipped elsewhere with the reason).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.append(str(SCRIPT.parent))  # after the packages: bench/agent.py must not hide agent/
import gpu_check  # noqa: E402
import gpu_check_cases as cases  # noqa: E402
import gpu_check_timings as timings  # noqa: E402


def run_script(*args, timeout=300, **env_set):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_set
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


# --- the dry run: the same checks on CPU ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = run_script("--dry-run", "--out", str(out), "--seed", str(int(time.time()) % 100000))
    return proc, out


def test_dry_run_checks_every_kernel_and_plan_against_the_references(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu-dry-run-cpu.json").read_text())
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp file left behind
    checks = {c["name"]: c for c in report["checks"]}
    names = {n.split("[")[0] for n in checks}
    assert {"compress_keys", "stage1_scores", "select_blocks", "block_attention_dense", "block_attention_list",
            "infllm_v2_attention", "ternary_linear", "cpm_attention_plan_dense", "cpm_attention_plan_sparse",
            "aot_cpm_attention_plan_sparse", "aot_ternary_plan", "copy_bandwidth", "sparse_decode",
            "ternary_gemv", "int4_linear", "aot_int4_plan"} <= names
    for c in checks.values():
        if c["name"] == "aot_preflight":  # no --kernels given: said so
            assert c["status"] == "unavailable" and c["reason"].startswith("no --kernels folder given"), c
        elif c["group"] == "aot":  # no GPU: said so, not counted as passed
            assert c["status"] == "unavailable" and c["reason"].startswith("AOT executor unavailable: "), c
        else:
            assert c["status"] == "pass", c
    for dtype in ("bf16", "fp16"):
        plan = checks[f"cpm_attention_plan_sparse[tiny,{dtype}]"]["detail"]["steps"]
        assert [s["tokens"] for s in plan] == [12, 1] and all(s["caches_equal"] and s["kc"]["pass"] for s in plan)
        assert checks[f"select_blocks[tiny,{dtype}]"]["detail"]["rows_differing"] == 0
    assert report["summary"] == {"pass": len(checks) - 9, "fail": 0, "error": 0, "unavailable": 9, "skipped": 0}
    assert report["versions"]["torch"] == torch.__version__ and report["device"]["name"].startswith("cpu")
    assert report["tolerances"]["attention_atol"] == cases.ATOL_ATTENTION


def test_dry_run_timings_carry_their_bytes_and_bandwidth_share(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu-dry-run-cpu.json").read_text())
    checks = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "pass"}
    copy = checks["copy_bandwidth"]
    assert copy["gbs"] == pytest.approx(2 * copy["bytes"] / (copy["ms"] / 1e3) / 1e9)
    decode = checks["sparse_decode[130]"]
    H, Hkv, D = report["models"]["tiny"]
    # tiny config: 130 keys fit in init + top-k + window blocks, so both kv heads attend every key
    assert decode["bytes_read"]["keys_attended"] == 2 * 130
    assert decode["dense_bytes_read"] == 2 * Hkv * 130 * D * 2 + H * D * 2
    for detail in (decode, checks["ternary_gemv[96x256]"]):
        for entry in detail["timings"].values():
            share = 100 * entry["read"] / (entry["eager_ms"] / 1e3) / 1e9 / copy["gbs"]
            assert entry["eager"]["pct_of_copy_bandwidth"] == pytest.approx(share)
            assert entry["graph_ms"] is None and entry["graph_note"] == "CUDA graphs need a GPU"
    assert checks["ternary_gemv[96x256]"]["timings"]["ternary"]["read"] == 96 * 256 // 4 + 96 * 4 + 256 * 2
    plot = report["plot"]
    assert (out / "gpu-dry-run-cpu.png").exists() if plot == "gpu-dry-run-cpu.png" else plot.startswith("skipped: ")


# --- arguments ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--budget-s", "0"], "--budget-s 0: give 0 < seconds <= 480"),
    (["--budget-s", "900"], "--budget-s 900: give 0 < seconds <= 480"),
    (["--kernels", "{empty}"], "no *.cubin there"),
    (["--dry-run", "--only", "stage2,timing"], "--only stage2: no such group or check"),
])
def test_bad_arguments_say_what_to_change_and_exit_2(args, message, tmp_path):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    proc = run_script(*args, "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_without_a_gpu_it_points_to_the_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_script("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and "--dry-run" in proc.stderr



def test_a_gpu_run_refuses_the_interpreter(tmp_path):
    """TRITON_INTERPRET=1 left set would run the kernels in the interpreter and check nothing compiled."""
    proc = run_script("--out", str(tmp_path), timeout=120, TRITON_INTERPRET="1")
    assert proc.returncode == 2 and "TRITON_INTERPRET=1 is set: unset it" in proc.stderr


def test_only_picks_groups_and_names_and_measures_bandwidth_before_timings():
    ctx = cases.Context(cases.GPU_SIZES, False, None, 0)
    checks = gpu_check.build_checks(ctx)
    assert [c.name for c in gpu_check.select_checks(checks, "ternary_gemv")] == [
        "copy_bandwidth", "ternary_gemv[4096x4096]", "ternary_gemv[14336x4096]", "ternary_gemv[4096x14336]"]
    aot = gpu_check.select_checks(checks, "aot")
    assert len(aot) == 1 + 2 * (2 * 2 + 2) and {c.group for c in aot} == {"aot"} and aot[0].name == "aot_preflight"
    assert [c.name for c in gpu_check.select_checks(checks, "sparse_decode[128K]")] == ["copy_bandwidth", "sparse_decode[128K]"]
    with pytest.raises(ValueError, match="--only nope: no such group or check"):
        gpu_check.select_checks(checks, "nope")


# --- results: independent checks, written whole ----------------------------------------------------------------
def test_a_failing_check_is_recorded_and_the_rest_run(tmp_path):
    path = tmp_path / "gpu-x.json"
    runner = gpu_check.Runner(path, {"checks": []}, budget_s=60)

    def broken():
        return {"n": 1 / 0}

    def unavailable():
        raise cases.Unavailable("AOT executor unavailable: not here")

    for name, fn in (("raises", broken), ("fails", lambda: {"pass": False, "err": 3.0}),
                     ("missing", unavailable), ("passes", lambda: {"pass": True})):
        runner.run(gpu_check.Check(name, "triton", fn))
    report = json.loads(path.read_text())
    got = {c["name"]: c for c in report["checks"]}
    assert [c["name"] for c in report["checks"]] == ["raises", "fails", "missing", "passes"]
    assert got["raises"]["status"] == "error" and got["raises"]["error"] == "ZeroDivisionError: division by zero"
    assert got["fails"]["status"] == "fail" and got["fails"]["detail"] == {"err": 3.0}
    assert got["missing"] == {**got["missing"], "status": "unavailable", "reason": "AOT executor unavailable: not here"}
    assert got["passes"]["status"] == "pass"
    assert report["summary"] == {"pass": 1, "fail": 1, "error": 1, "unavailable": 1, "skipped": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-x.json"]


@pytest.fixture
def restore_alarm():
    """pytest-timeout may hold SIGALRM: give it back as it was."""
    handler, timer = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, handler)
    if timer[0]:
        signal.setitimer(signal.ITIMER_REAL, *timer)


def test_time_guard_stops_a_running_check_and_skips_the_rest(tmp_path, restore_alarm):
    path = tmp_path / "gpu-x.json"
    runner = gpu_check.Runner(path, {"checks": []}, budget_s=0.2)

    def slow():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return {"pass": True}

    gpu_check.arm_time_guard(runner, 0.5)
    start = time.monotonic()
    runner.run(gpu_check.Check("slow", "timing", slow))
    runner.run(gpu_check.Check("next", "timing", lambda: {"pass": True}))
    assert time.monotonic() - start < 5
    got = {c["name"]: c for c in json.loads(path.read_text())["checks"]}
    assert got["slow"]["status"] == "error" and got["slow"]["error"].startswith("stopped by the time guard")
    assert got["next"]["status"] == "skipped" and "time budget of 0.2 s" in got["next"]["reason"]


def test_results_are_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "gpu-x.json"
    gpu_check.write_json_atomic(path, {"a": 1})
    gpu_check.write_json_atomic(path, {"a": 2})
    with pytest.raises(TypeError):
        gpu_check.write_json_atomic(path, {"a": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-x.json"]
    assert gpu_check.result_name("NVIDIA H200", False) == "gpu-nvidia-h200"
    assert gpu_check.result_name("NVIDIA GeForce RTX 4090", False) == "gpu-nvidia-geforce-rtx-4090"


# --- the arithmetic -----------------------------------------------------------------------------------------
def test_bandwidth_arithmetic():
    # 1 GiB copied in 0.5 ms: 2 GiB moved (read + write) in 0.5 ms
    assert timings.copy_bandwidth_gbs(2**30, 0.5) == pytest.approx(2 * 2**30 / 0.5e-3 / 1e9)
    assert timings.achieved(4 * 10**6, 2.0, 4.0) == pytest.approx({"gbs": 2.0, "pct_of_copy_bandwidth": 50.0})
    assert timings.achieved(10**9, 1000.0, None) == {"gbs": 1.0, "pct_of_copy_bandwidth": None}
    l2 = 50 * 2**20
    assert timings.rotation_sets(15 * 2**20, 136 * 2**20, l2) == 11           # ceil(150 / 15) + 1
    assert timings.rotation_sets(2 * 2**30, 2 * 2**30, l2) == 2               # reads 40 L2s: two sets anyway
    assert timings.rotation_sets(4 * 2**20, 4 * 2**20, l2) == 39              # ceil(150 / 4) + 1
    assert timings.rotation_sets(2**10, 2**10, l2) == 64                      # at most 64
    assert timings.rotation_sets(2**20, 3 * 2**30, l2) == 2                   # memory: at least 2 all the same


def test_sparse_decode_bytes_count_the_attended_keys_by_hand():
    # two kv heads of one row at position 200, blocks of 64: head 0 attends blocks 0 and 3 (64 + 9 keys: 192..200),
    # head 1 blocks 1, 2 (128 keys); slots past the count are not read
    got = timings.sparse_decode_bytes([[0, 3, 7], [1, 2, 0]], [2, 2], [200], heads=32, kv_heads=2, head_dim=128,
                                    elem=2, block_size=64, n_visible=[11])
    keys = 64 + 9 + 128
    assert got == {"keys_attended": keys, "kv_bytes": 2 * keys * 128 * 2, "compressed_key_bytes": 2 * 11 * 128 * 4,
                   "q_bytes": 32 * 128 * 2, "total": 2 * keys * 256 + 2 * 11 * 512 + 32 * 256}
    assert timings.dense_decode_bytes([200], heads=32, kv_heads=2, head_dim=128, elem=2) == 2 * 2 * 201 * 256 + 32 * 256
    assert timings.visible_kernels(200, 32, 16, 100) == (200 - 31) // 16 + 1
    assert timings.visible_kernels(30, 32, 16, 100) == 0 and timings.visible_kernels(10**6, 32, 16, 100) == 100


def test_ternary_plan_bytes_are_its_inputs():
    from trt_plugins import plans
    plan = plans.ternary_plan(1, 14336, 4096, 1024, 1, 0, "fp16")
    assert timings.plan_input_bytes(plan) == 14336 * 4096 // 4 + 14336 * 4 + 4096 * 2


def test_aot_executor_gets_every_buffer_pointer_and_a_workspace():
    from trt_plugins import plans
    from trt_plugins.attention.config import InfLLMv2Config
    from trt_plugins.executors import TORCH_DTYPES

    plan = plans.attention_plan(plans.AttentionShape(2, 3, 4, 2, 96, 64), "bf16",
                                InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4))
    tensors = {b.name: torch.zeros(b.numel, dtype=TORCH_DTYPES[b.dtype]) for b in plan.buffers if b.kind != "workspace"}
    addresses, workspace = cases.plan_pointers(plan, tensors)
    assert addresses == {name: t.data_ptr() for name, t in tensors.items()}
    assert set(addresses) == {"q", "k", "v", "k_cache", "v_cache", "positions", "out", "kc"}
    assert workspace.numel() == plan.workspace_bytes > 0
    tensors["kc"] = tensors["kc"].to(torch.float16)
    with pytest.raises(ValueError, match="plan buffer kc: expected .* fp32"):
        cases.plan_pointers(plan, tensors)


# --- on a GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (torch.cuda.is_available() is False)")
def test_gpu_check_on_this_gpu(tmp_path):
    """The whole run; AOT cubins when CPM_EDGE_GPU_KERNELS names a compiled folder for this GPU."""
    kernels = os.environ.get("CPM_EDGE_GPU_KERNELS")
    proc = run_script("--out", str(tmp_path), *(["--kernels", kernels] if kernels else []), timeout=560)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert all(c["status"] == "pass" for c in report["checks"] if c["group"] == "triton"), report["summary"]


def test_aot_preflight_packs_every_launch_it_has_a_kernel_for_and_names_the_rest(tmp_path):
    """Only the ternary kernels compiled (sm_90, Triton's bundled ptxas): their launches pack against the
    compiled signatures; every attention kernel the AOT checks would launch is named as missing."""
    ctx = cases.Context(cases.DRY_SIZES, True, tmp_path / "k" / "sm_90", 0)
    plans = cases.aot_plans(ctx)
    ternary = {l.config.name for label, p in plans if label.startswith("ternary") for l in p.launches}
    attention = {l.config.name for label, p in plans if not label.startswith("ternary") for l in p.launches}
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import gpu_check_cases as c; "
            "from trt_plugins import aot; ctx = c.Context(c.DRY_SIZES, True, None, 0); "
            "configs = {l.config.name: l.config for label, p in c.aot_plans(ctx) if label.startswith('ternary') "
            "for l in p.launches}; aot.build_cache_env(Path(sys.argv[2]) / '.cache'); "
            "aot.compile_all([aot.Target(90)], Path(sys.argv[2]) / 'k', list(configs.values()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent), str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = cases.check_aot_preflight(ctx)
    assert got["missing_kernels"] == sorted(attention) and got["mismatched"] == [] and not got["pass"]
    n_ternary = sum(len(p.launches) for label, p in plans if label.startswith("ternary"))
    assert got["launches_packed"] == n_ternary == 2 * len(cases.DRY_SIZES.ternary_cases) and len(ternary) == 4
