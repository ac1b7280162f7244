r"""Segmentation-conditioned latent diffusion on VQ-f4 latents.

The default is CompVis latent-diffusion's `semantic_synthesis256` recipe:
UNet 128 channels, mult (1, 4, 8), 2 res blocks, 8 heads (attention only in
the middle block, since attention_resolutions are downsampling rates), a
SpatialRescaler 182 -> 3 in 2 stages, a frozen vq-f4 (8192 codes), 1000
linear steps 0.0015..0.0205, l1 loss, AdamW lr 1e-6 x global batch, EMA 0.9999.
"Same training as the original" means that from the same weights, batches,
timesteps and noise our steps land where PyTorch's do (AdamW over UNet and
rescaler, weight decay 0.01, LitEma's warm-up resumed from a converted
checkpoint's counter): tests/test_training_trajectory.py replays ten steps
recorded from the original code (losses within 2e-4, updates within 2%).

Reference recipe (real data, a converted vq-f4; 8 GPUs, one host):
  python convert_torch_ckpt.py vq-f4/model.ckpt --config vq-f4/config.yaml \
      --out checkpoints/vq-f4
  python train.py --config configs/seg_f4.py --workdir runs/seg_f4 \
      --config.first_stage.checkpoint=checkpoints/vq-f4 \
      --config.data.image_dir=DATA/images --config.data.mask_dir=DATA/segmentations
  Hardware: GPUs with >= 40 GB each at batch 8 per device in float32.
  Expected: loss_simple (l1) falls from ~0.8 to ~0.15 over the first 50k steps.

Variants (`--config configs/seg_f4.py:VARIANT`):
  demo  Two CPU cores, nothing downloaded: the built-in synthetic scenes, a
        small VQ-f4 trained first (when first_stage.checkpoint is empty),
        then a small LDM; all in one command (`make demo`):
          python train.py --config configs/seg_f4.py:demo --workdir workdirs/demo
        Hardware: 2 CPU cores; `make demo` (venv, VQ, LDM and sampling)
        fits a 15-minute budget. Expected: `python sample.py --workdir
        workdirs/demo` scores mask-adherence mIoU far above chance (1/16).
        Measured times and scores: BENCHMARKS.md, "The CPU demo".
  tiny  The reference recipe at reduced width for tests and smoke runs
        (same structure: attention only in the middle, 2 rescaler stages).
        It can follow a dataset variant, `:ade20k,tiny`, for a smoke run on
        the real folders.

Datasets by name: the reference recipe on a dataset exactly as its owners
ship it (folders, file suffixes, label ids), given its root folder. The
rescaler takes the dataset's class count; validation folders are read by
`--check_data` and for `sample.py`'s dataset masks, never by training.
Check the folders first: the same command with `--check_data` decodes every
record of both splits and prints `data check OK: N of N records checked, 0
bad` (N as shipped below) or names each bad file. Hardware: as the
reference. Training on the full datasets has not been measured here;
tests/test_datasets.py trains each variant 3 steps on look-alike folders.
  ade20k      ADEChallengeData2016.zip (the MIT Scene Parsing benchmark):
              images/{training,validation}/ADE_*.jpg with
              annotations/{training,validation}/ADE_*.png; 150 classes
              (stored 1..150 -> ids 0..149), 0 "other" ignored. N = 22210
              (20210 training + 2000 validation).
          python train.py --config configs/seg_f4.py:ade20k \
              --workdir runs/ade20k --config.data.root=DATA/ADEChallengeData2016 \
              --config.first_stage.checkpoint=checkpoints/vq-f4
  coco_stuff  COCO 2017 images (train2017.zip, val2017.zip) in images/ and
              stuffthingmaps_trainval2017.zip in annotations/, as
              cocostuff's getCocoStuff.sh lays them out:
              images/{train2017,val2017}/*.jpg with
              annotations/{train2017,val2017}/*.png; 182 classes (0..181,
              unused COCO ids included, the palette's order), 255
              unlabeled. N = 123287 (118287 + 5000).
          python train.py --config configs/seg_f4.py:coco_stuff \
              --workdir runs/coco_stuff --config.data.root=DATA/cocostuff \
              --config.first_stage.checkpoint=checkpoints/vq-f4
  cityscapes  leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
              unpacked in one folder: leftImg8bit/{train,val}/CITY/
              *_leftImg8bit.png with gtFine/{train,val}/CITY/
              *_gtFine_labelIds.png, remapped to the 19 train ids (every
              other id ignored). With the `*_gtFine_labelTrainIds.png` that
              cityscapesScripts' createTrainIdLabelImgs.py writes, add
              `--config.data.mask_suffix=_gtFine_labelTrainIds.png
              --config.data.remap=`. N = 3475 (2975 + 500).
          python train.py --config configs/seg_f4.py:cityscapes \
              --workdir runs/cityscapes --config.data.root=DATA/cityscapes \
              --config.first_stage.checkpoint=checkpoints/vq-f4
Any other folder pair: `--config.data.image_suffix=...
--config.data.mask_suffix=...` (image REL + image_suffix pairs with mask REL +
mask_suffix; other files are not records).

TFDS, a dataset of per-pixel classes: TFDS's `cityscapes/semantic_segmentation`
stores each `*_gtFine_labelIds.png` as `segmentation_label`, so the cityscapes
variant's labels apply. Build it once where TensorFlow is installed (TFDS
needs it to build, not to read), with the two Cityscapes zips in DOWNLOADS:
  tfds build cityscapes --config=semantic_segmentation --manual_dir=DOWNLOADS \
      --data_dir=DATA/tfds --file_format=array_record
  python train.py --config configs/seg_f4.py:cityscapes --workdir runs/cityscapes \
      --config.data.source=tfds --config.data.tfds_data_dir=DATA/tfds \
      --config.data.tfds_name=cityscapes/semantic_segmentation \
      --config.data.image_key=image_left --config.data.mask_key=segmentation_label \
      --config.data.tfds_split=train --config.data.tfds_val_split=validation \
      --config.first_stage.checkpoint=checkpoints/vq-f4
TFDS `scene_parse150` is not ADE20K's benchmark: its annotations are instance
maps of 100 thing classes without stuff (the 2017 challenge's
annotations_instance), not the 150-class maps; it is refused in one line. Use
`:ade20k` on ADEChallengeData2016.

Every field can be overridden: `--config.train.batch_size=16`.
"""

import ml_collections as mlc

LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ = "ldm.models.autoencoder.VQModelInterface"
RESCALER = "ldm.modules.encoders.modules.SpatialRescaler"


def _model(image_size, num_classes, unet, vq, timesteps=1000, cond_channels=3):
  """An LDM-style node, the same format as the YAML beside a model.ckpt."""
  latent = image_size // 2 ** (len(vq["ddconfig"]["ch_mult"]) - 1)
  embed_dim = vq["embed_dim"]
  return {
      "target": LDM,
      "params": {
          "linear_start": 0.0015, "linear_end": 0.0205, "timesteps": timesteps,
          "loss_type": "l1", "image_size": latent, "channels": embed_dim,
          "conditioning_key": "concat", "cond_stage_trainable": True,
          "use_ema": True, "scale_factor": 1.0, "scale_by_std": False,
          "unet_config": {"target": UNET, "params": {
              "image_size": latent, "in_channels": embed_dim + cond_channels,
              "out_channels": embed_dim, **unet}},
          "first_stage_config": {"target": VQ, "params": vq},
          "cond_stage_config": {"target": RESCALER, "params": {
              "n_stages": 2, "method": "bilinear", "multiplier": 0.5,
              "in_channels": num_classes, "out_channels": cond_channels,
              "bias": False}},
      },
  }


def _vq_f4(ch, n_embed, resolution, num_res_blocks=2, ch_mult=(1, 2, 4)):
  return {"embed_dim": 3, "n_embed": n_embed, "ddconfig": {
      "double_z": False, "z_channels": 3, "resolution": resolution,
      "in_channels": 3, "out_ch": 3, "ch": ch, "ch_mult": list(ch_mult),
      "num_res_blocks": num_res_blocks, "attn_resolutions": [],
      "dropout": 0.0}}


# Each dataset as shipped: folders under data.root, file suffixes, labels.
DATASETS = {
    "ade20k": dict(
        num_classes=150, ignore_label=0, remap="ade20k",
        image_dir="images/training", mask_dir="annotations/training",
        val_image_dir="images/validation",
        val_mask_dir="annotations/validation",
        image_suffix=".jpg", mask_suffix=".png"),
    "coco_stuff": dict(
        num_classes=182, ignore_label=255, remap="",
        image_dir="images/train2017", mask_dir="annotations/train2017",
        val_image_dir="images/val2017", val_mask_dir="annotations/val2017",
        image_suffix=".jpg", mask_suffix=".png"),
    "cityscapes": dict(
        num_classes=19, ignore_label=255, remap="cityscapes",
        image_dir="leftImg8bit/train", mask_dir="gtFine/train",
        val_image_dir="leftImg8bit/val", val_mask_dir="gtFine/val",
        image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelIds.png"),
}


def _reference_model(num_classes):
  unet = {"model_channels": 128, "attention_resolutions": [32, 16, 8],
          "num_res_blocks": 2, "channel_mult": [1, 4, 8], "num_heads": 8}
  return _model(256, num_classes, unet, _vq_f4(128, 8192, 256))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  variant = arg or "reference"
  dataset, _, size = variant.partition(",")
  known = ("reference", "demo", "tiny", *DATASETS)
  if dataset not in known or size not in ("", "tiny") or (
      size and dataset not in DATASETS):
    raise ValueError(f"configs/seg_f4.py: unknown variant {variant!r}; "
                     f"choose one of {', '.join(known)}, or DATASET,tiny")
  c = mlc.ConfigDict()
  c.variant = variant
  c.seed = 0
  # Compiled programs are kept here, so a resumed run or sample.py does not
  # compile them again: unset = $XDG_CACHE_HOME/segldm_jax/jax_cache
  # (~/.cache/...), '' = off (segldm_jax/compilation_cache.py).
  c.compilation_cache_dir = mlc.config_dict.placeholder(str)

  # --- data: folder | tfds | synthetic -------------------------------------
  c.data = mlc.ConfigDict()
  c.data.source = "folder"
  c.data.dataset = ""               # ade20k | coco_stuff | cityscapes: a
  c.data.root = ""                  # known layout under this root folder
  c.data.image_dir = ""             # relative to data.root when it is set
  c.data.mask_dir = ""
  c.data.val_image_dir = ""         # validation split (never trained on)
  c.data.val_mask_dir = ""
  c.data.image_suffix = ""          # "": any image extension
  c.data.mask_suffix = ""           # "": .png
  c.data.num_classes = 182          # COCO-Stuff ids 0..181 (sflckr)
  c.data.ignore_label = mlc.config_dict.placeholder(int)  # 255 COCO-Stuff, 0 ADE20K
  c.data.palette = ""               # JSON/text palette for RGB label PNGs
  c.data.remap = ""                 # JSON {old_id: new_id}, ade20k, cityscapes
  c.data.skip_unpaired = False
  # error | skip: a record that fails to decode stops the run naming its
  # file, or is replaced by the next good one and counted (bad_records in
  # metrics.jsonl). `train.py --check_data` lists them all up front.
  c.data.bad_records = "error"
  c.data.image_size = 256
  c.data.tfds_name = ""
  c.data.tfds_split = "train"
  c.data.tfds_val_split = ""
  c.data.tfds_data_dir = ""
  c.data.image_key = "image"
  c.data.mask_key = "segmentation_mask"
  c.data.num_records = 0            # synthetic source only
  c.data.num_workers = 0            # grain decode workers per process
  c.data.mask_size = 0              # 0: masks at image resolution (reference)

  # --- first stage: a converted (or demo-trained) VQ model directory --------
  c.first_stage = mlc.ConfigDict()
  c.first_stage.checkpoint = ""
  c.first_stage.allow_random_init = False  # smoke tests only
  c.first_stage.train_steps = 0     # demo: train our own VQ when no checkpoint
  c.first_stage.train_batch_size = 16
  c.first_stage.train_crop = 0      # train on random square crops (0: whole)
  c.first_stage.learning_rate = 1e-3
  c.first_stage.adam_b1 = 0.5       # taming's betas; 0.9/0.99 converge
  c.first_stage.adam_b2 = 0.9       # faster without a discriminator
  c.first_stage.mse_weight = 0.0    # extra MSE term on top of taming's L1
  c.first_stage.warmup_steps = 40   # linear lr warm-up, then cosine decay
  c.first_stage.quantize_warmup_steps = 100  # see make_vq_train_step

  # --- model: the LDM node (same schema as a latent-diffusion YAML) --------
  c.model = _reference_model(182)

  # --- optimisation ---------------------------------------------------------
  c.train = mlc.ConfigDict()
  c.train.steps = 500_000
  c.train.batch_size = 8            # global, per optimiser update
  c.train.grad_accum = 1            # micro-batches per update
  c.train.base_learning_rate = 1e-6
  c.train.scale_lr = True           # lr = base x batch, as main.py --scale_lr
  c.train.lr_schedule = "constant"  # the reference; "cosine" for short runs
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.01
  c.train.grad_clip_norm = 0.0      # 0 = off (the reference does not clip)
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "float32"  # or bfloat16 (params stay float32)
  # Recompute UNet activations in the backward pass: none | block |
  # dots_saveable (BENCHMARKS.md: memory and time of each). The default
  # is open until measured on a GPU.
  c.train.remat = "none"
  # The frozen VQ encoder on this many micro-batches in turn: its image-size
  # activations take 1/k of the memory, for the same latents.
  c.train.encode_chunks = 1
  c.train.nonfinite = "stop"        # stop | skip a non-finite step
  c.train.cond_drop_prob = 0.0      # classifier-free guidance: drop the mask
  c.train.region_drop_prob = 0.0    # "don't care" a random box of the mask
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.keep_period = 50_000      # also keep every N-th step for the record
  c.train.sample_every = 5000

  # --- sampling (previews during training and sample.py defaults) ----------
  c.sample = mlc.ConfigDict()
  c.sample.sampler = "ddim"
  c.sample.steps = 200              # the reference's log_images default
  c.sample.eta = 1.0
  c.sample.num_masks = 8
  c.sample.guidance_scale = 1.0     # on the mask; needs train.cond_drop_prob

  # --- evaluation (evaluate.py --workdir; during training every eval_every) -
  c.train.eval_every = 0            # 0 = off; logs eval/fid, eval/kid, ...
  c.eval = mlc.ConfigDict()
  c.eval.num_images = 64            # validation masks sampled
  c.eval.batch_size = 16
  c.eval.diversity_masks = 4        # masks sampled K times for LPIPS diversity
  c.eval.diversity_samples = 3      # K
  c.eval.segmenter = ""             # "" = by data (synthetic, ade20k) or none
  # ADE20K segmenter: "litert" (the runtime; the reference's exact labels,
  # fast on CPU) or "jax" (the port, jitted on the accelerator; its pixel
  # agreement with the reference's labels: BENCHMARKS.md).
  c.eval.segmenter_backend = "litert"
  c.data.val_seed = 0               # synthetic: held-out family (0 = seed + 1000003)

  # --- mesh and sharding (big_vision style rule lists) ---------------------
  # Tuples, so that the command line can override them:
  #   --config.mesh="(('data', 1), ('fsdp', -1))"
  #   --config.sharding_strategy="(('.*', 'fsdp'),)"   # FSDP instead of DP
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_strategy = ((".*", "replicate"),)

  # --- multi-process runs ---------------------------------------------------
  c.parallel = mlc.ConfigDict()
  # A peer process silent this long is lost: the others stop, naming it, the
  # last complete checkpoint and the command that resumes. A minute: long
  # past any pause of a live process (the beat comes from its own thread,
  # through compiles and saves), short enough that a preempted cluster's
  # survivors are not held for jax's default (100 s) before a restart.
  c.parallel.heartbeat_timeout_s = 60

  # --- fine-tuning (README: "Fine-tune the released model on your dataset")
  c.init_from = ""                  # a workdir to start from (only read)
  c.init_from_ema = True            # its EMA UNet weights; False: the live ones
  c.init_class_map = "by_name"      # by_name | none | FILE.json {new: old}
  c.data.class_names = ""           # a file: one class name per line
  # Parameters trained: a regex over paths (unet/..., cond_stage/...) or a
  # preset: all | rescaler | rescaler_unet_ends (training/trainable.py).
  c.train.trainable = "all"

  if dataset in DATASETS:
    c.data.dataset = dataset
    c.data.update(DATASETS[dataset])
    c.model = _reference_model(c.data.num_classes)
  if dataset == "demo":
    _demo(c)
  elif "tiny" in (dataset, size):
    _tiny(c)
  return c


def _demo(c):
  c.data.source = "synthetic"
  c.data.image_size = 64
  # 16 classes: colours 112 grey levels apart. At 182 (45 apart) the VQ
  # alone needs far more than the 15-minute budget to keep colours apart.
  c.data.num_classes = 16
  c.data.num_records = 4096
  # The VQ is convolutional: 32x32 crops cost a quarter of a whole image
  # and teach it colours and edges just as well.
  c.first_stage.train_steps = 1200
  c.first_stage.train_crop = 32
  c.first_stage.learning_rate = 1e-3
  c.first_stage.adam_b1, c.first_stage.adam_b2 = 0.9, 0.99
  c.first_stage.mse_weight = 1.0
  c.model = _model(64, 16,
                   {"model_channels": 64, "attention_resolutions": [4],
                    "num_res_blocks": 1, "channel_mult": [1, 2, 2],
                    "num_heads": 4},
                   _vq_f4(32, 512, 64, num_res_blocks=1, ch_mult=(1, 1, 1)),
                   # One conditioning channel per class: squeezed into 3
                   # (the reference), some classes' random embeddings start
                   # near zero and stay unseen for the whole short run.
                   cond_channels=16)
  # Latents of unit scale, as the noise schedule assumes (the demo VQ's
  # come out narrower: BENCHMARKS.md, "The CPU demo").
  c.model.params.scale_by_std = True
  # Measured on 64 masks x 2 seeds (BENCHMARKS.md): batch 16 beats batch 8
  # at the same number of images, 2e-3 sometimes diverges, and weight decay
  # only slows a run this short.
  c.train.steps = 1200
  c.train.batch_size = 16
  c.train.base_learning_rate = 6.25e-5  # x16 = 1e-3: tiny models train faster
  c.train.weight_decay = 0.0
  c.train.log_every = 25
  c.train.checkpoint_every = 400
  c.train.sample_every = 600
  # Classifier-free guidance on the mask: scale 2 scores a higher mIoU than
  # unguided sampling, and 3 is past the peak (BENCHMARKS.md, guidance).
  c.train.cond_drop_prob = 0.1
  c.sample.guidance_scale = 2.0
  # Partial masks: a quarter of the masks have a "don't care" box, so the
  # model learns to fill such holes from their surroundings.
  c.train.region_drop_prob = 0.25
  c.sample.steps = 25
  c.sample.sampler = "dpmpp_2m"
  c.sample.eta = 0.0
  c.sample.num_masks = 16


def _tiny(c):
  c.data.image_size = 32
  c.model = _model(32, c.data.num_classes,
                   {"model_channels": 32, "attention_resolutions": [32, 16, 8],
                    "num_res_blocks": 1, "channel_mult": [1, 2, 2],
                    "num_heads": 4},
                   _vq_f4(32, 64, 32, num_res_blocks=1))
  c.train.steps = 10
  c.train.batch_size = 1
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  c.train.sample_every = 0
  c.sample.steps = 5
