"""Evaluation: accuracy and calibration metrics, cost, the comparison with teacher and baseline, gate, reports."""
