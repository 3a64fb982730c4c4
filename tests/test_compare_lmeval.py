"""The lm-eval-harness bridge: skipped with a reason where it cannot run, exact on a local fake task."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.compare import lmeval
from tests.conftest import tiny_llama

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " banana", " seven"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " purple"], "answer": 1},
    {"question": "The sky is", "choices": [" blue", " loud", " a"], "answer": 2},
    {"question": "Water is", "choices": [" wet", " dry"], "answer": 0},
]


@pytest.fixture
def fake_task(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n")
    task = tmp_path / "fake.yaml"
    task.write_text(f"""task: lowbit_fake_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return task


def test_tasks_skip_without_lm_eval(monkeypatch):
    real = lmeval.importlib.util.find_spec
    monkeypatch.setattr(lmeval.importlib.util, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    with pytest.raises(lmeval.TasksUnavailable, match=r"lm-eval is not installed \(pip install lm-eval\)"):
        lmeval.prepare_tasks(["arc_easy"])


def test_hub_tasks_skip_with_a_reason_when_the_hub_is_unreachable(monkeypatch, fake_task):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr(lmeval, "_hub_reachable", lambda endpoint: False)
    with pytest.raises(lmeval.TasksUnavailable, match=r"hub .* is unreachable and the data of lowbit_fake_hub could not"):
        lmeval.prepare_tasks([str(_hub_task(fake_task))])


def _hub_task(fake_task):
    """The fake task pointed at a hub dataset, so loading it needs the (unreachable) hub."""
    task = fake_task.with_name("hub.yaml")
    text = fake_task.read_text().replace("lowbit_fake_mc", "lowbit_fake_hub")
    text = text.replace("dataset_path: json", "dataset_path: lowbit-nonexistent/dataset")
    task.write_text(text)
    return task


def test_adapter_accuracy_equals_argmax_of_summed_choice_log_likelihoods(fake_task, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    suite = lmeval.prepare_tasks([str(fake_task)])
    assert suite.names == ["lowbit_fake_mc"] and not suite.builtin
    scores = lmeval.run_tasks(suite, model, tokenizer)

    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            totals = []
            for choice in doc["choices"]:
                whole = tokenizer(doc["question"] + choice, add_special_tokens=False)["input_ids"]
                log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
                totals.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
            correct += int(max(range(len(totals)), key=totals.__getitem__) == doc["answer"])
    assert scores == {"lowbit_fake_mc": {"acc": correct / len(DOCS)}}
