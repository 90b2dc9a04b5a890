"""Speech emotion recognition metrics over text predictions, on one synced confusion matrix.

Predictions are canonical labels or None (no label could be read). None maps to an extra ``invalid``
column that no gold label has, so it always counts as wrong, while the per-class metrics stay over the
K real classes. State: C (K x (K+1)) with C[g, p] = count of gold g predicted p (p = K: invalid),
summed across ranks by torchmetrics. With n = sum C, support_i = sum_p C[i, p], predicted_i = sum_g
C[g, i], tp_i = C[i, i]::

    wa           = sum_i tp_i / n                        (micro accuracy; invalid counts as wrong)
    ua           = mean_{i: support_i > 0} tp_i / support_i          (unweighted average recall)
    f1_i         = 2 tp_i / (support_i + predicted_i)
    f1_macro     = mean_{i: support_i + predicted_i > 0} f1_i         (classes never seen are skipped)
    f1_weighted  = sum_i support_i f1_i / n
    invalid_rate = sum_g C[g, K] / n
    recall/<c_i>  = tp_i / support_i                      (per class; nan when class i has no support)

These equal scikit-learn's accuracy_score, recall_score(average="macro", labels=<classes present in
gold>), f1_score(average="macro", labels=<classes present in gold or predictions>) and
f1_score(average="weighted", labels=<all classes>) with None written as a label outside the set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from emorl_pl.emotions import get_label_set


class SERMetrics(Metric):
    """WA, UA, weighted and macro F1, invalid rate and the confusion matrix for one label set.

    ``compute()`` returns scalars ``wa``, ``ua``, ``f1_weighted``, ``f1_macro``, ``invalid_rate``,
    ``recall/<label>`` per class, and
    ``confusion``: the K x (K+1) count matrix (rows gold, columns predicted, last column ``invalid``;
    ``column_names`` names the columns). All scalars are nan before any update.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confusion: Tensor

    def __init__(self, labels: Sequence[str] | str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = get_label_set(labels)
        self.column_names = (*self.labels, "invalid")
        self._index = {label: i for i, label in enumerate(self.labels)}
        k = len(self.labels)
        self.add_state("confusion", torch.zeros(k, k + 1, dtype=torch.long), dist_reduce_fx="sum")

    def _pred_index(self, pred: str | None) -> int:
        if pred is None:
            return len(self.labels)
        if pred not in self._index:
            raise ValueError(
                f"prediction {pred!r} is not in the label set {self.labels} (pass None for unparseable output)"
            )
        return self._index[pred]

    def update(self, preds: Sequence[str | None], golds: Sequence[str]) -> None:
        if len(preds) != len(golds):
            raise ValueError(f"got {len(preds)} predictions but {len(golds)} gold labels")
        bad = [g for g in golds if g not in self._index]
        if bad:
            raise ValueError(
                f"gold labels {sorted(set(map(str, bad)))} are not in the label set {self.labels}"
            )
        k1 = len(self.labels) + 1
        g = torch.tensor([self._index[x] for x in golds], dtype=torch.long, device=self.confusion.device)
        p = torch.tensor([self._pred_index(x) for x in preds], dtype=torch.long, device=self.confusion.device)
        counts = torch.bincount(g * k1 + p, minlength=len(self.labels) * k1)
        self.confusion += counts.view(len(self.labels), k1)

    def compute(self) -> dict[str, Tensor]:
        c = self.confusion.double()
        k = len(self.labels)
        n = c.sum()
        tp = c.diagonal()  # length K: the invalid column has no diagonal entry
        support = c.sum(dim=1)
        predicted = c[:, :k].sum(dim=0)
        nan = c.new_tensor(float("nan"))

        seen = support > 0
        recall = tp / support.clamp(min=1)
        ua = recall[seen].mean() if seen.any() else nan

        denom = support + predicted
        f1 = 2 * tp / denom.clamp(min=1)
        present = denom > 0
        f1_macro = f1[present].mean() if present.any() else nan

        if n > 0:
            wa, f1_weighted, invalid_rate = tp.sum() / n, (support * f1).sum() / n, c[:, k].sum() / n
        else:
            wa = f1_weighted = invalid_rate = nan
        out = {
            "wa": wa.float(),
            "ua": ua.float(),
            "f1_weighted": f1_weighted.float(),
            "f1_macro": f1_macro.float(),
            "invalid_rate": invalid_rate.float(),
        }
        for i, label in enumerate(self.labels):
            out[f"recall/{label}"] = (recall[i] if seen[i] else nan).float()
        out["confusion"] = self.confusion.clone()
        return out
