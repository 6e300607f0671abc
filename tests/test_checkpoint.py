"""Quantize → save → load (in a fresh process) gives identical logits; saving is atomic."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.checkpoint import CheckpointError, load_quantized, save_quantized

RELOAD_SCRIPT = """
import sys, torch
from duquant.checkpoint import load_quantized
model, config, record = load_quantized(sys.argv[1])
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=tokens).logits, sys.argv[3])
"""


@pytest.mark.parametrize("family", ["llama-tied", "qwen2"])
def test_save_and_reload_in_fresh_process(tmp_path, tokens, family):
    model = tiny_model(family)
    config = QuantConfig(method="duquant", rotation_steps=8)
    quantize(model, config, tokens, device="cpu", batch_size=2, progress=False)
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    out = save_quantized(model, None, tmp_path / "q", config, {"note": "test"})
    torch.save(tokens, tmp_path / "tokens.pt")
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, str(out), str(tmp_path / "tokens.pt"),
                    str(tmp_path / "logits.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    # The model still works after saving, and the directory describes itself.
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, expected)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "duquant" and QuantConfig.from_dict(saved["config"]) == config
    assert json.loads((out / "duquant_run.json").read_text())["note"] == "test"


def test_packed_checkpoint_is_smaller_than_fp(tmp_path, tokens):
    model = tiny_model("llama")
    fp_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers" in n and p.dim() == 2)
    quantize(model, QuantConfig(method="rtn"), None, device="cpu", progress=False)
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith("qweight"))
    assert packed * 8 == fp_bytes  # 4 bits instead of 32


def test_existing_output_refused_and_overwrite(tmp_path, tokens):
    model = tiny_model("llama")
    config = QuantConfig(method="rtn")
    quantize(model, config, None, device="cpu", progress=False)
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, None, out, config)
    assert (out / "keep.txt").read_text() == "precious"
    save_quantized(model, None, out, config, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_crash_while_saving_leaves_nothing(tmp_path, tokens, monkeypatch):
    import duquant.checkpoint as ckpt

    model = tiny_model("llama")
    config = QuantConfig(method="rtn")
    quantize(model, config, None, device="cpu", progress=False)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized(model, None, tmp_path / "q", config)
    assert list(tmp_path.iterdir()) == []


def test_loading_fails_loudly_on_mismatch(tmp_path, tokens):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    config = QuantConfig(method="rtn")
    quantize(model, config, None, device="cpu", progress=False)
    out = save_quantized(model, None, tmp_path / "q", config)
    state = load_file(str(out / "model.safetensors"))
    state.pop("model.layers.0.self_attn.q_proj.qweight")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(out)
    with pytest.raises(CheckpointError, match="not a duquant checkpoint"):
        load_quantized(tmp_path)
