"""Measured GPU results, stored as JSON and formatted as tables (notebook 06_wkv, README).

The GPU benchmarks (benchmarks/wkv_gpu_bench.py, benchmarks/train_bench.py) write one file
per device, `benchmarks/results/<device-slug>.json`, with a "device" section (GPU, driver,
CUDA and PyTorch versions) and one section per benchmark ("wkv", "train"). The notebooks
and the README show those committed numbers through the functions here, so their stored
outputs stay the same from run to run while showing real measurements of a real GPU.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
IMPL_NAMES = {
    "ours-sequential": "ours, sequential",
    "ours-chunked": "ours, chunked",
    "rwkv-lm": "RWKV-LM v4",
}


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the results file's name for a device."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a file name from the device name {name!r}")
    return slug


def update_results(path: str | Path, section: str, data: dict, device: dict) -> Path:
    """Set one section of a results file (creating it if needed), atomically: a reader never
    sees half a file, and a failed write leaves the old file as it was."""
    path = Path(path)
    results: dict = {}
    if path.exists():
        results = _read(path)
        old = results.get("device", {}).get("gpu")
        if old is not None and old != device.get("gpu"):
            raise ValueError(f"{path} holds results of {old}, not {device.get('gpu')}; "
                             f"write to another file")
    results["device"] = device
    results[section] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); regenerate it with the "
                         f"benchmarks or delete it") from err
    if not isinstance(data, dict) or not isinstance(data.get("device"), dict):
        raise ValueError(f"{path} has no 'device' section: not a results file of the "
                         f"GPU benchmarks")
    return data


def load_results(directory: str | Path = RESULTS_DIR) -> list[dict]:
    """Every results file in `directory`, sorted by file name (an empty list if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [_read(p) | {"file": p.name} for p in sorted(directory.glob("*.json"))]


def _num(x: float | None, digits: int, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def device_line(result: dict) -> str:
    """One line naming the device and the software the numbers were measured with."""
    d = result["device"]
    parts = [d.get("gpu", "?")]
    for key, label in (("driver", "driver"), ("cuda_runtime", "CUDA"), ("torch", "PyTorch")):
        if d.get(key):
            parts.append(f"{label} {d[key]}")
    line = ", ".join(parts)
    bandwidth = result.get("wkv", {}).get("copy_bandwidth_gbps")
    if bandwidth:
        line += f"; device-to-device copy {bandwidth:.0f} GB/s"
    return line


def wkv_table(result: dict) -> str:
    """Markdown table of the WKV operator's timings (one row per implementation, shape, pass)."""
    rows = result.get("wkv", {}).get("rows", [])
    if not rows:
        return "(no WKV results)"
    lines = ["| implementation | B, T, C | pass | chunks | ms | GPU ms | fwd bandwidth / copy "
             "| vs RWKV-LM |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        chunks = "-" if r.get("chunks") is None else str(r["chunks"])
        lines.append(
            f"| {IMPL_NAMES.get(r['impl'], r['impl'])} | {r['B']}, {r['T']}, {r['C']} "
            f"| {r['pass']} | {chunks} | {_num(r['ms'], 3)} | {_num(r.get('gpu_ms'), 3)} "
            f"| {_num(r.get('bandwidth_fraction'), 2)} "
            f"| {_num(r.get('speedup_vs_rwkv_lm'), 1, 'x')} |")
    return "\n".join(lines)


def train_table(result: dict) -> str:
    """Markdown table of the training-step benchmark."""
    train = result.get("train", {})
    rows = train.get("rows", [])
    if not rows:
        return "(no training results)"
    lines = ["| model | WKV kernel | tokens / s | ms / step | MFU (datasheet) | MFU (measured "
             "matmul) | first loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = r.get("mfu_datasheet")
        mfu_measured = r.get("mfu_measured")
        lines.append(
            f"| {r['model']} | {r.get('kernel', '-')} | {r['tokens_per_s']:,.0f} "
            f"| {_num(r.get('step_ms'), 1)} | {_num(None if mfu is None else 100 * mfu, 1, '%')} "
            f"| {_num(None if mfu_measured is None else 100 * mfu_measured, 1, '%')} "
            f"| {_num(r.get('first_loss'), 4)} |")
    return "\n".join(lines)
