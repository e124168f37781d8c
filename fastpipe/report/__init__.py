"""What a run leaves behind: `run` (metrics.csv, log.md, TensorBoard, plots, summary.json) and `classes`
(per-class accuracy and confusion)."""
