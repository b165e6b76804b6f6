"""rwkv_lib.cpu_matmul: which library computes float32 products, with autograd and without,
and that the model gives the same results and gradients, to float rounding, whichever it is,
eager and compiled."""

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


@pytest.mark.parametrize("vendor, family, works, expected, expected_training", [
    ("AuthenticAMD", 26, True, "onednn", "onednn"),  # Zen 5
    ("AuthenticAMD", 25, True, "onednn", "blas"),  # Zen 3, Zen 4
    ("AuthenticAMD", 26, False, "blas", "blas"),
    ("GenuineIntel", 6, True, "blas", "blas"), ("", 0, True, "blas", "blas")])
def test_auto_chooses_onednn_only_on_amd_where_it_works(monkeypatch, vendor, family, works,
                                                        expected, expected_training):
    monkeypatch.delenv("RWKV_CPU_MATMUL", raising=False)
    monkeypatch.setattr(cpu_matmul, "processor_vendor", lambda: vendor)
    monkeypatch.setattr(cpu_matmul, "processor_family", lambda: family)
    monkeypatch.setattr(cpu_matmul, "onednn_works", lambda: works)
    assert cpu_matmul.library() == expected
    assert cpu_matmul.library(autograd=True) == expected_training
    monkeypatch.setenv("RWKV_CPU_MATMUL", "auto")
    assert cpu_matmul.library() == expected
    assert cpu_matmul.library(autograd=True) == expected_training


@pytest.mark.parametrize("cpuinfo, windows_name, vendor, family", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\n"
     "processor\t: 1\nvendor_id\t: Other\n", "", "AuthenticAMD", 26),
    (None, "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD", "AuthenticAMD", 25),
    (None, "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", "GenuineIntel", 6),
    (None, "", "", 0)])
def test_the_processor_is_read_from_cpuinfo_or_windows_name(monkeypatch, tmp_path, cpuinfo,
                                                           windows_name, vendor, family):
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path != "/proc/cpuinfo":
            return real_open(path, *args, **kwargs)
        if cpuinfo is None:
            raise FileNotFoundError(path)
        (tmp_path / "cpuinfo").write_text(cpuinfo)
        return real_open(tmp_path / "cpuinfo", *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(cpu_matmul.platform, "processor", lambda: windows_name)
    monkeypatch.setattr(cpu_matmul, "_cpu_fields", None)  # read afresh, restored after
    assert (cpu_matmul.processor_vendor(), cpu_matmul.processor_family()) == (vendor, family)


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
def test_linear_sends_float32_products_of_enough_rows_to_onednn(monkeypatch, calls):
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
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides instead
            assert layer(x).dtype == torch.bfloat16
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 2
    monkeypatch.setenv("RWKV_CPU_MATMUL", "blas")
    with torch.no_grad():
        layer(x)
    layer(x.requires_grad_()).sum().backward()
    assert len(calls) == 2


@needs_onednn
@pytest.mark.parametrize("needs", ["input and weight", "weight", "input"])
def test_linear_differentiates_through_onednn(monkeypatch, calls, needs):
    """Under autograd the forward and each needed gradient are oneDNN products, and the
    gradients are F.linear's to float rounding (bias included)."""
    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    torch.manual_seed(0)
    layer = Linear(32, 48)
    layer.requires_grad_("weight" in needs)
    x = torch.randn(3, MIN_ROWS, 32, requires_grad="input" in needs)
    dy = torch.randn(3, MIN_ROWS, 48)
    y = layer(x)
    (y * dy).sum().backward()
    assert len(calls) == 1 + needs.count("input") + needs.count("weight")
    monkeypatch.setenv("RWKV_CPU_MATMUL", "blas")
    x_ref = x.detach().clone().requires_grad_(x.requires_grad)
    ref = nn_linear_copy(layer)
    y_ref = ref(x_ref)
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y, y_ref)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad)
    if layer.weight.requires_grad:
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)
    assert len(calls) == 1 + needs.count("input") + needs.count("weight")


def nn_linear_copy(layer: Linear) -> torch.nn.Linear:
    ref = torch.nn.Linear(layer.in_features, layer.out_features)
    ref.load_state_dict(layer.state_dict())
    return ref.requires_grad_(layer.weight.requires_grad)


def _training_losses(steps: int, compiled: bool) -> tuple[list[float], torch.Tensor]:
    from rwkv_lib.l2wrap import l2wrap
    from rwkv_lib.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=40, n_layer=1, n_embd=32, wkv_backend="pytorch"))
    opt = make_optimizer(model.train(), TrainConfig(lr_init=3e-3))
    runner = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randint(0, 40, (MIN_ROWS // 4, 4), generator=g) for _ in range(2))
    losses = []
    for _ in range(steps):
        logits = runner(x)
        loss = l2wrap(F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.head.weight.detach().clone()


@needs_onednn
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_training_through_onednn_follows_the_blas(monkeypatch, calls, compiled):
    """Training steps with every product through oneDNN, eager and under torch.compile
    (Inductor), keep to the eager BLAS's losses and weights, to float rounding."""
    import torch._dynamo

    monkeypatch.setenv("RWKV_CPU_MATMUL", "blas")
    blas_losses, blas_head = _training_losses(4, compiled=False)
    assert calls == []
    torch._dynamo.reset()  # no graph traced for the BLAS may serve oneDNN
    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    losses, head = _training_losses(4, compiled)
    torch._dynamo.reset()
    assert len(calls) == 4 * 3 * (7 + 1)  # each step: forward, dx, dw of every product
    assert losses == pytest.approx(blas_losses, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(head, blas_head, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_a_compiled_model_follows_torchs_onednn_switch(monkeypatch, calls):
    """torch.compile guards on torch.backends.mkldnn.enabled (benchmarks/cpu_bench.py
    relies on it to time the BLAS beside oneDNN in one process)."""
    import torch._dynamo

    monkeypatch.setenv("RWKV_CPU_MATMUL", "onednn")
    torch._dynamo.reset()
    layer = torch.compile(Linear(16, 8))
    x = torch.randn(MIN_ROWS, 16, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 3
    with torch.backends.mkldnn.flags(enabled=False):
        y = layer(x)
    assert len(calls) == 3
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    torch._dynamo.reset()


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
