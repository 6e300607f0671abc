"""--preset: the DuQuant and QuaRot evaluation settings, overridable by explicit options."""
import pytest

from duquant.cli import parse_args
from duquant.commands import config_from_args
from duquant.config import QuantConfig


def cli_config(*options):
    return config_from_args(parse_args(["quantize", "some-model", *options]))


def test_quarot_preset_is_the_documented_setting():
    c = cli_config("--method", "quarot", "--preset", "quarot")
    assert (c.w_symmetric, c.a_symmetric, c.kv_symmetric, c.quantize_q) == (True, True, False, False)
    assert (c.kv_bits, c.weight_quantizer, c.a_clip, c.qk_clip, c.v_clip, c.w_clip) == (4, "gptq", 0.9, 0.95, 0.95, 1.0)
    assert c.q_spec() is None and c.k_spec().bits == 4 and not c.k_spec().symmetric and c.v_spec().clip == 0.95
    assert c.act_spec().symmetric and c.weight_spec().symmetric
    assert c == QuantConfig.from_preset("quarot", method="quarot")


def test_duquant_preset_is_the_documented_setting():
    c = cli_config("--preset", "duquant")
    assert (c.w_symmetric, c.a_symmetric, c.quantize_q, c.kv_bits, c.weight_quantizer) == (False, False, True, None, "rtn")
    assert c.q_spec().bits == c.k_spec().bits == c.v_spec().bits == c.abits == 4
    assert not c.k_spec().symmetric and (c.w_clip, c.a_clip, c.qk_clip, c.v_clip) == (None, None, None, 1.0)
    assert (c.weight_spec().clip, c.act_spec().clip, c.q_spec().clip, c.k_spec().clip) == (0.8, 0.9, 0.9, 0.9)
    assert c == cli_config()  # the DuQuant setting is the default


def test_explicit_options_override_the_preset():
    c = cli_config("--w-asym", "--preset", "quarot", "--kvbits", "16", "--weight-quantizer", "rtn", "--a-clip", "1.0",
                   "--quantize-q", "--kv-sym", "--gptq-act-order", "--gptq-damp", "0.1", "--rotation", "random")
    assert (c.w_symmetric, c.kv_bits, c.weight_quantizer, c.a_clip, c.quantize_q, c.kv_symmetric) == (
        False, 16, "rtn", 1.0, True, True)
    assert (c.a_symmetric, c.w_clip, c.gptq_act_order, c.gptq_damp, c.rotation) == (True, 1.0, True, 0.1, "random")
    assert cli_config("--preset", "duquant", "--a-sym").a_symmetric


def test_unknown_preset_refused():
    with pytest.raises(SystemExit):
        parse_args(["quantize", "m", "--preset", "awq"])
    with pytest.raises(ValueError, match="preset"):
        QuantConfig.from_preset("awq")


def test_calib_forward_option_reaches_the_config():
    assert cli_config().calib_forward == "simulated"
    assert cli_config("--calib-forward", "real").calib_forward == "real"
    assert QuantConfig.from_dict(cli_config("--calib-forward", "real").to_dict()).calib_forward == "real"
