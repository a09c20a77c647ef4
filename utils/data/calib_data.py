"""Calibration token windows for post-training quantization.

Sources (``source`` argument / ``--calib_data``):

* ``None``: ``"c4"`` when the Hugging Face hub is reachable (``utils.data.cache.hub_reachable``), else ``"c4_excerpt"``.
* ``"c4"``: GPTQ / LLM-FP4 convention on allenai/c4 ``en/c4-train.00000-of-01024.json.gz``: with
  ``rng = random.Random(seed)``, per sample draw ``rng.randint(0, n_docs - 1)`` until the document tokenizes
  (default special tokens) to more than ``seqlen`` tokens, then take the window starting at
  ``rng.randint(0, n_tokens - seqlen - 1)``. Same draws as GPTQ's ``get_c4`` with ``random.seed(seed)``.
* ``"c4_excerpt"``: offline C4 excerpt ``exllamav2/conversion/standard_cal_data/c4.utf8`` (118 documents,
  one per line) read from the PyPI wheel ``exllamav2==0.3.2`` (fetched once into ``<cache>/wheels/``, or
  ``$LLM_FP4_EXLLAMAV2_WHEEL``). Few of its documents exceed 1024 tokens, so it uses the stream scheme below.
* a ``.txt`` file (the whole text is one document) or ``.jsonl`` file (one JSON object per line with a string
  ``text`` field; blank lines skipped): stream scheme below.

Stream scheme: ``rng = random.Random(seed)``; ``rng.shuffle`` the non-blank documents; tokenize each without
special tokens; join them with the tokenizer's EOS id between documents (the tokens of ``"\\n\\n"`` if it has
no EOS); then each of the ``calib_size`` rows is ``lead + stream[s : s + seqlen - len(lead)]`` with ``s =
rng.randint(0, len(stream) - seqlen + len(lead))``, ``lead = leading_special_ids(tokenizer)`` (Gemma's BOS; empty
for SmolLM2 and Qwen2, whose rows are then plain stream windows). Rows may overlap; the stream must hold at least
``seqlen - len(lead)`` tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.data.cache import CacheError, fetch_wheel, hub_reachable

C4_REPO = "allenai/c4"
C4_FILE = "en/c4-train.00000-of-01024.json.gz"
EXLLAMAV2 = ("exllamav2", "0.3.2")
EXCERPT_MEMBER = "exllamav2/conversion/standard_cal_data/c4.utf8"
EXCERPT_SHA256 = "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505"
WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"
WIKI_SHA256 = "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
_MAX_DRAWS = 10_000  # per sample, for the GPTQ scheme (GPTQ itself loops forever)


class CalibDataError(ValueError):
    """Calibration data could not be built; the message is one line naming the problem and a fix."""


@dataclass(frozen=True)
class CalibSet:
    """Calibration tokens and where they came from."""

    tokens: torch.Tensor  # [calib_size, seqlen] int64 token ids
    description: str  # human-readable provenance, for results JSON


def get_calib_data(tokenizer, *, calib_size: int = 32, seqlen: int = 1024, seed: int = 0,
                   source: str | None = None) -> torch.Tensor:
    """Calibration token ids, int64 [calib_size, seqlen]; see the module docstring for ``source``."""
    return load_calib_set(tokenizer, calib_size=calib_size, seqlen=seqlen, seed=seed, source=source).tokens


def load_calib_set(tokenizer, *, calib_size: int = 32, seqlen: int = 1024, seed: int = 0,
                   source: str | None = None) -> CalibSet:
    """Like ``get_calib_data`` but also returns a description of the data's origin. Raises CalibDataError."""
    for name, value in (("calib_size", calib_size), ("seqlen", seqlen)):
        if not isinstance(value, int) or value < 1:
            raise CalibDataError(f"{name} must be a positive integer, got {value!r}")
    if source is None:
        if hub_reachable():
            try:
                return _c4_hub(tokenizer, calib_size, seqlen, seed)
            except (OSError, EOFError, ValueError, ImportError) as e:
                warnings.warn(f"C4 download from the hub failed ({type(e).__name__}); using the offline C4 excerpt",
                              stacklevel=2)
        source = "c4_excerpt"
    if source == "c4":
        if not hub_reachable():
            raise CalibDataError("calibration source 'c4' needs the Hugging Face hub, which is unreachable "
                                 "(offline or HF_HUB_OFFLINE=1); use source='c4_excerpt' or a .txt/.jsonl file")
        try:
            return _c4_hub(tokenizer, calib_size, seqlen, seed)
        except (OSError, EOFError, ImportError) as e:
            raise CalibDataError(f"cannot download {C4_REPO}/{C4_FILE} ({type(e).__name__}); "
                                 "use source='c4_excerpt' or a .txt/.jsonl file") from e
    if source == "c4_excerpt":
        docs, digest = _excerpt_docs()
        tokens, n_tokens = _stream_windows(docs, tokenizer, calib_size, seqlen, seed, "the C4 excerpt")
        return CalibSet(tokens, f"c4 excerpt (exllamav2 {EXLLAMAV2[1]} {EXCERPT_MEMBER}, {len(docs)} docs, "
                                f"sha256 {digest[:16]}, {n_tokens} tokens; shuffled docs joined by EOS, "
                                f"random windows, seed={seed})")
    docs, digest = _file_docs(Path(source).expanduser())
    tokens, n_tokens = _stream_windows(docs, tokenizer, calib_size, seqlen, seed, f"calibration file {source}")
    return CalibSet(tokens, f"file {source} ({len(docs)} docs, sha256 {digest[:16]}, {n_tokens} tokens; "
                            f"shuffled docs joined by EOS, random windows, seed={seed})")


def _download_c4_shard() -> Path:
    """Local path of the first C4 en train shard (hub download, cached by huggingface_hub)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(C4_REPO, C4_FILE, repo_type="dataset"))


def _c4_hub(tokenizer, calib_size: int, seqlen: int, seed: int) -> CalibSet:
    """GPTQ-style C4 sampling (module docstring)."""
    with gzip.open(_download_c4_shard(), "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    rows = []
    for _ in range(calib_size):
        for _draw in range(_MAX_DRAWS):
            ids = tokenizer(docs[rng.randint(0, len(docs) - 1)], verbose=False)["input_ids"]
            if len(ids) > seqlen:
                break
        else:
            raise CalibDataError(f"no C4 document longer than --calib_seqlen {seqlen} tokens in {_MAX_DRAWS} draws; "
                                 "lower --calib_seqlen")
        start = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[start:start + seqlen])
    return CalibSet(torch.tensor(rows, dtype=torch.long),
                    f"c4 ({C4_REPO} {C4_FILE}, {len(docs)} docs; GPTQ sampling, seed={seed})")


def _exllamav2_file(member: str, sha256: str, what: str) -> bytes:
    """A data file of the exllamav2 wheel (fetched once into the cache), checked by sha256."""
    try:
        wheel = fetch_wheel(*EXLLAMAV2, env_var="LLM_FP4_EXLLAMAV2_WHEEL")
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(member)
    except (CacheError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise CalibDataError(f"cannot read the offline {what} from exllamav2=={EXLLAMAV2[1]} "
                             f"({type(e).__name__}: {e}); set LLM_FP4_EXLLAMAV2_WHEEL to the wheel") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise CalibDataError(f"{member} in {wheel} has sha256 {digest[:16]}, expected "
                             f"{sha256[:16]}; delete the wheel so it is fetched again")
    return raw


def _excerpt_docs() -> tuple[list[str], str]:
    """The 118 documents (one per line) of exllamav2's C4 excerpt, and the file's sha256."""
    raw = _exllamav2_file(EXCERPT_MEMBER, EXCERPT_SHA256, "C4 excerpt")
    return [line for line in raw.decode("utf-8").split("\n") if line.strip()], EXCERPT_SHA256


def heldout_text() -> tuple[str, str]:
    """Held-out text for perplexity, never used for calibration or evaluation: the Wikipedia excerpt of
    exllamav2 (``wiki.utf8``, <doc> markup lines dropped), and its description."""
    raw = _exllamav2_file(WIKI_MEMBER, WIKI_SHA256, "Wikipedia excerpt").decode("utf-8")
    lines = [line for line in raw.split("\n") if not line.startswith(("<doc", "</doc"))]
    return "\n".join(lines), f"{WIKI_MEMBER} from exllamav2=={EXLLAMAV2[1]} (sha256 {WIKI_SHA256[:12]})"


def _file_docs(path: Path) -> tuple[list[str], str]:
    """Documents of a user .txt (one document) or .jsonl (``text`` per line) file, and the file's sha256."""
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibDataError(f"calibration source {path} is not 'c4', 'c4_excerpt' or an existing .txt/.jsonl file")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibDataError(f"cannot read calibration file {path} ({type(e).__name__}); "
                             "pass a readable UTF-8 .txt or .jsonl file") from e
    if path.suffix == ".txt":
        docs = [text]
    else:
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibDataError(f"{path} line {lineno} is not valid JSON; "
                                     "each line must be an object with a 'text' field") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibDataError(f"{path} line {lineno} has no string 'text' field; "
                                     "each line must be an object with a 'text' field")
            docs.append(obj["text"])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibDataError(f"calibration file {path} contains no text")
    return docs, hashlib.sha256(raw).hexdigest()


def leading_special_ids(tokenizer) -> list[int]:
    """The token ids `tokenizer` puts before every text by default (Gemma's and Llama-2's BOS; none for SmolLM2 or
    Qwen2). A window cut from a token stream starts with them, as every sequence did in the model's training:
    Gemma3-270M's held-out perplexity is 18.3 without its BOS and 12.0 with it (2 x 1024 tokens, CPU;
    docs/results/Gemma3-270M/bos_check_cpu/)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _stream_windows(docs: list[str], tokenizer, calib_size: int, seqlen: int, seed: int,
                    what: str) -> tuple[torch.Tensor, int]:
    """Stream scheme (module docstring): int64 [calib_size, seqlen] windows and the stream length in tokens."""
    lead = leading_special_ids(tokenizer)
    if seqlen <= len(lead):
        raise CalibDataError(f"--calib_seqlen {seqlen} leaves no room after the tokenizer's {len(lead)} leading "
                             "special token(s); raise it")
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    sep = [eos] if eos is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = list(encoded[0])
    for ids in encoded[1:]:
        stream += sep
        stream += ids
    body = seqlen - len(lead)
    if len(stream) < body:
        raise CalibDataError(f"{what} gives only {len(stream)} tokens but --calib_seqlen {seqlen} needs at least "
                             f"{body}; provide more text or lower --calib_seqlen")
    flat, lead = torch.tensor(stream, dtype=torch.long), torch.tensor(lead, dtype=torch.long)
    starts = [rng.randint(0, len(stream) - body) for _ in range(calib_size)]
    return torch.stack([torch.cat([lead, flat[s:s + body]]) for s in starts]), len(stream)
