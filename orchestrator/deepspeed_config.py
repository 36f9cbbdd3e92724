"""Plan + RunConfig → the DeepSpeed config dict (ZeRO stage, precision, batch layout, clipping)."""

from __future__ import annotations

from orchestrator.config import Precision, RunConfig
from orchestrator.plan import Plan


def deepspeed_config(run: RunConfig, plan: Plan) -> dict:
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": run.optim.grad_clip,
        "bf16": {"enabled": plan.precision is Precision.bf16},
        "zero_optimization": {
            "stage": plan.zero_stage,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": True},
                "offload_param": {"device": "cpu", "pin_memory": True}} if plan.offload else {}),
            "overlap_comm": plan.use_gpu,  # overlap reduce-scatter with backward (needs CUDA streams)
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,  # elements per gradient reduction bucket
            "stage3_prefetch_bucket_size": 5e7,  # elements of parameters fetched ahead of use
            "stage3_param_persistence_threshold": 1e5,  # params below this many elements stay unpartitioned
            # the final export gathers the full weights onto rank 0 (in the training precision)
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        # our optimizer is torch.optim.AdamW (fused), which ZeRO wraps but does not list as tested; with
        # offload it steps on the host copies (DeepSpeedCPUAdam would need a JIT-compiled extension)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # progress comes from our own console bar
        "wall_clock_breakdown": False,
    }
