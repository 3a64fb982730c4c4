"""Where calibration and evaluation text comes from, and how it becomes token windows.

A source is what a user types after --calib or --data: a local .txt or .jsonl file, a Hugging Face
dataset name (`wikitext2`, `c4`), `self` for text sampled from the model, or `none`. Hub datasets
need the optional `datasets` package and a reachable hub; without them every entry point fails
within seconds with a DataError that says which local file to pass instead, rather than hanging on
network timeouts or dying in a traceback from deep inside `datasets`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import types
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lowbit.calibrate.synthetic import self_generated_windows

HUB_SOURCES = ("wikitext2", "c4")

#: Added to the user's seed when evaluation text must be self-generated, so that it never repeats
#: the self-generated calibration text drawn with the same --seed.
EVALUATION_SEED_OFFSET = 1_000_003

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_HUB_PROBE_SECONDS = 3.0
_LOCAL_HINT = "pass a local .txt or .jsonl file instead"

# C4 as in the GPTQ code: the first shard of each split; validation text is the first 1100
# documents joined by spaces, the "c4-new" protocol behind most published C4 perplexities.
_C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_C4_DOCUMENTS = {"train": 2000, "validation": 1100}

# Split names accepted per hub dataset, and the split each reads. C4 has no public test split, so
# "test" reads its validation split, as the GPTQ paper does.
_SPLITS = {
    "wikitext2": {"train": "train", "validation": "validation", "valid": "validation", "test": "test"},
    "c4": {"train": "train", "validation": "validation", "valid": "validation", "test": "validation"},
}


class DataError(ValueError):
    """A text source could not be used; the message is one line saying what to pass instead."""


def load_text(spec: str, split: str = "train") -> str:
    """The text named by `spec`: a local .txt/.jsonl file, or `wikitext2`/`c4` from the hub.

    `split` applies to hub datasets only: "train", "validation" (or "valid") or "test".
    """
    if spec.lower() in HUB_SOURCES:
        return _hub_text(spec.lower(), split)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(f"{spec} is a directory; pass one .txt or .jsonl file, or one of {', '.join(HUB_SOURCES)}")
    if not path.exists():
        raise DataError(f"no such file: {spec} (expected a .txt or .jsonl file, or one of {', '.join(HUB_SOURCES)}, self)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = _read_jsonl(path)
    elif suffix == ".txt":
        text = _read(path)
    else:
        raise DataError(f"{spec}: unsupported file type {suffix or '(none)'!r}; pass a .txt or .jsonl file")
    if not text.strip():
        raise DataError(f"{spec} contains no text")
    return text


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _read_jsonl(path: Path) -> str:
    """Documents of a JSONL file joined by blank lines: each line's "text" field, or its only string field."""
    documents = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object with a \"text\" field, got {type(record).__name__}")
        documents.append(_document_text(record, f"{path}:{number}"))
    return "\n\n".join(documents)


def _document_text(record: dict, where: str) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    strings = [key for key, value in record.items() if isinstance(value, str)]
    if len(strings) == 1:
        return record[strings[0]]
    found = f"string fields {strings}" if strings else "no string field"
    raise DataError(f"{where}: no \"text\" field and {found}; give each line a \"text\" field")


def _hub_text(name: str, split: str) -> str:
    """Text of a hub dataset, or a DataError within seconds if it cannot be had."""
    if split not in _SPLITS[name]:
        raise DataError(f"unknown split {split!r} for {name}; use one of {', '.join(_SPLITS[name])}")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{name}' is read from the Hugging Face hub with the optional 'datasets' package, which is not "
            f"installed: pip install 'lowbit[hub]', or {_LOCAL_HINT}"
        ) from None
    offline = _offline()
    if not offline and not _hub_reachable(_endpoint()):
        raise DataError(
            f"the Hugging Face hub ({_endpoint()}) is unreachable, so '{name}' cannot be downloaded; "
            f"{_LOCAL_HINT}, or set HF_DATASETS_OFFLINE=1 to use a cached copy"
        )
    loader = _wikitext2 if name == "wikitext2" else _c4
    try:
        with _offline_mode(datasets, offline):
            return loader(datasets, _SPLITS[name][split])
    except Exception as e:  # datasets raises many unrelated types for network, cache and schema problems
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the local cache ({'/'.join(_OFFLINE_VARIABLES)} is set)" if offline else "the hub"
        raise DataError(f"could not load '{name}' from {where}: {reason}; {_LOCAL_HINT}") from e


def _wikitext2(datasets, split: str) -> str:
    """WikiText-2 (raw), documents joined by blank lines as in the standard perplexity protocol."""
    rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(rows["text"])


def _c4(datasets, split: str) -> str:
    """The first documents of one C4 shard, streamed: C4 is 300 GB and a calibration set needs ~1 MB."""
    rows = datasets.load_dataset("allenai/c4", data_files={split: _C4_SHARDS[split]}, split=split, streaming=True)
    texts = [row["text"] for row in itertools.islice(rows, _C4_DOCUMENTS[split])]
    return (" " if split == "validation" else "\n\n").join(texts)


@contextmanager
def _offline_mode(datasets: types.ModuleType, offline: bool) -> Iterator[None]:
    """Make `datasets` read only its cache when an offline variable is set now.

    datasets reads HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, when first imported; a process that
    imported it earlier would otherwise go to the network (and wait on its timeouts) anyway.
    """
    config = getattr(datasets, "config", None)
    names = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(config, name)]
    saved = {name: getattr(config, name) for name in names}
    if offline:
        for name in names:
            setattr(config, name, True)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_VARIABLES)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=None)
def _hub_reachable(endpoint: str) -> bool:
    """Whether `endpoint` answers an HTTP request within a few seconds (cached per process).

    Runs in a daemon thread because a socket timeout does not bound DNS resolution, which is
    what hangs on machines without network. Any HTTP answer, even an error status, counts:
    the point is only to avoid minutes of retries inside `datasets`. Proxies in the environment
    are honoured by urllib.
    """
    answered: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_HUB_PROBE_SECONDS):
                answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_SECONDS)
    return bool(answered and answered[0])


def tokenize_text(tokenizer, text: str) -> torch.LongTensor:
    """Token ids of the whole `text` as one 1-D LongTensor, without special tokens.

    One call over the whole text, as in the GPTQ perplexity protocol: pieces tokenized separately
    would tokenize differently at their seams, so perplexities would not match published ones. A
    fast (Rust) tokenizer does about 1 MB/s. No BOS is added, since windows are cut from anywhere
    in the stream and only the first would otherwise begin with one.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """`samples` windows of exactly `seq_len` consecutive tokens of `text`, at random offsets, as [samples, seq_len].

    The text is tokenized once; offsets come from a torch.Generator seeded with `seed`, so the
    windows are reproducible and independent of the global RNG. Windows may overlap, as in the
    GPTQ sampler, so a short text still yields as many samples as asked for.
    """
    if samples < 1 or seq_len < 1:
        raise ValueError(f"need samples >= 1 and seq_len >= 1, got samples={samples}, seq_len={seq_len}")
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seq_len + 1:
        raise DataError(
            f"calibration text has {ids.numel()} tokens, need at least {seq_len + 1} "
            f"(seq_len {seq_len} + 1); pass a longer text or a smaller sequence length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def resolve_calibration(
    spec: str | None,
    model: torch.nn.Module,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int,
) -> tuple[torch.LongTensor | None, str]:
    """Calibration windows for a --calib value, and a short description of where they came from.

    None: WikiText-2 train from the hub, or text generated by the model itself (with a warning)
    when the hub cannot be used. "self": generated text. "none": (None, ...) for data-free
    methods. Anything else: a local file or hub name, as accepted by load_text.
    """
    if spec is None:
        try:
            text = load_text("wikitext2", "train")
        except DataError as e:
            warnings.warn(f"no calibration data given and {e}; calibrating on text generated by the model itself", stacklevel=2)
            return _self_calibration(model, tokenizer, samples, seq_len, seed)
        return calibration_windows(tokenizer, text, samples, seq_len, seed), _describe("wikitext2 train", samples, seq_len, seed)
    if spec.lower() == "self":
        return _self_calibration(model, tokenizer, samples, seq_len, seed)
    if spec.lower() == "none":
        return None, "none (data-free)"
    text = load_text(spec, "train")
    return calibration_windows(tokenizer, text, samples, seq_len, seed), _describe(spec, samples, seq_len, seed)


def _self_calibration(model, tokenizer, samples: int, seq_len: int, seed: int) -> tuple[torch.LongTensor, str]:
    windows = self_generated_windows(model, tokenizer, samples, seq_len, seed)
    return windows, _describe("self-generated", samples, seq_len, seed)


def _describe(source: str, samples: int, seq_len: int, seed: int) -> str:
    return f"{source}: {samples} x {seq_len} tokens, seed {seed}"


def resolve_evaluation_text(
    spec: str | None,
    model: torch.nn.Module,
    tokenizer,
    seed: int = 0,
    samples: int = 32,
    seq_len: int = 512,
) -> tuple[str, str]:
    """Evaluation text for a --data value, and a short description of where it came from.

    None: the WikiText-2 test split from the hub, or, when the hub cannot be used, `samples`
    sequences of `seq_len` tokens generated by the model itself, decoded to text. Generated text
    uses seed + EVALUATION_SEED_OFFSET so it never repeats the calibration text, and a warning
    says that perplexity on it only compares models with each other. "self" asks for generated
    text directly. Anything else: a local file or hub name (test split), as accepted by load_text.
    """
    reason = ""
    if spec is None:
        try:
            return load_text("wikitext2", "test"), "wikitext2 test"
        except DataError as e:
            reason = f"no evaluation data given and {e}; "
    elif spec.lower() == "none":
        raise DataError("evaluation needs text: pass a .txt or .jsonl file, wikitext2, c4 or self")
    elif spec.lower() != "self":
        description = f"{spec.lower()} test" if spec.lower() in HUB_SOURCES else spec
        return load_text(spec, "test"), description
    warnings.warn(
        f"{reason}evaluating on text generated by the original model: perplexity on it is only a relative "
        "measure (quantized against original), not comparable with published numbers",
        stacklevel=2,
    )
    seed = seed + EVALUATION_SEED_OFFSET
    windows = self_generated_windows(model, tokenizer, samples, seq_len, seed)
    text = "\n\n".join(tokenizer.batch_decode(windows, skip_special_tokens=True))
    return text, _describe("self-generated", samples, seq_len, seed)
