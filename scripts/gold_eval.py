"""Gold reward of a tuned policy's samples against the reference's, on held-out gold-task prompts.

Usage::

    python scripts/gold_eval.py RUN_DIR [--prompts 100] [--k 4] [--seed 0]

Loads ``RUN_DIR/hf_model`` (the exported policy) and the run's reference (``builtin:gold`` unless
the run names another), samples ``k`` completions per prompt for the first ``--prompts`` prompts
of ``val`` and ``ood``, prints mean gold rewards and the policy's win rate over the reference, and
writes them to ``RUN_DIR/gold_eval.json``. ``--model PATH`` scores any model folder instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.builtin import resolve_model_path
from ipo_lightning.errors import UserInputError
from ipo_lightning.gold.evaluate import compare
from ipo_lightning.gold.reward import MAX_REWARD
from ipo_lightning.modeling import load_causal_lm
from ipo_lightning.tiny import one_thread


def _reference_of(run_dir: Path) -> str:
    run = load_run(run_dir)
    reference = run.setting("model.reference_name_or_path")
    return reference or run.setting("model.model_name_or_path", "builtin:gold")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, compare policy and reference on val and ood, print and save the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a fit run folder with hf_model/")
    parser.add_argument("--model", help="score this model folder instead of RUN_DIR/hf_model")
    parser.add_argument("--reference", help="reference model (default: the run's, else builtin:gold)")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per split (default: %(default)s)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.model is None and args.run_dir is None:
        parser.error("give RUN_DIR or --model")
    policy_path = args.model or str(args.run_dir / "hf_model")
    if not Path(resolve_model_path(policy_path)).is_dir():
        raise UserInputError(f"{policy_path}: no such model folder")
    reference_path = args.reference or (_reference_of(args.run_dir) if args.run_dir else "builtin:gold")
    policy, reference = load_causal_lm(policy_path), load_causal_lm(reference_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(reference_path))
    results = {}
    print(f"gold reward (max {MAX_REWARD}), {args.k} samples x {args.prompts} prompts per split")
    print(f"{'split':<6}{'policy':>9}{'reference':>11}{'win rate':>10}  95% CI")
    for split in ("val", "ood"):
        with one_thread():
            result = compare(
                policy, reference, tokenizer, split, prompts=args.prompts, k=args.k, seed=args.seed
            )
        results[split] = result.as_dict()
        print(
            f"{split:<6}{result.policy_reward:>9.3f}{result.reference_reward:>11.3f}"
            f"{result.win_rate:>10.3f}  [{result.ci_low:.3f}, {result.ci_high:.3f}]"
        )
    if args.run_dir is not None and args.model is None:
        record = {"policy": policy_path, "reference": reference_path, "k": args.k, **results}
        (args.run_dir / "gold_eval.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
