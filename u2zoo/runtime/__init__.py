"""Running a model and judging its output, below every target and every task: the Predictor
protocol and batching (``pipeline``), parity between two outputs (``compare``), latency
(``timing``) and accuracy against ground truth (``metrics``)."""
