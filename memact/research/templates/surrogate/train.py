"""The surrogate train.py: the constants the agent tunes, scored by prepare.evaluate in milliseconds.

This is the one file the research agent edits, as in the CPU template: the same constants, the
same summary block at the end (what the runner parses; keep its format). No model is trained:
`prepare.py` holds a known response surface (with interactions, crash regions and run-to-run
noise), so that hundreds of experiments run in minutes.
"""

import os
import sys

import prepare

# ---- Constants the agent tunes ----
LEARNING_RATE = 1e-3  # peak learning rate
WIDTH = 96  # model width; must be a multiple of N_HEADS
DEPTH = 2  # number of blocks
N_HEADS = 4  # attention heads per block
BATCH_SIZE = 16  # sequences per optimizer step
WARMUP_STEPS = 30  # linear learning-rate warmup, in optimizer steps
WEIGHT_DECAY = 0.1  # weight decay

BUDGET_S = float(os.environ.get("MEMACT_BUDGET_S", "60"))  # read as the CPU template does; unused


def main() -> None:
    constants = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, (int, float))}
    # The noise of a run follows its place in the workspace (seed and label, MEMACT_RUN_KEY): the
    # same seed draws the same noise under every memory and proposer, so runs compare paired.
    val_bpb, crash = prepare.evaluate(constants, os.environ.get("MEMACT_RUN_KEY") or os.environ.get("MEMACT_RUN_ID", ""))
    if val_bpb is None:
        print(crash, file=sys.stderr)
        sys.exit(1)
    print("---")
    print(f"val_bpb: {val_bpb:.6f}")
    print("training_seconds: 0.0")
    print(f"num_params: {12 * WIDTH * WIDTH * DEPTH}")


if __name__ == "__main__":
    main()
