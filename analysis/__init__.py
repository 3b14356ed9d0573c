"""What is made of finished runs: their scores, the comparison of several, the figures and the reports.

- metrics: the scores of PROTOCOL section 7 on plain arrays (confusion matrix, accuracy, F1, AUC).
- compare: the result files of evaluated runs read and checked, and several runs compared (tables, masking check).
- figures: the pictures (training curves, robustness curves, confusion heatmaps, the adversarial example); draws only.
- selection: the coefficient-selection study (each criterion's pick) and its cost estimate.
- report: what reproduce.py writes besides the runs (stage timings, report.md, selection.md).
"""
