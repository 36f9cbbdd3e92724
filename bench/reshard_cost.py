"""Issue 16: what a resume on another number of workers costs. A ZeRO-3 checkpoint of a Llama-shaped model (random
weights, one AdamW step so the optimizer state exists) is saved, converted to DeepSpeed's universal format by the
product's own `orchestrator.checkpoint.to_universal` (what `restore` runs when the world size changed), and loaded
back in the universal format; each phase timed. One process, CPU (gloo), world size 1.

  python bench/reshard_cost.py --hidden 512 --layers 8 [--hidden 1024 --layers 12 ...] [--out bench/results/issue16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(hidden: int, layers: int, scratch: str) -> dict:
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from orchestrator.checkpoint import TAG, to_universal

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e5},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    keep = HfDeepSpeedConfig(config)  # noqa: F841 - builds the model under zero.Init, as the recipe does
    model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                                         vocab_size=32000))
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=config)
    ids = torch.randint(0, 32000, (1, 32))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    root = tempfile.mkdtemp(dir=scratch)
    try:
        started = time.perf_counter()
        engine.save_checkpoint(os.path.join(root, "ds"), tag=TAG)
        save = time.perf_counter() - started
        started = time.perf_counter()
        to_universal(os.path.join(root, "ds", TAG), os.path.join(root, "uc", TAG))
        convert = time.perf_counter() - started
        engine._config.load_universal_checkpoint = True
        started = time.perf_counter()
        engine.load_checkpoint(os.path.join(root, "uc"), tag=TAG)
        load = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(root, "ds"))
                   for f in files)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"hidden": hidden, "layers": layers, "params_m": params / 1e6, "checkpoint_mib": size / 2**20,
            "save_s": save, "convert_s": convert, "universal_load_s": load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, action="append", required=True)
    parser.add_argument("--layers", type=int, action="append", required=True)
    parser.add_argument("--scratch", default="/var/tmp")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "issue16"))
    args = parser.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534", RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    sys.path.insert(0, str(ROOT))
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo")
    rows = []
    for hidden, layers in zip(args.hidden, args.layers):
        row = measure(hidden, layers, args.scratch)
        row["load_average"] = os.getloadavg()[0]
        print(f"params {row['params_m']:.1f}M, checkpoint {row['checkpoint_mib']:.0f} MiB: save {row['save_s']:.2f} s,"
              f" convert {row['convert_s']:.2f} s, universal load {row['universal_load_s']:.2f} s "
              f"(load average {row['load_average']:.1f})", flush=True)
        rows.append(row)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{os.cpu_count()} CPU cores (this CI machine)", "rows": rows,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (Path(args.out) / "reshard_cost.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
