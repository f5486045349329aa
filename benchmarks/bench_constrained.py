"""The cost of constrained decoding per token: the same requests with and without a JSON-schema grammar,
at batch 1 and 8, through the plugin's scheduler on a tiny checkpoint (CPU by default).

    python benchmarks/bench_constrained.py [--model qwen3_vl_2b] [--new 48]

Reports ms per decode step for free and constrained requests, and the grammar's own share (mask
computation and application, timed inside the scheduler). The tiny tokenizer has a few hundred tokens;
llguidance's mask cost grows with the vocabulary (the published tokenizers have ~150 k).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import inference_pio` does; torch must not load first

from inference_pio import PluginManager
from inference_pio.runtime.constraints import json_schema_grammar

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
    "required": ["name", "age"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3_vl_2b", choices=["qwen3_vl_2b", "glm_4_7_flash"])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import importlib

    package = {"qwen3_vl_2b": "inference_pio_qwen3_vl_2b", "glm_4_7_flash": "inference_pio_glm_4_7_flash"}
    testing = importlib.import_module(f"{package[args.model]}.testing")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = testing.make_tiny_checkpoint(f"{tmp}/tiny")
        pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": f"{tmp}/none.toml"})
        plugin: Any = pm.activate_plugin(
            args.model, device="cpu", model_path=str(checkpoint), max_context=1024, max_batch_size=8
        )
        scheduler = plugin.scheduler
        grammar_time = [0.0]
        constrain = scheduler._constrain

        def timed_constrain(*a: Any) -> Any:
            start = time.perf_counter()
            out = constrain(*a)
            grammar_time[0] += time.perf_counter() - start
            return out

        scheduler._constrain = timed_constrain
        messages = [{"role": "user", "content": "Describe a person."}]
        grammar = json_schema_grammar(SCHEMA)
        vocab = plugin.engine.vocab_size
        print(f"{args.model} tiny (vocab {vocab}), CPU; {args.new} new tokens per request")
        for batch in (1, 8):
            for name, extra in (("free", {}), ("json_schema", {"grammar": grammar})):
                per_step, shares = [], []
                for _ in range(args.reps):
                    grammar_time[0] = 0.0
                    steps = scheduler.steps
                    start = time.perf_counter()
                    threads = [
                        threading.Thread(
                            target=plugin.chat_completion,
                            args=(messages,),
                            kwargs={"max_new_tokens": args.new, "ignore_eos": True, "temperature": 0.8, **extra},
                        )
                        for _ in range(batch)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    elapsed = time.perf_counter() - start
                    n = max(1, scheduler.steps - steps)
                    per_step.append(elapsed / n * 1e3)
                    shares.append(grammar_time[0] / n * 1e3)
                print(
                    f"  batch {batch}  {name:<12} {statistics.median(per_step):7.2f} ms/step   "
                    f"grammar {statistics.median(shares):6.2f} ms/step"
                )
        pm.shutdown()


if __name__ == "__main__":
    main()
