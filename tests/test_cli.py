"""The command line on a tiny local model with its own tokenizer, and its errors."""
import json
import subprocess
import sys

import pytest
from conftest import tiny_model

from duquant.cli import main

WORDS = [f"w{i}" for i in range(90)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    text = " ".join(WORDS[(i * 7) % 90] for i in range(400))
    (root / "wikitext2" / "test.txt").write_text(text)
    (root / "wikitext2" / "validation_tokenized.txt").write_text(text)
    return root


def quantize_args(model_dir, data_folder, out, *extra):
    return ["quantize", str(model_dir), "--method", "duquant", "--calib", "wikitext2", "--nsamples", "2",
            "--seqlen", "32", "--rotation-steps", "8", "--eval-ppl", "wikitext2", "--max-windows", "3",
            "--data-dir", str(data_folder), "--out", str(out), "--device", "cpu", "--quiet", *extra]


def test_quantize_eval_generate_round_trip(model_dir, data_folder, tmp_path, capsys):
    out = tmp_path / "q"
    record = tmp_path / "run.json"
    assert main(quantize_args(model_dir, data_folder, out, "--eval-fp", "--json", str(record))) == 0
    table = capsys.readouterr().out
    assert "| FP |" in table and "duquant W4A4" in table
    run = json.loads(record.read_text())
    assert run["calibration"]["source"] == "wikitext2" and len(run["calibration"]["token_sha256"]) == 64
    assert set(run["seconds"]) >= {"load", "quantize", "eval", "save"}
    quantized_ppl = run["results"]["wikitext2"]["ppl"]
    saved = json.loads((out / "duquant_run.json").read_text())
    assert saved["results"]["wikitext2"]["ppl"] == quantized_ppl and saved["versions"]["torch"]

    eval_json = tmp_path / "eval.json"
    assert main(["eval", str(out), "--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "3",
                 "--data-dir", str(data_folder), "--device", "cpu", "--quiet", "--json", str(eval_json)]) == 0
    assert json.loads(eval_json.read_text())["results"]["wikitext2"]["ppl"] == pytest.approx(quantized_ppl, rel=1e-6)

    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("preset", ["duquant", "quarot"])
def test_real_backend_eval_and_generate(model_dir, data_folder, tmp_path, capsys, preset):
    """--backend real (the kernels' CPU references here) gives the simulated perplexity up to
    rounding, for DuQuant (asymmetric) and QuaRot (symmetric W/A, online Hadamard, GPTQ);
    quantize --backend real still saves the simulated layout."""
    out = tmp_path / "q"
    record = tmp_path / "run.json"
    extra = ["--preset", "quarot", "--method", "quarot"] if preset == "quarot" else []
    assert main(quantize_args(model_dir, data_folder, out, "--backend", "real", "--json", str(record), *extra)) == 0
    run = json.loads(record.read_text())
    assert run["backend"]["real_layers"] == 14 and run["backend"]["simulated_layers"] == []
    real_ppl = run["results"]["wikitext2"]["ppl"]
    common = ["--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "3", "--data-dir", str(data_folder),
              "--device", "cpu", "--quiet"]
    sim_json, real_json = tmp_path / "sim.json", tmp_path / "real.json"
    assert main(["eval", str(out), *common, "--json", str(sim_json)]) == 0
    assert main(["eval", str(out), *common, "--backend", "real", "--json", str(real_json)]) == 0
    sim, real = (json.loads(p.read_text()) for p in (sim_json, real_json))
    assert sim["backend"] is None and real["backend"]["backend"] == "real"
    assert real["results"]["wikitext2"]["ppl"] == pytest.approx(real_ppl, rel=1e-6)
    assert real["results"]["wikitext2"]["ppl"] == pytest.approx(sim["results"]["wikitext2"]["ppl"], rel=5e-3)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--device", "cpu",
                 "--backend", "real"]) == 0
    assert capsys.readouterr().out.strip()


def test_real_backend_needs_a_quantized_model(model_dir, data_folder, caplog):
    args = ["eval", str(model_dir), "--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "1",
            "--data-dir", str(data_folder), "--device", "cpu", "--quiet", "--backend", "real"]
    assert main(args) == 2
    assert "no quantized linear layer" in caplog.text


def test_bench_subcommand_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    assert main(["bench", "--level", "kernel"]) == 2
    assert "CUDA" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])


def test_existing_out_is_refused_before_any_work(model_dir, data_folder, tmp_path, caplog):
    out = tmp_path / "q"
    out.mkdir()
    assert main(quantize_args(model_dir, data_folder, out)) == 2
    assert "--overwrite" in caplog.text and list(out.iterdir()) == []


def test_missing_data_dir_says_how_to_fix(model_dir, tmp_path, caplog):
    args = quantize_args(model_dir, tmp_path / "nowhere", tmp_path / "q")
    assert main(args) == 2
    assert "DUQUANT_DATA_DIR" in caplog.text and not (tmp_path / "q").exists()


def test_bits_out_of_range_is_a_usage_error(model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(model_dir), "--wbits", "12"])
    assert exc.value.code == 2 and "2..8 or 16" in capsys.readouterr().err


def test_non_causal_lm_and_unsupported_architecture(tmp_path, caplog):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(tmp_path / "bert")
    assert main(["eval", str(tmp_path / "bert"), "--ppl", "wikitext2", "--device", "cpu"]) == 2
    assert "supported" in caplog.text
    caplog.clear()
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "gpt2")
    assert main(["quantize", str(tmp_path / "gpt2"), "--method", "rtn", "--device", "cpu"]) == 2
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in caplog.text


def test_console_entry_point():
    done = subprocess.run([sys.executable, "-m", "duquant", "quantize", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--method" in done.stdout
