"""On-policy training: RLOO and online IPO/DPO on prompts, with a pluggable reward (see rl/module.py)."""
