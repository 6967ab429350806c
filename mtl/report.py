"""Printing results as tables."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table


def results_table(results: Mapping[str, Any], title: str = "Final metrics (best checkpoint)") -> Table:
    """A rich table: one row per stage and task, val and test metrics side by side."""
    table = Table(title=title)
    for col in ("stage", "task", "role", "split", "metrics"):
        table.add_column(col)
    for stage, r in results["stages"].items():
        sources = set(r.get("source_tasks") or [])
        for task, splits in r["tasks"].items():
            for split in ("val", "test"):
                metrics = splits.get(split) or {}
                text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
                table.add_row(stage, task, "source" if task in sources else "target", split, text or "-")
    return table


def print_results(results: Mapping[str, Any], console: Console | None = None) -> None:
    (console or Console(width=140)).print(results_table(results))
