"""Reporting: figures, the papers' claims as data and the paper-vs-ours fidelity verdicts."""
