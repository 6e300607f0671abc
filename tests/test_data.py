"""Datasets, calibration windows and the perplexity protocol."""
import json
import math

import pytest
import torch
from conftest import tiny_model

from duquant.data.calibration import CalibrationSpec, calibration_tokens, sample_windows, token_hash
from duquant.data.datasets import C4_EVAL_DOCUMENTS, DataUnavailableError, load_text, resolve_data_dir
from duquant.evaluation.perplexity import perplexity, split_windows


@pytest.fixture
def fake_data(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text("wiki test text")
    (tmp_path / "wikitext2" / "validation_tokenized.txt").write_text("wiki validation")
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text(" a b \n c d \n")
    (tmp_path / "ptb" / "validation.txt").write_text(" v \n")
    (tmp_path / "c4").mkdir()
    docs = [{"text": f"doc{i}"} for i in range(C4_EVAL_DOCUMENTS + 3)]
    (tmp_path / "c4" / "validation.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    return tmp_path


def test_local_datasets(fake_data):
    assert load_text("wikitext2", "test", fake_data) == "wiki test text"
    assert load_text("wikitext2", "calib", fake_data) == "wiki validation"
    assert load_text("ptb", "test", fake_data) == " a b   c d "


def test_c4_calibration_never_overlaps_evaluation(fake_data):
    test_docs = set(load_text("c4", "test", fake_data).split(" "))
    calib_docs = set(load_text("c4", "calib", fake_data).split("\n\n"))
    assert len(test_docs) == C4_EVAL_DOCUMENTS and calib_docs == {f"doc{i}" for i in range(1100, 1103)}
    assert not test_docs & calib_docs


def test_env_variable_and_missing_folder(fake_data, monkeypatch, tmp_path):
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(fake_data))
    assert resolve_data_dir() == fake_data
    monkeypatch.setenv("DUQUANT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataUnavailableError, match="DUQUANT_DATA_DIR"):
        load_text("wikitext2")


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(DataUnavailableError, match="missing data file"):
        load_text("ptb", "test", tmp_path)
    with pytest.raises(DataUnavailableError, match="unknown dataset"):
        load_text("imagenet", "test", tmp_path)


def test_random_calibration_is_seeded():
    a = calibration_tokens(None, CalibrationSpec("random", 3, 16, seed=0), vocab_size=50)
    b = calibration_tokens(None, CalibrationSpec("random", 3, 16, seed=0), vocab_size=50)
    c = calibration_tokens(None, CalibrationSpec("random", 3, 16, seed=1), vocab_size=50)
    assert a.shape == (3, 16) and int(a.max()) < 50
    assert token_hash(a) == token_hash(b) != token_hash(c)


def test_text_file_calibration_and_bad_source(tmp_path):
    class CharTokenizer:
        def __call__(self, text, return_tensors=None):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(ch) % 50 for ch in text]])})

    path = tmp_path / "calib.txt"
    path.write_text("abcdefghij" * 20)
    windows = calibration_tokens(CharTokenizer(), CalibrationSpec(str(path), 4, 8, seed=0), vocab_size=50)
    assert windows.shape == (4, 8)
    with pytest.raises(DataUnavailableError, match="neither a dataset"):
        calibration_tokens(CharTokenizer(), CalibrationSpec(str(tmp_path / "missing.txt"), 4, 8), 50)


def test_sample_windows_come_from_the_stream():
    ids = torch.arange(100)
    w = sample_windows(ids, 5, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in w)


def test_windows_drop_the_tail():
    windows = split_windows(torch.arange(25).unsqueeze(0), 10)
    assert windows.shape == (2, 10) and split_windows(torch.arange(25), 10, max_windows=1).shape == (1, 10)


def test_perplexity_matches_manual_nll_and_is_batch_invariant():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(0))
    r1 = perplexity(model, ids, seqlen=16, batch_size=1, progress=False)
    r3 = perplexity(model, ids, seqlen=16, batch_size=3, progress=False)
    nll = []
    with torch.no_grad():
        for w in ids[0, :64].reshape(4, 16):
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            nll.append(-logp.gather(1, w[1:, None]).sum())
    manual = math.exp(float(sum(nll)) / (4 * 15))
    assert r1.windows == 4 and r1.tokens == 60
    assert r1.ppl == pytest.approx(manual, rel=1e-5) and r3.ppl == pytest.approx(r1.ppl, rel=1e-5)
