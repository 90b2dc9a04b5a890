"""Plain-text tables of SER results (for the terminal and the README)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_COLUMNS = (("wa", "WA"), ("ua", "UA"), ("f1_weighted", "wF1"), ("f1_macro", "mF1"), ("format_rate", "format"))


def format_results_table(results: Mapping[str, Mapping[str, torch.Tensor | float]], title: str = "") -> str:
    """One row per evaluation set, percentages with one decimal: set | WA | UA | wF1 | mF1 | format."""
    present = [(k, h) for k, h in _COLUMNS if any(k in r for r in results.values())]
    header = "| set | " + " | ".join(h for _, h in present) + " |"
    lines = [f"\n{title} results" if title else "", header, "|" + "---|" * (len(present) + 1)]
    for name, values in results.items():
        cells = [f"{100 * float(values[k]):.1f}" if k in values else "-" for k, _ in present]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line is not None)
