"""The report: Table 1 beside the paper's, the attention analysis (paper Figs. 7-10, 14) and the measured
consistency/completeness scores. Pure functions of arrays, records and paths: no params, no stages.

Layering: imports only semanticmim.{models, eval, data, errors}, torch, timm, numpy, pandas, matplotlib.
"""

from semanticmim.report.attention import (
    COVERAGE_THRESHOLD,
    IGNORE_INDEX,
    attention_completeness,
    attention_consistency,
    attention_maps,
    distance_per_layer,
    labels_to_patches,
    mean_attention_distance,
    patch_queries,
    patch_size_of,
    prefix_maps,
    query_maps,
    split_rows,
    token_grid,
)
from semanticmim.report.figures import (
    plot_attention_distance,
    plot_consistency_completeness,
    plot_curves,
    plot_depth,
    plot_patch_queries,
    plot_prefix_queries,
    plot_proxy_heatmaps,
    plot_sweep,
)
from semanticmim.report.table1 import (
    BASELINES,
    COLUMNS,
    CSV_COLUMNS,
    PAPER,
    ROWS,
    Cell,
    table1_frame,
    write_table1,
)

__all__ = [
    "BASELINES",
    "COLUMNS",
    "COVERAGE_THRESHOLD",
    "CSV_COLUMNS",
    "IGNORE_INDEX",
    "PAPER",
    "ROWS",
    "Cell",
    "attention_completeness",
    "attention_consistency",
    "attention_maps",
    "distance_per_layer",
    "labels_to_patches",
    "mean_attention_distance",
    "patch_queries",
    "patch_size_of",
    "plot_attention_distance",
    "plot_consistency_completeness",
    "plot_curves",
    "plot_depth",
    "plot_patch_queries",
    "plot_prefix_queries",
    "plot_proxy_heatmaps",
    "plot_sweep",
    "prefix_maps",
    "query_maps",
    "split_rows",
    "table1_frame",
    "token_grid",
    "write_table1",
]
