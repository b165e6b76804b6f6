import os
import zipfile

import numpy as np
import pytest
import torch

from rwkv_lib import checkpoint as ckpt_mod
from rwkv_lib.checkpoint import (
    CheckpointError,
    check_compatible,
    export_rwkv_lm,
    import_rwkv_lm,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from rwkv_lib.data import ByteVocab
from rwkv_lib.model import RWKV, RWKVConfig, state_dict_names

TEXT = b"<page><title>Checkpoint</title> the cat sat on the mat, caf\xc3\xa9.</page>\n"


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a tiny model after one Adam step, and what went into it."""
    vocab = ByteVocab.from_data(TEXT)
    config = RWKVConfig(vocab_size=vocab.size, n_layer=2, n_embd=16, ctx_len=8,
                        wkv_backend="pytorch")
    model = RWKV(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.from_numpy(vocab.encode(TEXT[:9])).unsqueeze(0)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    loss.backward()
    optimizer.step()
    train_config = {"preset": "test", "corpus": "x", "n_layer": 2, "n_embd": 16, "ctx_len": 8,
                    "betas": (0.9, 0.99), "grad_clip": None}
    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=optimizer, step=7,
                           train_config=train_config, vocab=vocab, data_position=28,
                           metrics={"train": [{"step": 7, "loss": 1.5}], "val": []})
    return path, model, optimizer, vocab, train_config


def test_contents_load_with_weights_only(saved):
    path, model, optimizer, vocab, train_config = saved
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["format"] == ckpt_mod.FORMAT and raw["version"] == ckpt_mod.VERSION
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["data_position"] == 28
    assert ckpt["train_config"]["betas"] == [0.9, 0.99]
    assert ByteVocab.from_dict(ckpt["vocab"]) == vocab
    assert ckpt["metrics"]["train"][0]["loss"] == 1.5
    assert torch.equal(ckpt["rng_state"]["torch"], torch.get_rng_state())
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], tensor), name
    fresh = torch.optim.Adam(RWKV(model.config).parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt["optimizer"])  # the optimizer state round-trips


def test_load_model_gives_the_same_logits(saved):
    path, model, _, vocab, train_config = saved
    # the model's own backend: bit-exact logits (the default, "auto", may pick the C++ op)
    loaded, loaded_vocab, loaded_config = load_model(path, wkv_backend="pytorch")
    assert loaded_vocab == vocab and not loaded.training
    assert loaded_config["n_embd"] == 16
    ids = torch.from_numpy(vocab.encode(TEXT[:12])).unsqueeze(0)
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)


def test_a_crash_mid_write_keeps_the_old_checkpoint(saved, monkeypatch):
    path, model, optimizer, vocab, train_config = saved
    before = path.read_bytes()
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(f.tell() // 2 + 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, model=model, optimizer=optimizer, step=8,
                        train_config=train_config, vocab=vocab)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 7
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]  # no temp file left behind


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved, tmp_path):
    path = saved[0]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*truncated or corrupted"):
        load_checkpoint(cut)


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="junk.pt.*not a torch.save zip archive"):
        load_checkpoint(junk)


def test_a_torch_file_that_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert zipfile.is_zipfile(other)
    with pytest.raises(CheckpointError, match="not an rwkv_lib checkpoint"):
        load_checkpoint(other)


def test_an_rwkv_lm_state_dict_gets_a_hint(tmp_path):
    pth = tmp_path / "rwkv.pth"
    torch.save(RWKV(RWKVConfig(vocab_size=5, n_layer=1, n_embd=4)).state_dict(), pth)
    with pytest.raises(CheckpointError, match="import_rwkv_lm"):
        load_checkpoint(pth)


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": ckpt_mod.FORMAT, "obj": ByteVocab([1, 2])}, evil)  # a class instance
    with pytest.raises(CheckpointError, match=r"evil.pt: it holds Python objects that safe "
                       r"loading \(weights_only=True\) refuses") as err:
        load_checkpoint(evil)
    message = str(err.value)
    assert "truncated" not in message
    assert "rwkv_lib.data.ByteVocab" in message  # the global torch refused, by name
    # torch's advice to load it unsafely is not passed on
    assert "likely succeed" not in message and "weights_only=False" not in message
    assert "add_safe_globals" not in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("writer", ["legacy torch.save", "plain pickle"])
def test_other_pickles_are_refused_without_torch_advice(tmp_path, writer):
    import pickle

    evil = tmp_path / "evil.pt"
    if writer == "plain pickle":
        with open(evil, "wb") as f:
            pickle.dump({"obj": ByteVocab([1])}, f, protocol=4)
    else:  # torch's format before 1.6: not a zip archive
        torch.save({"obj": ByteVocab([1, 2])}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="evil.pt: it holds Python objects") as err:
        load_checkpoint(evil)
    message = str(err.value)
    assert "likely succeed" not in message and "weights_only=False" not in message
    assert len(message.splitlines()) == 1
    if writer == "legacy torch.save":
        assert "unsupported global rwkv_lib.data.ByteVocab" in message


def test_check_compatible_lists_every_difference(saved):
    path, *_ = saved
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, {"n_layer": 2, "n_embd": 16, "ctx_len": 99})  # ctx_len may change
    with pytest.raises(CheckpointError, match=r"n_layer: checkpoint 2, config 3; "
                                              r"n_embd: checkpoint 16, config 32"):
        check_compatible(ckpt, {"n_layer": 3, "n_embd": 32})
    with pytest.raises(CheckpointError, match="vocabulary"):
        check_compatible(ckpt, {"n_layer": 2, "n_embd": 16}, vocab=ByteVocab(range(256)))


def test_export_import_round_trip(saved, tmp_path):
    path, model, _, vocab, _ = saved
    out = export_rwkv_lm(path, tmp_path / "rwkv-lm.pth")
    state = torch.load(out, weights_only=True)
    assert list(state) == state_dict_names(model.config)  # RWKV-LM's names, in its order
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state["blocks.0.att.time_decay"], model.blocks[0].att.time_decay.detach())

    imported = import_rwkv_lm(out, vocab=vocab)
    c = imported.config
    assert (c.vocab_size, c.n_layer, c.n_embd) == (vocab.size, 2, 16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}  # RWKV-LM often saves bf16
    assert import_rwkv_lm(half).head.weight.dtype == torch.float32


def test_import_names_missing_and_unexpected_keys():
    state = RWKV(RWKVConfig(vocab_size=7, n_layer=2, n_embd=8)).state_dict()
    del state["blocks.1.ffn.key.weight"]
    state["head_q.weight"] = torch.zeros(8, 8)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.ffn.key.weight'\], "
                                              r"unexpected \['head_q.weight'\]"):
        import_rwkv_lm(state)
    with pytest.raises(CheckpointError, match="vocabulary of 7 tokens"):
        import_rwkv_lm(RWKV(RWKVConfig(vocab_size=7, n_layer=1, n_embd=8)).state_dict(),
                       vocab=ByteVocab(range(5)))
    with pytest.raises(CheckpointError, match="emb.weight"):
        import_rwkv_lm({"something": torch.zeros(2)})


def test_command_line_export_and_import(saved, tmp_path, capsys):
    path, model, _, vocab, _ = saved
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT)
    assert ckpt_mod.main(["export", str(path), str(tmp_path / "out.pth")]) == 0
    assert ckpt_mod.main(["import", str(tmp_path / "out.pth"), str(tmp_path / "back.pt"),
                          "--corpus", str(corpus)]) == 0
    back, back_vocab, back_config = load_model(tmp_path / "back.pt")
    assert back_vocab == vocab and back_config["corpus"] == str(corpus)
    assert torch.equal(back.head.weight, model.head.weight)
    assert "wrote" in capsys.readouterr().out


# --- export and import never destroy a file ------------------------------------------------

def test_export_refuses_to_overwrite_its_input(saved, tmp_path, capsys):
    path = saved[0]
    before = path.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.pt").symlink_to(path)
    for out in (path, tmp_path / "sub" / ".." / path.name, tmp_path / "link.pt"):
        for extra in ([], ["--force"]):
            assert ckpt_mod.main(["export", str(path), str(out), *extra]) == 1
            assert "is the input file" in capsys.readouterr().err
    assert path.read_bytes() == before and load_checkpoint(path)["optimizer"] is not None
    with pytest.raises(ValueError, match="is the input file"):
        export_rwkv_lm(path, path, overwrite=True)
    assert path.read_bytes() == before


def test_export_and_import_refuse_an_existing_output_unless_forced(saved, tmp_path, capsys):
    path, _, _, vocab, _ = saved
    pth, back = tmp_path / "out.pth", tmp_path / "back.pt"
    pth.write_bytes(b"someone's file")
    back.write_bytes(b"another file")
    assert ckpt_mod.main(["export", str(path), str(pth)]) == 1
    assert "--force" in capsys.readouterr().err
    assert pth.read_bytes() == b"someone's file"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_rwkv_lm(path, pth)
    assert ckpt_mod.main(["export", str(path), str(pth), "--force"]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(TEXT)
    for out in (back, pth):  # an existing file, and the input itself
        assert ckpt_mod.main(["import", str(pth), str(out), "--corpus", str(corpus)]) == 1
    assert back.read_bytes() == b"another file"
    assert ckpt_mod.main(["import", str(pth), str(back), "--corpus", str(corpus),
                          "--force"]) == 0
    assert load_model(back)[1] == vocab


def test_a_checkpoint_write_syncs_its_folder(saved, monkeypatch):
    import stat

    path, model, optimizer, vocab, train_config = saved
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(path, model=model, optimizer=optimizer, step=8, train_config=train_config,
                    vocab=vocab)
    # the bytes reach the disk, then the new name, then the folder entry that holds it
    assert events == ["fsync file", "rename", "fsync dir"]


# --- the WKV backend is chosen where the model runs, not stored with it ------------------------

def test_load_model_takes_the_backend_from_the_caller(tmp_path):
    vocab = ByteVocab.from_data(TEXT)
    model = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8, wkv_backend="cuda"))
    path = save_checkpoint(tmp_path / "gpu.pt", model=model, optimizer=None, step=0,
                           train_config={"corpus": "x"}, vocab=vocab)
    reference = RWKV(RWKVConfig(vocab_size=vocab.size, n_layer=1, n_embd=8,
                                wkv_backend="pytorch"))
    reference.load_state_dict(model.state_dict())
    ids = torch.from_numpy(vocab.encode(TEXT[:10])).unsqueeze(0)
    for backend, expected in ((None, "auto"), ("pytorch", "pytorch"), ("definition",
                                                                      "definition")):
        kwargs = {} if backend is None else {"wkv_backend": backend}
        loaded, _, _ = load_model(path, **kwargs)  # on the CPU, trained with "cuda"
        assert loaded.config.wkv_backend == expected
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), reference(ids))
    with pytest.raises(ValueError, match="wkv_backend"):
        load_model(path, wkv_backend="fast")


def test_a_checkpoint_missing_fields_is_refused(saved, tmp_path):
    raw = torch.load(saved[0], weights_only=True)
    del raw["model_config"], raw["vocab"]
    torch.save(raw, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt: .*missing .*model_config.*vocab"):
        load_checkpoint(tmp_path / "partial.pt")
