"""Peak GPU memory per worker for each training strategy, from the model's shape alone (config.json).

All of the project's memory arithmetic lives here (the planner in plan.py only compares the results).
Bytes per parameter, with bf16 weights and an fp32 AdamW (master weights + two moments = 12 bytes):

    full ZeRO-3           (2 weights + 2 grads + 12 optimizer) / workers      + gathered layers + activations
    full ZeRO-3 + offload  optimizer, master weights and parameters in host memory: gathered layers + activations
    LoRA                   2 (frozen base, whole) + 16 x adapter parameters     + activations
    QLoRA                  ~0.51 (4-bit NF4 with double-quantised constants) for the blocks; embeddings, head and
                           norms are cast to fp32 by peft's prepare_model_for_kbit_training: 4
    freeze depth k         like full, with optimizer state only for the blocks above k

Activations per token and layer (bf16, FlashAttention/SDPA: no s x s score matrix is kept):
    2 x (5 h + 2 kv + 4 I) bytes: inputs of the q/k/v/o projections and norms, and the four I-wide tensors of
    the gated MLP. With activation checkpointing only each layer's input (2 h) is kept, plus one layer's
    full set while it is recomputed. The logits cost 12 bytes x vocabulary per token (bf16 logits, their
    fp32 copy for the loss, and its gradient); fused with the output projection (kernels.py) the loss keeps
    a bf16 gradient of the hidden state and a chunk of fp32 logits as wide as hidden/vocab of the tokens:
    about 8 x hidden bytes per token. QLoRA's fp32 norms keep the h-wide tensors (norm inputs and
    outputs, the residual stream) in fp32: 2 x 5 h bytes more per token and layer.
Overhead: CUDA context, NCCL buffers, allocator slack: 1.5 GiB + 8% of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from orchestrator.config import Strategy

GIB = 2**30
OPTIMIZER_BYTES = 12  # fp32 master weights + AdamW exp_avg + exp_avg_sq
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit values, fp8 block constants, fp32 second-level constants
OVERHEAD_BYTES = 1.5 * GIB
OVERHEAD_FRACTION = 0.08
LIVE_PARAMETER_LIMIT = 1e9  # DeepSpeed's stage3_max_live_parameters default: gathered elements at once


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool = True  # Llama/Qwen SwiGLU (3 matrices) vs BERT/GPT (2)
    head_dim: Optional[int] = None  # head_dim (Qwen3, Gemma: heads x head_dim != hidden); None: hidden/heads

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        hidden = int(config.get("hidden_size") or config.get("n_embd") or config["d_model"])
        heads = int(config.get("num_attention_heads") or config.get("n_head"))
        model_type = config.get("model_type", "")
        return cls(hidden=hidden, intermediate=int(config.get("intermediate_size") or 4 * hidden),
                   layers=int(config.get("num_hidden_layers") or config.get("n_layer")), heads=heads,
                   kv_heads=int(config.get("num_key_value_heads") or heads), vocab=int(config["vocab_size"]),
                   tied_embeddings=bool(config.get("tie_word_embeddings", model_type in ("bert", "gpt2"))),
                   gated_mlp=model_type not in ("bert", "roberta", "gpt2", "distilbert"),
                   head_dim=int(config["head_dim"]) if config.get("head_dim") else None)

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    @property
    def block_params(self) -> int:
        attention = self.hidden * (2 * self.q_dim + 2 * self.kv_dim)
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embedding_params + self.hidden

    def lora_params(self, rank: int) -> int:
        """Adapters on every linear map of every block (q, k, v, o, and the MLP's), A: r x in, B: out x r."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        maps = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i), (h, i), (i, h)][: 3 if self.gated_mlp else 2]
        return self.layers * sum(rank * (a + b) for a, b in maps)

    def activation_bytes_per_token(self, checkpointing: bool, fp32_residual: bool = False,
                                   fused_loss: bool = False) -> float:
        layer = 2 * (5 * self.hidden + 2 * self.kv_dim + 4 * self.intermediate) + (10 * self.hidden if fp32_residual
                                                                                    else 0)
        logits = 8 * self.hidden if fused_loss else 12 * self.vocab
        if checkpointing:
            return self.layers * 2 * self.hidden + layer + logits
        return self.layers * layer + logits


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes on one GPU, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float  # ZeRO-3: full layers gathered for compute (and prefetched)

    @property
    def total(self) -> float:
        subtotal = self.weights + self.gradients + self.optimizer + self.activations + self.gathered
        return subtotal * (1 + OVERHEAD_FRACTION) + OVERHEAD_BYTES

    @property
    def gib(self) -> float:
        return self.total / GIB


def estimate(strategy: Union[Strategy, str], shape: ModelShape, workers: int, tokens_per_micro_batch: int,
             checkpointing: bool, lora_rank: int = 16, freeze_depth: int = 0, fused_loss: bool = False) -> Estimate:
    """Peak memory per GPU for one of: full, full_offload, lora, qlora (freeze depth applies to full)."""
    strategy = Strategy(strategy)
    activations = tokens_per_micro_batch * shape.activation_bytes_per_token(checkpointing, strategy.quantized,
                                                                            fused_loss)
    p = shape.params
    # ZeRO-3 gathers a layer at a time, and prefetches the next: two blocks live, in bf16
    gathered = 2 * min(2 * shape.block_params, LIVE_PARAMETER_LIMIT)
    if strategy is Strategy.full:
        trainable = p - freeze_depth * shape.block_params - (shape.embedding_params if freeze_depth else 0)
        return Estimate(weights=2 * p / workers, gradients=2 * trainable / workers,
                        optimizer=OPTIMIZER_BYTES * trainable / workers, activations=activations, gathered=gathered)
    if strategy is Strategy.full_offload:
        # parameters, gradients and optimizer live in host memory; the GPU holds what is gathered for
        # compute and the gradient reduction buckets
        return Estimate(weights=0, gradients=2 * 5e7, optimizer=0, activations=activations, gathered=gathered)
    adapters = shape.lora_params(lora_rank)
    if strategy is Strategy.lora:
        weights = 2 * p / workers if workers > 1 else 2 * p
        return Estimate(weights=weights, gradients=4 * adapters, optimizer=OPTIMIZER_BYTES * adapters,
                        activations=activations, gathered=gathered if workers > 1 else 0)
    if strategy is Strategy.qlora:
        blocks = shape.layers * shape.block_params
        weights = NF4_BYTES * blocks + 4 * (p - blocks)
        return Estimate(weights=weights, gradients=4 * adapters, optimizer=OPTIMIZER_BYTES * adapters,
                        activations=activations, gathered=0)
    raise ValueError(f"unknown strategy {strategy}")


def host_bytes_for_offload(shape: ModelShape, nodes: int) -> float:
    """Host memory per node that full_offload needs: bf16 params + fp32 optimizer state + gradients."""
    return (2 + OPTIMIZER_BYTES + 4) * shape.params / nodes


def fits(estimate_: Estimate, gpu_memory_gb: Optional[float]) -> bool:
    return gpu_memory_gb is None or estimate_.total <= gpu_memory_gb * GIB
