"""Evaluation: the figures the semantic-synthesis literature reports.

  inception.py   FID Inception-v3 (pool3) as a Flax module + pytorch-fid protocol
  fid.py         FID (scipy-free) and KID from features
  miou.py        confusion matrix / IoU / mIoU; the synthetic-scene segmenter
  seams.py       how visible tile seams are
"""
