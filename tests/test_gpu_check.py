"""benchmarks/gpu_check.py in its CI-sized form: the GPU check runs end to end on the CPU with tiny
checkpoints, so the script a lent H100 runs is known to work before the device is spent on it."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .conftest import ROOT


def test_gpu_check_runs_on_cpu_with_tiny_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    before = set(Path(tempfile.gettempdir()).glob("inference-pio-gpu-check-*"))
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--device", "cpu", "--size", "tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for model in ("qwen3_vl_2b", "glm_4_7_flash"):
        assert result[f"{model}_top1_agreement"] == 1.0  # float32 on CPU: our step is the reference's forward
        assert result[f"{model}_logits_rel_err"] < 1e-4
        rates = result[f"{model}_decode_tok_s"]
        assert rates["ours"] > 0 and rates["transformers"] > 0
        assert result[f"{model}_batch4_out_tok_s"]["ours"] > 0
    assert result["qwen_image_ttft_ms"]["ours"] > 0
    assert result["qwen_4_images_ttft_ms"]["ours"] > 0
    assert set(result["glm_4_7_flash_ctx256_decode_tok_s"]) == {"ours", "transformers"}
    assert "glm_4_7_flash_context_slowdown" in result
    for quant in ("int8", "int4"):  # bitsandbytes (CPU backend) for the Linear layers, our store for the experts
        assert result[f"glm_4_7_flash_{quant}_top1_agreement"] == 1.0  # the same quantized weights on both sides
        weights = result[f"glm_4_7_flash_{quant}_weight_gb"]
        assert weights["measured"] > 0 and weights["plan"] > 0
    isolated = result["isolated_medium"]  # a medium-trust plugin in its worker, 4 concurrent streams
    assert isolated["all_first_before_any_end"], isolated
    assert isolated["limits"]
    assert "| model | what | inference-pio | transformers |" in proc.stdout
    assert set(Path(tempfile.gettempdir()).glob("inference-pio-gpu-check-*")) == before  # checkpoints removed
