#!/usr/bin/env bash
# Compile the trained model for the edge with OpenVINO (the successor of the NCSDK's
# mvNCCompile), check it against TensorFlow, then classify model/test/ with it.
set -euo pipefail

usage() {
  cat <<'HELP'
Usage: ./compile_ncs.sh [--precision FP16|FP32|INT8|all] [--device DEVICE] [--config confs.json]
                        [--max-int8-drop X] [-v]

Converts model/<model_name>.keras to OpenVINO IR in model/ir/<PRECISION>/ (FP16 is the Movidius
stick's precision; INT8 is NNCF post-training quantization calibrated on real training patches),
each with the model's bundle (model.json), prints the agreement with TensorFlow on validation
patches (INT8 must keep balanced accuracy within 0.01: an INT8 IR that does not is removed, and
an INT8 asked for by name fails), then runs inception_test.py on model/test/. By default
(OpenVINO.precision "auto") it compiles FP16, and INT8 on a CPU, where the server then serves INT8.

  --precision P     FP16, FP32, INT8, or all (any case; default: OpenVINO.precision in confs.json)
  --device D        OpenVINO device: CPU, GPU, NPU, AUTO (default: OpenVINO.device); checked first
  --config PATH     config file (default: confs.json beside this script)
  --max-int8-drop X largest balanced-accuracy loss allowed for INT8 (default: 0.01)
  -v, --verbose     show the libraries' own messages (TensorFlow, NNCF)
  -h, --help        this help
HELP
}

cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
config=confs.json
precision=""
device=()
gate=()
verbose=()
while [ $# -gt 0 ]; do
  case "$1" in
    --precision) precision=$(echo "${2:-}" | tr '[:lower:]' '[:upper:]'); shift 2 ;;
    --device) device=(--device "$2"); shift 2 ;;
    --config) config=$2; shift 2 ;;
    --max-int8-drop) gate=(--max-int8-drop "$2"); shift 2 ;;
    -v|--verbose) verbose=(-v); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$precision" in
  "") precisions=() ;;
  ALL) precisions=(--precision FP32 FP16 INT8) ;;
  FP32|FP16|INT8) precisions=(--precision "$precision") ;;
  *) echo "unknown precision: $precision (FP32, FP16, INT8 or all)" >&2; exit 2 ;;
esac

"$PYTHON" -m idc.edge.compile --config "$config" "${precisions[@]}" "${device[@]}" "${gate[@]}" "${verbose[@]}"
test_precision=()
[ -n "$precision" ] && [ "$precision" != ALL ] && test_precision=(--precision "$precision")
"$PYTHON" inception_test.py --config "$config" "${test_precision[@]}" "${device[@]}" "${verbose[@]}"
