"""Evaluation: the figures the semantic-synthesis literature reports.

  inception.py   FID Inception-v3 (pool3) as a Flax module + pytorch-fid protocol
  fid.py         FID (scipy-free) and KID from features
  lpips.py       LPIPS (AlexNet / VGG16) and diversity
  segmenter.py   the ADE20K segmenter (TFLite file in assets/): LiteRT or JAX
  tflite_graph.py  replays a TFLite flatbuffer's graph with jax.lax
  weights.py     locating weights inside pip packages; safe array pickles
  report.py      the figures of two image sets (evaluate.py --real/--fake)
  workdir_eval.py  a run's validation split sampled and scored (--workdir,
                 train.eval_every)
  miou.py        confusion matrix / IoU / mIoU; the synthetic-scene segmenter
  seams.py       how visible tile seams are

May import: every layer below it, training and ui excepted (evaluation
runs on a loaded model; train.py calls it, never the reverse).
"""
