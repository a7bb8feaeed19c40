"""What every machine shares: config, errors, preprocessing, the model bundle, the decision rule,
command-line plumbing. Nothing here imports TensorFlow (the saved Keras model's layers live in
idc.keras_model, outside core, for that reason)."""
