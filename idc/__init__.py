"""IDC Classifier: invasive ductal carcinoma detection, from patient-sorted data to the edge.

config (confs.json), data (patient-level sorting), preprocessing (THE preprocessing),
model (Inception V3 transfer learning), bottleneck (feature cache), training, metrics,
evaluation, edge_compile (OpenVINO IR), inference (the engine), api (the Flask app),
mqtt (IoT JumpWay wiring), alarm (the Raspberry Pi alarm), files, cli, errors.
"""
