"""Evaluation and calibration text: offline from `DUQUANT_DATA_DIR`, else from the hub.

The data directory is laid out as:
    wikitext2/test.txt                 WikiText-2 raw test, joined with "\n\n" (GPTQ protocol)
    wikitext2/validation_tokenized.txt WikiText-2 validation (calibration)
    ptb/test.txt, ptb/validation.txt   one sentence a line
    c4/validation.jsonl                {"text": ...} a line
C4 perplexity uses the first 1,100 documents (as GPTQ/QuaRot); calibration on C4 uses only the
documents after them, so the two never overlap.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

DATA_ENV = "DUQUANT_DATA_DIR"
EVAL_DATASETS = ("wikitext2", "c4", "ptb")
C4_EVAL_DOCUMENTS = 1100


class DataUnavailableError(RuntimeError):
    """A dataset could not be found locally and could not be fetched."""


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: the explicit argument, else $DUQUANT_DATA_DIR, else None."""
    value = explicit if explicit is not None else os.environ.get(DATA_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataUnavailableError(
            f"data directory {path} does not exist; point {DATA_ENV} (or --data-dir) at a folder laid out "
            "like wikitext2/test.txt, ptb/test.txt, c4/validation.jsonl"
        )
    return path


def _read(path: Path) -> str:
    if not path.is_file():
        raise DataUnavailableError(
            f"missing data file {path}; the data directory must contain wikitext2/, ptb/ and c4/ "
            f"as described in the README (set {DATA_ENV})"
        )
    return path.read_text(encoding="utf-8")


def _c4_documents(root: Path) -> list[str]:
    lines = _read(root / "c4" / "validation.jsonl").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def _ptb_join(text: str) -> str:
    # GPTQ protocol: sentences joined by a single space.
    return " ".join(line for line in text.split("\n") if line)


def _check_name(name: str) -> None:
    if name not in EVAL_DATASETS:
        raise DataUnavailableError(f"unknown dataset {name!r}; choose one of {', '.join(EVAL_DATASETS)}")


def _local_text(name: str, split: str, root: Path) -> str:
    if name == "wikitext2":
        return _read(root / "wikitext2" / ("test.txt" if split == "test" else "validation_tokenized.txt"))
    if name == "ptb":
        return _ptb_join(_read(root / "ptb" / ("test.txt" if split == "test" else "validation.txt")))
    docs = _c4_documents(root)
    if split == "test":
        return " ".join(docs[:C4_EVAL_DOCUMENTS])
    if len(docs) <= C4_EVAL_DOCUMENTS:
        raise DataUnavailableError("the C4 file has no documents beyond the evaluation set to calibrate on")
    return "\n\n".join(docs[C4_EVAL_DOCUMENTS:])


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise DataUnavailableError(
            f"dataset {name!r} needs either {DATA_ENV} pointing at an offline data folder "
            "or the `datasets` package (pip install 'duquant[hub]') and network access"
        ) from err
    try:
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test" if split == "test" else "train")
            return "\n\n".join(data["text"])
        if name == "ptb":
            data = datasets.load_dataset("ptb_text_only", "penn_treebank", split="test" if split == "test" else "train")
            return " ".join(data["sentence"])
        if split == "test":
            data = datasets.load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
            )
            return " ".join(data[:C4_EVAL_DOCUMENTS]["text"])
        data = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return "\n\n".join(data[:5000]["text"])
    except Exception as err:  # network errors come in many types
        raise DataUnavailableError(
            f"could not load {name!r} from the hub ({err}); set {DATA_ENV} to an offline data folder"
        ) from err


def load_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """Raw text of `name` ("wikitext2", "c4", "ptb"); split "test" for evaluation, "calib" for calibration."""
    _check_name(name)
    root = resolve_data_dir(data_dir)
    return _local_text(name, split, root) if root is not None else _hub_text(name, split)
