#!/usr/bin/env bash
# On a GPU machine without network access: installs wheels brought along and this project, then runs the command given.
#   .wheels: wheels of the GPU extras and whatever the machine's image lacks (`pip download -d .wheels ...` on a machine
#   with network); .wheels_u (optional): Unsloth, the packages it pins, and unsloth-core.zip (its source, unpacked);
#   .gpu/tokenizer: any saved tokenizer, such as the embedded SmolLM2's:
#   python -c "from lora_cli.embedded import embedded_model_dir as d; from transformers import AutoTokenizer as t;
#   t.from_pretrained(d()).save_pretrained('.gpu/tokenizer')"
#   BENCH_COMMIT=<the clone's commit> bash benchmarks/on_gpu.sh python3 benchmarks/speed.py --modes baseline_qlora,qlora \
#     --results /tmp/out   (BENCH_COMMIT where the copy has no .git), then, back in the clone, with that results.csv:
#   python benchmarks/results_table.py --add results.csv
# Unsloth pins older TRL and datasets: they go into a folder of their own, which speed.py puts first on the path of
# the Unsloth mode's process alone (UNSLOTH_SITE).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-index .wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
if [ -d .wheels_u ]; then
  export UNSLOTH_SITE=/tmp/unsloth-site
  python3 -m pip install -q --no-deps --no-index --target "$UNSLOTH_SITE" .wheels_u/*.whl
  python3 -m zipfile -e .wheels_u/unsloth-core.zip "$UNSLOTH_SITE"
fi
export TOKENIZER_DIR=${TOKENIZER_DIR:-.gpu/tokenizer}
"$@"
