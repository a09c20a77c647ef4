"""How the installed transformers converts a GGUF's tokenizer: the token count of one sentence and whether BOS comes
first, appended to a JSON list (one entry per transformers version; run with each version on PYTHONPATH).

    python bench/gguf_tokenizer_check.py --gguf ~/.cache/llm_fp4/models/gemma-3-270m-q4_k_m.gguf \
      --output docs/results/Gemma3-270M/bos_check_cpu/tokenizer_by_transformers_version.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SENTENCE = "The quick brown fox jumps over the lazy dog."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    ids = tokenizer(SENTENCE)["input_ids"]
    entry = {"transformers": transformers.__version__, "gguf": args.gguf.name, "sentence": SENTENCE,
             "characters": len(SENTENCE), "tokens": len(ids),
             "bos_first": bool(ids) and ids[0] == tokenizer.bos_token_id}
    entries = json.loads(args.output.read_text()) if args.output.is_file() else []
    entries = [e for e in entries if e["transformers"] != entry["transformers"]] + [entry]
    args.output.write_text(json.dumps(sorted(entries, key=lambda e: [int(p) for p in e["transformers"].split(".")]),
                                      indent=1) + "\n")
    print(entry)


if __name__ == "__main__":
    main()
