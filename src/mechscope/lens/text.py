"""Text for training and evaluating lenses, as fixed-length token sequences with BOS first.

Two sources:
  * the user's text (`read_text` then `tokenize_text`): a plain `.txt` file, a `.jsonl` file with a
    "text" field on every line, or a Hugging Face `datasets` directory saved with `save_to_disk` (a
    "text" column). Documents are tokenized without special tokens, joined with the EOS token between
    them, and cut into sequences of `length - 1` tokens, each with BOS put in front; a last piece
    shorter than that is dropped.
  * the offline default (`sampled_text`): text sampled from the model itself, starting from BOS,
    with plain ancestral sampling at temperature 1 (the full distribution: no top-k, no top-p), from a
    `torch.Generator` seeded with `seed`. The sequences are cached under mechscope's cache directory
    (`cache_root()/lens-text/`), keyed by the model's name and weights fingerprint, the seed, the
    length and the count, and written atomically; a second call reads the cache and samples nothing.

Every problem with the user's text (missing, empty, not UTF-8, no "text" field, fewer tokens than one
sequence) is a `TextError` naming the file, raised before any model work (only the tokenizer is
needed).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..devices import HOST, model_device
from ..errors import MechscopeError, check_count

# Bump when the meaning of a cached sample changes (the sampler, the BOS convention).
_SAMPLE_FORMAT = 1
SAMPLING = "ancestral sampling at temperature 1 from the full distribution (no top-k), torch.Generator seeded"


class TextError(MechscopeError, ValueError):
    """Training or evaluation text that cannot be used: the message names the file and says why."""


# ------------------------------------------------------------------------------------------------
# The user's text
# ------------------------------------------------------------------------------------------------


def _datasets_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def read_text(path: str | os.PathLike) -> list[str]:
    """The documents of a text source: a .txt file (one document), a .jsonl file (the "text" field of
    each line) or a `datasets` directory saved with `save_to_disk` (its "text" column; of a
    DatasetDict, every split in turn). Raises TextError naming the file when it holds no text."""
    docs = list(iter_text(path))
    if not docs:
        raise TextError(f"{Path(path)}: holds no text")
    return docs


def iter_text(path: str | os.PathLike) -> Iterator[str]:
    """The non-blank documents of a text source, as `read_text` gives them, one at a time: a .jsonl
    file is read line by line as the documents are taken (so a reader that stops early, like
    `load_text` with a count, never reads or holds the rest of the file)."""
    from ..data.dataset import iter_text_lines, parse_json_object, read_text_file

    path = Path(path)
    if path.is_dir():
        if not _datasets_dir(path):
            raise TextError(f"{path}: is a directory but not a `datasets` directory saved with save_to_disk")
        docs: Iterable[str] = _read_datasets_dir(path)
    elif path.suffix.lower() == ".jsonl":
        docs = _jsonl_documents(path, iter_text_lines(path, "text file", TextError), parse_json_object)
    else:
        docs = [read_text_file(path, "text file", TextError)]
    return (d for d in docs if d.strip())


def _jsonl_documents(path: Path, lines, parse) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        row = parse(line, f"{path}, line {lineno}", TextError)
        if "text" not in row:
            raise TextError(f"{path}, line {lineno}: missing field 'text'")
        if not isinstance(row["text"], str):
            raise TextError(f"{path}, line {lineno}: field 'text' must be a string, "
                            f"not {type(row['text']).__name__}")
        yield row["text"]


def _read_datasets_dir(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is installed with mechscope's environment
        raise TextError(f"{path}: reading a `datasets` directory needs the `datasets` package; "
                        "give a .txt or .jsonl file instead") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # the loader raises many kinds of error on a damaged directory
        raise TextError(f"{path}: cannot read the `datasets` directory ({type(exc).__name__}: {exc})") from None
    parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
    docs = []
    for part in parts:
        if "text" not in part.column_names:
            raise TextError(f"{path}: the dataset has no 'text' column (columns: {', '.join(part.column_names)})")
        docs.extend(str(t) for t in part["text"] if t is not None)
    return docs


def _bos_id(tokenizer) -> int:
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise TextError("the tokenizer has neither a BOS nor an EOS token to start sequences with")
    return int(bos)


def tokenize_text(docs: Iterable[str], tokenizer, length: int, count: int | None = None, *,
                  source: str = "text") -> torch.Tensor:
    """[n, length] token ids (on the host) of `docs`: joined with EOS between documents, cut into
    pieces of `length - 1` tokens, BOS in front of each. At most `count` sequences (all when None).
    TextError naming `source` when there is not enough text for one sequence."""
    check_count("length", length, 2)
    if count is not None:
        check_count("count", count)
    bos = _bos_id(tokenizer)
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    need = None if count is None else count * (length - 1)
    for i, doc in enumerate(docs):
        if i and sep is not None:
            stream.append(int(sep))
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // (length - 1)
    if n == 0:
        raise TextError(f"{source}: too short: {len(stream)} tokens, fewer than the {length - 1} of one "
                        f"sequence of length {length}; give more text or a smaller length")
    if count is not None:
        n = min(n, count)
    body = torch.tensor(stream[: n * (length - 1)], dtype=torch.long, device=HOST).reshape(n, length - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long, device=HOST), body], dim=1)


def load_text(path: str | os.PathLike, tokenizer, length: int, count: int | None = None) -> torch.Tensor:
    """`read_text` then `tokenize_text`: the user's text as [n, length] token ids. The documents are
    read as they are tokenized, so with `count` only the start of a large .jsonl is read."""
    docs = iter_text(path)
    first = next(docs, None)
    if first is None:
        raise TextError(f"{Path(path)}: holds no text")
    return tokenize_text(itertools.chain([first], docs), tokenizer, length, count, source=str(path))


# ------------------------------------------------------------------------------------------------
# Text sampled from the model (the offline default)
# ------------------------------------------------------------------------------------------------


def model_fingerprint(model) -> str:
    """Identity of a loaded model for cache keys: its name, the source's fingerprint (installed
    weight packages, or file sizes and times), its shape, and a hash of a slice of its unembedding."""
    from .. import models

    name = getattr(model, "mechscope_name", None) or model.cfg.model_name
    source = ""
    if name in models.REGISTRY and models.REGISTRY[name].installed:
        source = models.REGISTRY[name].fingerprint()
    else:
        path = Path(name)
        if path.is_file():
            source = models._file_fingerprint(path)
        elif path.is_dir():
            source = ";".join(models._file_fingerprint(f) for f in sorted(path.iterdir()) if f.is_file())
    cfg = model.cfg
    probe = model.W_U[:, :64].detach().to(HOST, torch.float32).contiguous().numpy().tobytes()
    h = hashlib.sha256()
    h.update(f"{name}|{source}|{cfg.n_layers}|{cfg.d_model}|{cfg.d_vocab}|".encode())
    h.update(probe)
    return h.hexdigest()[:16]


def sample_cache_path(model, seed: int, length: int, count: int) -> Path:
    from ..models import cache_root

    name = getattr(model, "mechscope_name", None) or model.cfg.model_name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(name)).name)[:40] or "model"
    key = f"{_SAMPLE_FORMAT}|{model_fingerprint(model)}|{seed}|{length}|{count}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "lens-text" / f"{safe}-s{seed}-{count}x{length}-{digest}.safetensors"


@torch.no_grad()
def sample_tokens(model, length: int, count: int, seed: int, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """[count, length] token ids sampled from `model` (see the module docstring), on the host.

    Uses the wrapped Hugging Face model directly, for its key-value cache: sampling through the
    bridge would recompute every earlier position at each step (quadratic in the length)."""
    from tqdm.auto import tqdm

    check_count("length", length, 2)
    check_count("count", count)
    device = model_device(model)
    hf = model.original_model
    bos = _bos_id(model.tokenizer)
    gen = torch.Generator(device=HOST).manual_seed(seed)
    out = []
    bar = tqdm(total=count * (length - 1), desc="sampling text", unit="tok", disable=not progress)
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        ids = torch.full((n, 1), bos, dtype=torch.long, device=device)
        seqs = [ids]
        past = None
        for _ in range(length - 1):
            result = hf(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            probs = torch.softmax(result.logits[:, -1].float(), dim=-1).to(HOST)
            ids = torch.multinomial(probs, 1, generator=gen).to(device)
            seqs.append(ids)
            bar.update(n)
        out.append(torch.cat(seqs, dim=1).to(HOST))
    bar.close()
    return torch.cat(out)


def sampled_text(model, length: int = 128, count: int = 32, seed: int = 0, progress: bool = True,
                 cache: bool = True) -> torch.Tensor:
    """[count, length] token ids sampled from `model` with `seed` (BOS first), read from the cache
    when there (written there atomically otherwise; `cache=False` neither reads nor writes it)."""
    from safetensors.torch import load_file, save_file

    from ..fileio import atomic_path

    check_count("length", length, 2)
    check_count("count", count)
    path = sample_cache_path(model, seed, length, count)
    if cache and path.is_file():
        try:
            tokens = load_file(str(path))["tokens"]
            if tokens.shape == (count, length):
                return tokens
        except Exception:  # a damaged entry: sample again and replace it
            pass
    tokens = sample_tokens(model, length, count, seed, progress=progress)
    if cache:
        meta = {"model": str(getattr(model, "mechscope_name", model.cfg.model_name)), "seed": str(seed),
                "length": str(length), "count": str(count), "sampling": SAMPLING}
        with atomic_path(path) as tmp:
            save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=meta)
    return tokens


def describe_source(text: str | os.PathLike | None, seed: int, length: int, count: int) -> dict:
    """How a lens's text was obtained, for result files and reports."""
    if text is None:
        return {"source": "sampled from the model", "sampling": SAMPLING, "seed": seed, "length": length,
                "count": count}
    return {"source": str(text), "length": length, "count": count}


def token_summary(tokens: torch.Tensor) -> dict:
    return {"sequences": int(tokens.shape[0]), "length": int(tokens.shape[1]),
            "positions": int(tokens.shape[0] * (tokens.shape[1] - 1))}


