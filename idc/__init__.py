"""IDC Classifier: invasive ductal carcinoma detection, from patient-sorted data to the edge.

The package is grouped by the machine that runs it, as the 2018 article's three devices:

- `idc.core`: config (confs.json), errors, THE preprocessing, the model bundle (model.json and the
  model directory's layout), the decision rule and metrics, command-line plumbing. Light: NumPy
  and Pillow at most.
- `idc.training` (the workstation or cluster): dataset sorting, bottleneck cache, Inception V3
  transfer learning, training, evaluation and reports. TensorFlow (the cluster launcher,
  `idc.training.cluster`, is standard library only).
- `idc.keras_model`: the saved Keras model's layers and loader, shared by training and the edge's
  Keras fallback. TensorFlow, so not in core.
- `idc.edge` (the edge box): the inference engine, OpenVINO compilation, the HTTP API and review
  station (`idc.edge.web`). Never
  imports training code; serving an IR needs no TensorFlow.
- `idc.iot` (the Raspberry Pi): MQTT wiring and the alarm. Needs neither NumPy, TensorFlow nor
  OpenVINO.
"""

__version__ = "0.3.0"
