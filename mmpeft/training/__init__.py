"""Training: the loop (set-up -> fit -> finish) over a task object, optimisation, checkpoints, faults, evaluation
and metrics."""
