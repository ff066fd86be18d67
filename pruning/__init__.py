"""actprune.pruning: score units from stats, plan, slice checkpoints, recover and evaluate."""
