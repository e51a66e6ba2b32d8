"""Scoring inpainted images: what a network's numbers mean and what they are compared with.

* :mod:`~kdinpaint.evaluation.metrics` — PSNR, SSIM and mean L1 in one pinned convention and three compatibility
  modes, per image (:class:`~kdinpaint.evaluation.metrics.MetricRow`), summarised in the Table 1 buckets and
  written as Markdown, CSV or JSON;
* :mod:`~kdinpaint.evaluation.baselines` — the weight-free fills (biharmonic, Telea, Navier-Stokes, mean,
  pyramid), called like a network;
* :mod:`~kdinpaint.evaluation.floor` — the floor: those fills scored on the same images and masks as a network,
  the gap to biharmonic and its tables;
* :mod:`~kdinpaint.evaluation.compare` — the paired gap of two networks (a student and its control).

Running a network on images is :mod:`kdinpaint.inference`. The floor runs the fills through it, so this package
imports nothing at its top: ``kdinpaint.inference`` can import the metrics and baselines without pulling in the
floor.
"""
