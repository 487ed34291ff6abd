"""MedMNIST's four task types, as one table: outputs, activation, score layout and decision rule.

Every place that depends on the task (losses, probabilities, predictions, metrics, kNN votes, maps,
serving, export) reads it from a :class:`Task` here instead of comparing task strings::

    >>> t = get_task("binary-class")
    >>> t.num_outputs(2), t.sigmoid, t.threshold
    (1, True, 0.5)

Score layout (``Task.probs``) is medmnist's, which its evaluator reads: binary models have one logit
z and their scores are ``[1 - sigmoid(z), sigmoid(z)]`` (column 1 the positive class); multi-label
models one sigmoid per label; multi-class and ordinal models a softmax over the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BINARY = "binary-class"
MULTI_CLASS = "multi-class"
MULTI_LABEL = "multi-label, binary-class"
ORDINAL = "ordinal-regression"


@dataclass(frozen=True)
class Task:
    """One task type.

    Attributes:
        name: medmnist's task string (``INFO[flag]["task"]``).
        sigmoid: outputs are independent sigmoids (BCE loss) rather than one softmax (cross-entropy).
        multilabel: several labels may hold at once (one decision per label).
        threshold: the probability above which a sigmoid output is positive (``None`` for softmax tasks).
    """

    name: str
    sigmoid: bool
    multilabel: bool = False
    threshold: float | None = None

    @property
    def binary(self) -> bool:
        return self.name == BINARY

    def num_outputs(self, n_labels: int) -> int:
        """Logits of a model for ``n_labels`` label names: 1 for binary tasks (one BCE logit), else one each."""
        return 1 if self.binary else n_labels

    def num_scores(self, n_labels: int) -> int:
        """Columns of the score matrix (medmnist's layout): 2 for binary tasks, else one per label."""
        return 2 if self.binary else n_labels

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) -> scores (N, C) in medmnist's layout, float32."""
        logits = logits.float()
        if self.binary:
            p = torch.sigmoid(logits[:, :1])
            return torch.cat([1 - p, p], dim=1)
        if self.sigmoid:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Scores (N, C) -> one class index per image: ``p > threshold`` for binary, the argmax otherwise
        (for multi-label tasks the most probable label; see :meth:`positives` for all of them)."""
        if self.binary:
            return (probs[:, 1] > self.threshold).astype(np.int64)
        return probs.argmax(axis=1).astype(np.int64)

    def positives(self, probs: np.ndarray) -> np.ndarray:
        """(N, L) bool: the labels above threshold (multi-label tasks)."""
        if not self.multilabel:
            raise ValueError(f"{self.name} tasks have one label per image; use decide()")
        return probs > self.threshold


TASKS: dict[str, Task] = {t.name: t for t in (
    Task(BINARY, sigmoid=True, threshold=0.5),
    Task(MULTI_CLASS, sigmoid=False),
    Task(MULTI_LABEL, sigmoid=True, multilabel=True, threshold=0.5),
    Task(ORDINAL, sigmoid=False),
)}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name``; an unknown name lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(map(repr, TASKS))}") from None
