"""PyTorch checkpoints <-> segldm-jax, without torch.

  torch_io.py       reads torch.save zips (restricted unpickler, mmapped storages)
  torch_writer.py   writes them (plain tensors and containers only)
  safetensors_io.py reads .safetensors state_dicts (the package's numpy API)
  infer_config.py   an LDM-style architecture node from tensor shapes alone
  mapping.py        the rename rule and transposes: state_dict <-> Flax trees
  export.py         workdirs / model directories -> model.ckpt, .safetensors,
                    config.yaml

May import: the root, runtime, models, diffusion, data, checkpoint, config
and inference; never training, eval or ui.
"""

from segldm_jax.convert.mapping import (  # noqa: F401
    EMA_PREFIX, IGNORED_PREFIXES, LDM_PREFIXES, SCHEDULE_BUFFERS, ConversionError, Converted,
    Report, convert_checkpoint, convert_ldm, convert_module, convert_tree,
    ema_key, flax_path, to_torch_state_dict, torch_key)
