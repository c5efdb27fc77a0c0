"""Tiny models: the tokenizer covers every byte, seeds make different versions, reruns are free."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from turnout import tinymodels

pytest.importorskip("transformers")

# Smaller than the default so the unit tests stay quick; the shape logic is the same.
SMALL = {"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1,
         "num_hidden_layers": 1}


def test_tokenizer_round_trips_any_bytes() -> None:
    tok = tinymodels.build_tokenizer()
    assert len(tok) == tinymodels.VOCAB_SIZE == 259
    text = "héllo wörld\n\t\x00 😀 <not special>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "<pad>"]) == [256, 257, 258]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<s>assistant\n") and "hi" in prompt


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_seeds_make_different_versions_and_reruns_are_idempotent(tmp_path: Path) -> None:
    a = tinymodels.make_tiny_model(tmp_path / "a", 1, **SMALL)
    b = tinymodels.make_tiny_model(tmp_path / "b", 2, **SMALL)
    config = json.loads((a / "config.json").read_text())
    assert config["vocab_size"] == 259 and config["hidden_size"] == 64
    assert (a / "tokenizer.json").is_file() and (a / tinymodels.MARKER_FILE).is_file()

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert any(not wa[k].equal(wb[k]) for k in wa)

    mtime = (a / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert tinymodels.make_tiny_model(tmp_path / "a", 1, **SMALL) == a
    assert time.monotonic() - started < 0.5
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime

    # Same seed again in a new dir gives the same weights: a version is reproducible.
    again = tinymodels.make_tiny_model(tmp_path / "a2", 1, **SMALL)
    assert all(wa[k].equal(_weights(again)[k]) for k in wa)

    # A different seed in an existing dir rebuilds it.
    tinymodels.make_tiny_model(tmp_path / "a", 2, **SMALL)
    assert json.loads((a / tinymodels.MARKER_FILE).read_text())["seed"] == 2


def test_incomplete_dir_is_rebuilt(tmp_path: Path) -> None:
    path = tinymodels.make_tiny_model(tmp_path / "m", 3, **SMALL)
    (path / "model.safetensors").unlink()
    tinymodels.make_tiny_model(path, 3, **SMALL)
    assert (path / "model.safetensors").is_file()


def test_main_makes_one_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare the same spec the CLI uses, so main() finds it complete and returns at once.
    target = tmp_path / "cli"
    tinymodels.make_tiny_model(target, 5)
    assert tinymodels.main([str(target), "--seed", "5"]) == 0
    assert str(target) in capsys.readouterr().out
