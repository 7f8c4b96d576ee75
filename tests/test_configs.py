"""Every shipped recipe validates, and the demo recipe trains the embedded model end to end."""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_lora_process
from lora_cli.recipe import load_recipe

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PLANNED = [path for path in CONFIGS if "lora inspect-params' plan" in path.read_text()]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_validate(path: Path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    overrides = []
    if (raw.get("model") or {}).get("adapter"):  # the SFT run it continues (runs/...) is made by its first stage
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32}))
        overrides = [f"model.adapter={tmp_path}"]
    recipe = load_recipe(path, overrides)
    assert recipe.output_dir.startswith("runs/")
    assert path.read_text().startswith("#"), "each recipe documents itself in a comment header"


@pytest.mark.parametrize("path", PLANNED, ids=[p.name for p in PLANNED])
def test_the_gpu_memory_a_recipe_states_is_its_plan(path: Path):
    """A header's "peak 8.6 GiB, 10.8 GiB with the CUDA context" is its row of lora inspect-params --recipe."""
    from lora_cli.inspect_params import inspect_recipe
    from lora_cli.memory.device import GIB

    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    stated = re.search(r"peak ([\d.]+) GiB, ([\d.]+) GiB with the CUDA context", header)
    report = inspect_recipe(path)
    recipe = report["recipe"]
    highlighted = (recipe["method"], recipe["gradient_checkpointing"])
    row = next(row for row in report["memory"]["rows"] if (row["method"], row["gradient_checkpointing"]) == highlighted)
    assert stated and stated.groups() == (f"{row['peak'] / GIB:.1f}", f"{row['device'] / GIB:.1f}")


def test_demo_end_to_end_on_the_embedded_model(tmp_path, embedded_dir):
    """The README's demo, shortened to 9 steps (6 already teach the voice): train SmolLM2 on the pirate
    chats, then the adapter answers like a pirate."""
    out = tmp_path / "demo"
    trained = run_lora_process(["train", "configs/demo-smollm2.yaml", "--output-dir", out,
                                "--set", "training.max_steps=9", "--set", "data.eval=null"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Data audit" in trained.stdout and "Done." in trained.stdout
    answer = run_lora_process(["generate", out, "--prompt", "What is the capital of France?", "--max-new-tokens", "24",
                               "--compare-base"])
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "Arr" in answer.stdout and "Paris" in answer.stdout
