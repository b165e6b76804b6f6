import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_lib import evaluate as evaluate_mod
from rwkv_lib.checkpoint import save_checkpoint
from rwkv_lib.data import ByteVocab
from rwkv_lib.evaluate import evaluate_bpb
from rwkv_lib.model import RWKV, RWKVConfig

V = 13


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(vocab_size=V, n_layer=2, n_embd=16, wkv_backend="pytorch"))
    with torch.no_grad():  # move away from the init, where several layers output zero
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.double()  # float64: chunked and single-pass sums then agree to ~1e-12


def _tokens(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, n)


def _single_pass_nats(model: RWKV, tokens: np.ndarray) -> float:
    ids = torch.from_numpy(tokens).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))


def test_chunked_equals_single_pass(model):
    tokens = _tokens(101)
    expected = _single_pass_nats(model, tokens) / 100 / math.log(2)
    for chunk_len in (1, 7, 100, 1000):
        result = evaluate_bpb(model, tokens, chunk_len=chunk_len)
        assert result["predicted"] == 100 and result["streams"] == 1
        assert result["bpb"] == pytest.approx(expected, rel=1e-10), chunk_len


def test_streams_are_contiguous_pieces_read_separately(model):
    tokens = _tokens(62)  # 61 targets -> 3 streams of 20, the last target left out
    result = evaluate_bpb(model, tokens, chunk_len=6, batch_size=3)
    assert result["predicted"] == 60 and result["bytes"] == 62
    nats = sum(_single_pass_nats(model, tokens[j * 20 : j * 20 + 21]) for j in range(3))
    assert result["loss"] == pytest.approx(nats / 60, rel=1e-10)


def test_max_bytes_and_errors(model):
    tokens = _tokens(300)
    short = evaluate_bpb(model, tokens, chunk_len=16, max_bytes=41)
    assert short["bytes"] == 41 and short["predicted"] == 40
    assert short["bpb"] == pytest.approx(evaluate_bpb(model, tokens[:41])["bpb"], rel=1e-10)
    with pytest.raises(ValueError, match="too few"):
        evaluate_bpb(model, tokens[:3], batch_size=4)
    with pytest.raises(ValueError, match="chunk_len"):
        evaluate_bpb(model, tokens, chunk_len=0)


def test_untrained_model_is_near_uniform():
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(vocab_size=97, n_layer=1, n_embd=32, wkv_backend="pytorch"))
    tokens = np.random.default_rng(1).integers(0, 97, 400)
    bpb = evaluate_bpb(m, tokens, chunk_len=64, batch_size=2)["bpb"]
    assert abs(bpb - math.log2(97)) < 0.5, bpb  # log2(97) = 6.6


def test_command_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a small corpus for the evaluation command line. " * 40)
    data = np.frombuffer(corpus.read_bytes(), dtype=np.uint8)
    vocab = ByteVocab.from_data(data)
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8, wkv_backend="pytorch"))
    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=None, step=0,
                           train_config={"corpus": str(corpus)}, vocab=vocab)
    assert evaluate_mod.main([str(path), "--split", "val", "--no-progress",
                              "--device", "cpu", "--chunk-len", "16"]) == 0
    out = capsys.readouterr().out
    val = data[len(data) * 90 // 100 : len(data) * 95 // 100]
    expected = evaluate_bpb(model, vocab.encode(val), chunk_len=16)["bpb"]
    assert f"val: {expected:.4f} bits per byte" in out


def test_a_checkpoint_trained_with_cuda_evaluates_on_the_cpu(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"trained on a GPU, evaluated on a laptop. " * 40)
    vocab = ByteVocab.from_data(corpus.read_bytes())
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8, wkv_backend="cuda"))
    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=None, step=0,
                           train_config={"corpus": str(corpus)}, vocab=vocab)
    for backend in ([], ["--wkv-backend", "pytorch"], ["--wkv-backend", "auto"]):
        assert evaluate_mod.main([str(path), "--split", "val", "--no-progress", "--device",
                                  "cpu", *backend]) == 0
        assert "bits per byte" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        evaluate_mod.main([str(path), "--wkv-backend", "fast"])
    assert info.value.code == 2
