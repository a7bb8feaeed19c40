"""What every machine shares: config, errors, preprocessing, the model bundle, the decision rule,
command-line plumbing. Nothing here imports TensorFlow at import time but keras_model."""
