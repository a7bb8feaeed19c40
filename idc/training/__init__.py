"""The training machine's code: dataset sorting, bottleneck cache, Inception V3 transfer learning,
training, evaluation and reports (TensorFlow).

Importing the package imports nothing heavy: `python -m idc.training.cluster` (standard library
only) runs on every node before TensorFlow. The modules that need TensorFlow import it through
`quiet_import`, which keeps its start-up noise out unless -v is given."""
