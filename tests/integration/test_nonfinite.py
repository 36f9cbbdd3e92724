"""Issue 14: a loss that turns NaN or infinite stops the run (trainer.max_nonfinite_steps) instead of training on
and exporting a broken model with exit code 0. A learning rate of 1e12 without clipping or weight decay overflows
the tiny Llama's weights in its first step (fp32 on CPU, as bf16: no step is skipped), so the loss is NaN from step 2
on; the checkpoint of step 1 stays. (At 1e6 the tiny Llama does not overflow: its loss sticks at ln(vocabulary),
finite, from a model that predicts nothing.)"""

from __future__ import annotations

import json
import re

import pytest

from orchestrator.__main__ import execute
from orchestrator.checkpoint import newest_complete_checkpoint, storage_root
from orchestrator.errors import UserError
from tests.conftest import compose_run, tiny_llama_run

pytestmark = pytest.mark.ray


def overflowing_run(tiny_llama_dir, run_dir, *extra):
    return compose_run([*tiny_llama_run(tiny_llama_dir), "optim.lr=1e12", "optim.grad_clip=0", "optim.weight_decay=0",
                        "optim.warmup_ratio=0", "optim.schedule=constant", "trainer.max_steps=8",
                        "trainer.eval_every=0", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=8",
                        "trainer.micro_batch_size=4", "data.max_length=64", "data.max_validation_rows=8",
                        "trainer.eval_generate_rows=0", "trainer.max_failures=0", *extra],
                       run_dir)  # max_failures=0: a retry would only fail again


def test_a_loss_that_overflows_stops_the_run_keeps_the_last_good_checkpoint_and_exports_nothing(
        ray_cluster, tiny_llama_dir, tmp_path):
    run = overflowing_run(tiny_llama_dir, tmp_path / "run")
    with pytest.raises(UserError, match=r"trainer\.max_nonfinite_steps=3") as raised:
        execute(run)
    message = str(raised.value)
    assert "optim.lr" in message and "optim.grad_clip" in message and "learning rate 1e+12" in message
    first_bad = int(re.search(r"from step (\d+) on", message).group(1))
    assert first_bad == 2  # the first step's loss comes from the initial weights, the second's from broken ones
    assert f"training stopped at step {first_bad + 2}:" in message and "for 3 step(s) in a row" in message
    assert not (tmp_path / "run" / "export").exists()
    # nothing was saved from the first non-finite step on: the newest checkpoint is the step before it
    kept = newest_complete_checkpoint([storage_root(run)])
    assert kept is not None and kept.step == first_bad - 1
    assert f"the checkpoint of step {first_bad - 1} is kept" in message
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["step"] == first_bad + 2  # it stopped at the third non-finite step in a row


def test_the_limit_is_a_validated_key(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"trainer\.max_nonfinite_steps=0 is not allowed: an integer >= 1"):
        compose_run([*tiny_llama_run(tiny_llama_dir), "trainer.max_nonfinite_steps=0"], tmp_path / "run")


def test_only_consecutive_non_finite_steps_count():
    """The guard itself (no Ray): a finite step ends the streak; the message names the first step of the last one."""
    from orchestrator.train_loop import NonFiniteSteps
    from orchestrator.train_state import StepMetrics

    guard = NonFiniteSteps(limit=2, checkpoint_every=0, saved_step=None, grad_clip=1.0)
    seen = [(step, guard.observe(step, StepMetrics(loss, lr=0.1 * step, tokens=1.0, seconds=1.0)), guard.exhausted())
            for step, loss in enumerate([1.0, float("nan"), 2.0, float("inf"), float("nan")], start=1)]
    assert seen == [(1, False, False), (2, True, False), (3, False, False), (4, True, False), (5, True, True)]
    message = guard.message()
    assert message.startswith("training stopped at step 5: the loss was not finite (nan) for 2 step(s) in a row "
                              "from step 4 on (trainer.max_nonfinite_steps=2), at learning rate 0.4;")
    assert "no checkpoint was saved before it (trainer.checkpoint_every=0)" in message
    assert "a smaller optim.grad_clip (it is 1)" in message
