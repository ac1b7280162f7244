"""XLA CPU settings: convolutions through XNNPACK, and Winograd's where faster.

jaxlib 0.10's CPU backend hands convolutions to YNNPACK fusions by default.
On this project's shapes (3x3 convolutions, 32-256 channels, 4x4 to 256x256)
XNNPACK's convolution is much faster, for the UNet forward and the VQ encode
alike (figures in BENCHMARKS.md, "Convolutions through XNNPACK"). Results
agree with the PyTorch fixtures to the same tolerance.

The flags are read when the CPU backend starts, so entry points call
`use_xnnpack_convolutions()` before anything touches a device. They exist
only in the jaxlib series requirements.txt pins (an unknown flag aborts XLA),
and a user's own XLA_FLAGS for the same options win.
"""

import os

import jax
import jaxlib

FLAGS = ("--xla_cpu_experimental_xnn_fusion_type="
         "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
         "--xla_cpu_experimental_ynn_fusion_type=")
_TESTED_JAXLIB = "0.10."


def use_xnnpack_convolutions() -> bool:
  """Adds FLAGS to XLA_FLAGS; True if they are in effect."""
  if not jaxlib.__version__.startswith(_TESTED_JAXLIB):
    return False
  current = os.environ.get("XLA_FLAGS", "")
  if any(f.split("=")[0] in current for f in FLAGS):
    return all(f in current for f in FLAGS)
  os.environ["XLA_FLAGS"] = " ".join([current, *FLAGS]).strip()
  return True


def preferred_conv() -> str:
  """The 3x3 convolution for this backend (`build_model(..., conv=)`):
  Winograd's where it measured faster on CPU, cuDNN's / XLA's elsewhere."""
  return "winograd" if jax.default_backend() == "cpu" else "xla"
