"""State adapters for model families beyond fla's per-layer dict layout (see `trl_refine.rollout.state`)."""
