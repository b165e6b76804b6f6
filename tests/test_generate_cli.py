"""python -m rwkv_lib.generate: the command line around generate_text."""

import pytest
import torch

from rwkv_lib import generate as generate_mod
from rwkv_lib.checkpoint import save_checkpoint
from rwkv_lib.data import ByteVocab
from rwkv_lib.model import RWKV, RWKVConfig

TEXT = b"<page>\n  <title>A page</title>\n  <text>some words</text>\n</page>\n"


@pytest.fixture
def checkpoint(tmp_path):
    vocab = ByteVocab.from_data(TEXT)
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8, wkv_backend="cuda"))
    return save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=None, step=0,
                           train_config={"corpus": "x"}, vocab=vocab), model, vocab


def test_a_checkpoint_trained_with_cuda_generates_on_the_cpu(checkpoint, capsys):
    path, model, vocab = checkpoint
    assert generate_mod.main([str(path), "--prompt", "<page>", "--tokens", "12"]) == 0
    first = capsys.readouterr().out
    assert generate_mod.main([str(path), "--prompt", "<page>", "--tokens", "12",
                              "--wkv-backend", "pytorch"]) == 0
    assert capsys.readouterr().out == first
    reference = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8,
                                wkv_backend="pytorch"))
    reference.load_state_dict(model.state_dict())
    assert first == "<page>" + generate_mod.generate_text(reference.eval(), vocab, "<page>", 12,
                                                          1.0, 0.9, 0) + "\n"


@pytest.mark.parametrize("args, problem", [
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--tokens", "-3"], "--tokens"), (["--wkv-backend", "fast"], "--wkv-backend"),
    (["--device", "tpu"], "tpu"),
])
def test_bad_arguments_are_usage_errors(checkpoint, capsys, args, problem):
    with pytest.raises(SystemExit) as info:
        generate_mod.main([str(checkpoint[0]), *args])
    assert info.value.code == 2 and problem in capsys.readouterr().err


@pytest.mark.parametrize("prompt, problem", [("", "prompt is empty"), ("é", "not in")])
def test_prompts_the_model_cannot_read(checkpoint, prompt, problem):
    with pytest.raises(ValueError, match=problem):
        generate_mod.main([str(checkpoint[0]), "--prompt", prompt])
