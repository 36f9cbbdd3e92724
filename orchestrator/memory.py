"""Peak GPU memory per worker for each training strategy, from the model's shape alone (config.json).

All of the project's memory arithmetic lives here (the planner in plan.py only compares the results).
Bytes per parameter, with bf16 weights and an fp32 AdamW (master weights + two moments = 12 bytes):

    full ZeRO-3           (2 weights + 2 grads + 12 optimizer) / workers      + gathered layers + activations
    full ZeRO-3 + offload  optimizer, master weights and parameters in host memory: gathered layers + activations
    LoRA                   2 (frozen base, whole) + 16 x adapter parameters     + activations
    QLoRA                  ~0.51 (4-bit NF4 with double-quantised constants) for the blocks; embeddings, head and
                           norms are cast to fp32 by peft's prepare_model_for_kbit_training: 4
    freeze depth k         like full, with optimizer state only for the blocks above k

Activations per token and layer (bf16, FlashAttention/SDPA: no s x s score matrix is kept), full fine-tuning
and QLoRA:
    2 x (5 h + 2 kv + 4 I) bytes: inputs of the q/k/v/o projections and norms, and the four I-wide tensors of
    the gated MLP. With activation checkpointing only each layer's input (2 h) is kept, plus one layer's
    full set while it is recomputed. The logits cost 12 bytes x vocabulary per token (bf16 logits, their
    fp32 copy for the loss, and its gradient); fused with the output projection (kernels.py) the loss keeps
    a bf16 gradient of the hidden state and a chunk of fp32 logits as wide as hidden/vocab of the tokens:
    about 8 x hidden bytes per token. QLoRA's fp32 norms keep the h-wide tensors (norm inputs and
    outputs, the residual stream) in fp32: 2 x 5 h bytes more per token and layer.
LoRA on the bf16 base (ModelShape.lora_activation_bytes_per_token), counted tensor by tensor: a frozen linear map
    keeps no input for backward (its input gradient needs only its weight), so what a layer keeps is
      the two norms' inputs          2 x 2 h (Liger's RMSNorm: its bf16 input), 2 x 4 h (transformers': an fp32 copy)
      attention (SDPA)               q, k, v, output: 4 x 2 q (packed or padded rows carry a mask: transformers then
                                     repeats k and v to every head) and the mask as an additive bf16 bias: 2 s
      each adapted map of input w    3 w (the adapter's dropout: a bf16 copy of the input and a one-byte mask)
      the gated MLP                  4 I (Liger's SwiGLU: gate and up outputs), 6 I (gate, silu(gate), up)
    with the adapters where peft puts them: peft.target_modules, by default peft's table (q_proj and v_proj for
    Llama, Qwen, Mistral, Gemma); the output head is frozen too. This count plus weights and adapter state against
    the measured allocated peak: -1.2% (1B, 4 x 2048 packed, fused kernels; tests/gpu/records/2026-12-01), -0.3%
    (8B, 2 x 4096 packed, fused; bench/RESULTS.md, throughput call 3), +3.5% (8B, 1 x 2048 unpadded rows, unfused,
    which had no mask; bench/RESULTS.md, issue 3).
Overhead: CUDA context, NCCL buffers, allocator slack: 1.5 GiB + 8% of the rest under ZeRO-3, whose gathers and
releases of differently sized buffers leave the caching allocator holding 1.4-3.3 GiB more than is allocated
(bench/RESULTS.md, tests/gpu/records). LoRA on one worker runs without ZeRO (PlainEngine), where the allocator
held at most 0.6 GiB more than allocated (three runs): 0.5 GiB (the CUDA context, outside the allocator) + 5%.
QLoRA keeps the ZeRO-3 figure (bitsandbytes' buffers: 1.1 GiB held over allocated in its one run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Sequence, Union

from orchestrator.config import Strategy

GIB = 2**30
OPTIMIZER_BYTES = 12  # fp32 master weights + AdamW exp_avg + exp_avg_sq
NF4_BYTES = 0.5 + 0.5 / 64 + 4 / (64 * 256)  # 4-bit values, fp8 block constants, fp32 second-level constants
OVERHEAD_BYTES = 1.5 * GIB
OVERHEAD_FRACTION = 0.08
PLAIN_OVERHEAD_BYTES = 0.5 * GIB  # one worker without ZeRO (PlainEngine): see the module's docstring
PLAIN_OVERHEAD_FRACTION = 0.05
LIVE_PARAMETER_LIMIT = 1e9  # DeepSpeed's stage3_max_live_parameters default: gathered elements at once

# The linear maps of a transformer block that LoRA can adapt, and the module names (peft.target_modules, matched
# on the name's last part) that adapt each. A name not listed counts as adapting every map (more memory: safe).
BLOCK_MAPS = ("q", "k", "v", "o", "gate", "up", "down")
TARGET_MAPS = {
    "q_proj": ("q",), "query": ("q",), "q": ("q",), "query_proj": ("q",),
    "k_proj": ("k",), "key": ("k",), "k": ("k",), "key_proj": ("k",),
    "v_proj": ("v",), "value": ("v",), "v": ("v",), "value_proj": ("v",),
    "o_proj": ("o",), "out_proj": ("o",), "q_lin": ("q",), "k_lin": ("k",), "v_lin": ("v",), "out_lin": ("o",),
    "qkv_proj": ("q", "k", "v"), "c_attn": ("q", "k", "v"), "query_key_value": ("q", "k", "v"), "Wqkv": ("q", "k", "v"),
    "gate_proj": ("gate",), "w1": ("gate",), "up_proj": ("up",), "w3": ("up",), "c_fc": ("up",), "fc1": ("up",),
    "gate_up_proj": ("gate", "up"), "down_proj": ("down",), "w2": ("down",), "fc2": ("down",),
    "c_proj": ("o", "down"),  # GPT-2: the attention's and the MLP's output maps share the name
}
# peft's default targets (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), for peft.
# target_modules=null; q_proj and v_proj for Llama, Qwen, Mistral, Gemma and any model type not listed here
PEFT_DEFAULT_TARGETS = {"gpt2": ("c_attn",), "bert": ("query", "value"), "roberta": ("query", "value")}


def adapted_maps(model_type: str, targets: Union[Sequence[str], str, None] = None) -> FrozenSet[str]:
    """The maps of each block (BLOCK_MAPS) that LoRA adapts for peft.target_modules (None: peft's default;
    "all-linear", as peft spells it: every one)."""
    if isinstance(targets, str):
        targets = [targets]
    if targets is None:
        targets = PEFT_DEFAULT_TARGETS.get(model_type, ("q_proj", "v_proj"))
    maps = set()
    for target in targets:
        name = str(target).rsplit(".", 1)[-1]
        maps.update(TARGET_MAPS.get(name, BLOCK_MAPS))  # "all-linear", a regex, an unknown name: all of them
    return frozenset(maps)


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
    model_type: str = ""  # config.json's model_type: peft's default LoRA targets depend on it

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
                   head_dim=int(config["head_dim"]) if config.get("head_dim") else None, model_type=model_type)

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

    def _maps(self) -> dict:
        """Each linear map of a block: (input width, output width)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        maps = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "up": (h, i), "down": (i, h)}
        if self.gated_mlp:
            maps["gate"] = (h, i)
        return maps

    def lora_params(self, rank: int, targets: Union[Sequence[str], str, None] = None) -> int:
        """Adapters on the maps peft.target_modules names (None: peft's default), A: r x in, B: out x r."""
        adapted = adapted_maps(self.model_type, targets)
        return self.layers * sum(rank * (a + b) for name, (a, b) in self._maps().items() if name in adapted)

    def lora_activation_bytes_per_token(self, checkpointing: bool, seq_len: int,
                                        targets: Union[Sequence[str], str, None] = None, fused_kernels: bool = False,
                                        fused_loss: bool = False) -> float:
        """What LoRA on a frozen bf16 base keeps for backward, per token (the module's docstring, tensor by tensor).
        Attention is counted with a mask (packed or padded rows), which costs more than none: k and v repeated
        to every head, and the bias."""
        adapted = adapted_maps(self.model_type, targets)
        norms = 2 * (2 if fused_kernels else 4) * self.hidden
        attention = 4 * 2 * self.q_dim + 2 * seq_len
        adapters = sum(3 * width for name, (width, _) in self._maps().items() if name in adapted)
        mlp = (4 if fused_kernels and self.gated_mlp else 6) * self.intermediate
        layer = norms + attention + adapters + mlp
        logits = 8 * self.hidden if fused_loss else 12 * self.vocab
        if checkpointing:
            return self.layers * 2 * self.hidden + layer + logits
        return self.layers * layer + logits

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
    zero: bool = True  # under DeepSpeed ZeRO-3 (its overhead); False: one worker without ZeRO (PlainEngine)

    @property
    def total(self) -> float:
        subtotal = self.weights + self.gradients + self.optimizer + self.activations + self.gathered
        if not self.zero:
            return subtotal * (1 + PLAIN_OVERHEAD_FRACTION) + PLAIN_OVERHEAD_BYTES
        return subtotal * (1 + OVERHEAD_FRACTION) + OVERHEAD_BYTES

    @property
    def gib(self) -> float:
        return self.total / GIB


def estimate(strategy: Union[Strategy, str], shape: ModelShape, workers: int, tokens_per_micro_batch: int,
             checkpointing: bool, lora_rank: int = 16, freeze_depth: int = 0, fused_loss: bool = False,
             seq_len: Optional[int] = None, lora_targets: Union[Sequence[str], str, None] = None,
             fused_kernels: Optional[bool] = None) -> Estimate:
    """Peak memory per GPU for one of: full, full_offload, lora, qlora (freeze depth applies to full).
    seq_len: tokens per row (data.max_length; None: the whole micro-batch, one row); lora_targets:
    peft.target_modules (None: peft's default); fused_kernels: Liger's RMSNorm and SwiGLU (None: as fused_loss)."""
    strategy = Strategy(strategy)
    p = shape.params
    # ZeRO-3 gathers a layer at a time, and prefetches the next: two blocks live, in bf16
    gathered = 2 * min(2 * shape.block_params, LIVE_PARAMETER_LIMIT)
    if strategy is Strategy.lora:
        fused_kernels = fused_loss if fused_kernels is None else fused_kernels
        activations = tokens_per_micro_batch * shape.lora_activation_bytes_per_token(
            checkpointing, seq_len or tokens_per_micro_batch, lora_targets, fused_kernels, fused_loss)
        adapters = shape.lora_params(lora_rank, lora_targets)
        weights = 2 * p / workers if workers > 1 else 2 * p
        return Estimate(weights=weights, gradients=4 * adapters, optimizer=OPTIMIZER_BYTES * adapters,
                        activations=activations, gathered=gathered if workers > 1 else 0, zero=workers > 1)
    activations = tokens_per_micro_batch * shape.activation_bytes_per_token(checkpointing, strategy.quantized,
                                                                            fused_loss)
    if strategy is Strategy.full:
        trainable = p - freeze_depth * shape.block_params - (shape.embedding_params if freeze_depth else 0)
        return Estimate(weights=2 * p / workers, gradients=2 * trainable / workers,
                        optimizer=OPTIMIZER_BYTES * trainable / workers, activations=activations, gathered=gathered)
    if strategy is Strategy.full_offload:
        # parameters, gradients and optimizer live in host memory; the GPU holds what is gathered for
        # compute and the gradient reduction buckets
        return Estimate(weights=0, gradients=2 * 5e7, optimizer=0, activations=activations, gathered=gathered)
    if strategy is Strategy.qlora:
        # counted as before the LoRA count above was made tensor by tensor (measured -5%, bench/RESULTS.md):
        # the older activation formula, and adapters on every map whatever peft.target_modules says
        adapters = shape.lora_params(lora_rank, "all-linear")
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
