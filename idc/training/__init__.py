"""The training machine's code: dataset sorting, bottleneck cache, Inception V3 transfer learning,
training, evaluation and reports (TensorFlow)."""

from idc.core.cli import quiet_import

quiet_import("tensorflow")  # before any submodule imports it: keeps TensorFlow's start-up noise out
