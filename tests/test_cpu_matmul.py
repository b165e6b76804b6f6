"""rwkv_lib.cpu_matmul: which library computes float32 products without autograd, and that
the model gives the same results, to float rounding, whichever it is."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rwkv_lib import cpu_matmul
from rwkv_lib.cpu_matmul import MIN_ROWS, Linear
from rwkv_lib.model import RWKV, RWKVConfig

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_works(),
                                  reason="this torch has no working oneDNN linear")


def test_onednn_is_found_where_torch_has_it():
    """The check behind `auto` is not silently false on builds that carry oneDNN (PyPI's
    x86 wheels), and oneDNN's op computes x @ w.T."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert cpu_matmul.onednn_works()
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g) for s in ((70, 2048), (512, 2048), (512,)))
    torch.testing.assert_close(cpu_matmul.onednn_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cpu_matmul.onednn_linear(x, w, b), x @ w.T + b,
                               rtol=1e-5, atol=1e-3)  # sums of 2048 terms near 45


@pytest.fixture
def calls(monkeypatch):
    """Counts the products that went to oneDNN."""
    seen = []
    real = cpu_matmul.onednn_linear

    def counting(x, weight, bias=None):
        seen.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(cpu_matmul, "onednn_linear", counting)
    return seen


@pytest.mark.parametrize("vendor, works, expected", [
    ("AuthenticAMD", True, "onednn"), ("AuthenticAMD", False, "blas"),
    ("GenuineIntel", True, "blas"), ("", True, "blas")])
def test_auto_chooses_onednn_only_on_amd_where_it_works(monkeypatch, vendor, works, expected):
    monkeypatch.delenv("RWKV_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cpu_matmul, "processor_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "onednn_works", lambda: works)
    assert cpu_matmul.library() == expected
    monkeypatch.setenv("RWKV_CPU_MATMUL", "auto")
    assert cpu_matmul.library() == expected


def test_the_environment_overrides_the_choice(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "processor_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_matmul, "onednn_works", lambda: True)
    monkeypatch.setenv("RWKV_CPU_MATMUL", "blas")
    assert cpu_matmul.library() == "blas"
    monkeypatch.setattr(cpu_matmul, "processor_vendor", lambda: "GenuineIntel")
    monkeypatch.setenv("RWKV_CPU_MATMUL", " OneDNN ")
    assert cpu_matmul.library() == "onednn"
    with torch.backends.mkldnn.flags(enabled=False):  # torch's own switch is respected
        assert cpu_matmul.library() == "blas"


@pytest.mark.parametrize("value, message", [
    ("mkl", "RWKV_CPU_MATMUL must be one of auto, blas, onednn, got 'mkl'"),
    ("onednn", "no working oneDNN linear; unset it or set it to blas")])
def test_a_bad_choice_is_refused_when_the_model_is_built(monkeypatch, value, message):
    monkeypatch.setattr(cpu_matmul, "onednn_works", lambda: False)
    monkeypatch.setenv("RWKV_CPU_MATMUL", value)
    with pytest.raises(ValueError, match=message):
        RWKV(RWKVConfig(vocab_size=8, n_layer=1, n_embd=8))


def test_a_bad_choice_is_one_line_from_the_command_line(tmp_path):
    env = {**os.environ, "RWKV_CPU_MATMUL": "fast"}
    out = subprocess.run([sys.executable, "-m", "rwkv_lib.train", "--preset", "ci",
                          "--out-dir", str(tmp_path / "run"), "--max-steps", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: RWKV_CPU_MATMUL must be one of auto, blas, onednn, got 'fast'; unset it to let "
        "the library choose"]


@needs_onednn
def test_linear_sends_only_float32_products_without_autograd_to_onednn(monkeypatch, calls):
    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    torch.manual_seed(0)
    layer = Linear(32, 48)
    x = torch.randn(2, MIN_ROWS // 2, 32)  # MIN_ROWS rows in all
    with torch.no_grad():
        y = layer(x)
        assert calls == [(2, MIN_ROWS // 2, 32)]
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
        layer(x[:, 1:])  # one row short
        layer.bfloat16()(x.bfloat16())  # not float32
        layer.float()
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 2
    y = layer(x.requires_grad_())  # training: the BLAS, and gradients as usual
    y.sum().backward()
    assert len(calls) == 2 and x.grad is not None
    monkeypatch.setenv("RWKV_CPU_MATMUL", "blas")
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2


@needs_onednn
@pytest.mark.parametrize("T", [MIN_ROWS, 3 * MIN_ROWS])
def test_the_model_agrees_whichever_library_computes_it(monkeypatch, calls, T):
    """GPT mode without autograd through oneDNN: the logits and state of the BLAS path, and
    of RNN mode token by token, to float rounding."""
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=50, n_layer=2, n_embd=32, wkv_backend="pytorch"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # RWKV-4's init zeroes several matrices
    idx = torch.randint(0, 50, (1, T), generator=torch.Generator().manual_seed(1))
    results = {}
    for lib in ("blas", "onednn"):
        monkeypatch.setenv("RWKV_CPU_MATMUL", lib)
        with torch.no_grad():
            results[lib] = model(idx, return_state=True)
    assert len(calls) == 2 * 7 + 1  # every product of both blocks, and the head
    torch.testing.assert_close(results["onednn"], results["blas"], atol=1e-5, rtol=1e-5)
    state = model.init_state(1)
    with torch.no_grad():
        for t in range(T):
            last = model.step_(idx[:, t], state)
    logits, gpt_state = results["onednn"]
    torch.testing.assert_close(logits[:, -1], last, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpt_state, state, atol=1e-4, rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("n_in, n_out", [(0, 4), (4, 0)])
def test_empty_products_stay_with_the_blas(monkeypatch, calls, n_in, n_out):
    """oneDNN cannot build a product with an empty side; F.linear returns the empty or
    zero result."""
    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    layer = Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        y = layer(torch.ones(MIN_ROWS, n_in))
    assert y.shape == (MIN_ROWS, n_out) and not y.any() and calls == []
