#!/usr/bin/env bash
# On the lent GPU machine: installs the carried wheels and this project, then runs the command given.
#   ../shared/gpu/wheelhouse.sh .wheels; ../shared/gpu/unsloth_wheelhouse.sh .wheels_u (optional; drop its
#   bitsandbytes wheel, .wheels has it, so that both fit the 64 MiB a call carries)
#   carry: .wheels .wheels_u .gpu (.gpu/tokenizer: any saved tokenizer, such as the embedded SmolLM2's:
#   python -c "from lora_cli.embedded import embedded_model_dir as d; from transformers import AutoTokenizer as t;
#   t.from_pretrained(d()).save_pretrained('.gpu/tokenizer')"; keep all three in .git/info/exclude)
#   bash benchmarks/on_gpu.sh python3 benchmarks/speed.py --modes baseline_qlora,qlora,unsloth --results "$OUT"
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
