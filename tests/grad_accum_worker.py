"""Run under torchrun by tests/test_grad_accum_torchrun.py: the same pretraining twice in one
process group, once as `--grad-accum 2` micro-batches of B images and once as one batch of 2B.

    torchrun --nproc_per_node 2 tests/grad_accum_worker.py DATA OUT STEPS B

Writes OUT/accum and OUT/batch (pretrain's folders). Decoder dropout is off: with it, the two
runs draw their dropout masks from differently seeded generators (one per micro-batch), which
would differ by design rather than by a fault of accumulation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from magicseg_engine.train.loop import load_pretrain_preset, pretrain


def main() -> None:
    data, out, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    common = {"steps": steps, "checkpoint_every": steps, "num_workers": 0, "warmup_steps": 1}
    for name, overrides in (("accum", {"batch_size": batch, "grad_accum": 2}),
                            ("batch", {"batch_size": 2 * batch, "grad_accum": 1})):
        config = load_pretrain_preset("tiny", {**common, **overrides}, {"decoder_dropout": 0.0})
        pretrain(config, data, out / name, device="cpu")


if __name__ == "__main__":
    main()
