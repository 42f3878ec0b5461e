"""Moved to `prefalign.report` (the demo's table: `prefalign.report.demo`); this name
re-exports it for one release."""

from prefalign.report import COLUMNS, fmt, plot_reward_vs_kl, results_table, write_demo_report

__all__ = ["COLUMNS", "fmt", "plot_reward_vs_kl", "results_table", "write_demo_report"]
