"""Integration tests on the real SmolLM2-135M (both outlier kinds), with a small calibration."""
import subprocess
import sys

import pytest
import torch

from duquant import QuantConfig, quantize
from duquant.checkpoint import save_quantized
from duquant.data.calibration import CalibrationSpec, calibration_tokens
from duquant.data.datasets import load_text
from duquant.evaluation.perplexity import perplexity
from duquant.transforms.permutation import block_mean_variance, zigzag_permutation
from duquant.transforms.rotation import fit_block_rotation, rotate_blocks

pytestmark = pytest.mark.slow
SEQLEN, WINDOWS = 512, 3


@pytest.fixture(scope="module")
def calib(smollm2, data_dir):
    model, tokenizer = smollm2
    return calibration_tokens(tokenizer, CalibrationSpec("c4", 8, SEQLEN, 0), model.config.vocab_size, data_dir)


@pytest.fixture(scope="module")
def wikitext_ids(smollm2, data_dir):
    return smollm2[1](load_text("wikitext2", "test", data_dir), return_tensors="pt").input_ids


def ppl(model, ids):
    return perplexity(model, ids, SEQLEN, "cpu", batch_size=1, max_windows=WINDOWS, progress=False).ppl


@pytest.fixture(scope="module")
def duquant_model(smollm2, calib):
    import copy

    model = copy.deepcopy(smollm2[0])
    quantize(model, QuantConfig(method="duquant"), calib, device="cpu", batch_size=4, progress=False)
    return model


def test_duquant_w4a4_far_below_rtn(smollm2, duquant_model, wikitext_ids):
    import copy

    fp = ppl(smollm2[0], wikitext_ids)
    rtn_model = copy.deepcopy(smollm2[0])
    quantize(rtn_model, QuantConfig(method="rtn"), None, device="cpu", progress=False)
    rtn = ppl(rtn_model, wikitext_ids)
    duq = ppl(duquant_model, wikitext_ids)
    print(f"FP {fp:.2f}  RTN W4A4 {rtn:.2f}  DuQuant W4A4 {duq:.2f}")
    assert duq < rtn / 20  # measured on 3×512 windows: FP ≈ 29, RTN ≈ 5000, DuQuant ≈ 50
    assert duq < 3 * fp


def test_zigzag_on_real_massive_outliers(smollm2, calib):
    """Eq. 4 on layer 11's down_proj input (the ~3100 massive outlier): zigzag ≪ no permutation."""
    model = smollm2[0]
    captured = {}
    def grab(_module, args):
        captured["x"] = args[0][0].double()

    hook = model.model.layers[11].mlp.down_proj.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(input_ids=calib[:1])
    hook.remove()
    x = captured["x"]
    assert x.abs().max() > 1000  # the massive outlier is really there
    rotated = rotate_blocks(x, fit_block_rotation(x, 128, 256, torch.Generator().manual_seed(0)))
    absmax = rotated.abs().amax(0)
    perm = zigzag_permutation(absmax, 128)
    assert block_mean_variance(absmax, 128, perm) < block_mean_variance(absmax, 128) / 10


RELOAD = """
import sys, torch
from duquant.checkpoint import load_quantized
model, _, _ = load_quantized(sys.argv[1])
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def test_save_and_fresh_process_reload_identical(duquant_model, smollm2, calib, tmp_path):
    tokens = calib[:1, :64]
    with torch.no_grad():
        expected = duquant_model(input_ids=tokens).logits
    out = save_quantized(duquant_model, smollm2[1], tmp_path / "smol", QuantConfig(method="duquant"))
    torch.save(tokens, tmp_path / "t.pt")
    subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "t.pt"), str(tmp_path / "l.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "l.pt"), expected)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
