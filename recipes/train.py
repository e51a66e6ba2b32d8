"""Train an inpainting network with distillation-guided supervision (Suin et al., ICCV 2021): the main job.

    accelerate launch recipes/train.py                                   # recipes/demo.yaml: bundled photos, minutes on CPU
    accelerate launch recipes/train.py --config recipes/reference.yaml data.images=/data/places2/train.flist
    torchrun --nproc_per_node 2 recipes/train.py train.steps=20         # two processes (gloo on CPU)

The same as ``kdinpaint train RECIPE [overrides]``; the training itself is :class:`kdinpaint.train.Trainer`
(stages, the run folder, resume, the report: :mod:`kdinpaint.train.trainer`). Overrides are dotted
``section.key=value`` pairs; unknown keys are refused. A bad input ends the run with one ``train.py: error: ...``
line and exit status 1 (``--debug`` shows the traceback); a run the divergence guard stopped exits with status 2.
"""

import sys
from pathlib import Path

from kdinpaint.train.trainer import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py", default_recipe=Path(__file__).with_name("demo.yaml")))
