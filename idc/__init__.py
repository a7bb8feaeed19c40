"""IDC Classifier: invasive ductal carcinoma detection, from patient-sorted data to the edge.

Modules: config (confs.json), data (dataset sorting), preprocessing, model (Inception V3
transfer learning), bottleneck (feature cache), training, metrics, evaluation.
"""
