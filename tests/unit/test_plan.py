"""Planner decisions over a table of models x GPU counts x GPU memory, and its failure messages."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from orchestrator.errors import UserError
from orchestrator.memory import ModelShape, estimate
from orchestrator.model import BUILTIN_CONFIGS
from orchestrator.plan import MICRO_BATCH_MEMORY_SHARE, ClusterResources, describe, make_plan
from tests.conftest import ROOT, compose_run


def shape(name: str) -> dict:
    return json.loads((BUILTIN_CONFIGS / name / "config.json").read_text())


def plan_for(tmp_path, model: str, gpus: int, memory_gb: float, nodes: int = 1, host_gb: float = 2000,
             extra=()):
    run = compose_run(["+experiment=legal_full", *extra], tmp_path)
    resources = ClusterResources(nodes=nodes, gpus_per_node=gpus, gpu_memory_gb=memory_gb, cpus=64,
                                 host_memory_gb=host_gb)
    return make_plan(run, resources, shape(model))


# (model, nodes, GPUs per node, GiB per GPU, host GiB per node, tokens per row) -> strategy; micro-batch 1
CASES = [
    ("qwen2.5-0.5b", 1, 1, 24, 256, 2048, "lora"),
    ("qwen2.5-0.5b", 1, 2, 24, 256, 2048, "full"),
    ("llama-3.2-1b", 1, 2, 80, 256, 2048, "full"),
    ("llama-3.2-1b", 1, 1, 141, 256, 2048, "lora"),  # one GPU is always PEFT
    ("llama-3.1-8b", 1, 1, 80, 256, 2048, "lora"),
    ("llama-3.1-8b", 1, 1, 24, 256, 1024, "lora"),  # 16 GB of bf16 weights + checkpointed activations
    ("llama-3.1-8b", 1, 1, 24, 256, 2048, "lora"),  # ... 20.3 GiB predicted, 84% of the GPU
    ("llama-3.1-8b", 1, 1, 24, 256, 3072, "qlora"),  # ... LoRA would fill 93% of the GPU, more than the 90% rule
    ("llama-3.1-8b", 1, 1, 24, 256, 5120, "qlora"),  # ... and with 5k-token rows (6k: nothing fits 90%)
    ("llama-3.1-8b", 1, 8, 80, 1024, 4096, "full"),
    ("llama-3.1-8b", 1, 4, 24, 1024, 2048, "full_offload"),
    ("qwen2.5-7b", 1, 8, 141, 1024, 4096, "full"),
    ("llama-3.1-70b", 1, 8, 80, 2048, 2048, "full_offload"),
    ("llama-3.1-70b", 8, 8, 80, 2048, 2048, "full"),  # 64 GPUs
    ("llama-3.1-70b", 1, 1, 80, 2048, 2048, "qlora"),
]


@pytest.mark.parametrize("model,nodes,gpus,memory,host,tokens,expected", CASES)
def test_planner_decisions(tmp_path, model, nodes, gpus, memory, host, tokens, expected):
    plan = plan_for(tmp_path, model, gpus, memory, nodes=nodes, host_gb=host, extra=[f"data.max_length={tokens}"])
    assert plan.strategy == expected
    assert plan.num_workers == nodes * gpus
    assert plan.predicted_gib_per_gpu <= memory * MICRO_BATCH_MEMORY_SHARE
    assert plan.zero_stage == (0 if expected in ("lora", "qlora") else 3)


def test_no_gpu_means_cpu_workers(tmp_path):
    run = compose_run([], tmp_path)
    plan = make_plan(run, ClusterResources(nodes=1, gpus_per_node=0, gpu_memory_gb=None, cpus=2),
                     shape("tiny-llama"))
    assert (plan.strategy, plan.num_workers, plan.use_gpu, plan.precision) == ("full", 2, False, "fp32")


def test_activation_checkpointing_only_where_memory_needs_it(tmp_path):
    roomy = plan_for(tmp_path, "llama-3.2-1b", 8, 80)
    tight = plan_for(tmp_path, "llama-3.1-8b", 8, 40, extra=["data.max_length=4096"])
    assert roomy.strategy == tight.strategy == "full"
    assert not roomy.gradient_checkpointing and tight.gradient_checkpointing


def test_nothing_fits_fails_before_launch_with_the_numbers(tmp_path):
    with pytest.raises(UserError, match=r"no full fine-tuning plan fits 2 x 24 GiB \(a plan fills at most 90%\): "
                                        r"predicted per GPU: full \d+"):
        plan_for(tmp_path, "llama-3.1-70b", 2, 24, host_gb=64)


def test_an_impossible_forced_strategy_fails_with_the_prediction(tmp_path):
    with pytest.raises(UserError, match=r"strategy=full does not fit: predicted \d+\.\d GiB per GPU against 80 GiB"):
        plan_for(tmp_path, "llama-3.1-8b", 1, 80, extra=["strategy=full"])


def test_qlora_on_cpu_is_refused(tmp_path):
    run = compose_run(["strategy=qlora"], tmp_path)
    with pytest.raises(UserError, match="strategy=qlora needs a GPU"):
        make_plan(run, ClusterResources(nodes=1, gpus_per_node=0, gpu_memory_gb=None, cpus=2), shape("tiny-llama"))


def test_global_batch_must_divide_over_workers_and_micro_batches(tmp_path):
    with pytest.raises(UserError, match=r"trainer.global_batch_size=63 is not allowed: it must be a multiple of"):
        plan_for(tmp_path, "llama-3.1-8b", 8, 80, extra=["trainer.global_batch_size=63"])


def test_parameter_counts_match_the_published_sizes():
    for name, billions in [("llama-3.2-1b", 1.24), ("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.6),
                           ("qwen2.5-0.5b", 0.49), ("qwen2.5-7b", 7.6)]:
        assert ModelShape.from_config(shape(name)).params / 1e9 == pytest.approx(billions, rel=0.01)


def test_zero3_memory_shrinks_with_workers_and_offload_frees_the_gpu():
    s = ModelShape.from_config(shape("llama-3.1-8b"))
    one, eight = (estimate("full", s, w, 2048, True).total for w in (1, 8))
    assert eight < one / 4
    assert estimate("full_offload", s, 8, 2048, True).total < eight
    assert estimate("qlora", s, 1, 2048, True).total < estimate("lora", s, 1, 2048, True).total


def test_the_printed_plan_has_the_table_the_strategy_line_and_why(tmp_path):
    text = describe(plan_for(tmp_path, "llama-3.1-8b", 8, 80), 80)
    for expected in ("candidate", "predicted GiB/GPU", "full_offload", "strategy=full\n", "why: full fine-tuning"):
        assert expected in text


def test_fused_kernels_are_planned_printed_and_counted(tmp_path, monkeypatch):
    """On GPUs with liger-kernel installed the planner turns the fused kernels on, says so, and counts the
    logits that the fused loss never materialises; model.fused_kernels=off keeps the plain estimate."""
    from orchestrator import kernels

    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    one_row = ["data.max_length=4096", "trainer.micro_batch_size=1"]
    fused = plan_for(tmp_path / "a", "llama-3.1-8b", 4, 141, extra=one_row)
    plain = plan_for(tmp_path / "b", "llama-3.1-8b", 4, 141, extra=[*one_row, "model.fused_kernels=off"])
    assert fused.fused_kernels and not plain.fused_kernels
    assert "fused kernels: on (Liger Kernel: RMSNorm, SwiGLU, RoPE, output projection + loss)" in describe(fused, 141)
    assert "fused kernels: off (model.fused_kernels=off)" in describe(plain, 141)
    # 4096 tokens x 12 bytes x 128,256 vocabulary = 5.9 GiB of logits, less the fused loss's chunk, plus slack
    saved = plain.predicted_gib_per_gpu - fused.predicted_gib_per_gpu
    assert 5.5 < saved < 7.0


def test_planner_picks_the_largest_micro_batch_that_fits(tmp_path):
    """trainer.micro_batch_size=null (legal_full): the largest divisor of the rows per worker per step that fits
    without activation checkpointing, within 90% of the GPU; the next larger divisor would not fit. The same global
    batch either way."""
    for model, gpus, memory, global_batch, micro in (("llama-3.2-1b", 2, 140, 16, 8),  # bench/RESULTS.md's cases
                                                     ("llama-3.1-8b", 2, 140, 8, 2),
                                                     ("llama-3.1-8b", 8, 80, 64, 1)):
        plan = plan_for(tmp_path, model, gpus, memory, extra=["data.max_length=4096", "model.fused_kernels=off",
                                                              f"trainer.global_batch_size={global_batch}"])
        assert (plan.strategy, plan.micro_batch_size) == ("full", micro), (model, gpus, memory)
        assert plan.grad_accum == global_batch // (gpus * micro) and plan.global_batch_size == global_batch
        assert not plan.gradient_checkpointing and plan.predicted_gib_per_gpu <= memory
        rows = global_batch // gpus
        larger = [d for d in range(micro + 1, rows + 1) if rows % d == 0]
        s = ModelShape.from_config(shape(model))
        assert not larger or estimate("full", s, gpus, larger[0] * 4096, False).gib > memory * MICRO_BATCH_MEMORY_SHARE
        assert f"micro-batch: {micro}: the largest divisor of the {rows} rows per worker" in describe(plan, memory)


def test_micro_batch_auto_uses_checkpointing_only_when_no_micro_batch_fits_without(tmp_path):
    plan = plan_for(tmp_path, "llama-3.1-8b", 8, 40, extra=["data.max_length=4096", "model.fused_kernels=off"])
    assert plan.strategy == "full" and plan.gradient_checkpointing and plan.micro_batch_size >= 1
    assert "with activation checkpointing" in plan.micro_batch_reason
    assert plan.predicted_gib_per_gpu <= 40


def test_micro_batch_auto_on_cpu_takes_all_rows_per_worker_in_one_pass(tmp_path):
    run = compose_run(["trainer.micro_batch_size=null", "trainer.global_batch_size=8"], tmp_path)
    plan = make_plan(run, ClusterResources(nodes=1, gpus_per_node=0, gpu_memory_gb=None, cpus=2),
                     shape("tiny-llama"))
    assert (plan.num_workers, plan.micro_batch_size, plan.grad_accum) == (2, 4, 1)


def test_micro_batch_auto_with_unknown_gpu_memory_says_so(tmp_path):
    run = compose_run(["+experiment=legal_full"], tmp_path)
    unknown_memory = ClusterResources(nodes=1, gpus_per_node=8, gpu_memory_gb=None, cpus=64)
    plan = make_plan(run, unknown_memory, shape("llama-3.2-1b"))
    assert plan.micro_batch_size == 8 and "GPU memory unknown: set cluster.gpu_memory_gb" in plan.micro_batch_reason


def test_micro_batch_auto_needs_a_global_batch_that_divides_over_the_workers(tmp_path):
    with pytest.raises(UserError, match=r"trainer.micro_batch_size=None is not allowed: null only with "
                                        r"trainer.global_batch_size set"):
        compose_run(["trainer.micro_batch_size=null"], tmp_path)
    with pytest.raises(UserError, match=r"trainer.global_batch_size=12 is not allowed: it must be a multiple of "
                                        r"the 8 workers"):
        plan_for(tmp_path, "llama-3.1-8b", 8, 80, extra=["trainer.global_batch_size=12"])


# ---------------------------------------------------------------- the messages agree with the table (issue 15)

def gib(text: str) -> list:
    return [float(x) for x in re.findall(r"(\d+\.\d) GiB", text)]


def table_row(text: str, strategy: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"│ {strategy} "))


def test_why_quotes_the_figures_of_the_picked_micro_batch(tmp_path):
    """1 GPU of 80 GB, legal_full (micro-batch picked): the why line's GiB are the table's, not one row's."""
    plan = plan_for(tmp_path, "llama-3.1-8b", 1, 80)
    assert plan.strategy == "lora" and plan.micro_batch_size > 1
    by_strategy = {c.strategy: c.gib_per_gpu for c in plan.candidates}
    text = describe(plan, 80)
    why = next(line for line in text.splitlines() if line.startswith("why: "))
    assert gib(why) == [round(by_strategy["full"], 1), round(by_strategy["lora"], 1)]
    assert table_row(text, "lora").split("│")[2].strip() == f"{plan.predicted_gib_per_gpu:.1f}"
    assert f"{plan.predicted_gib_per_gpu:.1f} GiB" in why
    assert f"picked micro-batch of {plan.micro_batch_size} rows" in why


def test_one_gpu_of_24_gb_honours_the_90_percent_rule(tmp_path):
    """8B on 24 GB, rows of 3072 tokens: LoRA at 93% of the GPU is not chosen (the rule says 90%); QLoRA is, and a
    micro-batch fits."""
    plan = plan_for(tmp_path, "llama-3.1-8b", 1, 24, extra=["data.max_length=3072"])
    lora = next(c for c in plan.candidates if c.strategy == "lora")
    assert plan.strategy == "qlora"
    assert lora.gib_per_gpu > 24 * MICRO_BATCH_MEMORY_SHARE and lora.fits is False
    assert plan.predicted_gib_per_gpu <= 24 * MICRO_BATCH_MEMORY_SHARE
    assert "no micro-batch" not in plan.micro_batch_reason
    assert f"LoRA on the bf16 model would need {lora.gib_per_gpu:.1f} GiB, more than 90% of 24 GiB" in plan.reason
    assert "| no" not in table_row(describe(plan, 24), "qlora")


def test_a_forced_strategy_over_the_share_is_refused_with_both_figures(tmp_path):
    with pytest.raises(UserError, match=r"strategy=lora does not fit: predicted \d+\.\d GiB per GPU against 24 GiB "
                                        r"\(a plan fills at most 90%: 21.6 GiB\)"):
        plan_for(tmp_path, "llama-3.1-8b", 1, 24, extra=["strategy=lora", "trainer.micro_batch_size=1",
                                                         "trainer.global_batch_size=null", "data.max_length=3072"])


def test_why_says_where_a_set_strategy_came_from(tmp_path):
    """Outside a Hydra run the source is "in the config"; in one, the command line or the experiment file."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from orchestrator.plan import setting_source

    assert "strategy=lora was set in the config" in plan_for(tmp_path, "llama-3.1-8b", 8, 80,
                                                             extra=["strategy=lora"]).reason
    cases = [(["+experiment=legal_full", "strategy=lora"], "on the command line"),
             (["+experiment=only_lora"], "in experiment/only_lora.yaml"),
             (["+experiment=legal_full"], "in the config")]
    configs = tmp_path / "hydra_conf"
    shutil.copytree(ROOT / "hydra_conf", configs, ignore=shutil.ignore_patterns("__pycache__"))
    (configs / "experiment" / "only_lora.yaml").write_text("# @package _global_\nname: only_lora\nstrategy: lora\n",
                                                           encoding="utf-8")
    try:
        for overrides, expected in cases:
            with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
                cfg = compose("config", overrides=overrides, return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)
                assert setting_source("strategy") == expected, overrides
    finally:
        HydraConfig.instance().cfg = None


def test_unknown_gpu_memory_marks_no_candidate_as_fitting(tmp_path):
    """A sizing dry run without cluster.gpu_memory_gb: no candidate of any size is said to fit, the table says
    unknown, and why says that nothing was checked."""
    run = compose_run(["+experiment=legal_full"], tmp_path)
    plan = make_plan(run, ClusterResources(nodes=1, gpus_per_node=1, gpu_memory_gb=None, cpus=64, host_memory_gb=256),
                     shape("llama-3.1-70b"))
    assert max(c.gib_per_gpu for c in plan.candidates) > 128
    assert all(c.fits is not True for c in plan.candidates)
    text = describe(plan, None)
    for c in plan.candidates:
        assert "yes" not in table_row(text, c.strategy.value).split("│")[4]
    assert "GPU memory unknown, so nothing was checked against it: set cluster.gpu_memory_gb" in plan.reason
