"""Human-readable output of a run folder: image grids, plots and the self-contained report.html."""

from fedleak.report.grids import save_comparison_grid, save_image_grid
from fedleak.report.html import write_report
from fedleak.report.plots import plot_metrics

__all__ = ["plot_metrics", "save_comparison_grid", "save_image_grid", "write_report"]
