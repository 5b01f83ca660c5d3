"""The embedded testbed: tiny models of every family, the corpus, and the trained testbed MoE."""
