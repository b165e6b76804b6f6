"""rwkv_lib.gpu_results: results files of the GPU benchmarks, read back and formatted."""

from __future__ import annotations

import json

import pytest

from rwkv_lib.gpu_results import (
    device_line,
    device_slug,
    load_results,
    train_table,
    update_results,
    wkv_table,
)

DEVICE = {"gpu": "NVIDIA H200", "driver": "580.159.04", "cuda_runtime": "13.0",
          "torch": "2.11.0+cu130"}
WKV = {
    "copy_bandwidth_gbps": 4312.4,
    "rows": [
        {"impl": "rwkv-lm", "B": 1, "T": 1024, "C": 512, "pass": "fwd+bwd", "chunks": None,
         "ms": 0.81234, "gpu_ms": 0.7, "bandwidth_fraction": None, "speedup_vs_rwkv_lm": 1.0},
        {"impl": "ours-chunked", "B": 1, "T": 1024, "C": 512, "pass": "fwd+bwd", "chunks": 64,
         "ms": 0.10049, "gpu_ms": None, "bandwidth_fraction": None,
         "speedup_vs_rwkv_lm": 8.0837},
        {"impl": "ours-sequential", "B": 32, "T": 1024, "C": 1024, "pass": "fwd", "chunks": 0,
         "ms": 0.2, "gpu_ms": 0.19, "bandwidth_fraction": 0.5677, "speedup_vs_rwkv_lm": None},
    ],
}
TRAIN = {"rows": [
    {"model": "ours", "kernel": "sequential", "tokens_per_s": 512345.6, "step_ms": 23.98,
     "mfu_datasheet": 0.1234, "mfu_measured": 0.15, "first_loss": 5.60123},
    {"model": "RWKV-LM v4", "kernel": "RWKV-LM", "tokens_per_s": 401000.0, "step_ms": 30.6,
     "mfu_datasheet": None, "mfu_measured": None, "first_loss": None},
]}


def test_device_slug():
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="cannot make a file name"):
        device_slug("  ")


def test_sections_are_written_separately_and_read_back(tmp_path):
    path = tmp_path / "results" / "nvidia-h200.json"
    update_results(path, "wkv", WKV, DEVICE)
    update_results(path, "train", TRAIN, DEVICE)
    (tmp_path / "results" / "notes.txt").write_text("not a results file")
    [result] = load_results(tmp_path / "results")
    assert result["file"] == "nvidia-h200.json"
    assert result["wkv"] == WKV and result["train"] == TRAIN and result["device"] == DEVICE
    assert not list((tmp_path / "results").glob(".*tmp")), "no temporary file left behind"


def test_a_file_of_another_device_is_not_overwritten(tmp_path):
    path = tmp_path / "r.json"
    update_results(path, "wkv", WKV, DEVICE)
    before = path.read_text()
    with pytest.raises(ValueError, match="holds results of NVIDIA H200, not NVIDIA A100"):
        update_results(path, "wkv", WKV, {**DEVICE, "gpu": "NVIDIA A100"})
    assert path.read_text() == before


def test_bad_files_give_one_clear_error(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a\.json is not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'device' section"):
        load_results(tmp_path)
    assert load_results(tmp_path / "missing") == []


def test_tables(tmp_path):
    path = tmp_path / "nvidia-h200.json"
    update_results(path, "wkv", WKV, DEVICE)
    update_results(path, "train", TRAIN, DEVICE)
    [result] = load_results(tmp_path)
    assert device_line(result) == ("NVIDIA H200, driver 580.159.04, CUDA 13.0, PyTorch "
                                   "2.11.0+cu130; device-to-device copy 4312 GB/s")
    table = wkv_table(result).splitlines()
    assert table[0].startswith("| implementation | B, T, C | pass | chunks | ms |")
    assert table[2] == "| RWKV-LM v4 | 1, 1024, 512 | fwd+bwd | - | 0.812 | 0.700 | - | 1.0x |"
    assert table[3] == "| ours, chunked | 1, 1024, 512 | fwd+bwd | 64 | 0.100 | - | - | 8.1x |"
    assert table[4] == "| ours, sequential | 32, 1024, 1024 | fwd | 0 | 0.200 | 0.190 | 0.57 | - |"
    train = train_table(result).splitlines()
    assert train[2] == "| ours | sequential | 512,346 | 24.0 | 12.3% | 15.0% | 5.6012 |"
    assert train[3] == "| RWKV-LM v4 | RWKV-LM | 401,000 | 30.6 | - | - | - |"
    assert wkv_table({"device": DEVICE}) == "(no WKV results)"
    assert train_table({"device": DEVICE}) == "(no training results)"


def test_the_results_in_the_repository_read():
    # every benchmarks/results/*.json is a GPU results file (other benchmarks keep theirs in
    # folders below it); notebook 06 reads them all
    for result in load_results():
        assert device_line(result)
