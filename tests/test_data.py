"""Calibration and evaluation text: local files, hub datasets (faked or offline), windows, self-generation."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import importlib
import importlib.util
import time
import types

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lowbit.calibrate import data
from lowbit.calibrate.data import (
    DataError,
    calibration_windows,
    load_text,
    resolve_calibration,
    resolve_evaluation_text,
    tokenize_text,
)
from lowbit.calibrate.synthetic import _sample, self_generated_windows

WORDS = 100  # word-level vocabulary of the test tokenizer: ids 0 and 1 special, 2..99 words


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer "w0 w1 ..." -> [2, 3, ...] with two special tokens, smaller than tiny_llama's vocab."""
    vocab = {"<eos>": 0, "<unk>": 1} | {f"w{i}": i + 2 for i in range(WORDS - 2)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def words(count: int, offset: int = 0) -> str:
    return " ".join(f"w{(i + offset) % (WORDS - 2)}" for i in range(count))


# ---- local files -------------------------------------------------------------------------------------------


def test_txt_file_is_read_whole(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\n\nsecond paragraph\n", encoding="utf-8")
    assert load_text(str(path)) == "first line\n\nsecond paragraph\n"


def test_jsonl_text_field_documents_joined_by_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "alpha", "id": 1, "title": "a"}), "", json.dumps({"text": "beta", "title": "b"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_text(str(path)) == "alpha\n\nbeta"


def test_jsonl_only_string_field_is_used(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "gamma", "score": 0.5}) + "\n", encoding="utf-8")
    assert load_text(str(path)) == "gamma"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', "{not json"], r"docs\.jsonl:2: not valid JSON"),
        (['["a", "list"]'], r"docs\.jsonl:1: expected a JSON object"),
        (['{"title": "a", "body": "b"}'], r"docs\.jsonl:1: no \"text\" field and string fields \['title', 'body'\]"),
        (['{"n": 3}'], r"docs\.jsonl:1: no \"text\" field and no string field"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_text(str(path))


def test_file_errors_are_data_errors_with_advice(tmp_path):
    with pytest.raises(DataError, match=r"no such file: .*missing\.txt \(expected a \.txt or \.jsonl file"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="is a directory; pass one .txt or .jsonl file"):
        load_text(str(tmp_path))
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="blank.txt contains no text"):
        load_text(str(tmp_path / "blank.txt"))
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no text"):
        load_text(str(tmp_path / "empty.jsonl"))
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_text(str(tmp_path / "table.csv"))
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_text(str(tmp_path / "binary.txt"))


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---- hub datasets ------------------------------------------------------------------------------------------


class FakeDatasets(types.ModuleType):
    """Stands in for the `datasets` package: records calls, serves a few rows or raises like a cache miss."""

    def __init__(self, fail: Exception | None = None):
        super().__init__("datasets")
        self.fail = fail
        self.calls: list[tuple[tuple, dict]] = []

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.fail is not None:
            raise self.fail
        if args[0] == "allenai/c4":
            return iter({"text": f"doc{i}", "timestamp": "t"} for i in range(5000))
        return {"text": [" = Title = \n", " body line \n", ""]}


@pytest.fixture
def no_network(monkeypatch):
    """Hub probes fail the test: these tests must decide without touching the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def probe(endpoint):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(data, "_hub_reachable", probe)


def test_hub_names_without_datasets_package(monkeypatch, no_network):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"optional 'datasets' package.*pip install 'lowbit\[hub\]'.*local \.txt or \.jsonl"):
        load_text("wikitext2")


@pytest.mark.parametrize("variable", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_names_offline_give_one_line_error_fast(monkeypatch, variable):
    """Whatever is installed here, offline mode answers within seconds with advice, never a traceback.

    The time bound is about not waiting on the network, so `datasets` (pandas, pyarrow: many
    seconds on a busy machine) is imported before the clock starts, and before the variable is set,
    as in a process that imported it earlier (it reads the variable only then)."""
    if importlib.util.find_spec("datasets") is not None:
        importlib.import_module("datasets")
    monkeypatch.setenv(variable, "1")
    for name in ("wikitext2", "c4"):
        start = time.perf_counter()
        with pytest.raises(DataError, match="local .txt or .jsonl file") as caught:
            load_text(name, "test")
        assert time.perf_counter() - start < 10
        assert "\n" not in str(caught.value)


def test_offline_cache_miss_is_reported_as_such(monkeypatch, no_network):
    fake = FakeDatasets(fail=ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore"))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"could not load 'wikitext2' from the local cache \(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set\): Couldn't reach") as caught:
        load_text("wikitext2", "test")
    assert "\n" not in str(caught.value)
    assert len(fake.calls) == 1


def test_unreachable_hub_is_not_asked(monkeypatch, no_network):
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: False)
    with pytest.raises(DataError, match=r"hub \(https://huggingface.co\) is unreachable.*local .txt or .jsonl file.*HF_DATASETS_OFFLINE=1"):
        load_text("c4")
    assert fake.calls == []


def test_wikitext2_and_c4_requests(monkeypatch, no_network):
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)

    assert load_text("wikitext2", "test") == " = Title = \n\n\n body line \n\n\n"
    assert fake.calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})

    validation = load_text("C4", "test")  # C4 has no test split: GPTQ's validation protocol
    assert validation == " ".join(f"doc{i}" for i in range(1100))
    args, kwargs = fake.calls[-1]
    assert args == ("allenai/c4",) and kwargs["streaming"] is True
    assert kwargs["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}

    train = load_text("c4", "train")
    assert train.split("\n\n")[:2] == ["doc0", "doc1"] and len(train.split("\n\n")) == 2000
    assert fake.calls[-1][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_unknown_split(no_network):
    with pytest.raises(DataError, match="unknown split 'dev' for wikitext2; use one of train, validation, valid, test"):
        load_text("wikitext2", "dev")


def test_hub_probe_answers_true_for_a_server_and_false_for_a_closed_port():
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert data._hub_reachable.__wrapped__(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    start = time.perf_counter()
    assert not data._hub_reachable.__wrapped__(f"http://127.0.0.1:{server.server_port}")
    assert time.perf_counter() - start < 5


# ---- tokens and windows ------------------------------------------------------------------------------------


def test_tokenize_text_is_one_flat_tensor_without_special_tokens(tokenizer):
    ids = tokenize_text(tokenizer, "w0 w1\n\nw2")
    assert ids.dtype == torch.long and ids.tolist() == [2, 3, 4]


def test_calibration_windows_are_slices_reproducible_and_seeded(tokenizer):
    text = words(500)
    ids = tokenize_text(tokenizer, text).tolist()
    torch.manual_seed(1)
    a = calibration_windows(tokenizer, text, samples=8, seq_len=32, seed=0)
    torch.manual_seed(2)  # global RNG state must not matter
    b = calibration_windows(tokenizer, text, samples=8, seq_len=32, seed=0)
    c = calibration_windows(tokenizer, text, samples=8, seq_len=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    starts = {tuple(ids[s : s + 32]): s for s in range(len(ids) - 31)}
    assert all(tuple(window.tolist()) in starts for window in a)


def test_calibration_windows_need_seq_len_plus_one_tokens(tokenizer):
    assert calibration_windows(tokenizer, words(33), samples=3, seq_len=32, seed=0).shape == (3, 32)
    with pytest.raises(DataError, match=r"calibration text has 32 tokens, need at least 33"):
        calibration_windows(tokenizer, words(32), samples=3, seq_len=32, seed=0)


# ---- self-generated text -----------------------------------------------------------------------------------


def test_self_generated_windows_shape_determinism_and_vocabulary(tokenizer):
    model = tiny_llama()
    rng = torch.get_rng_state()
    a = self_generated_windows(model, tokenizer, samples=3, seq_len=12, seed=0, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must be left alone"
    b = self_generated_windows(model, tokenizer, samples=3, seq_len=12, seed=0, batch_size=2, progress=False)
    c = self_generated_windows(model, tokenizer, samples=3, seq_len=12, seed=1, batch_size=2, progress=False)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 2 and a.max() < WORDS, "special tokens and ids unknown to the tokenizer are never sampled"
    assert len({tuple(row[:1].tolist()) for row in torch.cat([a, c])}) > 1, "first tokens are random"


def test_self_generated_windows_follow_the_model(tokenizer):
    """A model whose logits always favour one ordinary token generates (almost) only that token after the first."""
    model = tiny_llama()
    model.lm_head = torch.nn.Linear(64, 256, bias=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[7] = 30.0
    out = self_generated_windows(model, tokenizer, samples=2, seq_len=6, seed=0, progress=False)
    assert (out[:, 1:] == 7).all()


def test_inverse_cdf_sampler_matches_softmax_and_skips_banned():
    logits = torch.tensor([0.0, 1.0, float("-inf"), 2.0, float("-inf")]).expand(200_000, 5).contiguous()
    generator = torch.Generator().manual_seed(0)
    draws = _sample(logits, generator)
    frequency = torch.bincount(draws, minlength=5).double() / draws.numel()
    expected = torch.softmax(logits[0].double(), dim=0)
    assert frequency[2] == 0 and frequency[4] == 0
    assert torch.allclose(frequency, expected, atol=4e-3)


# ---- resolution ---------------------------------------------------------------------------------------------


def test_resolve_calibration_sources(tmp_path, tokenizer, no_network):
    model = tiny_llama()
    assert resolve_calibration("none", model, tokenizer, 4, 16, 0) == (None, "none (data-free)")

    path = tmp_path / "calib.txt"
    path.write_text(words(200), encoding="utf-8")
    windows, description = resolve_calibration(str(path), model, tokenizer, 4, 16, 0)
    assert windows.shape == (4, 16) and description == f"{path}: 4 x 16 tokens, seed 0"

    windows, description = resolve_calibration("self", model, tokenizer, 3, 16, 5)
    assert windows.shape == (3, 16) and description == "self-generated: 3 x 16 tokens, seed 5"

    with pytest.raises(DataError, match="no such file"):
        resolve_calibration(str(tmp_path / "nope.jsonl"), model, tokenizer, 4, 16, 0)


def test_resolve_calibration_default_falls_back_to_self_generation(monkeypatch, tokenizer, no_network):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.warns(UserWarning, match="no calibration data given and .*datasets.*; calibrating on text generated by the model"):
        windows, description = resolve_calibration(None, tiny_llama(), tokenizer, 2, 12, 0)
    assert windows.shape == (2, 12) and description.startswith("self-generated")


def test_resolve_calibration_default_uses_wikitext2_train(monkeypatch, tokenizer, no_network):
    fake = FakeDatasets()
    fake.load_dataset = lambda *a, **k: {"text": [words(100)]}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)
    windows, description = resolve_calibration(None, tiny_llama(), tokenizer, 2, 12, 0)
    assert windows.shape == (2, 12) and description == "wikitext2 train: 2 x 12 tokens, seed 0"


def test_resolve_evaluation_text(tmp_path, monkeypatch, tokenizer, no_network):
    model = tiny_llama()
    path = tmp_path / "test.txt"
    path.write_text(words(50), encoding="utf-8")
    assert resolve_evaluation_text(str(path), model, tokenizer) == (words(50), str(path))

    with pytest.raises(DataError, match="evaluation needs text"):
        resolve_evaluation_text("none", model, tokenizer)

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.warns(UserWarning, match="no evaluation data given and .*datasets.*; evaluating on text generated .* only a relative measure"):
        text, description = resolve_evaluation_text(None, model, tokenizer, seed=0, samples=2, seq_len=16)
    assert len(tokenize_text(tokenizer, text)) == 32
    assert description == f"self-generated: 2 x 16 tokens, seed {data.EVALUATION_SEED_OFFSET}"
    calibration, _ = resolve_calibration("self", model, tokenizer, 2, 16, 0)
    assert text != "\n\n".join(tokenizer.batch_decode(calibration)), "evaluation must not repeat calibration text"


# ---- the real tokenizer and data ----------------------------------------------------------------------------


@pytest.mark.slow
def test_wikitext_valid_tokenizes_in_seconds(has_default_model, wikitext):
    from transformers import AutoTokenizer

    from lowbit.models.loading import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = load_text(str(wikitext / "valid.txt"))
    start = time.perf_counter()
    ids = tokenize_text(tokenizer, text)
    assert time.perf_counter() - start < 10
    assert ids.numel() > 200_000
    windows = calibration_windows(tokenizer, text, samples=128, seq_len=2048, seed=0)
    assert windows.shape == (128, 2048)
