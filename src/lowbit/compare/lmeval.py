"""Zero-shot task accuracy through lm-eval-harness, for the models `lowbit compare` builds in memory.

lm-eval downloads each task's dataset from the Hugging Face hub. Where the hub cannot be reached
(or lm-eval is not installed) the tasks are skipped with one line saying why, checked once before
the grid starts rather than failing in every cell. A task can also be a YAML file of one's own
(lm-eval's task format), e.g. over a local JSON dataset, which needs no network at all.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from lowbit.calibrate.data import _endpoint, _hub_reachable

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class TasksUnavailable(RuntimeError):
    """The tasks cannot be run here; the message says why in one line (printed, then skipped)."""


@dataclass
class TaskSuite:
    """Resolved task names, with the folders of any task YAML files given by path."""

    names: list[str]
    include_paths: list[str] = field(default_factory=list)
    offline: bool = False
    """The hub was unreachable when the suite was checked: load datasets from local files/cache only."""
    builtin: bool = True
    """Some task is one of lm-eval's own (index them all); False when every task is a YAML file."""
    _manager: Any = field(default=None, repr=False)

    def manager(self):
        """lm-eval's task index, built once: it reads every task YAML lm-eval ships (seconds)."""
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.include_paths or None, verbosity="ERROR",
                                        include_defaults=self.builtin)
        return self._manager


def prepare_tasks(specs: list[str]) -> TaskSuite:
    """Check that lm-eval is installed, that every task exists and that its data can be loaded."""
    if importlib.util.find_spec("lm_eval") is None:
        raise TasksUnavailable("lm-eval is not installed (pip install lm-eval); task accuracy skipped")
    names, include, builtin = [], [], False
    for spec in specs:
        path = Path(spec)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            if "task" not in config:
                raise TasksUnavailable(f"{spec} has no 'task' field; it is not an lm-eval task file")
            names.append(str(config["task"]))
            include.append(str(path.parent.resolve()))
        else:
            names.append(spec)
            builtin = True
    suite = TaskSuite(names, sorted(set(include)), offline=not _hub_reachable(_endpoint()), builtin=builtin)
    with _offline(suite.offline):
        manager = suite.manager()
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise TasksUnavailable(f"lm-eval has no task {', '.join(unknown)}; see `lm-eval ls tasks`")
    from lm_eval.tasks import get_task_dict

    try:
        with _offline(suite.offline):
            get_task_dict(names, manager)
    except Exception as err:  # lm-eval and datasets raise many unrelated types for network problems
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"the hub ({_endpoint()}) is unreachable and " if suite.offline else ""
        raise TasksUnavailable(f"{where}the data of {', '.join(names)} could not be loaded ({first}); "
                               "task accuracy skipped") from None
    return suite


def run_tasks(suite: TaskSuite, model: nn.Module, tokenizer, limit: int | None = None,
              batch_size: int = 1) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for an in-memory model, with lm-eval's own HF wrapper and scoring."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with _offline(suite.offline):
        output = simple_evaluate(model=lm, tasks=suite.names, task_manager=suite.manager(), limit=limit,
                                 log_samples=False, verbosity="ERROR")
    return {task: _numbers(output["results"][task]) for task in suite.names}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """`acc,none: 0.5` -> `acc: 0.5`; standard errors, sample counts and labels dropped."""
    return {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key
        and key != "sample_len"
    }


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Make datasets and huggingface_hub fail at once instead of retrying an unreachable hub.

    Both read their offline switches when first imported, so the module constants are set as
    well as the environment variables.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    switches = [(datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_attributes = [(module, name, getattr(module, name, None)) for module, name in switches]
    saved_environment = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    for module, name, _ in saved_attributes:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_attributes:
            setattr(module, name, value)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
