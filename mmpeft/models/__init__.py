"""The models over the backbone: per-tower adapters (peft), heads, the fusion classifier, the retrieval model, and
the run folder they are saved in."""
