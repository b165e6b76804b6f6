"""The GPU benchmark scripts, run end to end as dry runs on the CPU (--device cpu): their
plumbing (arguments, measurements, results file, tables) must work before the one short
run on a GPU machine. The numbers of a dry run mean nothing and are not checked."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rwkv_lib import extension
from rwkv_lib.gpu_results import load_results

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    # the dry runs are tiny: more threads only wait for each other on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ext():
    if extension._missing_tools() is not None:
        pytest.skip("the C++ extension cannot be built here")
    return extension.load_wkv_extension()


def test_wkv_benchmark_dry_run(tmp_path, capsys, ext, one_thread):
    bench = _script("wkv_gpu_bench")
    data = bench.main(["--device", "cpu", "--shapes", "2x16x8,1x20x33", "--long-shapes", "1x40x8",
                       "--sweep-chunks", "1,3", "--reps", "2", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    [result] = load_results(tmp_path)
    assert result["wkv"] == json.loads(json.dumps(data))
    rows = result["wkv"]["rows"]
    # 3 shapes x 2 kernels x 2 passes, then the sweep: 3 shapes x 2 chunk counts x 2 passes
    assert len(rows) == 12 and len(result["wkv"]["chunk_sweep"]) == 12
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(r["ms"] > 0 for r in rows)
    assert all(c["agree"] for c in result["wkv"]["agreement"])  # same CPU kernel: equal
    assert "| ours, chunked | 1, 40, 8 | fwd+bwd |" in out


def test_wkv_benchmark_rejects_bad_shapes(capsys):
    bench = _script("wkv_gpu_bench")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shapes", "2x16"])
    assert "expected shapes like 1x1024x512" in capsys.readouterr().err


def test_training_benchmark_dry_run(tmp_path, capsys, ext, one_thread):
    bench = _script("train_bench")
    data = bench.main(["--device", "cpu", "--n-layer", "1", "--n-embd", "16", "--ctx-len", "8",
                       "--batch-size", "2", "--steps", "2", "--warmup", "1",
                       "--kernels", "sequential", "--results-dir", str(tmp_path)])
    [result] = load_results(tmp_path)
    assert result["train"]["config"]["n_layer"] == 1
    [row] = data["rows"]
    assert row["model"] == "ours" and row["tokens_per_s"] > 0
    assert abs(row["first_loss"] - torch.log(torch.tensor(256.0)).item()) < 0.5  # untrained
    assert data["parameters"] == sum(p.numel() for p in _our_model(1, 16, 8).parameters())
    assert "| ours | sequential |" in capsys.readouterr().out


def _our_model(n_layer, n_embd, ctx_len):
    from rwkv_lib.model import RWKV, RWKVConfig

    return RWKV(RWKVConfig(vocab_size=256, n_layer=n_layer, n_embd=n_embd, ctx_len=ctx_len))


def test_peak_rates_by_device_name():
    bench = _script("train_bench")
    assert bench.peak_bf16("NVIDIA H200")[0] == 989.5e12
    assert bench.peak_bf16("NVIDIA H200 NVL")[0] == 835.5e12
    assert bench.peak_bf16("NVIDIA H100 PCIe")[0] == 756.5e12
    assert bench.peak_bf16("NVIDIA H100 80GB HBM3")[0] == 989.5e12
    assert bench.peak_bf16("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench.peak_bf16("Tesla T4") == (None, None)


def test_rwkv_lm_checkout_errors_say_how_to_get_one(tmp_path):
    rwkv_lm = _script("rwkv_lm")
    with pytest.raises(rwkv_lm.RwkvLmUnavailable, match=r"git --git-dir=.* archive HEAD:RWKV-v4"):
        rwkv_lm.v4_dir(tmp_path)


def test_rwkv_lm_kernel_flags_are_read_from_its_model_file(tmp_path):
    """On a file shaped like RWKV-v4/src/model.py (written here, not copied)."""
    rwkv_lm = _script("rwkv_lm")
    v4 = tmp_path / "RWKV-v4"
    (v4 / "src").mkdir(parents=True)
    (v4 / "cuda").mkdir()
    for name in ("cuda/wkv_op.cpp", "cuda/wkv_cuda.cu"):
        (v4 / name).write_text("// stand-in\n")
    (v4 / "src" / "model.py").write_text(
        "T_MAX = 512\n"
        "wkv = load(name='wkv', sources=['a.cpp'], extra_cuda_cflags=['-O3', '--x 1', "
        "f'-DTmax={T_MAX}'])\n")
    assert rwkv_lm.kernel_flags(tmp_path) == (["-O3", "--x 1", "-DTmax=512"], 512)
    (tmp_path / "COMMIT").write_text("abc123\n")
    assert rwkv_lm.commit(tmp_path) == "abc123"


def test_cpu_benchmark_exports_the_same_shape_twice_in_one_run(tmp_path):
    """The generation and prompt rows both export an L12-C512 model into the run's one
    temporary folder: the second export must not find the first one's file in its way."""
    bench = _script("cpu_bench")
    loaded = []

    class FakePackage:  # stands in for the rwkv package: records what it was asked to load
        def __init__(self, path, strategy, verbose=False):
            loaded.append(path)

    for _ in range(2):
        ours, _theirs = bench.exported_pair(1, 16, 32, FakePackage, tmp_path)
        assert ours.config.n_layer == 1
    assert len(loaded) == 2 and loaded[0] != loaded[1]


def test_cpu_benchmark_optimizer_rows_compare_fused_with_one_tensor_at_a_time():
    """The opt section steps the same weights with the fused AdamW make_optimizer builds
    and with torch's per-tensor one, and its table rows name both."""
    import argparse

    bench = _script("cpu_bench")
    rows = bench.bench_optimizer(argparse.Namespace(vocab=256, reps=1))
    assert [r["model"] for r in rows] == ["L4-C128", "L12-C512"]
    assert all(r["fused_ms"] > 0 and r["per_tensor_ms"] > 0 for r in rows)
    table = bench.table({"opt": rows})
    assert table.count("AdamW step") == 2 and "one tensor at a time" in table


def test_cpu_benchmark_prompt_rows_bound_the_ratio_with_each_matmul_library():
    """The prompt section times its matrix products through torch's BLAS and, where
    PyTorch has oneDNN, through it too; the table prints the second bound only when it was
    measured, names the library our prompt used, and our prompt through the BLAS beside it
    when that was not the BLAS."""
    bench = _script("cpu_bench")
    prompt = {"model": "L12-C512", "max_logit_diff": 1e-6, "ours_ms": 300.0,
              "rwkv_pkg_ms": 600.0, "products_only_ms": 250.0, "matmul": "blas"}
    without = bench.table({"prompt": prompt})
    assert "oneDNN" not in without and "2.40x" in without and "through the BLAS;" in without
    with_onednn = bench.table({"prompt": {**prompt, "products_onednn_ms": 200.0,
                                          "matmul": "onednn", "ours_blas_ms": 400.0}})
    assert "through oneDNN;" in with_onednn and "the bound with them: 3.00x" in with_onednn
    assert "RWKV_CPU_MATMUL=blas), ms | 400.0 | 600.0 (rwkv pkg) | 1.50x faster" in with_onednn


def test_cpu_benchmark_switches_the_matmul_library_and_restores_it(monkeypatch):
    from rwkv_lib import cpu_matmul

    bench = _script("cpu_bench")
    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    with bench.matmul_library("blas"):
        assert cpu_matmul.library() == "blas"
    assert os.environ["RWKV_CPU_MATMUL"] == "onednn"
    monkeypatch.delenv("RWKV_CPU_MATMUL")
    with bench.matmul_library("blas"):
        assert os.environ["RWKV_CPU_MATMUL"] == "blas"
    assert "RWKV_CPU_MATMUL" not in os.environ


def test_cpu_benchmark_training_rows_name_the_library_and_show_the_blas_beside_it():
    """The training rows say where our products went; where that was oneDNN, ours compiled
    through the BLAS is shown against nanoGPT too; a ratio below 1 says slower."""
    bench = _script("cpu_bench")
    train = {"rwkv": "L4-C128", "rwkv_params": 923648, "nanogpt": "L4-C136 (4 heads)",
             "nanogpt_params": 938672, "ctx": 64, "batch": 12, "matmul": "blas",
             "ours_eager_tok_s": 950.0, "nanogpt_eager_tok_s": 1000.0,
             "ours_compiled_tok_s": 1500.0, "nanogpt_compiled_tok_s": 1000.0,
             "ours_compiled_first_step_s": 5.0, "nanogpt_compiled_first_step_s": 1.0}
    blas = bench.table({"train": train})
    assert "eager (our products through the BLAS) | 950 | 1,000 | 0.95x (slower) |" in blas
    assert "compiled (our products through the BLAS) | 1,500 | 1,000 | 1.50x faster |" in blas
    assert "RWKV_CPU_MATMUL=blas" not in blas
    onednn = bench.table({"train": {**train, "matmul": "onednn",
                                    "ours_blas_compiled_tok_s": 1100.0}})
    assert "compiled (our products through oneDNN) | 1,500 | 1,000 | 1.50x faster |" in onednn
    assert ("ours with its products through the BLAS (RWKV_CPU_MATMUL=blas) | 1,100 | 1,000 "
            "| 1.10x faster |") in onednn
