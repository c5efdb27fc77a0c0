"""Tiny Llama models made locally, so tests and demos can run real vLLM engines offline.

Nothing can be downloaded from a model hub on our machines, so the project makes its own
models: a 2-layer Llama with random weights (a different seed gives a different
"version") and a byte-level tokenizer that needs no training data. vLLM's CPU backend
serves them in about 20 s.

`transformers`, `torch` and `tokenizers` are imported inside the functions: the turnout
core must import fast on hosts that only run the API or the gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MARKER_FILE = ".turnout-tiny-model.json"
"""Written last: its presence (with the right seed and shape) means the model is complete."""

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

TINY_VERSIONS: dict[str, int] = {"tiny-v1": 1, "tiny-v2": 2}


def _spec(seed: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
          num_attention_heads: int, num_key_value_heads: int,
          max_position_embeddings: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": VOCAB_SIZE,
    }


def is_complete(path: Path, spec: dict[str, Any]) -> bool:
    """True if `path` already holds a finished model made with exactly `spec`."""
    marker = path / MARKER_FILE
    required = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not marker.is_file() or not all((path / name).is_file() for name in required):
        return False
    try:
        return bool(json.loads(marker.read_text()) == spec)
    except (OSError, ValueError):
        return False


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer: the 256 byte symbols plus `<s>`, `</s>`, `<pad>`.

    No merges, so every byte is one token: any text round-trips and no training is needed.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the byte symbols by byte value so token id == byte value (easy to reason about).
    byte_symbols = sorted(alphabet, key=_byte_of_symbol)
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols)}
    for i, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token=None, model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of_symbol(symbol: str) -> int:
    """Invert GPT-2's bytes-to-unicode table for one symbol."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def make_tiny_model(
    path: Path,
    seed: int,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a tiny random Llama (float32) and its tokenizer to `path`; return `path`.

    Idempotent: if `path` already holds a complete model of the same seed and shape (see
    `MARKER_FILE`) nothing is done, so CI and the CLI can call this on every run. The head
    dimension (hidden / heads) must be 64 or so: vLLM's CPU attention refuses 16.
    """
    path = Path(path)
    spec = _spec(seed, hidden_size, intermediate_size, num_hidden_layers,
                 num_attention_heads, num_key_value_heads, max_position_embeddings)
    if is_complete(path, spec):
        return path

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER_FILE).unlink(missing_ok=True)  # incomplete until rewritten below

    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[no-untyped-call, arg-type]
    # transformers' classes are untyped where mypy looks: the ignores are for those calls.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=256, eos_token_id=257, pad_token_id=258)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    (path / MARKER_FILE).write_text(json.dumps(spec, sort_keys=True))
    return path


def ensure_tiny_models(root: Path) -> dict[str, Path]:
    """Make `root/tiny-v1` (seed 1) and `root/tiny-v2` (seed 2): two versions of one model."""
    root = Path(root)
    return {name: make_tiny_model(root / name, seed) for name, seed in TINY_VERSIONS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m turnout.tinymodels DIR [--seed N]`; without --seed, makes tiny-v1/v2 in DIR."""
    parser = argparse.ArgumentParser(prog="python -m turnout.tinymodels",
                                     description="Make tiny Llama models for vLLM on the CPU.")
    parser.add_argument("dir", type=Path, help="model directory (or root, without --seed)")
    parser.add_argument("--seed", type=int, default=None,
                        help="make one model in DIR with this seed; default: tiny-v1 and "
                             "tiny-v2 under DIR")
    args = parser.parse_args(argv)
    if args.seed is None:
        for name, made in ensure_tiny_models(args.dir).items():
            print(f"{name}: {made}")
    else:
        print(make_tiny_model(args.dir, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
